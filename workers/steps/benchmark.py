"""benchmark: latency and throughput at batch 1 and the opt and max of the batch dimension, for
eager PyTorch (in the sandbox) and every passing candidate (through its runtime), in one run."""

from __future__ import annotations

import os
from typing import Any

from service import runtimes
from service import samples as sample_io
from service.config import get_settings
from workers.benchmark import measure
from workers.context import BenchPoint, Context
from workers.pipeline import StepLog
from workers.steps.common import sandboxed


def bench_threads(ctx: Context) -> int:
    return ctx.options.threads or get_settings().threads or os.cpu_count() or 1


class Benchmark:
    name = "benchmark"
    requires = ("validate",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        threads = bench_threads(ctx)
        batches = sample_io.batch_sizes(ctx.signature, ctx.options.batch_sizes)
        seconds = ctx.options.bench_seconds
        passing = [c for c in ctx.candidates if c.passed]
        total = len(passing) + (0 if ctx.bundle.kind == "onnx" else 1)
        log.info(f"batch sizes {batches}, {threads} thread(s), ~{seconds:.1f}s per point")
        if ctx.bundle.kind != "onnx":
            log.progress(0, "eager baseline")
            result = sandboxed(ctx, "benchmark_eager", {"batch_sizes": batches, "seconds": seconds,
                                                        "threads": threads}, log)
            ctx.eager_benchmark = [BenchPoint(**p) for p in result["points"]]
            log.info("eager: " + _fmt(ctx.eager_benchmark))
        for i, cand in enumerate(passing):
            log.progress((i + 1) / total, f"benchmarking {cand.id}")
            rt = runtimes.load(ctx.out / cand.artifact_dir, threads=threads)
            try:
                cand.benchmark = []
                for b in batches:
                    inputs = sample_io.at_batch(ctx.signature, b)
                    cand.benchmark.append(BenchPoint(**measure(lambda: rt.run(inputs), batch=b, seconds=seconds)))
            finally:
                rt.close()
            if ctx.eager_benchmark:
                cand.speedup = ctx.eager_benchmark[0].p50_ms / cand.benchmark[0].p50_ms
            log.info(f"{cand.id}: {_fmt(cand.benchmark)}"
                     + (f"; {cand.speedup:.2f}x eager at batch {batches[0]}" if cand.speedup else ""))
            ctx.save()
        return {"batch_sizes": batches, "threads": threads,
                "eager_p50_ms": ctx.eager_benchmark[0].p50_ms if ctx.eager_benchmark else None}


def _fmt(points: list[BenchPoint]) -> str:
    return ", ".join(f"b{p.batch} p50 {p.p50_ms:.2f}ms p99 {p.p99_ms:.2f}ms {p.throughput:.0f}/s" for p in points)
