"""select: the fastest passing candidate under a policy, and why every other one lost — said
plainly when no candidate beats eager PyTorch or when the figures are too noisy to rank on."""

from __future__ import annotations

from typing import Any

import numpy as np

from service import runtimes
from service.errors import ConversionError, KilnError
from service.runtimes.base import ArtifactInfo
from workers.benchmark import ratio
from workers.context import Candidate, Context, Selection
from workers.pipeline import StepLog
from workers.steps.benchmark import artifact_path, speedup_text


def _latency(c: Candidate) -> float:
    return c.benchmark[0].p50_ms


def _throughput(c: Candidate) -> float:
    return c.benchmark[-1].throughput


def _worst_rel(c: Candidate) -> float:
    return max((m.rel for m in c.validation.outputs.values()), default=0.0) if c.validation else float("inf")


def _versus(slower: Candidate, best: Candidate, last: bool = False) -> tuple[float, float, float]:
    """How many times faster `best` is than `slower`, from their paired rounds (first or last batch)."""
    i = -1 if last else 0
    a, b = slower.benchmark[i].round_p50_ms, best.benchmark[i].round_p50_ms
    if a and b and len(a) == len(b):
        return ratio(a, b)
    x = slower.benchmark[i].p50_ms / best.benchmark[i].p50_ms
    return x, x, x


def _in_process(ctx: Context, c: Candidate) -> bool:
    """Whether the candidate is served in the server's own process: a graph runtime's artifact. One
    that runs code (TorchScript, .pt2, AOTInductor) is served through an isolated runner, a process
    hop for every batch and a box of its own to schedule."""
    try:
        return not runtimes.get(ArtifactInfo.load(artifact_path(ctx, c)).runtime).runs_code
    except KilnError:
        return False


def _relative(eligible: list[Candidate], last: bool = False) -> dict[str, float]:
    """Each candidate's latency relative to the fastest of its round, median over the rounds: all
    were timed in the same interleaved rounds, so this ranks them under the same load round by
    round. Falls back to the plain p50 when their rounds do not pair up."""
    i = -1 if last else 0
    rounds = [c.benchmark[i].round_p50_ms for c in eligible]
    if not all(rounds) or len({len(r) for r in rounds}) != 1:
        return {c.id: c.benchmark[i].p50_ms for c in eligible}
    fastest = np.min(np.array(rounds), axis=0)
    return {c.id: float(np.median(np.array(r) / fastest)) for c, r in zip(eligible, rounds)}


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
        throughput = policy == "throughput"
        score = _relative(eligible, last=throughput)
        best = min(eligible, key=lambda c: score[c.id])
        # The benchmark times every artifact inside the box, where code-bearing ones run in-process
        # too; served, they go through an isolated runner. A graph runtime within the noise of such
        # a winner is served in the server's own process: it is the one to serve.
        runner_best = None
        if not _in_process(ctx, best):
            graphs = [
                c
                for c in eligible
                if c is not best and not _versus(c, best, last=throughput)[1] > 1.0 and _in_process(ctx, c)
            ]
            if graphs:
                runner_best, best = best, min(graphs, key=lambda c: score[c.id])
        ties = []
        for c in eligible:
            if c is best:
                continue
            mid, lo, _ = _versus(c, best, last=throughput)
            if c is runner_best:
                c.lost_because = (
                    f"{1 / mid:.2f}x as fast as {best.id}, within the noise, and it would be served through "
                    f"an isolated runner (its artifact runs code); {best.id} is served in the server's own process"
                )
                continue
            tied = not lo > 1.0
            if tied:
                ties.append(c.id)
            if throughput:
                c.lost_because = (
                    f"lower throughput at batch {c.benchmark[-1].batch}: {_throughput(c):.0f}/s "
                    f"vs {_throughput(best):.0f}/s"
                )
            else:
                c.lost_because = (
                    f"slower at batch {c.benchmark[0].batch}: p50 {_latency(c):.3g} ms vs "
                    f"{_latency(best):.3g} ms ({mid:.2f}x)"
                )
            if tied:
                c.lost_because += "; within the noise of the selected one"
        if throughput:
            why = f"highest throughput at batch {best.benchmark[-1].batch}: {_throughput(best):.0f} items/s"
        else:
            why = f"lowest p50 latency at batch {best.benchmark[0].batch}: {_latency(best):.3g} ms"
            if policy == "accuracy":
                why += f" within the accuracy budget {ctx.options.accuracy_budget:g}"
        if runner_best is not None:
            why += f"; preferred to {runner_best.id}, whose lead is within the noise and which runs code (served through an isolated runner)"
        best.lost_because = None
        beats: bool | None = None
        if best.speedup:
            low, high = best.speedup_low or best.speedup, best.speedup_high or best.speedup
            beats = low > 1.0
            if best.noisy:
                why += (
                    f"; {speedup_text(best)} eager PyTorch, but the figures are too noisy to rank on "
                    "(the machine was busy): rerun on a quieter machine before trusting them"
                )
            elif high < 1.0:
                why = (
                    f"no candidate is faster than eager PyTorch: the fastest, {best.id}, runs at "
                    f"{speedup_text(best)} eager speed; it is still the best artifact to serve (" + why + ")"
                )
            elif low <= 1.0:
                why += f"; no measurable speed-up over eager PyTorch ({speedup_text(best)})"
            else:
                why += f", {speedup_text(best)} eager PyTorch"
        elif best.noisy:
            why += "; the figures are too noisy to rank on: rerun on a quieter machine"
        if ties and not best.noisy:
            why += f"; {', '.join(ties)} {'is' if len(ties) == 1 else 'are'} within the noise of it"
        ctx.selection = Selection(policy=policy, candidate=best.id, reason=why, beats_eager=beats, noisy=best.noisy)
        log.info(f"selected {best.id}: {why}")
        for c in ctx.candidates:
            if c.lost_because:
                log.info(f"  {c.id}: {c.lost_because}")
        return {"selected": best.id, "beats_eager": beats, "noisy": best.noisy}
