"""Int8 static quantization (QDQ) and its calibration data, shared by the ONNX Runtime compiler (its
int8 candidates) and the TensorRT compiler (the graph of a strongly typed int8 engine); the OpenVINO
compiler calibrates NNCF on the same samples (`calibration_indices`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import InvalidOptions
from service.signature import FLOAT_DTYPES
from workers.context import Context
from workers.sandboxed import load_samples


def calibration_batches(ctx: Context) -> list[dict[str, Any]]:
    """User samples when there are any, else the generated ones (mixed-sign values only)."""
    samples = load_samples(ctx)
    return [samples[i] for i in calibration_indices(ctx.sample_labels)]


def calibration_indices(labels: list[str]) -> list[int]:
    """Which of the samples (by their labels) calibrate: what `calibration_batches` returns, as
    indices into the samples file, for a sandbox op that reads the file itself (the openvino target)."""
    user = [i for i, label in enumerate(labels) if label.startswith("user")]
    if user:
        return user
    return [i for i, label in enumerate(labels) if label in ("min", "opt", "max")] or list(range(len(labels)))


def quantize_int8_static(
    ctx: Context, src: Path, work: Path, *, symmetric: bool = False, exclude: list[str] | None = None
) -> tuple[Path, int]:
    """Static int8 (QDQ) of `src`, calibrated on `calibration_batches(ctx)`; returns the quantized graph
    and how many batches calibrated it. `symmetric` (signed int8 activations) is what TensorRT takes;
    `exclude` names nodes to keep in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not any(s.dtype in FLOAT_DTYPES for s in ctx.signature.inputs) and not _has_float_weights(src):
        raise InvalidOptions("static int8 needs float activations to calibrate")
    batches = calibration_batches(ctx)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, Any]] = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    path = work / "int8-static.onnx"
    quantize_static(
        str(preprocess(src, work)),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude or None,
        reduce_range=True,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    return path, len(batches)


def preprocess(src: Path, work: Path) -> Path:
    """The graph ONNX Runtime's quantizers expect: shapes inferred, optimized for quantization."""
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # The quantization tools open sessions of their own, whose warnings ("Removing initializer")
    # go to stderr with terminal colour codes even into a pipe or a log: errors only.
    ort.set_default_logger_severity(3)
    path = work / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(path), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
        quant_pre_process(str(src), str(path), skip_symbolic_shape=True)
    return path


def _has_float_weights(path: Path) -> bool:
    import onnx

    return any(
        t.data_type == onnx.TensorProto.FLOAT for t in onnx.load(str(path), load_external_data=False).graph.initializer
    )
