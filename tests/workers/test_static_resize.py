"""A Resize whose output size follows from static dimensions is rewritten to constant scales before
ONNX Runtime optimizes the graph for the CPU (workers/compilers/static_resize.py): through the real
exporter, compiler and runtime on the zoo's segmenter, and on hand-built graphs it must leave alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service import runtimes
from tests.conftest import zoo_signature
from tests.workers.test_engine import convert
from workers.compilers.static_resize import resize_by_scales


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_segmenter_upsamples_by_constant_scales_at_every_batch_size(tmp_path):
    ctx = convert(
        tmp_path,
        "segmenter",
        entry="build_model",
        signature=zoo_signature("segmenter"),
        targets=("onnxruntime",),
        precisions=("fp32",),
    )
    exported = onnx.load(str(ctx.onnx_file))
    made_by = {o: n.op_type for n in exported.graph.node for o in n.output}
    sized = [n for n in exported.graph.node if n.op_type == "Resize" and len(n.input) > 3 and n.input[3]]
    # what the rewrite is for: the exporter computes each size at run time, from the input's Shape
    assert len(sized) == 2 and all(made_by.get(n.input[3]) == "Concat" for n in sized), ctx.onnx_exporter
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed, (cand.reason, cand.validation)
    assert any(n.startswith("Resize x2 by constant scales") for n in cand.notes), cand.notes
    artifact = tmp_path / "out" / "onnxruntime-fp32"
    served = onnx.load(str(artifact / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in served.graph.node]
    # no size is computed at run time any more, so nothing reads a shape
    assert not [op for op in ops if op[1] in ("Shape", "Concat") and op != ("", "Concat")], ops
    assert all(len(n.input) < 4 or not n.input[3] for n in served.graph.node if n.op_type == "Resize")
    if any(d == "com.microsoft.nchwc" for d, _ in ops):  # the blocked layout, on CPUs with AVX2 or better
        assert ops.count(("com.microsoft.nchwc", "Upsample")) == 2, ops
    rt = runtimes.load(artifact, threads=1)
    try:
        for batch in (1, 3, 5):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
            got = rt.run({"image": x})["mask"]
            assert got.shape == (batch, 5, 32, 32)
            np.testing.assert_allclose(got, _run(ctx.onnx_file, x), rtol=1e-4, atol=1e-5)
    finally:
        rt.close()


def _resize_graph(tmp_path: Path, in_hw: tuple, out_hw: tuple[int, int]) -> Path:
    """X[batch, 4, *in_hw] resized to sizes = Shape(X)[:2] ++ out_hw, as the exporter writes it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, *in_hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([2], np.int64), "end"),
        numpy_helper.from_array(np.array(out_hw, np.int64), "hw"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["lead"]),
        helper.make_node("Concat", ["lead", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear"),
    ]
    graph = helper.make_graph(nodes, "resize", [x], [y], inits)
    path = tmp_path / "resize.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize(("in_hw", "out_hw"), [((7, 5), (14, 20)), ((3, 5), (7, 11))])
def test_static_sizes_become_scales_and_the_size_nodes_go(tmp_path, in_hw, out_hw):
    src = _resize_graph(tmp_path, in_hw, out_hw)
    dst = tmp_path / "scaled.onnx"
    assert resize_by_scales(src, dst) == 1
    model = onnx.load(str(dst))
    assert [n.op_type for n in model.graph.node] == ["Resize"]
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[2]))
    assert scales[:2].tolist() == [1.0, 1.0] and scales[2] * in_hw[0] == pytest.approx(out_hw[0])
    assert {t.name for t in model.graph.initializer} == {model.graph.node[0].input[2]}
    for batch in (1, 2):
        x = np.random.default_rng(0).standard_normal((batch, 4, *in_hw), dtype=np.float32)
        got = _run(dst, x)
        assert got.shape == (batch, 4, *out_hw)
        np.testing.assert_array_equal(got, _run(src, x))


def test_sizes_that_scales_cannot_say_are_left_alone(tmp_path):
    dst = tmp_path / "scaled.onnx"
    # the spatial dims are symbolic: the size is known only at run time
    assert resize_by_scales(_resize_graph(tmp_path, ("h", "w"), (14, 20)), dst) == 0
    # 7 -> 31: 31/7 in float32 times 7 truncates to 30, so ONNX Runtime would make 30 rows from the scale
    assert resize_by_scales(_resize_graph(tmp_path, (7, 5), (31, 10)), dst) == 0
    assert not dst.exists()
