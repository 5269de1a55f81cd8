"""Timing that survives a busy machine: contenders measured in interleaved rounds, paired ratios
with an interval, and a verdict when the spread is too wide to rank.

Eager PyTorch's OpenMP threads slow down far more under load than ONNX Runtime's, so timing one
contender after another takes a burst of load for a property of the model. Here every contender is
warmed up until its latency settles, then the contenders take turns in short blocks (A, B, C, B, C,
A, ...; the order rotates each round) until consecutive windows of rounds agree or the time budget
is spent. A speed-up is the median of the per-round ratios (both sides measured seconds apart, so
under the same load) with a distribution-free ~95% interval for that median.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# An interval wider than this (high / low) cannot rank contenders: the figure is reported as noisy.
NOISY_RATIO = 1.3
# Share of the time that other work waited for a CPU (the kernel's pressure stall information) above
# which the machine counts as busy: contenders then differ in how they suffer from it (eager PyTorch's
# thread team far more than ONNX Runtime's), so even a narrow interval is reported as noisy.
BUSY_SHARE = 0.2
MIN_ROUNDS = 7
MAX_ROUNDS = 200


@dataclass
class Timings:
    """One contender's calls at one batch size."""

    batch: int
    calls: list[float] = field(default_factory=list)  # seconds per call
    rounds: list[float] = field(default_factory=list)  # median seconds per call, one per round

    def point(self) -> dict[str, float | int | list[float]]:
        ms = np.array(self.calls) * 1e3
        rounds = np.array(self.rounds) * 1e3
        lo, hi = median_interval(list(rounds))
        p50 = float(np.median(rounds))
        return {
            "batch": self.batch,
            # the median of the per-round medians: every round weighs the same, however many calls it took
            "p50_ms": p50,
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "throughput": float(self.batch * 1e3 / p50),  # items per second at the median latency
            "iterations": len(ms),
            "rounds": len(rounds),
            "p50_low_ms": lo,
            "p50_high_ms": hi,
            "round_p50_ms": [round(float(r), 6) for r in rounds],
        }


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free interval for the median (order statistics of a binomial(n, 1/2)): about
    95% for z = 1.96; the whole range for fewer than ~7 values."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return (math.nan, math.nan)
    j = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return (float(v[j]), float(v[n - 1 - j]))


def ratio(baseline: list[float], other: list[float]) -> tuple[float, float, float]:
    """The speed-up of `other` over `baseline` from paired per-round figures: median and interval."""
    pairs = [b / o for b, o in zip(baseline, other) if o > 0]
    if not pairs:
        return (math.nan, math.nan, math.nan)
    lo, hi = median_interval(pairs)
    return (float(np.median(pairs)), lo, hi)


def noisy(low: float, high: float) -> bool:
    """Whether an interval is too wide to rank on (or not finite)."""
    return not (low > 0 and math.isfinite(high)) or high / low > NOISY_RATIO


def _warm(fn: Callable[[], object], cap_s: float) -> float:
    """Call `fn` until two consecutive windows of calls agree within 10% (or `cap_s` passes);
    return the settled latency in seconds."""
    window, prev = [], None
    deadline = time.perf_counter() + cap_s
    fn()  # first call: allocation, lazy initialisation, kernel selection
    while True:
        t0 = time.perf_counter()
        fn()
        window.append(time.perf_counter() - t0)
        if len(window) == 5:
            med = float(np.median(window))
            if (prev is not None and abs(med - prev) <= 0.1 * prev) or time.perf_counter() > deadline:
                return med
            prev, window = med, []


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    batch: int,
    budget_s: float,
    min_rounds: int = MIN_ROUNDS,
    pairs: list[tuple[str, str]] | None = None,
    pause_s: float = 0.002,
) -> dict[str, Timings]:
    """Time every contender at one batch size in interleaved rounds.

    Rounds go on until at least `min_rounds` are done and the budget is spent, or earlier once
    consecutive windows agree (every contender's median over the last third of the rounds within
    5% of the third before it, and every ratio of `pairs` (baseline, other) narrower than
    NOISY_RATIO) and half the budget is spent. Figures that have not settled run on to twice the
    budget, and are then reported with the spread they have.
    """
    names = list(contenders)
    start = time.perf_counter()
    settled = {n: _warm(contenders[n], cap_s=max(0.05, budget_s / (4 * len(names)))) for n in names}
    # Blocks short next to how fast load changes on a shared machine, long enough to time.
    block_s = min(0.05, max(0.005, budget_s / (len(names) * 3 * min_rounds)))
    per_block = {n: max(1, min(200, round(block_s / max(settled[n], 1e-6)))) for n in names}
    out = {n: Timings(batch) for n in names}
    for r in range(MAX_ROUNDS):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            fn, times = contenders[n], []
            block_end = time.perf_counter() + 2 * block_s  # a contender that slowed down keeps its turn short
            for _ in range(per_block[n]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                if t0 + times[-1] > block_end:
                    break
            out[n].calls += times
            out[n].rounds.append(float(np.median(times)))
            if pause_s:
                time.sleep(pause_s)  # let the last contender's spinning threads go idle
        done = r + 1
        elapsed = time.perf_counter() - start
        if done < min_rounds:
            continue
        if (_agree(out, pairs or []) and elapsed >= budget_s / 2) or elapsed >= 2 * budget_s:
            break
    return out


def _agree(out: dict[str, Timings], pairs: list[tuple[str, str]]) -> bool:
    for t in out.values():
        w = max(2, len(t.rounds) // 3)
        if len(t.rounds) < 2 * w:
            return False
        last, before = np.median(t.rounds[-w:]), np.median(t.rounds[-2 * w : -w])
        if abs(last - before) > 0.05 * before:
            return False
    for base, other in pairs:
        _, lo, hi = ratio(out[base].rounds, out[other].rounds)
        if noisy(lo, hi):
            return False
    return True


def machine_load() -> dict[str, float | int | None]:
    """The load averages, CPU count and the kernel's CPU stall counter now (recorded before and after
    benchmarking)."""
    one: float | None
    five: float | None
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        one = five = None
    return {"load_1m": one, "load_5m": five, "cpus": os.cpu_count(), "stall_us": cpu_stall_us(), "at": time.monotonic()}


def cpu_stall_us() -> int | None:
    """Microseconds during which some runnable task waited for a CPU, since boot (/proc/pressure/cpu),
    or None where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as f:
            line = f.readline()
        return int(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def busy_share(before: dict, after: dict) -> float | None:
    """The share of the time between two machine_load() readings that some task waited for a CPU."""
    if before.get("stall_us") is None or after.get("stall_us") is None:
        return None
    wall = (after["at"] - before["at"]) * 1e6
    return max(0.0, (after["stall_us"] - before["stall_us"]) / wall) if wall > 0 else None


def speedup_text(speedup: float | None, low: float | None, high: float | None, is_noisy: bool) -> str:
    """A speed-up as a reader should take it: "2.86x (2.71-3.02)", or marked noisy."""
    if not speedup:
        return ""
    if low is None or high is None:
        return f"{speedup:.2f}x"
    span = f"{low:.2f}-{high:.2f}"
    return f"~{speedup:.1f}x noisy ({span})" if is_noisy else f"{speedup:.2f}x ({span})"
