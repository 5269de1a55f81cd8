"""How a served version runs: how many intra-op threads it gets (one, when the model is so small
that waking more costs more than they save; as many as the cores allow otherwise), and the room
its isolated runner has to unpack the artifact."""

from __future__ import annotations

import time

from service.serving.manager import _one_thread_is_faster, _runs_under


class Timed:
    """A runtime whose run takes a fixed time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0

    def run(self, sample):
        self.runs += 1
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return {}


def test_one_thread_wins_when_it_runs_a_small_model_faster():
    assert _one_thread_is_faster(Timed(200e-6), Timed(40e-6), {}) is True


def test_several_threads_stay_when_one_is_no_faster():
    assert _one_thread_is_faster(Timed(40e-6), Timed(40e-6), {}) is False
    assert _one_thread_is_faster(Timed(40e-6), Timed(200e-6), {}) is False


def test_only_a_model_that_runs_in_under_a_millisecond_is_tried_on_one_thread():
    slow, fast = Timed(3e-3), Timed(50e-6)
    assert _runs_under(slow.run, {}, 1e-3) is False
    assert _runs_under(fast.run, {}, 1e-3) is True


def test_a_runner_box_has_room_to_unpack_its_artifact(tmp_path):
    """An AOTInductor package unpacks its library and weights into the runner's /tmp: the box's
    tmpfs and largest writable file grow with the artifact (a T5 encoder's weights did not fit)."""
    from service.runner import scratch_for

    small = tmp_path / "small"
    small.mkdir()
    (small / "model.onnx").write_bytes(b"x" * 1000)
    assert scratch_for(small) == {"file_size_bytes": 64 << 20, "tmp_bytes": 256 << 20}
    big = tmp_path / "big"
    (big / "data").mkdir(parents=True)
    with open(big / "data" / "weights.bin", "wb") as f:  # sparse: no disk used
        f.truncate(300 << 20)
    (big / "model.pt2").write_bytes(b"x" * 1000)
    room = scratch_for(big)
    assert room["file_size_bytes"] > 300 << 20 and room["tmp_bytes"] > (300 << 20) + 1000
