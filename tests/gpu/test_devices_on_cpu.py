"""GPU candidates on a host without a GPU: how they are named and planned, the tolerances they get,
the ONNX Runtime session that refuses to fall back to the CPU, and a job whose GPU candidates are
reported unavailable while its CPU candidates complete."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.errors import InvalidOptions, RuntimeUnavailable
from service.options import DEFAULT_TOLERANCES, ConversionOptions
from tests.conftest import zoo_bundle, zoo_signature
from workers import engine
from workers.compilers import COMPILERS, candidate_id, gpu


def test_gpu_candidates_are_variants_of_their_target():
    ort, ts, trt = COMPILERS["onnxruntime"], COMPILERS["torchscript"], COMPILERS["tensorrt"]
    both = ["cpu", "cuda"]
    assert ort.variants("fp32", both) == [None, "cuda", "trt"]
    assert ort.variants("fp16", ["cuda"]) == ["cuda", "trt"]
    assert ort.variants("int8", both) == [None, "dynamic", "trt"]
    assert ort.variants("bf16", ["cuda"]) == []
    assert ort.variants("fp32", ["cpu"]) == [None]
    assert ts.variants("bf16", both) == [None, "cuda"] and ts.variants("int8", both) == []
    assert trt.variants("fp16", ["cpu"]) == [None]  # engines are GPU-only whatever the devices
    for pt2 in (COMPILERS["torch_export"], COMPILERS["aotinductor"]):
        assert pt2.variants("fp32", both) == [None, "cuda"] and pt2.variants("fp32", ["cuda"]) == ["cuda"]
        assert pt2.variants("fp16", both) == []  # fp32 only
    assert [candidate_id("onnxruntime", "fp16", v) for v in ort.variants("fp16", both)] == [
        "onnxruntime-fp16",
        "onnxruntime-fp16-cuda",
        "onnxruntime-fp16-trt",
    ]
    assert candidate_id("torchscript", "bf16", "cuda") == "torchscript-bf16-cuda"


def test_devices_option_and_its_default(monkeypatch):
    assert ConversionOptions.parse({}).devices is None
    assert ConversionOptions.parse({"devices": ["CUDA", "cpu"]}).devices == ["cuda", "cpu"]
    with pytest.raises(InvalidOptions, match="unknown device 'tpu'; known: cpu, cuda"):
        ConversionOptions.parse({"devices": ["tpu"]})
    assert gpu.resolve_devices(["cuda"]) == ["cuda"]
    monkeypatch.setattr(gpu, "cuda_device", lambda: None)
    assert gpu.resolve_devices(None) == ["cpu"]
    monkeypatch.setattr(gpu, "cuda_device", lambda: "NVIDIA H100 80GB HBM3")
    assert gpu.resolve_devices(None) == ["cpu", "cuda"]


def test_fp32_on_cuda_allows_tf32():
    opts = ConversionOptions.parse({"tolerances": {"logits": {"min_cosine": 0.9}}})
    cpu, cuda = opts.tolerance_for("fp32", "other"), opts.tolerance_for("fp32", "other", "cuda")
    assert cpu == DEFAULT_TOLERANCES["fp32"]
    assert cuda.atol == 1e-2 and cuda.rtol == 1e-2 and cuda.min_cosine == 0.9999
    assert opts.tolerance_for("fp16", "other", "cuda") == DEFAULT_TOLERANCES["fp16"]
    assert opts.tolerance_for("fp32", "logits", "cuda").min_cosine == 0.9  # overrides still win


def test_onnxruntime_refuses_to_run_a_cuda_artifact_on_the_cpu(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    from service.runtimes.onnxruntime import OnnxRuntime

    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider; the refusal is for builds or hosts without it")
    with pytest.raises(
        RuntimeUnavailable,
        match="CUDAExecutionProvider was asked for but ONNX Runtime could only start CPUExecutionProvider",
    ):
        OnnxRuntime(tmp_path / "m.onnx", device="cuda")
    assert OnnxRuntime(tmp_path / "m.onnx").run({"x": -np.ones((1, 4), np.float32)})["y"].max() == 0


def test_traced_cpu_device_constants_are_retargeted():
    import importlib.util

    import torch

    from tests.conftest import ZOO
    from workers.sandbox_ops import retarget_device_constants

    spec = importlib.util.spec_from_file_location("zoo_transformer", ZOO / "transformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    traced = torch.jit.trace(module.build_small(), (torch.ones(2, 8, dtype=torch.long),), check_trace=False)
    frozen = torch.jit.freeze(traced.eval())
    assert 'device=torch.device("cpu")' in frozen.code
    assert retarget_device_constants(frozen.graph, "cuda") == 1
    assert 'device=torch.device("cuda")' in frozen.code and 'torch.device("cpu")' not in frozen.code


def test_gpu_candidates_are_unavailable_here_and_the_cpu_ones_complete(tmp_path):
    ctx = engine.convert(
        zoo_bundle(tmp_path, "mlp"),
        tmp_path / "out",
        signature=zoo_signature("mlp"),
        options={
            "targets": ["onnxruntime", "torchscript", "tensorrt", "torch_export"],
            "precisions": ["fp32", "fp16"],
            "devices": ["cpu", "cuda"],
            "bench_seconds": 0.05,
            "threads": 1,
        },
    )
    by_id = {c.id: c for c in ctx.candidates}
    assert set(by_id) == {
        "onnxruntime-fp32",
        "onnxruntime-fp32-cuda",
        "onnxruntime-fp32-trt",
        "onnxruntime-fp16",
        "onnxruntime-fp16-cuda",
        "onnxruntime-fp16-trt",
        "torchscript-fp32",
        "torchscript-fp32-cuda",
        "torchscript-fp16",
        "torchscript-fp16-cuda",
        "tensorrt-fp32",
        "tensorrt-fp16",
        "torch_export-fp32",
        "torch_export-fp32-cuda",
    }
    for cid in ("onnxruntime-fp16-cuda", "onnxruntime-fp32-trt", "torchscript-fp16-cuda", "torch_export-fp32-cuda"):
        assert by_id[cid].status == "unavailable" and by_id[cid].reason == "no CUDA device on this machine"
    assert (
        by_id["tensorrt-fp16"].status == "unavailable" and "TensorRT is not installed" in by_id["tensorrt-fp16"].reason
    )
    for cid in ("onnxruntime-fp32", "onnxruntime-fp16", "torchscript-fp32", "torchscript-fp16", "torch_export-fp32"):
        assert by_id[cid].passed, (cid, by_id[cid].reason, by_id[cid].validation)
    assert ctx.step("compile").outputs["devices"] == ["cpu", "cuda"]
    assert ctx.eager_benchmark and not ctx.eager_baselines  # nothing ran on CUDA
    assert ctx.selection.candidate in {
        "onnxruntime-fp32",
        "onnxruntime-fp16",
        "torchscript-fp32",
        "torchscript-fp16",
        "torch_export-fp32",
    }
    assert "not built: no CUDA device" in by_id["torchscript-fp32-cuda"].lost_because


def test_benchmark_op_times_eager_at_several_precisions_and_a_candidate_in_one_run(tmp_path):
    from service.signature import Signature
    from workers import sandbox_ops

    bundle = {"kind": "python", "root": str(tmp_path), "entry": "mlp.py:build_model"}
    zoo_bundle(tmp_path, "mlp")
    result = sandbox_ops.benchmark(
        {
            "bundle": bundle,
            "signature": Signature.parse(zoo_signature("mlp")).to_json(),
            "batch_sizes": [1, 2],
            "budget_s": 0.05,
            "threads": 1,
            "eager": [
                {"id": "eager", "device": "cpu", "precision": "fp32"},
                {"id": "eager-bf16", "device": "cpu", "precision": "bf16"},
            ],
            "artifacts": [{"id": "missing", "dir": str(tmp_path / "nothing")}],
            "pairs": [["eager", "eager-bf16"]],
        },
        tmp_path,
    )
    assert set(result["points"]) == {"eager", "eager-bf16"} and "missing" in result["errors"]
    for points in result["points"].values():
        assert [p["batch"] for p in points] == [1, 2]
        assert all(p["rounds"] >= 7 and len(p["round_p50_ms"]) == p["rounds"] for p in points)
    assert result["threads"]["torch"] == 1 and result["load_before"]["cpus"] == os.cpu_count()
