"""Sample inputs and reference outputs: generation from a signature, and `.npz` files.

A sample is one dict of named arrays (a batch). A file holds several samples under keys
``"<index>/<name>"``; a user's file may also hold plain ``"<name>"`` keys (one sample).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.errors import InvalidBundle, InvalidSignature
from service.signature import FLOAT_DTYPES, Signature, numpy_dtype

Sample = dict[str, np.ndarray]


# Rows (items along the batch dimension, over all samples) that validation statistics such as
# top-1 agreement need: one flipped row in 64 is 1.6%.
MIN_ROWS = 64


def rows(signature: Signature, sample: Sample) -> int:
    """Items along the batch dimension in one sample (1 without a batch dimension)."""
    if not signature.batch_dim:
        return 1
    first = signature.inputs[0]
    return int(sample[first.name].shape[0])


def generate(signature: Signature, seed: int = 0, min_rows: int = 0) -> list[tuple[str, Sample]]:
    """Samples covering min, opt and max of every dynamic dimension, with values of both signs,
    and then more at the opt sizes (labelled rowsN) until they hold `min_rows` rows together.

    Besides mixed-sign values, the opt size comes once all positive and once all negative so
    that data-dependent branches such as ``if x.sum() > 0`` are taken both ways.
    """
    rng = np.random.default_rng(seed)
    plan = [("min", "min", 0), ("opt", "opt", 0), ("max", "max", 0), ("opt+", "opt", 1), ("opt-", "opt", -1)]
    samples = []
    for label, point, sign in plan:
        sizes = signature.sizes_at(point)
        samples.append(
            (
                label,
                {
                    spec.name: _values(
                        rng, spec.dtype or "float32", signature.concrete_shape(spec, sizes), spec.value_range, sign
                    )
                    for spec in signature.inputs
                },
            )
        )
    have = sum(rows(signature, s) for _, s in samples)
    bd = signature.batch_dim
    while have < min_rows:
        batch = max(signature.dims[bd].min, min(signature.dims[bd].max, min_rows - have)) if bd else 1
        sizes = signature.sizes_at("opt", **({bd: batch} if bd else {}))
        samples.append(
            (
                f"rows{len(samples)}",
                {
                    spec.name: _values(
                        rng, spec.dtype or "float32", signature.concrete_shape(spec, sizes), spec.value_range, 0
                    )
                    for spec in signature.inputs
                },
            )
        )
        have += batch
    return samples


def _values(rng: np.random.Generator, dtype: str, shape: tuple[int, ...], value_range, sign: int) -> np.ndarray:
    if dtype in FLOAT_DTYPES:
        x = rng.standard_normal(shape).astype(np.float32)
        if sign:
            x = np.abs(x) * sign
        if value_range:
            lo, hi = value_range
            x = lo + (hi - lo) * (np.tanh(x) + 1) / 2
        return x.astype(numpy_dtype(dtype))
    if dtype == "bool":
        return rng.random(shape) > 0.5
    lo, hi = value_range or ((0, 100) if dtype not in ("int8",) else (-100, 100))
    if dtype == "uint8":
        lo, hi = max(lo, 0), min(hi, 256)
    return rng.integers(int(lo), int(hi), size=shape).astype(numpy_dtype(dtype))


def save(path: Path, samples: Iterable[Sample]) -> None:
    arrays = {f"{i}/{name}": arr for i, sample in enumerate(samples) for name, arr in sample.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle flag
    tmp.replace(path)


def load(path: Path) -> list[Sample]:
    """Samples from an `.npz` file (never unpickling: object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            items = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidBundle(f"samples file {path.name} is not a readable .npz: {exc}") from None
    if not items:
        raise InvalidBundle(f"samples file {path.name} holds no arrays")
    if all("/" not in k for k in items):
        return [items]
    grouped: dict[int, Sample] = {}
    for key, arr in items.items():
        idx, _, name = key.partition("/")
        if not idx.isdigit() or not name:
            raise InvalidBundle(f"samples file {path.name}: key {key!r} is neither '<input>' nor '<index>/<input>'")
        grouped.setdefault(int(idx), {})[name] = arr
    return [grouped[i] for i in sorted(grouped)]


def check_against(signature: Signature, samples: list[Sample], *, source: str = "samples") -> None:
    """Every sample has every input, with the signature's rank, static sizes and dtype kind."""
    for i, sample in enumerate(samples):
        for spec in signature.inputs:
            if spec.name not in sample:
                raise InvalidSignature(f"{source} #{i} has no input {spec.name!r} (it has {', '.join(sample)})")
            arr = sample[spec.name]
            shape = spec.shape or []
            if arr.ndim != len(shape):
                raise InvalidSignature(
                    f"{source} #{i}: input {spec.name!r} has rank {arr.ndim}, the signature says {len(shape)} ({shape})"
                )
            for axis, (want, got) in enumerate(zip(shape, arr.shape)):
                if isinstance(want, int) and want != got:
                    raise InvalidSignature(
                        f"{source} #{i}: input {spec.name!r} axis {axis} is {got}, the signature says {want}"
                    )


def at_batch(signature: Signature, batch: int, seed: int = 1) -> Sample:
    """One input batch at the opt size of every dimension, with the batch dimension set to `batch`."""
    rng = np.random.default_rng(seed)
    over = {signature.batch_dim: batch} if signature.batch_dim else {}
    sizes = signature.sizes_at("opt", **over)
    return {
        s.name: _values(rng, s.dtype or "float32", signature.concrete_shape(s, sizes), s.value_range, 0)
        for s in signature.inputs
    }


def batch_sizes(signature: Signature, requested: list[int] | None = None) -> list[int]:
    """Batch sizes to benchmark: 1 and the opt and max of the batch dimension (or what was asked)."""
    if requested:
        return requested
    if not signature.batch_dim:
        return [1]
    r = signature.dims[signature.batch_dim]
    return sorted({max(r.min, 1), r.opt, r.max})
