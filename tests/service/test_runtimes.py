"""The ONNX Runtime runtime's session settings: served sessions' intra-op threads stop busy-waiting
when a run returns (they still spin between the parallel sections of a run)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from service.runtimes.onnxruntime import OnnxRuntime

SPIN = "session.intra_op.allow_spinning"
STOP = "session.force_spinning_stop"


def _model(path, weight: np.ndarray | None = None, layers: int = 1):
    """x @ W, `layers` times over (W square when layers > 1); W is arange(8) as 4x2 by default."""
    weight = np.arange(8, dtype=np.float32).reshape(4, 2) if weight is None else weight
    w = helper.make_tensor("W", TensorProto.FLOAT, list(weight.shape), weight.ravel().tolist())
    names = ["x"] + [f"h{i}" for i in range(1, layers)] + ["y"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", [a, "W"], [b]) for a, b in zip(names, names[1:])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_spin_setting_reaches_the_session_and_changes_no_answer(tmp_path):
    path = _model(tmp_path / "m.onnx")
    x = np.ones((3, 4), np.float32)
    busy = OnnxRuntime(path, threads=2)
    idle = OnnxRuntime(path, threads=2, spin=False)
    assert idle.session.get_session_options().get_session_config_entry(STOP) == "1"
    for rt, key in ((idle, SPIN), (busy, SPIN), (busy, STOP)):  # ONNX Runtime's defaults: spin, no stop
        with pytest.raises(RuntimeError, match="does not have configuration"):
            rt.session.get_session_options().get_session_config_entry(key)
    np.testing.assert_array_equal(busy.run({"x": x})["y"], idle.run({"x": x})["y"])
    np.testing.assert_array_equal(idle.run({"x": x})["y"], x @ np.arange(8, dtype=np.float32).reshape(4, 2))


def test_serving_does_not_spin_by_default(monkeypatch):
    from service.config import Settings

    monkeypatch.delenv("KILN_SERVING_SPIN_WAIT", raising=False)
    assert Settings().serving_spin_wait is False
    monkeypatch.setenv("KILN_SERVING_SPIN_WAIT", "true")
    assert Settings().serving_spin_wait is True


def _idle_cpu_ms(rt, x) -> float:
    """CPU this process burns while it sleeps 100 ms right after a run (the most of 5 tries)."""
    burnt = []
    for _ in range(5):
        rt.run({"x": x})
        before = time.process_time()
        time.sleep(0.1)
        burnt.append((time.process_time() - before) * 1e3)
    return max(burnt)


def test_served_sessions_burn_no_cpu_between_runs(tmp_path):
    """ONNX Runtime's own default keeps intra-op threads spinning after a run; a served session's
    stop when the run returns, so an idle server leaves its cores to the rest of the machine."""
    # big enough that ONNX Runtime splits each MatMul across its intra-op threads
    path = _model(tmp_path / "w.onnx", np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32), 2)
    x = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    served = OnnxRuntime(path, threads=2, spin=False)
    spinning = OnnxRuntime(path, threads=2)
    assert _idle_cpu_ms(spinning, x) > 3.0  # the control: this is what the setting prevents
    assert _idle_cpu_ms(served, x) < 2.0
    np.testing.assert_allclose(served.run({"x": x})["y"], spinning.run({"x": x})["y"], rtol=1e-5)
