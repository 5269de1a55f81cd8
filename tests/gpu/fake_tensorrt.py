"""A stand-in for the `tensorrt` module where TensorRT cannot run (no GPU, no library).

It has the names Kiln's TensorRT code uses, spelled as TensorRT 10 spells them (checked against the
strings of the tensorrt-cu12-bindings 10.16 and tensorrt-cu13-bindings 11.4 extension modules);
`make(weak=False)` drops what TensorRT 11 dropped (FP16/BF16/INT8 builder flags, precision
constraints, calibrators). The parser reads the ONNX graph with `onnx` and turns each node into a
layer; the "engine" it builds is JSON saying what was asked for, so tests can read it back.
"""

from __future__ import annotations

import json
import types
from enum import IntEnum
from typing import Any

# ONNX op type -> TensorRT LayerType member, for the kinds the fp32 fallback looks at.
_KINDS = {
    "Softmax": "SOFTMAX",
    "LayerNormalization": "NORMALIZATION",
    "ReduceMean": "REDUCE",
    "Exp": "UNARY",
    "Sqrt": "UNARY",
    "Conv": "CONVOLUTION",
    "MatMul": "MATRIX_MULTIPLY",
    "Gemm": "MATRIX_MULTIPLY",
    "Relu": "ACTIVATION",
    "Add": "ELEMENTWISE",
    "Mul": "ELEMENTWISE",
    "Div": "ELEMENTWISE",
    "Constant": "CONSTANT",
    "Shape": "SHAPE",
    "Cast": "CAST",
    "QuantizeLinear": "QUANTIZE",
    "DequantizeLinear": "DEQUANTIZE",
}


def make(*, weak: bool = True, version: str = "10.16.1.11") -> types.ModuleType:
    """A fresh fake module: TensorRT 10 (`weak`, with builder flags for precisions) or 11."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version if weak else "11.4.0.106"

    flags = ["DEBUG", "GPU_FALLBACK", "TF32", "DISABLE_TIMING_CACHE"]
    if weak:
        flags += ["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = IntEnum("BuilderFlag", flags, start=0)
    trt.NetworkDefinitionCreationFlag = IntEnum(
        "NetworkDefinitionCreationFlag", (["EXPLICIT_BATCH"] if weak else []) + ["STRONGLY_TYPED"], start=0
    )
    trt.DataType = IntEnum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "BF16", "INT64"], start=0)
    trt.float32, trt.float16, trt.bfloat16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
    trt.int8, trt.int32, trt.int64 = trt.DataType.INT8, trt.DataType.INT32, trt.DataType.INT64
    trt.LayerType = IntEnum("LayerType", sorted(set(_KINDS.values()) | {"PLUGIN_V2"}), start=0)
    trt.TensorIOMode = IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], start=0)
    trt.MemoryPoolType = IntEnum("MemoryPoolType", ["WORKSPACE"], start=0)

    class ILogger:
        Severity = IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0)

        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(ILogger.Severity)

        def __init__(self, min_severity: Any = None) -> None:
            super().__init__()

        def log(self, severity: Any, msg: str) -> None:
            pass

    class ITensor:
        def __init__(self, name: str, dtype: Any = None) -> None:
            self.name, self.dtype = name, trt.DataType.FLOAT if dtype is None else dtype

    class ILayer:
        def __init__(self, name: str, kind: str, inputs: list, outputs: list) -> None:
            self.name, self.type = name, trt.LayerType[kind]
            self._inputs, self._outputs = inputs, outputs
            self.num_inputs, self.num_outputs = len(inputs), len(outputs)
            self.output_types: dict[int, Any] = {}
            self._precision = None

        def get_input(self, i: int) -> ITensor:
            return self._inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self._outputs[i]

        def set_output_type(self, i: int, dtype: Any) -> None:
            if not weak:
                raise AttributeError("set_output_type")
            self.output_types[i] = dtype

        @property
        def precision(self) -> Any:
            return self._precision

        @precision.setter
        def precision(self, dtype: Any) -> None:
            self._precision = dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.layers: list[ILayer] = []
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.op_types: list[str] = []

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i: int) -> ILayer:
            return self.layers[i]

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

    class ParserError:
        def __init__(self, text: str) -> None:
            self._text = text

        def desc(self) -> str:
            return self._text

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self.network, self._errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, i: int) -> ParserError:
            return self._errors[i]

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.load(path)
            tensors: dict[str, ITensor] = {}
            for value in model.graph.input:
                tensors[value.name] = ITensor(value.name)
                self.network.inputs.append(tensors[value.name])
            for i, node in enumerate(model.graph.node):
                kind = _KINDS.get(node.op_type)
                if node.op_type == "NoImporter":
                    self._errors.append(ParserError(f"no importer for {node.op_type}"))
                    return False
                outs = [tensors.setdefault(o, ITensor(o)) for o in node.output]
                ins = [tensors.setdefault(x, ITensor(x)) for x in node.input if x]
                self.network.layers.append(ILayer(node.name or f"node_{i}", kind or "PLUGIN_V2", ins, outs))
                self.network.op_types.append(node.op_type)
            self.network.outputs = [tensors[o.name] for o in model.graph.output]
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, name: str) -> tuple:
            return self.shapes[name]

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data) or b"timing:"

        def serialize(self) -> bytes:
            return self.data + b"+"

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags_set: set[str] = set()
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile = None
            self.timing_cache: ITimingCache | None = None
            if weak:
                self.int8_calibrator = None

        def set_flag(self, flag: Any) -> None:
            self.flags_set.add(trt.BuilderFlag(flag).name)

        def get_flag(self, flag: Any) -> bool:
            return trt.BuilderFlag(flag).name in self.flags_set

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            if not weak:
                raise AttributeError("set_calibration_profile")
            self.calibration_profile = profile
            return True

        def create_timing_cache(self, serialized: bytes) -> ITimingCache:
            return ITimingCache(serialized)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            pass

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            strongly = bool(network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            if "UnsupportedByBuilder" in network.op_types:
                self.logger.log(ILogger.Severity.ERROR, "no implementation for UnsupportedByBuilder")
                return None
            return json.dumps(
                {
                    "strongly_typed": strongly,
                    "flags": sorted(config.flags_set),
                    "op_types": network.op_types,
                    "profiles": [{n: [list(s) for s in v] for n, v in p.shapes.items()} for p in config.profiles],
                    "fp32_layers": sorted(
                        layer.name for layer in network.layers if layer.precision == trt.DataType.FLOAT
                    ),
                    "calibrator": weak and config.int8_calibrator is not None,
                    "calibration_profile": config.calibration_profile is not None,
                    "timing_cache_loaded": config.timing_cache.data.decode() if config.timing_cache else None,
                }
            ).encode()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            raise RuntimeError("the fake TensorRT has no GPU to run engines on")

    for cls in (
        ILogger,
        Logger,
        ITensor,
        ILayer,
        INetworkDefinition,
        OnnxParser,
        IOptimizationProfile,
        ITimingCache,
        IBuilderConfig,
        Builder,
        Runtime,
    ):
        setattr(trt, cls.__name__, cls)

    if weak:

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt
