"""validate: every built candidate against the eager reference on every sample, through the
same runtime class that will serve it."""

from __future__ import annotations

from typing import Any

from service.errors import ConversionError, KilnError
from service.samples import Sample
from workers.compilers import COMPILERS
from workers.context import Candidate, Context, Validation
from workers.pipeline import StepLog
from workers.sandboxed import load_references, load_samples
from workers.steps.compile import build_candidate
from workers.validation import degenerate_reference, output_kind, validate_artifact


class Validate:
    name = "validate"
    requires = ("compile",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        samples, refs = load_samples(ctx), load_references(ctx)
        ctx.degenerate = {}
        for o in ctx.signature.outputs:
            why = degenerate_reference(output_kind(o, refs[0][o.name]), [r[o.name] for r in refs])
            if why:
                ctx.degenerate[o.name] = why
                log.info(
                    f"{o.name}: {why}: the reference is degenerate; this validation proves little "
                    "- give real samples (or real weights)"
                )
        built = [c for c in ctx.candidates if c.status == "built"]
        for cand in built:
            self._rebuild_if_stale(ctx, cand, log)
        built = [c for c in built if c.status == "built"]
        for i, cand in enumerate(built):
            log.progress(i / len(built), f"validating {cand.id}")
            cand.validation = self._validate(ctx, cand, samples, refs)
            v = cand.validation
            summary = ", ".join(
                f"{n} ({m.kind}): max_abs {m.max_abs:.3g} cos {m.cosine:.6f}"
                + (f" top1 {m.top1:.3f} over {m.rows} rows" if m.top1 is not None else "")
                + (f" exact {m.exact:.4f}" if m.exact is not None else "")
                for n, m in v.outputs.items()
            )
            log.info(f"{cand.id}: {'PASS' if v.passed else 'FAIL'} ({v.reason or summary})")
        passed = [c.id for c in built if c.passed]
        if not passed:
            raise ConversionError(
                "no candidate passed validation: "
                + "; ".join(f"{c.id}: {c.validation.reason if c.validation else c.reason}" for c in ctx.candidates)
            )
        return {
            "passed": passed,
            "failed": [c.id for c in built if not c.passed],
            "samples": len(samples),
            "degenerate": ctx.degenerate,
        }

    def _rebuild_if_stale(self, ctx: Context, cand: Candidate, log: StepLog) -> None:
        """A TensorRT engine built on another GPU or TensorRT version (a job resumed on another
        worker) is rebuilt here rather than loaded."""
        try:
            why = COMPILERS[cand.target].stale(ctx, cand)
        except KilnError:  # e.g. no TensorRT here: loading it will say so
            why = None
        if why:
            log.info(f"{cand.id}: {why}; rebuilding")
            build_candidate(ctx, cand, log)
            ctx.save()

    def _validate(self, ctx: Context, cand: Candidate, samples: list[Sample], refs: list[Sample]) -> Validation:
        if cand.artifact_dir is None:
            raise ConversionError(f"{cand.id} is marked built but has no artifact directory")
        return validate_artifact(ctx, ctx.out / cand.artifact_dir, cand.precision, samples, refs)
