"""The ONNX Runtime runtime's session settings: serving turns off busy-waiting intra-op threads."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from service.runtimes.onnxruntime import OnnxRuntime

SPIN = "session.intra_op.allow_spinning"


def _model(path):
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.arange(8, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_spin_setting_reaches_the_session_and_changes_no_answer(tmp_path):
    path = _model(tmp_path / "m.onnx")
    x = np.ones((3, 4), np.float32)
    busy = OnnxRuntime(path, threads=2)
    idle = OnnxRuntime(path, threads=2, spin=False)
    assert idle.session.get_session_options().get_session_config_entry(SPIN) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        busy.session.get_session_options().get_session_config_entry(SPIN)
    np.testing.assert_array_equal(busy.run({"x": x})["y"], idle.run({"x": x})["y"])
    np.testing.assert_array_equal(idle.run({"x": x})["y"], x @ np.arange(8, dtype=np.float32).reshape(4, 2))


def test_serving_does_not_spin_by_default(monkeypatch):
    from service.config import Settings

    monkeypatch.delenv("KILN_SERVING_SPIN_WAIT", raising=False)
    assert Settings().serving_spin_wait is False
    monkeypatch.setenv("KILN_SERVING_SPIN_WAIT", "true")
    assert Settings().serving_spin_wait is True
