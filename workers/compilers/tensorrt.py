"""TensorRT candidates: an engine built from the exported ONNX model for the GPU of this worker.

The builder parses the ONNX graph, adds the optimization profiles made from the signature's
min/opt/max (`service.runtimes.tensorrt.optimization_profiles`), sets the precision and builds with
a timing cache kept under the data directory, one per GPU model and TensorRT version.

Precision, by what the installed TensorRT offers:

- TensorRT 10 ("weakly typed" builds): the FP16 / BF16 / INT8 builder flags. int8 uses the
  graph's own Q/DQ nodes when it has them (explicit quantization), and otherwise an entropy
  calibrator fed with the job's sample inputs at the profile's opt shapes.
- TensorRT 11 and later keep only strongly typed networks: the ONNX graph carries the precision,
  so fp16 is the graph converted to float16 and int8 a symmetric Q/DQ graph calibrated on the
  samples (through ONNX Runtime's quantizer). bf16 needs a bf16 graph, which Kiln does not make.

A lower-precision engine is run on every sample before it is kept. When it fails the tolerances,
layers feeding the failing outputs are kept at fp32 (precision-sensitive kinds first: softmax,
normalization, reductions, exp/log/pow; then the layers closest to the output; then all of them)
and the engine is rebuilt; the candidate's notes say which layers. The pure parts of this (the
build mode, the choice of layers, calibration inputs) are functions tested on the CPU.

The engine records the GPU model and TensorRT version it was built with; the runtime refuses to
load it anywhere else, and the validate step rebuilds a candidate whose engine is stale.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import samples as sample_io
from service.artifacts import sha256_file
from service.config import get_settings
from service.errors import ConversionError, InvalidOptions
from service.runtimes.base import ArtifactInfo
from service.runtimes.tensorrt import Profile, current_stamp, engine_mismatch, engine_stamp, optimization_profiles
from service.signature import Signature
from workers.compilers.gpu import require_tensorrt
from workers.compilers.int8 import calibration_batches, quantize_int8_static
from workers.compilers.onnxruntime import quantized_nodes
from workers.context import Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import load_references, load_samples
from workers.validation import validate_artifact

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ENGINE_FILE = "model.plan"
TIMING_CACHE_DIR = "cache/tensorrt"
# Layer kinds whose results lose most in lower precision (TensorRT LayerType names and ONNX op types).
SENSITIVE_KINDS = frozenset(
    {
        "SOFTMAX",
        "NORMALIZATION",
        "REDUCE",
        "UNARY",
        "TOPK",
        "RAGGED_SOFTMAX",
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "Pow",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Erf",
        "Div",
    }
)
# Layers that compute nothing in floating point, so there is no precision to keep.
NO_PRECISION_KINDS = frozenset(
    {"CONSTANT", "SHAPE", "Constant", "Shape", "QuantizeLinear", "DequantizeLinear", "Cast", "CAST"}
)
MAX_FALLBACK_ROUNDS = 3


# --- pure decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildMode:
    """How one precision is built with the installed TensorRT."""

    precision: str
    strongly_typed: bool
    flags: tuple[str, ...] = ()  # BuilderFlag member names
    graph: str | None = None  # strongly typed: how the ONNX graph is rewritten first ("fp16" or "qdq")
    calibrate: bool = False  # weakly typed int8 without Q/DQ nodes: entropy calibration on the samples

    @property
    def explains(self) -> str:
        if self.calibrate:
            return "int8 (entropy calibration on the sample inputs) with fp16, by builder flags"
        if self.strongly_typed:
            how = {
                "fp16": "the ONNX graph converted to float16",
                "qdq": "a symmetric Q/DQ graph calibrated on the sample inputs",
                None: "the graph's own types",
            }[self.graph]
            return f"strongly typed network: {how}"
        return f"builder flags {', '.join(self.flags) or 'none (fp32; TF32 allowed)'}"


def weak_typing(trt: Any) -> bool:
    """Whether this TensorRT still has the FP16/INT8 builder flags (10.x does; 11 dropped them)."""
    return all(hasattr(trt.BuilderFlag, f) for f in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"))


def build_mode(precision: str, *, weak: bool, has_qdq: bool) -> BuildMode:
    """The build for `precision`: builder flags on TensorRT 10, graph rewrites on strongly typed ones."""
    if precision not in PRECISIONS:
        raise InvalidOptions(f"precision {precision} is not built for TensorRT")
    if weak:
        flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}[precision]
        return BuildMode(precision, strongly_typed=False, flags=flags, calibrate=precision == "int8" and not has_qdq)
    if precision == "bf16":
        raise ConversionError(
            "this TensorRT builds strongly typed networks only, where bf16 needs a bf16 ONNX "
            "graph, which Kiln does not make; build fp16, or bf16 with the torchscript target"
        )
    graph = {"fp32": None, "fp16": "fp16", "int8": None if has_qdq else "qdq"}[precision]
    return BuildMode(precision, strongly_typed=True, graph=graph)


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a network (or node of an ONNX graph): what the fp32 fallback needs to know."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: bool = True  # it computes in floating point, so it can be kept at fp32


def feeding(layers: Sequence[LayerInfo], outputs: Iterable[str]) -> list[int]:
    """Indices (in network order) of the layers that the given tensors depend on."""
    producer = {t: i for i, layer in enumerate(layers) for t in layer.outputs}
    seen: set[int] = set()
    stack = [producer[t] for t in outputs if t in producer]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(producer[t] for t in layers[i].inputs if t in producer)
    return sorted(seen)


def choose_fp32_layers(
    layers: Sequence[LayerInfo], failing_outputs: Iterable[str], pinned: Iterable[str], round_: int
) -> set[str]:
    """The layers to keep at fp32 in fallback round `round_` (from 1), among those feeding the failing
    outputs: precision-sensitive kinds; then also the half closest to the outputs; then all."""
    candidates = [
        layers[i]
        for i in feeding(layers, failing_outputs)
        if layers[i].float_outputs and layers[i].kind not in NO_PRECISION_KINDS
    ]
    chosen = {layer.name for layer in candidates if layer.kind in SENSITIVE_KINDS}
    if round_ >= 2:
        chosen |= {layer.name for layer in candidates[len(candidates) // 2 :]}
    if round_ >= 3:
        chosen |= {layer.name for layer in candidates}
    return set(pinned) | chosen


def next_fp32_layers(
    layers: Sequence[LayerInfo], failing_outputs: Iterable[str], pinned: set[str], round_: int
) -> tuple[set[str], int]:
    """The first round from `round_` on that keeps more layers at fp32, and that set; the same set and
    a round past the last when nothing more can be kept."""
    failing = list(failing_outputs)
    for r in range(round_, MAX_FALLBACK_ROUNDS + 1):
        chosen = choose_fp32_layers(layers, failing, pinned, r)
        if chosen - pinned:
            return chosen, r
    return set(pinned), MAX_FALLBACK_ROUNDS + 1


def describe_fp32_layers(layers: Sequence[LayerInfo], names: Iterable[str], limit: int = 8) -> str:
    """'12 layers (SOFTMAX x4, NORMALIZATION x8): name, name, ...' for a candidate's notes."""
    wanted = set(names)
    kept = [layer for layer in layers if layer.name in wanted]
    kinds: dict[str, int] = {}
    for layer in kept:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    listed = ", ".join(layer.name for layer in kept[:limit]) + (", ..." if len(kept) > limit else "")
    return f"{len(kept)} layer(s) ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}): {listed}"


def calibration_inputs(batches: Sequence[Mapping[str, np.ndarray]], profile: Profile) -> list[dict[str, np.ndarray]]:
    """The batches whose shapes are the profile's opt shapes: TensorRT calibrates at those."""
    opt = {name: shapes[1] for name, shapes in profile.items()}
    return [dict(b) for b in batches if all(tuple(b[n].shape) == s for n, s in opt.items() if n in b)]


def describe_onnx(model: Any) -> list[LayerInfo]:
    """The nodes of an ONNX graph as layers (strongly typed builds keep ONNX nodes at fp32)."""
    return [
        LayerInfo(name=n.name, kind=n.op_type, inputs=tuple(i for i in n.input if i), outputs=tuple(n.output))
        for n in model.graph.node
        if n.name
    ]


def timing_cache_file(stamp: Mapping[str, str]) -> Path:
    """One timing cache per GPU model and TensorRT version, under the data directory."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{stamp['gpu']}-sm{stamp['compute_capability']}-trt{stamp['tensorrt']}")
    return get_settings().data_dir.resolve() / TIMING_CACHE_DIR / f"timing-{slug.strip('-')}.cache"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- TensorRT itself (runs only where it is installed) ------------------------------------------


def _enum_name(value: Any) -> str:
    return getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]


def describe_network(network: Any) -> list[LayerInfo]:
    """The layers of a parsed TensorRT network."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = tuple(t.name for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        floats = all(_enum_name(t.dtype) in ("FLOAT", "HALF", "BF16") for t in outs)
        layers.append(
            LayerInfo(
                name=layer.name,
                kind=_enum_name(layer.type),
                inputs=ins,
                outputs=tuple(t.name for t in outs),
                float_outputs=floats,
            )
        )
    return layers


def _logger(trt: Any) -> Any:
    """A TensorRT logger that keeps the errors, so that a failed build can say why."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))

    return Logger()


def make_calibrator(trt: Any, batches: Sequence[Mapping[str, np.ndarray]], cache_file: Path) -> Any:
    """An entropy calibrator that hands TensorRT the sample batches, one at a time, on the GPU."""
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._pending = list(batches)
            self._held: list[Any] = []

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks take the batch from the shapes

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            if not self._pending:
                return None
            batch = self._pending.pop(0)
            self._held = [torch.from_numpy(np.ascontiguousarray(batch[n])).cuda() for n in names]
            return [int(t.data_ptr()) for t in self._held]

        def read_calibration_cache(self) -> bytes | None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            _write_atomic(cache_file, bytes(cache))

    return Calibrator()


def build_engine(
    trt: Any,
    onnx_path: Path,
    mode: BuildMode,
    profiles: Sequence[Profile],
    *,
    fp32_layers: Iterable[str] = (),
    timing_cache: Path | None = None,
    calibration: Sequence[Mapping[str, np.ndarray]] = (),
    work: Path | None = None,
) -> tuple[bytes, list[LayerInfo]]:
    """Parse `onnx_path` and build a serialized engine; also return the network's layers."""
    # The parser owns the weights the network points at: it stays alive until the engine is built.
    logger = _logger(trt)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    if mode.strongly_typed:
        flags |= 1 << int(creation.STRONGLY_TYPED)
    elif hasattr(creation, "EXPLICIT_BATCH"):  # the default, and deprecated, from TensorRT 10
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ConversionError("TensorRT's ONNX parser refused the model: " + "; ".join(errors[:3] or logger.errors[:3]))
    config = builder.create_builder_config()
    for name in mode.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    trt_profiles = []
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        trt_profiles.append(profile)
    layers = describe_network(network)
    pinned = set(fp32_layers)
    if pinned and not mode.strongly_typed:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in pinned:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if mode.calibrate:
        if not calibration:
            raise ConversionError("int8 calibration needs sample inputs at the profile's opt shapes")
        # held here too: TensorRT calls back into it during the build
        calibrator = make_calibrator(trt, calibration, (work or onnx_path.parent) / "calibration.cache")
        config.int8_calibrator = calibrator
        config.set_calibration_profile(trt_profiles[0])
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError(
            "TensorRT could not build the engine" + (f": {'; '.join(logger.errors[-3:])}" if logger.errors else "")
        )
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), layers


# --- the compiler -------------------------------------------------------------------------------


@dataclass
class _Attempt:
    fp32_layers: set[str] = field(default_factory=set)
    round_: int = 0


class TensorRTCompiler:
    target = "tensorrt"

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        # Engines run on the GPU only; asking for the target asks for them, whatever the devices.
        return [None]

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """Why a built engine may not be used on this worker (another GPU or TensorRT version), if so."""
        if candidate.status != "built" or not candidate.artifact_dir:
            return None
        require_tensorrt()
        info = ArtifactInfo.load(ctx.out / candidate.artifact_dir)
        return engine_mismatch(info.extra.get("engine"), current_stamp())

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        require_tensorrt()
        if not ctx.onnx_file:
            raise ConversionError("no ONNX model to compile: the export step did not succeed")
        import tensorrt as trt

        p = candidate.precision
        src = Path(ctx.onnx_file)
        mode = build_mode(p, weak=weak_typing(trt), has_qdq=quantized_nodes(src) > 0)
        stamp = current_stamp()
        profiles = optimization_profiles(ctx.signature)
        work = ctx.work / "compile" / candidate.id
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        calibration: list[dict[str, np.ndarray]] = []
        if mode.calibrate:
            calibration = calibration_inputs(calibration_batches(ctx), profiles[0]) or [_opt_batch(ctx.signature)]
        samples, refs = load_samples(ctx), load_references(ctx)
        out_dir.mkdir(parents=True, exist_ok=True)
        attempt = _Attempt()
        layers: list[LayerInfo] = []
        while True:
            onnx_path = self._graph(ctx, src, work, mode, attempt.fp32_layers)
            engine, trt_layers = build_engine(
                trt,
                onnx_path,
                mode,
                profiles,
                fp32_layers=attempt.fp32_layers if not mode.strongly_typed else (),
                timing_cache=timing_cache_file(stamp),
                calibration=calibration,
                work=work,
            )
            layers = describe_onnx(_load_onnx(onnx_path)) if mode.strongly_typed else trt_layers
            (out_dir / ENGINE_FILE).write_bytes(engine)
            ArtifactInfo(
                runtime="tensorrt",
                file=ENGINE_FILE,
                precision=p,
                signature=ctx.signature.to_json(),
                device="cuda",
                extra={
                    "engine": stamp,
                    "build": mode.explains,
                    "strongly_typed": mode.strongly_typed,
                    "flags": list(mode.flags),
                    "fp32_layers": sorted(attempt.fp32_layers),
                    "profiles": [{n: [list(s) for s in shapes] for n, shapes in prof.items()} for prof in profiles],
                    "onnx_sha256": sha256_file(src),
                },
            ).save(out_dir)
            if p == "fp32":
                break
            check = validate_artifact(ctx, out_dir, p, samples, refs)
            if check.passed:
                break
            failing = [n for n, m in check.outputs.items() if not m.passed] or [o.name for o in ctx.signature.outputs]
            more, round_ = next_fp32_layers(layers, failing, attempt.fp32_layers, attempt.round_ + 1)
            if more == attempt.fp32_layers:
                candidate.notes.append(
                    f"still outside the tolerances after keeping "
                    f"{len(attempt.fp32_layers)} layer(s) at fp32: {check.reason}"
                )
                break
            log.info(
                f"{candidate.id}: {check.reason}; rebuilding with {len(more - attempt.fp32_layers)} more "
                f"layer(s) at fp32 (round {round_})"
            )
            attempt = _Attempt(fp32_layers=more, round_=round_)
        candidate.file = ENGINE_FILE
        candidate.notes.append(
            f"{mode.explains}; {len(profiles)} optimization profile(s); built for "
            f"{stamp['gpu']} with TensorRT {stamp['tensorrt']}"
        )
        if attempt.fp32_layers:
            candidate.notes.append(
                "kept at fp32 to pass validation: " + describe_fp32_layers(layers, attempt.fp32_layers)
            )

    def _graph(self, ctx: Context, src: Path, work: Path, mode: BuildMode, fp32_layers: set[str]) -> Path:
        """The ONNX graph to parse: the exported one, or (strongly typed) its float16 or Q/DQ rewrite."""
        if mode.graph == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(
                onnx.load(str(src)), keep_io_types=True, node_block_list=sorted(fp32_layers) or None
            )
            path = work / "fp16.onnx"
            onnx.save(model, str(path))
            return path
        if mode.graph == "qdq":
            path, _ = quantize_int8_static(ctx, src, work, symmetric=True, exclude=sorted(fp32_layers))
            return path
        return src


def _opt_batch(signature: Signature) -> dict[str, np.ndarray]:
    r = signature.dims.get(signature.batch_dim) if signature.batch_dim else None
    return sample_io.at_batch(signature, r.opt if r else 1)


def _load_onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


__all__ = [
    "BuildMode",
    "LayerInfo",
    "TensorRTCompiler",
    "build_engine",
    "build_mode",
    "calibration_inputs",
    "choose_fp32_layers",
    "describe_fp32_layers",
    "engine_stamp",
    "next_fp32_layers",
    "weak_typing",
]
