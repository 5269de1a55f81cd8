"""ONNX Runtime candidates: graph-optimized fp32, fp16, int8 static (QDQ, calibrated) and int8 dynamic
on the CPU; fp32 and fp16 on the CUDA execution provider; fp32, fp16 and int8 (QDQ) on the TensorRT one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from service.errors import ConversionError, InvalidOptions
from service.runtimes.base import ArtifactInfo
from service.runtimes.onnxruntime import OnnxRuntime, session_options
from service.runtimes.tensorrt import ort_trt_profile_options
from workers.compilers.fusion import Fusion, fuse_transformer, fused_operators, gained, transformer_kind
from workers.compilers.gpu import CUDA_PROVIDER, TENSORRT_PROVIDER, require_ort_provider
from workers.compilers.int8 import preprocess, quantize_int8_static
from workers.compilers.static_resize import resize_by_scales
from workers.context import Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import load_references, load_samples
from workers.validation import validate_artifact

# The variant of a GPU candidate -> the device its artifact records (the runtime maps it to a provider).
GPU_VARIANTS = {"cuda": "cuda", "trt": "tensorrt"}
# Per precision, what a CUDA host adds. int8 runs on TensorRT only: the CUDA provider has no int8
# convolutions or matrix products, so a QDQ graph would run in float with extra casts.
CUDA_VARIANTS: dict[str, list[str]] = {"fp32": ["cuda", "trt"], "fp16": ["cuda", "trt"], "int8": ["trt"]}


class OnnxRuntimeCompiler:
    target = "onnxruntime"

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        out: list[str | None] = []
        if "cpu" in devices:
            out += [None, "dynamic"] if precision == "int8" else [None]
        if "cuda" in devices:
            out += CUDA_VARIANTS.get(precision, [])
        return out

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """Never: the artifact runs wherever its runtime does."""
        return None

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        if not ctx.onnx_file:
            raise ConversionError("no ONNX model to compile: the export step did not succeed")
        device = GPU_VARIANTS.get(candidate.variant or "", "cpu")
        if device != "cpu":
            require_ort_provider(TENSORRT_PROVIDER if device == "tensorrt" else CUDA_PROVIDER)
        src = Path(ctx.onnx_file)
        work = ctx.work / "compile" / candidate.id
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        p = candidate.precision
        if device == "cpu" and (n := resize_by_scales(src, work / "resize-scales.onnx")):
            src = work / "resize-scales.onnx"
            candidate.notes.append(
                f"Resize x{n} by constant scales (its output size followed from static dimensions), "
                "so that ONNX Runtime's blocked CPU layout runs through it"
            )
        unfused = src
        fused = self._fuse(src, work, p, device, log)
        if fused:
            src = fused.path
        provider_options: dict[str, Any] = {}
        if device == "tensorrt":
            # TensorRT picks the precision of each layer itself; the graph stays fp32 (or QDQ for int8).
            provider_options = {
                "trt_fp16_enable": p in ("fp16", "int8"),
                "trt_int8_enable": p == "int8",
                **ort_trt_profile_options(ctx.signature),
            }
        if p == "fp32" or (p == "fp16" and device == "tensorrt"):
            model = src
            if p == "fp16":
                candidate.notes.append(
                    "TensorRT execution provider with fp16 layers enabled (fp32 where faster or needed)"
                )
        elif p == "fp16":
            model = self._fp16(src, work)
            candidate.notes.append("weights and compute in float16; inputs and outputs keep the signature's dtypes")
        elif p == "int8" and candidate.variant == "dynamic":
            model = self._int8_dynamic(src, work)
            candidate.notes.append(
                "dynamic quantization: int8 weights, activations quantized per batch at run time "
                "(suits MatMul/Gemm-heavy models; slow on convolutions)"
            )
        elif p == "int8":
            symmetric = device == "tensorrt"  # TensorRT takes only symmetric, signed int8 QDQ
            model, n = quantize_int8_static(ctx, src, work, symmetric=symmetric)
            candidate.notes.append(
                f"static quantization (QDQ), per-channel int8 weights, "
                f"{'symmetric signed' if symmetric else 'asymmetric'} activations calibrated "
                f"on {n} sample batch(es) (suits convolutions)"
            )
        else:
            raise InvalidOptions(
                f"precision {p} is not supported by ONNX Runtime on the CPU "
                "(it has no bf16 kernels for most operators); build bf16 with the torchscript target"
            )
        if p == "int8" and not quantized_nodes(model):
            raise ConversionError(
                "nothing in this graph could be quantized to int8 (no MatMul/Gemm/Conv outside "
                "control-flow subgraphs); the int8 model would just be the fp32 one"
            )
        self._emit(ctx, model, out_dir, p, device, candidate.variant, provider_options)
        candidate.file = "model.onnx"
        if fused:
            self._keep_fused_if_valid(ctx, candidate, unfused, work, out_dir, device, provider_options, fused)

    def _emit(
        self,
        ctx: Context,
        model: Path,
        out_dir: Path,
        p: str,
        device: str,
        variant: str | None,
        provider_options: dict[str, Any],
    ) -> None:
        """Write the artifact (optimized for the CPU, or as it is for a GPU provider) and its info."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if device == "cpu":
            optimize(model, out_dir / "model.onnx", ctx.options.threads)
            optimization = "ORT_ENABLE_ALL"
        else:
            # A graph optimized offline at ORT_ENABLE_ALL is specific to the provider it was optimized
            # for (the CPU's layouts and fused kernels), so GPU artifacts are optimized when loaded.
            shutil.copyfile(model, out_dir / "model.onnx")
            optimization = "ORT_ENABLE_ALL at load, for its provider"
        info = ArtifactInfo(
            runtime="onnxruntime",
            file="model.onnx",
            precision=p,
            signature=ctx.signature.to_json(),
            device=device,
            extra={
                "variant": variant,
                "exporter": ctx.onnx_exporter,
                "graph_optimization": optimization,
                **({"provider_options": provider_options} if provider_options else {}),
            },
        )
        info.save(out_dir)
        if device == "cuda":
            # Loading here tells a provider that is listed but cannot start (its CUDA libraries
            # missing) from a model that fails validation: the first is "unavailable".
            OnnxRuntime(out_dir / "model.onnx", info=info, threads=ctx.options.threads, device=device).close()

    def _fuse(self, src: Path, work: Path, p: str, device: str, log: StepLog) -> Fusion | None:
        """The transformer-fused graph for a transformer's fp32 and fp16 candidates on the CPU and
        CUDA providers; None for anything else. TensorRT builds its own kernels from standard
        operators, and the int8 quantizers expect standard operators too."""
        if p not in ("fp32", "fp16") or device == "tensorrt":
            return None
        kind = transformer_kind(src)
        if kind is None:
            return None
        fusion = fuse_transformer(src, work, kind)
        for route, result in (fusion.tried if fusion else {}).items():
            log.info(f"transformer fusions by {route}: {result}")
        if fusion is None:
            log.info("transformer fusions: no rewriter fused anything in this graph")
        return fusion

    def _keep_fused_if_valid(
        self,
        ctx: Context,
        candidate: Candidate,
        src: Path,
        work: Path,
        out_dir: Path,
        device: str,
        provider_options: dict[str, Any],
        fused: Fusion,
    ) -> None:
        """Record what fused when the fused artifact agrees with eager PyTorch; otherwise put the
        unfused graph in its place, saying why, so that a bad fusion never costs the candidate."""
        p = candidate.precision
        check = validate_artifact(ctx, out_dir, p, load_samples(ctx), load_references(ctx))
        if not check.passed:
            candidate.notes.append(
                f"transformer fusions ({fused.route}) dropped: the fused graph failed validation "
                f"({check.reason}); this is the unfused graph"
            )
            model = src if p == "fp32" else self._fp16(src, work, name="unfused-fp16.onnx")
            shutil.rmtree(out_dir)
            self._emit(ctx, model, out_dir, p, device, candidate.variant, provider_options)
            return
        # What the served artifact holds, with what ONNX Runtime's session optimizations fused besides
        candidate.fused_ops = gained(fused_operators(src), fused_operators(out_dir / "model.onnx"))
        candidate.notes.append(
            f"transformer fusions (model type {fused.kind}, by {fused.route}): "
            + ", ".join(f"{op} x{n}" for op, n in candidate.fused_ops.items())
        )

    def _fp16(self, src: Path, work: Path, name: str = "fp16.onnx") -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
        path = work / name
        onnx.save(model, str(path))
        return path

    def _int8_dynamic(self, src: Path, work: Path) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = work / "int8-dynamic.onnx"
        # 7-bit weights (reduce_range): x86 CPUs without VNNI (AVX2 only: many AMD EPYC and older
        # Xeons) multiply u8 x s8 with VPMADDUBSW, whose 16-bit sums saturate on full-range weights.
        # On such a CPU the zoo MLP's dynamic int8 fell to cosine 0.967 (0.9998 with 7 bits), its
        # static int8 to 0.937 (0.991). An artifact may be served on such a host even when it was
        # built on one with VNNI, so both int8 paths always quantize this way.
        quantize_dynamic(str(preprocess(src, work)), str(path), weight_type=QuantType.QInt8, reduce_range=True)
        return path


def optimize(src: Path, dst: Path, threads: int | None) -> None:
    """Apply ONNX Runtime's graph optimizations at the highest level and save what it will load."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(src), session_options(threads, optimized_path=dst), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        raise ConversionError(f"ONNX Runtime could not load the model: {str(exc).splitlines()[0][:300]}") from None
    if not dst.exists():
        raise ConversionError("ONNX Runtime did not write the optimized model")


QUANTIZED_OPS = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}


def quantized_nodes(path: Path) -> int:
    """How many quantizing nodes the top-level graph has."""
    import onnx

    return sum(n.op_type in QUANTIZED_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)
