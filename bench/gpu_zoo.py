"""Convert the zoo's CNN (ResNet-18-sized, 224x224) and transformer encoder for every GPU candidate
this machine's libraries allow, and print one table: latency at each batch size against eager
PyTorch on CUDA at fp32 and fp16, measured in the same run, with the accuracy figures beside them.

    python bench/gpu_zoo.py [--seconds 0.3] [--models cnn,transformer] [--devices cuda] [--small]

Candidates a library is missing for are listed as unavailable, with the reason. `--small` uses the
zoo's small variants (for a quick look on a CPU: `--small --devices cpu`).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import engine  # noqa: E402 - after the sys.path set-up above
from workers.context import BenchPoint, Context  # noqa: E402 - after the sys.path set-up above

MODELS = {"cnn": "cnn.py", "transformer": "transformer.py"}


def signature_of(path: Path, attr: str) -> dict:
    tree = ast.parse(path.read_text())
    consts = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.targets[0], ast.Name)
    }
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == attr)
    return eval(ast.unparse(node.value), {"__builtins__": {}}, consts)  # noqa: S307 - literals only


def rows(name: str, ctx: Context, batches: list[int]) -> list[list[str]]:
    """Table rows for one model: its eager baselines, then every candidate."""
    base = ctx.eager_baselines.get("cuda-fp32") or ctx.eager_benchmark
    half = ctx.eager_baselines.get("cuda-fp16")

    def timings(points: list[BenchPoint]) -> list[str]:
        by_batch = {p.batch: p.p50_ms for p in points}
        return [f"{by_batch[b]:.3f}" if b in by_batch else "" for b in batches]

    def ratio(points: list[BenchPoint], ref: list[BenchPoint] | None) -> str:
        if not points or not ref:
            return ""
        return f"{ref[0].p50_ms / points[0].p50_ms:.2f}x"

    out = []
    for key, points in [("eager-" + k, v) for k, v in ctx.eager_baselines.items()] + (
        [("eager-cpu-fp32", ctx.eager_benchmark)] if ctx.eager_benchmark else []
    ):
        out.append([name, key, "baseline", *timings(points), ratio(points, base), ratio(points, half), "", "", ""])
    for c in ctx.candidates:
        v = c.validation
        outs = list(v.outputs.values()) if v else []
        status = c.status if c.status != "built" else ("pass" if c.passed else "FAIL")
        note = (c.reason if c.status != "built" else (v.reason if v and not v.passed else "")) or ""
        note = note or "; ".join(n for n in c.notes if n.startswith("kept at fp32"))
        accuracy = [f"{max(o.max_abs for o in outs):.3g}", f"{min(o.cosine for o in outs):.6f}"] if outs else ["", ""]
        out.append(
            [
                name,
                c.id,
                status,
                *timings(c.benchmark),
                ratio(c.benchmark, base),
                ratio(c.benchmark, half),
                *accuracy,
                note[:90],
            ]
        )
    return out


def print_table(header: list[str], body: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(line.format(*r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.3, help="timing per benchmark point")
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--precisions", default="fp32,fp16,bf16,int8")
    ap.add_argument("--targets", default="onnxruntime,torchscript,tensorrt,torch_export,aotinductor")
    ap.add_argument("--devices", default="cuda")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--small", action="store_true", help="the zoo's small variants")
    ap.add_argument("--keep", type=Path, help="keep the outputs here")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kiln-gpu-bench-"))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    body: list[list[str]] = []
    header = [
        "model",
        "candidate",
        "status",
        *[f"b{b} p50 ms" for b in batches],
        "vs eager fp32",
        "vs eager fp16",
        "max abs",
        "cosine",
        "note",
    ]
    for name in args.models.split(","):
        src = ROOT / "tests" / "zoo" / MODELS[name]
        entry, sig = ("build_small", "SMALL_SIGNATURE") if args.small else ("build_model", "SIGNATURE")
        t0 = time.perf_counter()
        ctx = engine.convert(
            src,
            base / name,
            entry=f"{MODELS[name]}:{entry}",
            signature=signature_of(src, sig),
            options={
                "targets": args.targets.split(","),
                "precisions": args.precisions.split(","),
                "devices": args.devices.split(","),
                "bench_seconds": args.seconds,
                "batch_sizes": batches,
            },
        )
        steps = ", ".join(f"{s.name} {s.duration_s:.0f}s" for s in ctx.steps if s.duration_s is not None)
        print(
            f"== {name}: {time.perf_counter() - t0:.0f}s ({steps}); selected "
            f"{ctx.selection.candidate if ctx.selection else None}",
            flush=True,
        )
        for s in ctx.steps:
            if s.status == "failed":
                print(f"   step {s.name} failed: {s.error}", flush=True)
            for line in s.log.splitlines():
                if "could not be measured" in line or "rebuilding with" in line:
                    print(f"   {s.name}: {line.strip()}", flush=True)
        model_rows = rows(name, ctx, batches)
        print_table(header, model_rows)
        print(flush=True)
        body += model_rows
    print("All models:")
    print_table(header, body)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
