"""capture: TorchScript by trace and by script, and torch.export; notice frozen branches.

Tracing records one path through data-dependent control flow and silently freezes it. It is
caught two ways: the tracer's own warnings, and disagreement with eager on the samples, which
take both sides of sign-dependent branches. A capture that keeps control flow is preferred.
"""

from __future__ import annotations

from typing import Any

from service.errors import ConversionError
from workers.context import CaptureRecord, Context, Hazard
from workers.pipeline import SkipStep, StepLog
from workers.sandboxed import sandboxed

# capture method, hazard kind, what failed, what to do
FAILED_CAPTURE_HAZARDS = (
    (
        "export",
        "value_branch",
        "torch.export",
        "Rewrite that branch with torch.cond for a torch.export capture; the other captures are used meanwhile",
    ),
    (
        "trace",
        "untraceable",
        "torch.jit.trace",
        "A trace needs that computed without the mode and torch.vmap, by broadcasting the index tensors (for a "
        "Hugging Face model: a mask function without vmap registered in transformers' AttentionMaskInterface, as "
        "Optimum's ONNX export does); the other captures are used meanwhile",
    ),
)


class Capture:
    name = "capture"
    requires = ("load",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        if ctx.bundle.kind == "onnx":
            raise SkipStep("the upload is already an ONNX graph")
        result = sandboxed(ctx, "capture", {"out_dir": str(ctx.work / "sandbox" / "captures")}, log)
        ctx.captures = [CaptureRecord(**r) for r in result["captures"]]
        for c in ctx.captures:
            if not c.ok:
                log.info(f"{c.method}: failed: {c.error}")
            else:
                verdict = "agrees with eager" if c.agrees else f"DISAGREES on {', '.join(c.disagreeing_samples)}"
                log.info(
                    f"{c.method}: {verdict} (max abs {c.max_abs if c.max_abs is not None else 'n/a'}, {c.seconds:.2f}s)"
                )
        ctx.hazards = [
            h for h in ctx.hazards if h.kind not in ("frozen_branch", "tracer_warning", "value_branch", "untraceable")
        ]
        # a failed capture whose hint says where and why: a hazard, with the way out
        for method, kind, what, action in FAILED_CAPTURE_HAZARDS:
            failed = ctx.capture(method)
            if failed and not failed.ok and failed.hint:
                ctx.hazards.append(Hazard(kind=kind, detail=f"{what} failed: {failed.hint}", action=action))
                log.info(f"hazard: {ctx.hazards[-1].detail}")
        ctx.preferred_capture = prefer(ctx.captures)
        trace = ctx.capture("trace")
        if trace and trace.ok and (not trace.agrees or trace.warnings):
            ctx.hazards.append(frozen_branch_hazard(trace, ctx.preferred_capture))
            log.info(f"hazard: {ctx.hazards[-1].detail} -> {ctx.hazards[-1].action}")
        if not any(c.ok for c in ctx.captures):
            raise ConversionError("no capture succeeded: " + "; ".join(f"{c.method}: {c.error}" for c in ctx.captures))
        log.info(f"preferred capture: {ctx.preferred_capture or 'none agrees with eager'}")
        return {
            "preferred": ctx.preferred_capture,
            "hazards": [h.kind for h in ctx.hazards],
            "captures": {c.method: ("agrees" if c.agrees else "disagrees") if c.ok else "failed" for c in ctx.captures},
        }


def prefer(captures: list[CaptureRecord]) -> str | None:
    """A clean trace; else a faithful script (keeps control flow); else any faithful capture."""
    good = {c.method: c for c in captures if c.ok and c.agrees}
    if "trace" in good and not good["trace"].warnings:
        return "trace"
    for method in ("script", "trace", "export"):
        if method in good:
            return method
    return None


def frozen_branch_hazard(trace: CaptureRecord, preferred: str | None) -> Hazard:
    if not trace.agrees:
        detail = (
            f"torch.jit.trace froze data-dependent control flow: the trace disagrees with eager on "
            f"sample(s) {', '.join(trace.disagreeing_samples)}"
        )
        kind = "frozen_branch"
    else:
        detail = "torch.jit.trace warned that the trace may not generalise, though it agreed on every sample"
        kind = "tracer_warning"
    if trace.warnings:
        detail += f" (tracer: {trace.warnings[0]})"
    if preferred and preferred != "trace":
        action = (
            f"The trace was discarded; Kiln uses torch.jit.{preferred}, which keeps the control flow "
            "and agrees with eager on every sample"
        )
    elif preferred == "trace":
        action = "Kept the trace because it agreed with eager on every sample, including both branch directions"
    else:
        action = "No capture agrees with eager: TorchScript candidates cannot be built"
    return Hazard(kind=kind, detail=detail, action=action)
