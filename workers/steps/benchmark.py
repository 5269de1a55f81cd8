"""benchmark: latency and throughput at batch 1 and the opt and max of the batch dimension, for
eager PyTorch (in the sandbox) and every passing candidate (through its runtime), in one run.

On a GPU host eager PyTorch is also measured on CUDA at fp32 and fp16, and a CUDA candidate's
speed-up is against eager fp32 on CUDA; a CPU candidate's against eager on the CPU. Runtimes
take and return numpy arrays, so every GPU timing includes the copies in and out and ends when
the outputs are on the host.
"""

from __future__ import annotations

import os
from typing import Any

from service import runtimes
from service import samples as sample_io
from service.config import get_settings
from service.errors import KilnError
from service.runtimes.base import ArtifactInfo
from workers.benchmark import measure
from workers.context import BenchPoint, Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import sandboxed

# Eager precisions measured on a GPU host, the first being the baseline of CUDA candidates.
CUDA_EAGER_PRECISIONS = ("fp32", "fp16")


def bench_threads(ctx: Context) -> int:
    return ctx.options.threads or get_settings().threads or os.cpu_count() or 1


def candidate_device(ctx: Context, cand: Candidate) -> str:
    """Where a built candidate computes: "cpu" or "cuda"."""
    return runtimes.compute_device(ArtifactInfo.load(ctx.out / cand.artifact_dir))


class Benchmark:
    name = "benchmark"
    requires = ("validate",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        threads = bench_threads(ctx)
        batches = sample_io.batch_sizes(ctx.signature, ctx.options.batch_sizes)
        seconds = ctx.options.bench_seconds
        passing = [c for c in ctx.candidates if c.passed]
        devices = {c.id: candidate_device(ctx, c) for c in passing}
        on_cuda = any(d == "cuda" for d in devices.values())
        on_cpu = any(d == "cpu" for d in devices.values())
        eager = ctx.bundle.kind != "onnx"
        total = len(passing) + (on_cpu + on_cuda if eager else 0)
        log.info(f"batch sizes {batches}, {threads} thread(s), ~{seconds:.1f}s per point")
        if eager and (on_cpu or not on_cuda):
            log.progress(0, "eager baseline")
            result = sandboxed(ctx, "benchmark_eager", {"batch_sizes": batches, "seconds": seconds,
                                                        "threads": threads}, log)
            ctx.eager_benchmark = [BenchPoint(**p) for p in result["points"]]
            log.info("eager: " + _fmt(ctx.eager_benchmark))
        if eager and on_cuda:
            log.progress(0, "eager baselines on CUDA")
            ctx.eager_baselines = self._cuda_eager(ctx, batches, seconds, threads, log)
        for i, cand in enumerate(passing):
            log.progress((i + 1) / max(total, 1), f"benchmarking {cand.id}")
            rt = runtimes.load(ctx.out / cand.artifact_dir, threads=threads)
            try:
                cand.benchmark = []
                for b in batches:
                    inputs = sample_io.at_batch(ctx.signature, b)
                    cand.benchmark.append(BenchPoint(**measure(lambda: rt.run(inputs), batch=b, seconds=seconds)))
            finally:
                rt.close()
            baseline = (ctx.eager_baselines.get(f"cuda-{CUDA_EAGER_PRECISIONS[0]}")
                        if devices[cand.id] == "cuda" else ctx.eager_benchmark)
            if baseline:
                cand.speedup = baseline[0].p50_ms / cand.benchmark[0].p50_ms
            log.info(f"{cand.id}: {_fmt(cand.benchmark)}"
                     + (f"; {cand.speedup:.2f}x eager{' on CUDA' if devices[cand.id] == 'cuda' else ''} "
                        f"at batch {batches[0]}" if cand.speedup else ""))
            ctx.save()
        return {"batch_sizes": batches, "threads": threads,
                "eager_p50_ms": ctx.eager_benchmark[0].p50_ms if ctx.eager_benchmark else None,
                **({"eager_cuda_p50_ms": {k: v[0].p50_ms for k, v in ctx.eager_baselines.items() if v}}
                   if ctx.eager_baselines else {})}

    def _cuda_eager(self, ctx: Context, batches: list[int], seconds: float, threads: int,
                    log: StepLog) -> dict[str, list[BenchPoint]]:
        """Eager PyTorch on CUDA at fp32 and fp16, in one sandbox run. A baseline that cannot be
        measured is logged, and the candidates are still benchmarked."""
        try:
            result = sandboxed(ctx, "benchmark_eager", {"batch_sizes": batches, "seconds": seconds, "threads": threads,
                                                        "device": "cuda", "precisions": list(CUDA_EAGER_PRECISIONS)}, log)
        except KilnError as exc:
            log.info(f"eager PyTorch on CUDA could not be measured: {exc}")
            return {}
        for precision, error in (result.get("errors") or {}).items():
            log.info(f"eager PyTorch on CUDA at {precision} could not be measured: {error}")
        baselines = {f"cuda-{p}": [BenchPoint(**x) for x in points] for p, points in result["by_precision"].items()}
        for key, points in baselines.items():
            log.info(f"eager {key}: {_fmt(points)}")
        return baselines


def _fmt(points: list[BenchPoint]) -> str:
    return ", ".join(f"b{p.batch} p50 {p.p50_ms:.2f}ms p99 {p.p99_ms:.2f}ms {p.throughput:.0f}/s" for p in points)
