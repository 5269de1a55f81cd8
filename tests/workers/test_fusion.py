"""ONNX Runtime's transformer fusions in the onnxruntime compiler, on the zoo's BERT-like encoder and
on models without attention, through the real exporters, optimizer, runtimes and pipeline."""

from __future__ import annotations

import json

import onnx

from tests.conftest import zoo_signature
from tests.workers.test_engine import convert
from workers.compilers.fusion import fused_operators, transformer_kind


def test_transformer_candidates_fuse_attention_and_count_it(tmp_path):
    ctx = convert(
        tmp_path,
        "transformer",
        entry="build_small",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32", "fp16"),
    )
    assert transformer_kind(ctx.onnx_file) == "bert"
    for cid in ("onnxruntime-fp32", "onnxruntime-fp16"):
        cand = ctx.candidate(cid)
        # the fused artifact is the candidate, and it agrees with eager PyTorch
        assert cand.passed, (cid, cand.reason, cand.validation)
        fused = cand.fused_ops
        assert fused.get("Attention", 0) >= 1, (cid, fused, cand.notes)
        assert fused.get("EmbedLayerNormalization", 0) == 1, (cid, fused)
        assert fused.get("SkipLayerNormalization", 0) >= 1, (cid, fused)
        # the counts are what the served artifact holds
        artifact = tmp_path / "out" / cid / "model.onnx"
        assert fused_operators(artifact) == fused
        assert any(n.op_type == "Attention" for n in onnx.load(str(artifact)).graph.node)
        note = next(n for n in cand.notes if "transformer fusions" in n)
        assert "model type bert" in note and f"Attention x{fused['Attention']}" in note
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    record = next(c for c in report["candidates"] if c["id"] == "onnxruntime-fp32")
    assert record["fused_ops"] == ctx.candidate("onnxruntime-fp32").fused_ops


def test_models_without_attention_are_left_alone(tmp_path):
    ctx = convert(tmp_path, "mlp", targets=("onnxruntime",), precisions=("fp32",))
    assert transformer_kind(ctx.onnx_file) is None
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed
    assert cand.fused_ops == {}
    assert not any("transformer fusions" in n for n in cand.notes), cand.notes
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert next(c for c in report["candidates"] if c["id"] == "onnxruntime-fp32")["fused_ops"] == {}


def test_scaled_dot_product_attention_fuses_too(tmp_path):
    # torch.export decomposes it into a Softmax guarded by IsNaN/Where, which ONNX Runtime's own
    # optimizer does not recognise; onnxscript's fusions do
    ctx = convert(
        tmp_path,
        "transformer",
        entry="build_small_sdpa",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32",),
    )
    assert ctx.onnx_exporter == "dynamo:eager"
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed, (cand.reason, cand.validation)
    assert cand.fused_ops.get("Attention", 0) >= 1, (cand.fused_ops, cand.notes)
    assert any("onnxscript" in n for n in cand.notes), cand.notes
