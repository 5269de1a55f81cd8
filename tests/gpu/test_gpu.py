"""On a CUDA device: ONNX Runtime's CUDA provider, TorchScript on CUDA, TensorRT engines, and eager
baselines on the GPU, through the whole conversion. Each test skips with its reason where the device
or the library is missing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service import runtimes
from service import samples as sample_io
from service.errors import RuntimeUnavailable
from tests.conftest import zoo_bundle, zoo_signature
from workers import engine
from workers.compilers.gpu import ort_providers, tensorrt_libraries

pytestmark = pytest.mark.gpu
FAST = {"bench_seconds": 0.05, "threads": 2, "devices": ["cuda"]}


def _relu_matmul(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnxruntime_cuda_session_runs_on_the_gpu(tmp_path, ort_cuda):
    from service.runtimes.onnxruntime import OnnxRuntime

    path = _relu_matmul(tmp_path / "m.onnx")
    gpu = OnnxRuntime(path, device="cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = OnnxRuntime(path).run({"x": x})["y"]
    assert np.allclose(gpu.run({"x": x})["y"], want, atol=1e-2, rtol=1e-2)


def _expect_gpu_candidate(cand, available: bool, why: str) -> None:
    if available:
        assert cand.status == "built", (cand.id, cand.reason)
    else:
        assert cand.status == "unavailable" and why in cand.reason, (cand.id, cand.status, cand.reason)


def test_small_cnn_on_every_gpu_candidate_with_eager_cuda_baselines(tmp_path, cuda):
    ctx = engine.convert(
        zoo_bundle(tmp_path, "cnn"),
        tmp_path / "out",
        entry="cnn.py:build_small",
        signature=zoo_signature("cnn", "SMALL_SIGNATURE"),
        options={
            "targets": ["onnxruntime", "torchscript", "tensorrt"],
            "precisions": ["fp32", "fp16", "bf16", "int8"],
            **FAST,
        },
    )
    by_id = {c.id: c for c in ctx.candidates}
    assert not any(c.variant is None and c.target != "tensorrt" for c in ctx.candidates)  # devices: cuda only
    for cid in ("torchscript-fp32-cuda", "torchscript-fp16-cuda"):
        assert by_id[cid].passed, (cid, by_id[cid].reason, by_id[cid].validation)
    assert by_id["torchscript-bf16-cuda"].status == "built" and by_id["torchscript-bf16-cuda"].validation
    has_ort_cuda = "CUDAExecutionProvider" in ort_providers()
    for cid in ("onnxruntime-fp32-cuda", "onnxruntime-fp16-cuda"):
        _expect_gpu_candidate(by_id[cid], has_ort_cuda, "no CUDAExecutionProvider")
        if has_ort_cuda:
            assert by_id[cid].passed, (cid, by_id[cid].validation)
    has_trt_ep = has_ort_cuda and "TensorrtExecutionProvider" in ort_providers() and tensorrt_libraries()
    for cid in ("onnxruntime-fp16-trt", "onnxruntime-int8-trt"):
        _expect_gpu_candidate(by_id[cid], has_trt_ep, "TensorRT" if has_ort_cuda else "no TensorrtExecutionProvider")
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    for cid in ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"):
        _expect_gpu_candidate(by_id[cid], has_trt, "TensorRT is not installed")
    # eager PyTorch on CUDA at fp32 and fp16 in the same run; CUDA candidates are compared with it
    assert set(ctx.eager_baselines) == {"cuda-fp32", "cuda-fp16"}, ctx.step("benchmark").log
    assert not ctx.eager_benchmark  # no CPU candidate, so no CPU baseline
    ts = by_id["torchscript-fp16-cuda"]
    assert ts.benchmark and ts.speedup_low <= ts.speedup <= ts.speedup_high  # paired with eager fp32 on CUDA
    assert len(ts.benchmark[0].round_p50_ms) == len(ctx.eager_baselines["cuda-fp32"][0].round_p50_ms)
    info = runtimes.ArtifactInfo.load(tmp_path / "out" / "torchscript-fp16-cuda")
    assert info.device == "cuda" and info.compute_dtype == "float16"
    assert by_id[ctx.selection.candidate].passed


def test_small_transformer_on_cuda_keeps_its_dynamic_sequence(tmp_path, cuda):
    ctx = engine.convert(
        zoo_bundle(tmp_path, "transformer"),
        tmp_path / "out",
        entry="transformer.py:build_small",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        options={"targets": ["onnxruntime", "torchscript"], "precisions": ["fp32", "fp16"], **FAST},
    )
    ts = ctx.candidate("torchscript-fp16-cuda")
    assert ts.passed, (ts.reason, ts.validation)
    rt = runtimes.load(tmp_path / "out" / "torchscript-fp32-cuda")
    for seq in (2, 16):
        assert rt.run({"ids": np.ones((1, seq), np.int64)})["logits"].shape == (1, 4)
    if "CUDAExecutionProvider" in ort_providers():
        assert ctx.candidate("onnxruntime-fp16-cuda").passed, ctx.candidate("onnxruntime-fp16-cuda").validation


def _pt2_on_cuda(tmp_path, targets: list[str]) -> tuple[Any, dict[str, Any]]:
    ctx = engine.convert(
        zoo_bundle(tmp_path, "cnn"),
        tmp_path / "out",
        entry="cnn.py:build_small",
        signature=zoo_signature("cnn", "SMALL_SIGNATURE"),
        options={"targets": targets, "precisions": ["fp32"], **FAST},
    )
    by_id = {c.id: c for c in ctx.candidates}
    assert set(by_id) == {f"{t}-fp32-cuda" for t in targets}  # devices: cuda only
    for cid, cand in by_id.items():
        assert cand.passed, (cid, cand.reason, cand.validation, ctx.step("compile").log[-2000:])
        assert cand.benchmark and cand.speedup_low <= cand.speedup <= cand.speedup_high
        info = runtimes.ArtifactInfo.load(tmp_path / "out" / cid)
        assert info.device == "cuda" and info.runtime == cand.target
    assert set(ctx.eager_baselines) == {"cuda-fp32"}
    outputs = {}
    for cid in by_id:  # loaded the way serving loads them: in a runner, since they carry code
        rt = runtimes.load(tmp_path / "out" / cid)
        try:
            for batch in (1, 3):
                outputs[cid, batch] = rt.run(sample_io.at_batch(ctx.signature, batch))
                assert all(v.shape[0] == batch for v in outputs[cid, batch].values())
        finally:
            rt.close()
    return ctx, outputs


def test_torch_export_candidate_on_cuda(tmp_path, cuda):
    """The ExportedProgram is moved to the GPU from the CPU capture, passes validation against eager
    on CUDA, is paired with eager fp32 on CUDA, and runs on the GPU at other batch sizes."""
    ctx, _ = _pt2_on_cuda(tmp_path, ["torch_export"])
    assert "from torch.export, on cuda" in ctx.candidate("torch_export-fp32-cuda").notes


def test_aotinductor_package_on_cuda(tmp_path, cuda, aoti_cuda):
    """An AOTInductor package compiled for this GPU (Triton kernels, in the box) passes validation,
    records the GPU it was built for, and agrees with the ExportedProgram on the GPU."""
    ctx, outputs = _pt2_on_cuda(tmp_path, ["torch_export", "aotinductor"])
    aoti = ctx.candidate("aotinductor-fp32-cuda")
    assert any(f"for this GPU ({cuda})" in n for n in aoti.notes), aoti.notes
    assert runtimes.ArtifactInfo.load(tmp_path / "out" / aoti.id).extra["gpu"] == cuda
    for batch in (1, 3):
        a, b = outputs["torch_export-fp32-cuda", batch], outputs["aotinductor-fp32-cuda", batch]
        for name in a:
            assert np.allclose(a[name], b[name], atol=1e-3, rtol=1e-3), name


def test_tensorrt_engine_profiles_buckets_and_refusal_elsewhere(tmp_path, tensorrt):
    ctx = engine.convert(
        zoo_bundle(tmp_path, "mlp"),
        tmp_path / "out",
        signature=zoo_signature("mlp"),
        options={"targets": ["tensorrt"], "precisions": ["fp32", "fp16", "int8"], **FAST},
    )
    for cid in ("tensorrt-fp32", "tensorrt-fp16"):
        assert ctx.candidate(cid).passed, (cid, ctx.candidate(cid).reason, ctx.candidate(cid).validation)
    out = tmp_path / "out" / "tensorrt-fp16"
    rt = runtimes.load(out)
    assert len(rt.profiles) == 2  # the full range, and one tuned for small batches
    for batch in (1, 3, 8, 32, 3):
        x = sample_io.at_batch(ctx.signature, batch)
        assert rt.run(x)["logits"].shape == (batch, 10)
    assert len(rt._buffers) == 4  # buckets 1, 4, 8 and 32; batch 3 reused bucket 4
    rt.close()
    meta = json.loads((out / "kiln-artifact.json").read_text())
    meta["extra"]["engine"]["gpu"] = "Some Other GPU"
    (out / "kiln-artifact.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeUnavailable, match="GPU 'Some Other GPU'.*rebuild it on this host"):
        runtimes.load(out)
