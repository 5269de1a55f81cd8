"""select: the fastest passing candidate under a policy, and why every other one lost."""

from __future__ import annotations

from typing import Any

from service.errors import ConversionError
from workers.context import Candidate, Context, Selection
from workers.pipeline import StepLog


def _latency(c: Candidate) -> float:
    return c.benchmark[0].p50_ms


def _throughput(c: Candidate) -> float:
    return c.benchmark[-1].throughput


def _worst_rel(c: Candidate) -> float:
    return max((m.rel for m in c.validation.outputs.values()), default=0.0) if c.validation else float("inf")


class Select:
    name = "select"
    requires = ("benchmark",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        policy = ctx.options.policy
        eligible = [c for c in ctx.candidates if c.passed and c.benchmark]
        for c in ctx.candidates:
            if c.status != "built":
                c.lost_because = f"not built: {c.reason}"
            elif not c.passed:
                c.lost_because = f"failed validation: {c.validation.reason if c.validation else 'not validated'}"
        if policy == "accuracy":
            budget = ctx.options.accuracy_budget
            for c in eligible:
                if _worst_rel(c) > budget:
                    c.lost_because = f"relative error {_worst_rel(c):.3g} is over the accuracy budget {budget:g}"
            eligible = [c for c in eligible if _worst_rel(c) <= budget]
        if not eligible:
            ctx.selection = Selection(policy=policy, candidate=None, reason="no candidate passed and was benchmarked")
            raise ConversionError(ctx.selection.reason)
        if policy == "throughput":
            best = max(eligible, key=_throughput)
            for c in eligible:
                if c is not best:
                    c.lost_because = (f"lower throughput at batch {c.benchmark[-1].batch}: {_throughput(c):.0f}/s "
                                      f"vs {_throughput(best):.0f}/s")
            why = f"highest throughput at batch {best.benchmark[-1].batch}: {_throughput(best):.0f} items/s"
        else:
            best = min(eligible, key=_latency)
            for c in eligible:
                if c is not best:
                    c.lost_because = (f"slower at batch {c.benchmark[0].batch}: p50 {_latency(c):.3g} ms vs "
                                      f"{_latency(best):.3g} ms ({_latency(c) / _latency(best):.2f}x)")
            why = f"lowest p50 latency at batch {best.benchmark[0].batch}: {_latency(best):.3g} ms"
            if policy == "accuracy":
                why += f" within the accuracy budget {ctx.options.accuracy_budget:g}"
        best.lost_because = None
        if best.speedup:
            why += f", {best.speedup:.2f}x eager PyTorch"
        ctx.selection = Selection(policy=policy, candidate=best.id, reason=why)
        log.info(f"selected {best.id}: {why}")
        for c in ctx.candidates:
            if c.lost_because:
                log.info(f"  {c.id}: {c.lost_because}")
        return {"selected": best.id}
