"""ONNX Runtime's transformer fusions in the onnxruntime compiler, on the zoo's BERT-like encoder and
on models without attention, through the real exporters, optimizer, runtimes and pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import zoo_signature
from tests.workers.test_engine import convert
from workers.compilers.fusion import (
    _restore_shape_dims,
    _shape_dims_as_gathers,
    fuse_transformer,
    fused_operators,
    transformer_kind,
)
from workers.compilers.onnxruntime import OnnxRuntimeCompiler
from workers.context import Candidate
from workers.sandboxed import load_references, load_samples
from workers.validation import validate_artifact


@pytest.fixture(scope="module")
def small_transformer(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("transformer")
    ctx = convert(
        tmp_path,
        "transformer",
        entry="build_small",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32", "fp16"),
    )
    return tmp_path, ctx


def test_transformer_candidates_fuse_attention_and_count_it(small_transformer):
    tmp_path, ctx = small_transformer
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
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- onnxruntime-fp32: Attention x{record['fused_ops']['Attention']}" in summary


def test_a_fused_graph_that_fails_validation_gives_way_to_the_unfused_one(small_transformer, tmp_path):
    _, ctx = small_transformer
    src = Path(ctx.onnx_file)
    fusion = fuse_transformer(src, tmp_path, "bert")
    assert fusion is not None and fusion.fused_ops.get("Attention")
    # a real fused graph gone wrong: its classifier's weights scaled, as a faulty rewrite could
    model = onnx.load(str(fusion.path))
    weight = next(t for t in model.graph.initializer if "head" in t.name and len(t.dims) == 2)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(3), weight.name))
    onnx.save(model, str(fusion.path))
    cand = Candidate(id="onnxruntime-fp32", target="onnxruntime", precision="fp32")
    out_dir = tmp_path / "artifact"
    compiler = OnnxRuntimeCompiler()
    compiler._emit(ctx, fusion.path, out_dir, "fp32", "cpu", None, {})
    compiler._keep_fused_if_valid(ctx, cand, src, tmp_path, out_dir, "cpu", {}, fusion)
    assert cand.fused_ops == {}
    assert "dropped: the fused graph failed validation" in cand.notes[0], cand.notes
    assert "Attention" not in fused_operators(out_dir / "model.onnx")
    assert validate_artifact(ctx, out_dir, "fp32", load_samples(ctx), load_references(ctx)).passed


def test_models_without_attention_are_left_alone(tmp_path):
    ctx = convert(tmp_path, "mlp", targets=("onnxruntime",), precisions=("fp32",))
    assert transformer_kind(ctx.onnx_file) is None
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed
    assert cand.fused_ops == {}
    assert not any("transformer fusions" in n for n in cand.notes), cand.notes
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert next(c for c in report["candidates"] if c["id"] == "onnxruntime-fp32")["fused_ops"] == {}
    assert "Fused operators" not in (tmp_path / "out" / "summary.md").read_text()


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


def test_bert_embeddings_fuse_into_one_operator(tmp_path):
    # word, token type and position embeddings summed as Hugging Face's BertEmbeddings does, the
    # position ids a Slice of a buffer up to the sequence length: the torch.export-based exporter
    # reads that length with Shape(start=1, end=2), which the optimizer's pattern did not know
    ctx = convert(
        tmp_path,
        "transformer",
        entry="build_small_bert_embeddings",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32",),
    )
    assert ctx.onnx_exporter == "dynamo:eager"
    assert any(n.op_type == "Shape" and n.attribute for n in onnx.load(str(ctx.onnx_file)).graph.node)
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed, (cand.reason, cand.validation)
    assert cand.fused_ops.get("EmbedLayerNormalization", 0) == 1, (cand.fused_ops, cand.notes)
    assert cand.fused_ops.get("Attention", 0) >= 1, (cand.fused_ops, cand.notes)
    artifact = onnx.load(str(tmp_path / "out" / "onnxruntime-fp32" / "model.onnx"))
    embed = next(n for n in artifact.graph.node if n.op_type == "EmbedLayerNormalization")
    # all three tables: the token types are its segment embedding
    assert len([i for i in embed.input[:5] if i]) == 5, embed.input
    # what no fusion took in is given back as the exporter wrote it
    model = onnx.load(str(ctx.onnx_file))

    def nodes():
        return [(n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in model.graph.node]

    exported, initializers = nodes(), len(model.graph.initializer)
    rewritten = _shape_dims_as_gathers(model.graph)
    assert rewritten and nodes() != exported
    _restore_shape_dims(model.graph, rewritten)
    assert nodes() == exported and len(model.graph.initializer) == initializers


def _attention_graph(tmp_path: Path, name: str, *, mask: str | None, norm: bool = True, weight: bool = False) -> Path:
    """Scores of two activations (or of an activation and a weight), masked or not, into Softmax."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
        numpy_helper.from_array(np.ones((8, 4), np.float32), "w"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "neg"),
    ]
    nodes = [helper.make_node("LayerNormalization" if norm else "Identity", ["x", "gamma"][: 2 if norm else 1], ["h"])]
    nodes.append(helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["h", "w" if weight else "ht"], ["s"]))
    nodes.append(helper.make_node("Div", ["s", "scale"], ["scaled"]))
    scores = "scaled"
    if mask == "trilu":
        inits.append(numpy_helper.from_array(np.ones((4, 4), bool), "ones"))
        nodes.append(helper.make_node("Trilu", ["ones"], ["keep"], upper=0))
    elif mask == "constant":
        inits.append(numpy_helper.from_array(np.tril(np.ones((4, 4), bool)), "keep"))
    if mask:
        nodes.append(helper.make_node("Where", ["keep", "scaled", "neg"], ["masked"]))
        scores = "masked"
    nodes.append(helper.make_node("Softmax", [scores], ["y"], axis=-1))
    model = helper.make_model(
        helper.make_graph(nodes, name, [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_transformer_kind_reads_the_graph(tmp_path):
    assert transformer_kind(_attention_graph(tmp_path, "encoder", mask=None)) == "bert"
    assert transformer_kind(_attention_graph(tmp_path, "trilu", mask="trilu")) == "gpt2"
    assert transformer_kind(_attention_graph(tmp_path, "tril_buffer", mask="constant")) == "gpt2"
    # a Softmax over a projection by weights is a classifier, not attention; no norm, no transformer
    assert transformer_kind(_attention_graph(tmp_path, "classifier", mask=None, weight=True)) is None
    assert transformer_kind(_attention_graph(tmp_path, "no_norm", mask=None, norm=False)) is None
