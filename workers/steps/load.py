"""load: build the eager model, make or read samples, and record the reference outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from service import requirements
from service import samples as sample_io
from service.errors import InvalidSignature
from service.onnx_policy import check_onnx
from service.signature import Signature, TensorSpec, canonical_dtype
from workers.context import Context
from workers.pipeline import StepLog
from workers.sandboxed import produced, sandbox_dir, sandboxed, uploaded_model_file


class Load:
    name = "load"
    requires: tuple[str, ...] = ()

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        # Before any of the bundle's code is imported: this worker's environment may differ from the
        # API's, which checked the same requirements at upload.
        requirements.check(ctx.bundle.requirements, where="this worker")
        if ctx.bundle.requirements:
            log.info(f"requirements met: {', '.join(ctx.bundle.requirements)}")
        samples: list[tuple[str, dict]] = []
        if ctx.bundle.samples:
            user = sample_io.load(Path(ctx.bundle.samples))
            sample_io.check_against(ctx.signature, user, source="user sample")
            samples += [(f"user{i}", s) for i, s in enumerate(user)]
            log.info(f"{len(user)} user sample(s)")
        have = sum(sample_io.rows(ctx.signature, s) for _, s in samples)
        generated = sample_io.generate(ctx.signature, min_rows=sample_io.MIN_ROWS - have)
        samples += generated
        log.info(
            f"{len(generated)} generated sample(s) covering min/opt/max of "
            f"{', '.join(ctx.signature.dims) or 'static shapes'}, values of both signs; "
            f"{have + sum(sample_io.rows(ctx.signature, s) for _, s in generated)} rows in all"
        )
        samples_file = ctx.work / "samples.npz"
        ctx.samples_file = str(samples_file)
        ctx.sample_labels = [label for label, _ in samples]
        sample_io.save(samples_file, [s for _, s in samples])
        # The sandbox writes the references in its own directory; they are moved out of its reach before
        # anything reads them (a later op could otherwise swap the file for a link to a host file).
        reference_file = ctx.work / "reference.npz"
        ctx.reference_file = str(reference_file)

        if ctx.bundle.kind == "onnx":
            return self._onnx_reference(ctx, log, [s for _, s in samples], reference_file)
        written = sandbox_dir(ctx) / "reference.npz"
        result = sandboxed(ctx, "load", {"reference_file": str(written)}, log)
        os.replace(produced(ctx, str(written)), reference_file)
        refs = sample_io.load(reference_file)
        ctx.signature = with_outputs(ctx.signature, result["output_names"], refs, [s for _, s in samples])
        log.info(
            f"model built in {result['build_s']:.2f}s; {result.get('parameters') or 0:,} parameters; "
            f"outputs: {', '.join(o.name for o in ctx.signature.outputs)}"
        )
        return {
            "samples": len(samples),
            "outputs": [o.name for o in ctx.signature.outputs],
            "parameters": result.get("parameters"),
        }

    def _onnx_reference(self, ctx: Context, log: StepLog, samples: list[dict], reference_file: Path) -> dict[str, Any]:
        """An uploaded ONNX model is its own reference, run by ONNX Runtime at fp32 without optimizations."""
        import onnxruntime as ort

        model_file = uploaded_model_file(ctx)
        check_onnx(model_file)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        refs = []
        for i, s in enumerate(samples):
            try:
                refs.append(dict(zip(names, sess.run(names, s))))
            except Exception as exc:  # noqa: BLE001 - the signature does not fit the model
                raise InvalidSignature(
                    f"the ONNX model failed on sample #{i}: {str(exc).splitlines()[0][:300]}"
                ) from None
        sample_io.save(reference_file, refs)
        ctx.signature = with_outputs(ctx.signature, names, refs, samples)
        log.info(f"reference outputs from the uploaded ONNX model: {', '.join(names)}")
        return {"samples": len(samples), "outputs": names}


def with_outputs(
    sig: Signature, names: list[str], refs: list[dict[str, np.ndarray]], samples: list[dict[str, np.ndarray]]
) -> Signature:
    """The signature with every output's dtype and shape filled in from the reference outputs."""
    declared = {o.name: o for o in sig.outputs}
    sizes = [sizes_of(sig, s) for s in samples]
    outputs = []
    for name in names:
        arrays = [r[name] for r in refs]
        spec = declared.get(name, TensorSpec(name=name))
        if spec.shape and any(len(spec.shape) != a.ndim for a in arrays):
            raise InvalidSignature(
                f"output {name!r}: the signature gives rank {len(spec.shape)}, the model returns rank {arrays[0].ndim}"
            )
        dtype = spec.dtype or canonical_dtype(str(arrays[0].dtype))
        shape = spec.shape or _infer_shape(sig, name, arrays, sizes)
        outputs.append(TensorSpec(name=name, dtype=dtype, shape=shape, kind=spec.kind))
    data = sig.to_json()
    data["outputs"] = [o.model_dump(exclude_none=True) for o in outputs]
    return Signature.parse(data)


def sizes_of(sig: Signature, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """The size of every named dimension in one sample, read off its input shapes."""
    sizes: dict[str, int] = {}
    for spec in sig.inputs:
        for axis, d in enumerate(spec.shape or []):
            if isinstance(d, str):
                sizes[d] = sample[spec.name].shape[axis]
    return sizes


def _infer_shape(sig: Signature, name: str, arrays: list[np.ndarray], sizes: list[dict[str, int]]) -> list[int | str]:
    ranks = {a.ndim for a in arrays}
    if len(ranks) != 1:
        raise InvalidSignature(f"output {name!r} changes rank between samples: {sorted(ranks)}")
    shape: list[int | str] = []
    for axis in range(ranks.pop()):
        values = [a.shape[axis] for a in arrays]
        if len(set(values)) == 1:
            shape.append(values[0])
            continue
        match = next((d for d in sig.dims if all(s.get(d) == v for s, v in zip(sizes, values))), None)
        shape.append(match or re.sub(r"\W", "_", name) + f"_d{axis}")
    return shape
