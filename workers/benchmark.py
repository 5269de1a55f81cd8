"""Timing loops shared by the eager baseline (in the sandbox) and candidates (in the worker)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure(fn: Callable[[], object], *, batch: int, seconds: float = 1.0, warmup: int = 3,
            min_iters: int = 10, max_iters: int = 10_000) -> dict[str, float | int]:
    """Latency percentiles and throughput of `fn` after warm-up, for about `seconds`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {
        "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "throughput": float(batch * len(ms) / (ms.sum() / 1e3)),
        "iterations": len(ms),
    }
