"""Numerical comparison of a candidate's outputs with the eager reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service import runtimes
from service.options import Tolerance
from workers.context import Context, OutputMetrics, Validation


def looks_like_scores(ref: np.ndarray, static_last_dim: bool) -> bool:
    """Class scores or logits: float, at least 2-D, a static last axis of 2 or more classes."""
    return ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2 and static_last_dim


class OutputComparison:
    """Accumulates one output's errors over all samples."""

    def __init__(self, scores: bool) -> None:
        self.scores = scores
        self.max_abs = 0.0
        self.rel = 0.0
        self.cosine = 1.0
        self.bound_excess = -np.inf  # max over samples of max_abs - (atol + rtol*max|ref|)
        self.top1_hits = 0
        self.top1_total = 0
        self.worst_ref_scale = 0.0

    def add(self, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> None:
        if got.shape != ref.shape:
            raise ValueError(f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
        a = got.astype(np.float64).ravel()
        b = ref.astype(np.float64).ravel()
        if not np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
            self.max_abs = self.rel = float("inf")
            self.cosine = -1.0
            return
        diff = np.abs(a - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        ref_norm = float(np.linalg.norm(b))
        diff_norm = float(np.linalg.norm(a - b))
        rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else diff_norm / 1e-12)
        na, nb = float(np.linalg.norm(a)), ref_norm
        cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        scale = float(np.abs(b).max()) if b.size else 0.0
        self.max_abs = max(self.max_abs, max_abs)
        self.rel = max(self.rel, rel)
        self.cosine = min(self.cosine, cos)
        if tol.atol is not None or tol.rtol is not None:
            bound = (tol.atol or 0.0) + (tol.rtol or 0.0) * scale
            self.bound_excess = max(self.bound_excess, max_abs - bound)
        if self.scores:
            ga = got.reshape(-1, got.shape[-1]).argmax(-1)
            gb = ref.reshape(-1, ref.shape[-1]).argmax(-1)
            self.top1_hits += int((ga == gb).sum())
            self.top1_total += int(ga.size)

    def result(self, tol: Tolerance) -> OutputMetrics:
        top1 = self.top1_hits / self.top1_total if self.top1_total else None
        failed = []
        if self.bound_excess > 0:
            failed.append(f"max abs error {self.max_abs:.3g} > atol {tol.atol} + rtol {tol.rtol} x |ref|")
        if tol.min_cosine is not None and not self.cosine >= tol.min_cosine:
            failed.append(f"cosine {self.cosine:.6f} < {tol.min_cosine}")
        if tol.min_top1 is not None and top1 is not None and top1 < tol.min_top1:
            failed.append(f"top-1 agreement {top1:.4f} < {tol.min_top1}")
        if not np.isfinite(self.max_abs):
            failed.append("non-finite outputs")
        return OutputMetrics(max_abs=self.max_abs, rel=self.rel, cosine=self.cosine, top1=top1,
                             passed=not failed, tolerance=tol, failed_checks=failed)


def validate_artifact(ctx: Context, directory: Path, precision: str, samples: list, refs: list) -> Validation:
    """Run a built artifact on every sample through its runtime and compare it with the references,
    against the tolerances for its precision on the device it runs on."""
    try:
        rt = runtimes.load(directory, threads=ctx.options.threads)
    except Exception as exc:  # noqa: BLE001 - a candidate that does not load fails validation
        return Validation(passed=False, samples=0, reason=f"the runtime could not load it: {_line(exc)}")
    device = runtimes.compute_device(rt.info) if rt.info else "cpu"
    static_last = {o.name: bool(o.shape) and isinstance(o.shape[-1], int) for o in ctx.signature.outputs}
    tols = {o.name: ctx.options.tolerance_for(precision, o.name, device) for o in ctx.signature.outputs}
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
