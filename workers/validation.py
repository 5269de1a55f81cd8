"""Numerical comparison of a candidate's outputs with the eager reference, by what each output is.

Class scores are judged by top-1 and top-k agreement over rows (besides cosine and error bounds),
embeddings and hidden states by cosine and relative error (an argmax over hidden units means
nothing), other floats by error bounds, ids and masks by exact agreement. A reference that cannot
discriminate (one class for every row, outputs that barely change with the input) is flagged:
agreeing with it proves little.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from service import runtimes
from service.options import Tolerance
from service.signature import TensorSpec
from workers.context import Context, OutputMetrics, Validation

# Rows of class scores the statistics need (one flipped row in 64 is 1.6%).
MIN_ROWS = 64
TOP_K = 5
_SCORE_NAME = re.compile(r"logit|score|prob|class|pred|cls", re.IGNORECASE)


def looks_like_scores(ref: np.ndarray, static_last_dim: bool) -> bool:
    """Class scores or logits by shape: float, at least 2-D, a static last axis of 2 or more classes."""
    return ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2 and static_last_dim


def output_kind(spec: TensorSpec, ref: np.ndarray) -> str:
    """The kind the signature gives, else: integers are ids, booleans masks; a float output is class
    scores only when it is 2-D with a static class axis and named like scores or logits; any other
    float output is compared as an embedding (cosine and relative error)."""
    if spec.kind:
        return spec.kind
    if ref.dtype.kind == "b":
        return "mask"
    if ref.dtype.kind in "iu":
        return "ids"
    shape = spec.shape or []
    static_last = bool(shape) and isinstance(shape[-1], int)
    if ref.ndim == 2 and looks_like_scores(ref, static_last) and _SCORE_NAME.search(spec.name):
        return "scores"
    return "embedding"


class OutputComparison:
    """Accumulates one output's errors over all samples."""

    def __init__(self, kind: str | bool) -> None:
        # a bool is the old spelling: True for class scores
        self.kind = ("scores" if kind else "regression") if isinstance(kind, bool) else kind
        self.scores = self.kind == "scores"
        self.max_abs = 0.0
        self.rel = 0.0
        self.cosine = 1.0
        self.bound_excess = -np.inf  # max over samples of max_abs - (atol + rtol*max|ref|)
        self.top1_hits = 0
        self.topk_hits = 0
        self.top1_total = 0
        self.equal = 0
        self.elements = 0

    def add(self, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> None:
        if got.shape != ref.shape:
            raise ValueError(f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
        if self.kind in ("ids", "mask"):
            self.equal += int((got == ref).sum())
            self.elements += int(ref.size)
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
        if self.scores and ref.ndim >= 1 and ref.shape[-1] >= 2:
            ga = got.reshape(-1, got.shape[-1])
            gb = ref.reshape(-1, ref.shape[-1]).argmax(-1)
            self.top1_hits += int((ga.argmax(-1) == gb).sum())
            k = min(TOP_K, ga.shape[-1] - 1) or 1
            topk = np.argpartition(-ga, k - 1, axis=-1)[:, :k]
            self.topk_hits += int((topk == gb[:, None]).any(-1).sum())
            self.top1_total += int(gb.size)

    def result(self, tol: Tolerance) -> OutputMetrics:
        top1 = self.top1_hits / self.top1_total if self.top1_total else None
        topk = self.topk_hits / self.top1_total if self.top1_total else None
        exact = self.equal / self.elements if self.elements else None
        failed = []
        exact_kind = self.kind in ("ids", "mask")
        if exact_kind:
            if tol.min_exact is not None and exact is not None and exact < tol.min_exact:
                failed.append(f"exact agreement {exact:.4f} < {tol.min_exact}")
        else:
            if self.bound_excess > 0:
                failed.append(f"max abs error {self.max_abs:.3g} > atol {tol.atol} + rtol {tol.rtol} x |ref|")
            if tol.min_cosine is not None and not self.cosine >= tol.min_cosine:
                failed.append(f"cosine {self.cosine:.6f} < {tol.min_cosine}")
            if tol.max_rel is not None and not self.rel <= tol.max_rel:
                failed.append(f"relative error {self.rel:.3g} > {tol.max_rel}")
        if tol.min_top1 is not None and top1 is not None and top1 < tol.min_top1:
            failed.append(f"top-1 agreement {top1:.4f} < {tol.min_top1} over {self.top1_total} rows")
        if tol.min_topk is not None and topk is not None and topk < tol.min_topk:
            failed.append(f"top-{TOP_K} agreement {topk:.4f} < {tol.min_topk} over {self.top1_total} rows")
        if not np.isfinite(self.max_abs):
            failed.append("non-finite outputs")
        return OutputMetrics(
            max_abs=self.max_abs,
            rel=self.rel,
            cosine=self.cosine,
            top1=top1,
            topk=topk,
            exact=exact,
            rows=self.top1_total or None,
            kind=self.kind,
            passed=not failed,
            tolerance=tol,
            failed_checks=failed,
        )


def degenerate_reference(kind: str, refs: list[np.ndarray]) -> str | None:
    """Why the reference outputs cannot tell a right candidate from a wrong one, or None."""
    refs = [r for r in refs if r.size]
    if not refs:
        return None
    if kind == "scores":
        classes = np.concatenate([r.reshape(-1, r.shape[-1]).argmax(-1) for r in refs])
        if classes.size >= 2 and np.unique(classes).size == 1:
            return f"the reference predicts class {int(classes[0])} for every one of its {classes.size} rows"
    flat = np.concatenate([r.astype(np.float64).ravel() for r in refs])
    if np.all(flat == flat[0]):
        return f"the reference output is the constant {flat[0]:.4g} for every input"
    if kind in ("ids", "mask"):
        return None
    # How much the output changes with the input, next to its magnitude: rows of equal length are
    # compared across every sample (the batch rows and the samples of one shape).
    rows: dict[int, list[np.ndarray]] = {}
    for r in refs:
        m = r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1)
        rows.setdefault(m.shape[1], []).extend(m.astype(np.float64))
    spread, magnitude = 0.0, float(np.sqrt(np.mean(flat**2))) or 1.0
    for group in rows.values():
        if len(group) >= 2:
            spread = max(spread, float(np.mean(np.std(np.stack(group), axis=0))))
    if spread < 1e-3 * magnitude:
        return f"the reference barely changes with the input (spread {spread:.2g} against magnitude {magnitude:.2g})"
    return None


def validate_artifact(ctx: Context, directory: Path, precision: str, samples: list, refs: list) -> Validation:
    """Run a built artifact on every sample through its runtime and compare it with the references,
    against the tolerances for its precision on the device it runs on and each output's kind."""
    try:
        rt = runtimes.load(directory, threads=ctx.options.threads)
    except Exception as exc:  # noqa: BLE001 - a candidate that does not load fails validation
        return Validation(passed=False, samples=0, reason=f"the runtime could not load it: {_line(exc)}")
    device = runtimes.compute_device(rt.info) if rt.info else "cpu"
    kinds = {o.name: output_kind(o, refs[0][o.name]) for o in ctx.signature.outputs}
    tols = {o.name: ctx.options.tolerance_for(precision, o.name, device, kinds[o.name]) for o in ctx.signature.outputs}
    comps = {n: OutputComparison(kinds[n]) for n in tols}
    try:
        for label, sample, ref in zip(ctx.sample_labels, samples, refs):
            try:
                got = rt.run(sample)
            except Exception as exc:  # noqa: BLE001 - e.g. a shape the artifact froze
                return Validation(passed=False, samples=0, reason=f"failed on sample {label}: {_line(exc)}")
            for name, comp in comps.items():
                try:
                    comp.add(got[name], ref[name], tols[name])
                except (KeyError, ValueError) as exc:
                    return Validation(passed=False, samples=0, reason=f"output {name} on sample {label}: {exc}")
    finally:
        rt.close()
    outputs = {n: c.result(tols[n]) for n, c in comps.items()}
    failed = [f"{n}: {'; '.join(m.failed_checks)}" for n, m in outputs.items() if not m.passed]
    return Validation(passed=not failed, samples=len(samples), outputs=outputs, reason="; ".join(failed) or None)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
