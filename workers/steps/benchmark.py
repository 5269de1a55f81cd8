"""benchmark: latency and throughput at batch 1 and the opt and max of the batch dimension, for
eager PyTorch and every passing candidate, timed in one sandboxed process in interleaved rounds
(workers/benchmark.py), so that a busy machine slows every contender alike.

On a GPU host eager PyTorch is also measured on CUDA at fp32 and fp16, and a CUDA candidate's
speed-up is against eager fp32 on CUDA; a CPU candidate's against eager on the CPU. Runtimes
take and return numpy arrays, so every GPU timing includes the copies in and out and ends when
the outputs are on the host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service import runtimes
from service import samples as sample_io
from service.config import get_settings
from service.runtimes.base import ArtifactInfo
from workers.benchmark import BUSY_SHARE, NOISY_RATIO, busy_share, noisy, ratio
from workers.benchmark import speedup_text as benchmark_text
from workers.context import BenchPoint, Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import sandboxed

# Eager precisions measured on a GPU host, the first being the baseline of CUDA candidates.
CUDA_EAGER_PRECISIONS = ("fp32", "fp16")
EAGER = "eager"


def bench_threads(ctx: Context) -> int:
    return ctx.options.threads or get_settings().threads or os.cpu_count() or 1


def candidate_device(ctx: Context, cand: Candidate) -> str:
    """Where a built candidate computes: "cpu" or "cuda"."""
    return runtimes.compute_device(ArtifactInfo.load(artifact_path(ctx, cand)))


def artifact_path(ctx: Context, cand: Candidate) -> Path:
    """Where a built candidate's artifact lies."""
    return ctx.out / (cand.artifact_dir or cand.id)


class Benchmark:
    name = "benchmark"
    requires = ("validate",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        threads = bench_threads(ctx)
        batches = sample_io.batch_sizes(ctx.signature, ctx.options.batch_sizes)
        passing = [c for c in ctx.candidates if c.passed]
        devices = {c.id: candidate_device(ctx, c) for c in passing}
        on_cuda = any(d == "cuda" for d in devices.values())
        eager: list[dict[str, str]] = []
        if ctx.bundle.kind != "onnx":
            if not on_cuda or any(d == "cpu" for d in devices.values()):
                eager.append({"id": EAGER, "device": "cpu", "precision": "fp32"})
            if on_cuda:
                eager += [{"id": f"{EAGER}-cuda-{p}", "device": "cuda", "precision": p} for p in CUDA_EAGER_PRECISIONS]
        baseline = {
            c.id: (f"{EAGER}-cuda-{CUDA_EAGER_PRECISIONS[0]}" if devices[c.id] == "cuda" else EAGER) for c in passing
        }
        contenders = len(eager) + len(passing)
        # The same total time as timing each point alone for bench_seconds; stable figures stop early.
        budget = ctx.options.bench_seconds * contenders
        log.info(
            f"batch sizes {batches}, {threads} thread(s); {contenders} contender(s) timed in interleaved "
            f"rounds, ~{budget:.1f}s per batch size (up to twice that while the figures are unsettled)"
        )
        log.progress(0, "timing eager PyTorch and the candidates in interleaved rounds")
        result = sandboxed(
            ctx,
            "benchmark",
            {
                "batch_sizes": batches,
                "threads": threads,
                "budget_s": budget,
                "eager": eager,
                "artifacts": [{"id": c.id, "dir": str(artifact_path(ctx, c))} for c in passing],
                "pairs": [[baseline[c.id], c.id] for c in passing],
            },
            log,
            readable=[artifact_path(ctx, c) for c in passing],
        )
        points = {name: [BenchPoint(**p) for p in pts] for name, pts in result["points"].items()}
        for name, error in result["errors"].items():
            log.info(f"{name} could not be timed: {error}")
        ctx.eager_benchmark = points.get(EAGER, [])
        ctx.eager_baselines = {
            k.removeprefix(f"{EAGER}-"): v for k, v in points.items() if k.startswith(f"{EAGER}-cuda-")
        }
        if ctx.eager_benchmark:
            log.info("eager: " + _fmt(ctx.eager_benchmark))
        for key, pts in ctx.eager_baselines.items():
            log.info(f"eager {key}: {_fmt(pts)}")
        busy = busy_share(result.get("load_before") or {}, result.get("load_after") or {})
        noisy_ids = []
        for cand in passing:
            cand.benchmark = points.get(cand.id, [])
            cand.speedup = cand.speedup_low = cand.speedup_high = None
            cand.noisy = False
            if cand.id in result["errors"]:
                cand.lost_because = f"could not be timed: {result['errors'][cand.id]}"
            base = points.get(baseline[cand.id])
            if base and cand.benchmark:
                mid, lo, hi = ratio(base[0].round_p50_ms, cand.benchmark[0].round_p50_ms)
                cand.speedup, cand.speedup_low, cand.speedup_high = mid, lo, hi
                cand.noisy = noisy(lo, hi)
            elif cand.benchmark and cand.benchmark[0].p50_low_ms:
                cand.noisy = noisy(cand.benchmark[0].p50_low_ms, cand.benchmark[0].p50_high_ms or 0.0)
            if busy is not None and busy > BUSY_SHARE and cand.benchmark:
                cand.noisy = True
            if cand.noisy:
                noisy_ids.append(cand.id)
            log.info(
                f"{cand.id}: {_fmt(cand.benchmark)}"
                + (
                    f"; {speedup_text(cand)} eager{' on CUDA' if devices[cand.id] == 'cuda' else ''} "
                    f"at batch {batches[0]}"
                    if cand.speedup
                    else ""
                )
            )
        rounds = max((p.rounds or 0 for pts in points.values() for p in pts), default=0)
        ctx.benchmark_conditions = {
            "method": "interleaved rounds",
            "rounds": rounds,
            "budget_s_per_batch": budget,
            "threads": result.get("threads"),
            "load_before": result.get("load_before"),
            "load_after": result.get("load_after"),
            "noisy": noisy_ids,
            "noisy_ratio": NOISY_RATIO,
            "cpu_busy_share": busy,
            "busy_share_limit": BUSY_SHARE,
        }
        if busy is not None and busy > BUSY_SHARE:
            log.info(
                f"the machine was busy: other work waited for a CPU {busy:.0%} of the time; every figure is "
                "marked noisy (rerun on a quieter machine for precise figures)"
            )
        elif noisy_ids:
            log.info(
                f"noisy: the spread of {', '.join(noisy_ids)} is too wide to rank on "
                f"(interval wider than {NOISY_RATIO:g}x); rerun on a quieter machine for precise figures"
            )
        ctx.save()
        return {
            "batch_sizes": batches,
            "threads": threads,
            "rounds": rounds,
            "noisy": noisy_ids,
            "eager_p50_ms": ctx.eager_benchmark[0].p50_ms if ctx.eager_benchmark else None,
            **(
                {"eager_cuda_p50_ms": {k: v[0].p50_ms for k, v in ctx.eager_baselines.items() if v}}
                if ctx.eager_baselines
                else {}
            ),
        }


def speedup_text(cand: Candidate) -> str:
    return benchmark_text(cand.speedup, cand.speedup_low, cand.speedup_high, cand.noisy)


def _fmt(points: list[BenchPoint]) -> str:
    return ", ".join(f"b{p.batch} p50 {p.p50_ms:.2f}ms p99 {p.p99_ms:.2f}ms {p.throughput:.0f}/s" for p in points)
