"""The conversion report: one JSON document and a readable summary."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from service.states import JobStatus
from workers.benchmark import speedup_text
from workers.context import Context

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"


def environment() -> dict[str, Any]:
    versions = {}
    for dist in (
        "kiln",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "numpy",
        "tensorrt",
        "onnxruntime-gpu",
        "openvino",
        "nncf",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cpu, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):  # better than platform.processor()'s bare architecture
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(
        f
        for f in flags
        if f in {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "isa": isa,
        "versions": versions,
    }


def build_report(ctx: Context) -> dict[str, Any]:
    data = json.loads(ctx.model_dump_json())
    status = JobStatus.SUCCEEDED if ctx.selection and ctx.selection.candidate else JobStatus.FAILED
    failed = next((s for s in ctx.steps if s.status == "failed"), None)
    return {"status": status, "error": failed.error if failed and status == "failed" else None, **data}


def write(ctx: Context) -> dict[str, Any]:
    report = build_report(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    tmp = ctx.out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(ctx.out / REPORT_FILE)
    (ctx.out / SUMMARY_FILE).write_text(summary(report))
    return report


def summary(report: dict[str, Any]) -> str:
    """A Markdown summary: steps, hazards, candidates and the selection."""
    lines = [f"# Kiln conversion: {report['status']}", ""]
    if report.get("error"):
        lines += [f"**Error:** {report['error']}", ""]
    lines += ["## Steps", "", "| step | status | time | note |", "|---|---|---|---|"]
    for s in report["steps"]:
        t = f"{s['duration_s']:.2f}s" if s.get("duration_s") is not None else ""
        lines.append(f"| {s['name']} | {s['status']} | {t} | {(s.get('error') or '').replace('|', '/')[:160]} |")
    if report["hazards"]:
        lines += ["", "## Hazards", ""]
        lines += [f"- **{h['kind']}**: {h['detail']}. {h['action']}." for h in report["hazards"]]
    if report.get("degenerate"):
        lines += ["", "## Validation", ""]
        lines += [f"- **{name}**: {line}" for name, line in degenerate_lines(report)]
    eager = report.get("eager_benchmark") or []
    lines += [
        "",
        "## Candidates",
        "",
        "| candidate | status | max abs | cosine | top-1 | p50 b1 (ms) | speed-up | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if eager:
        lines.append(f"| eager PyTorch | baseline | | | | {eager[0]['p50_ms']:.3g} | 1.00x | |")
    for c in report["candidates"]:
        v = c.get("validation") or {}
        outs = list((v.get("outputs") or {}).values())
        status = c["status"] if c["status"] != "built" else ("pass" if v.get("passed") else "FAIL")
        max_abs = f"{max(o['max_abs'] for o in outs):.3g}" if outs else ""
        cos = f"{min(o['cosine'] for o in outs):.6f}" if outs else ""
        top1s = [o["top1"] for o in outs if o.get("top1") is not None]
        top1 = f"{min(top1s):.3f}" if top1s else ""
        p50 = f"{c['benchmark'][0]['p50_ms']:.3g}" if c.get("benchmark") else ""
        sp = speedup_text(c.get("speedup"), c.get("speedup_low"), c.get("speedup_high"), c.get("noisy", False))
        note = (
            c.get("lost_because") or c.get("reason") or "selected"
            if c["id"] == (report.get("selection") or {}).get("candidate")
            else c.get("lost_because") or c.get("reason") or ""
        )
        lines.append(
            f"| {c['id']} | {status} | {max_abs} | {cos} | {top1} | {p50} | {sp} | {str(note).replace('|', '/')[:160]} |"
        )
    fused = [c for c in report["candidates"] if c.get("fused_ops")]
    if fused:
        lines += ["", "Fused operators in the ONNX Runtime artifacts of this transformer:", ""]
        lines += [f"- {c['id']}: " + ", ".join(f"{op} x{n}" for op, n in c["fused_ops"].items()) for c in fused]
    cond = report.get("benchmark_conditions") or {}
    if cond:
        lines += ["", conditions_line(cond)]
    sel = report.get("selection")
    if sel:
        lines += ["", f"**Selected:** {sel['candidate'] or 'none'} ({sel['policy']} policy): {sel['reason']}"]
    return "\n".join(lines) + "\n"


def conditions_line(cond: dict[str, Any]) -> str:
    """How the figures were taken, in one line: rounds, threads, the machine's load, the verdict."""
    threads = cond.get("threads") or {}
    before, after = cond.get("load_before") or {}, cond.get("load_after") or {}
    load = (
        f"load {before.get('load_1m', 0):.2f} -> {after.get('load_1m', 0):.2f} on {before.get('cpus')} CPUs"
        if before.get("load_1m") is not None
        else "load unknown"
    )
    noisy = cond.get("noisy") or []
    busy = cond.get("cpu_busy_share")
    why = (
        f"the machine was busy: other work waited for a CPU {busy:.0%} of the time"
        if busy is not None and busy > (cond.get("busy_share_limit") or 1)
        else f"interval wider than {cond.get('noisy_ratio')}x"
    )
    verdict = f"NOISY: {', '.join(noisy)} ({why}); rerun on a quieter machine" if noisy else "figures settled"
    return (
        f"Timed in {cond.get('rounds')} interleaved rounds, {threads.get('runtimes', '?')} thread(s), "
        f"{load}; speed-ups are medians of per-round ratios with a ~95% interval; {verdict}."
    )


DEGENERATE = "the reference is degenerate; this validation proves little - give real samples (or real weights)"


def degenerate_lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(output, warning) for every output whose reference cannot discriminate."""
    return [(name, f"{why}: {DEGENERATE}") for name, why in (report.get("degenerate") or {}).items()]
