"""validate: every built candidate against the eager reference on every sample, through the
same runtime class that will serve it."""

from __future__ import annotations

from typing import Any

from service import runtimes
from service.errors import ConversionError
from workers.context import Context, Validation
from workers.pipeline import StepLog
from workers.steps.common import load_references, load_samples
from workers.validation import OutputComparison, looks_like_scores


class Validate:
    name = "validate"
    requires = ("compile",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        samples, refs = load_samples(ctx), load_references(ctx)
        built = [c for c in ctx.candidates if c.status == "built"]
        for i, cand in enumerate(built):
            log.progress(i / len(built), f"validating {cand.id}")
            cand.validation = self._validate(ctx, cand, samples, refs)
            v = cand.validation
            summary = ", ".join(f"{n}: max_abs {m.max_abs:.3g} cos {m.cosine:.6f}"
                                + (f" top1 {m.top1:.3f}" if m.top1 is not None else "")
                                for n, m in v.outputs.items())
            log.info(f"{cand.id}: {'PASS' if v.passed else 'FAIL'} ({v.reason or summary})")
        passed = [c.id for c in built if c.passed]
        if not passed:
            raise ConversionError("no candidate passed validation: " + "; ".join(
                f"{c.id}: {c.validation.reason if c.validation else c.reason}" for c in ctx.candidates))
        return {"passed": passed, "failed": [c.id for c in built if not c.passed]}

    def _validate(self, ctx: Context, cand, samples, refs) -> Validation:
        try:
            rt = runtimes.load(ctx.out / cand.artifact_dir, threads=ctx.options.threads)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not load fails validation
            return Validation(passed=False, samples=0, reason=f"the runtime could not load it: {_line(exc)}")
        static_last = {o.name: bool(o.shape) and isinstance(o.shape[-1], int) for o in ctx.signature.outputs}
        tols = {o.name: ctx.options.tolerance_for(cand.precision, o.name) for o in ctx.signature.outputs}
        comps = {n: OutputComparison(looks_like_scores(refs[0][n], static_last[n])) for n in tols}
        try:
            for label, sample, ref in zip(ctx.sample_labels, samples, refs):
                try:
                    got = rt.run(sample)
                except Exception as exc:  # noqa: BLE001 - e.g. a shape the artifact froze
                    return Validation(passed=False, samples=0,
                                      reason=f"failed on sample {label}: {_line(exc)}")
                for name, comp in comps.items():
                    try:
                        comp.add(got[name], ref[name], tols[name])
                    except (KeyError, ValueError) as exc:
                        return Validation(passed=False, samples=0, reason=f"output {name} on sample {label}: {exc}")
        finally:
            rt.close()
        outputs = {n: c.result(tols[n]) for n, c in comps.items()}
        failed = [f"{n}: {'; '.join(m.failed_checks)}" for n, m in outputs.items() if not m.passed]
        return Validation(passed=not failed, samples=len(samples), outputs=outputs,
                          reason="; ".join(failed) or None)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
