"""Selection between candidates whose figures are within each other's noise: an artifact that runs
code is served through an isolated runner (a process hop per batch), a graph runtime in the
server's own process, so a graph runtime within the noise of a code-bearing winner is selected."""

from __future__ import annotations

import numpy as np
import pytest

from service.runtimes.base import ArtifactInfo
from service.signature import Signature
from service.states import CandidateStatus
from workers.context import BenchPoint, BundleInfo, Candidate, Context, Validation
from workers.pipeline import StepLog
from workers.steps.select import Select

ROUNDS = 9


def _candidate(ctx: Context, target: str, runtime: str, rounds_ms: list[float]) -> Candidate:
    directory = ctx.out / f"{target}-fp32"
    directory.mkdir(parents=True)
    ArtifactInfo(runtime=runtime, file="model").save(directory)
    p50 = float(np.median(rounds_ms))
    point = BenchPoint(
        batch=1,
        p50_ms=p50,
        p90_ms=p50,
        p99_ms=p50,
        mean_ms=p50,
        throughput=1000 / p50,
        iterations=10 * ROUNDS,
        rounds=ROUNDS,
        round_p50_ms=rounds_ms,
    )
    return Candidate(
        id=f"{target}-fp32",
        target=target,
        precision="fp32",
        status=CandidateStatus.BUILT,
        artifact_dir=f"{target}-fp32",
        validation=Validation(passed=True, samples=8),
        benchmark=[point],
    )


def _context(tmp_path) -> Context:
    signature = Signature.parse({"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 4]}})
    return Context(
        workdir=str(tmp_path / "work"),
        out_dir=str(tmp_path / "out"),
        bundle=BundleInfo(kind="python", root=str(tmp_path)),
        signature=signature,
    )


def _rounds(base: float, wobble: list[float]) -> list[float]:
    return [base * w for w in wobble]


# Two contenders timed in the same rounds: TorchScript's lead changes sides round by round (noise),
# or holds in every round (a real lead).
NOISY_LEAD = [0.9, 1.1, 0.92, 1.08, 0.95, 1.06, 0.9, 1.1, 0.97]
STEADY = [1.0] * ROUNDS


@pytest.mark.parametrize("lead, selected", [(NOISY_LEAD, "onnxruntime-fp32"), ([0.7] * ROUNDS, "torchscript-fp32")])
def test_a_graph_runtime_within_the_noise_of_a_code_bearing_winner_is_selected(tmp_path, lead, selected):
    ctx = _context(tmp_path)
    ts = _candidate(ctx, "torchscript", "torchscript", _rounds(10.0, [w * 0.98 for w in lead]))
    ort = _candidate(ctx, "onnxruntime", "onnxruntime", _rounds(10.0, STEADY))
    ctx.candidates = [ts, ort]
    assert np.median(ts.benchmark[0].round_p50_ms) < np.median(ort.benchmark[0].round_p50_ms)  # TorchScript leads

    Select().run(ctx, StepLog("select"))

    assert ctx.selection is not None and ctx.selection.candidate == selected, ctx.selection
    if selected == "onnxruntime-fp32":
        assert "preferred to torchscript-fp32" in ctx.selection.reason, ctx.selection.reason
        assert "isolated runner" in (ts.lost_because or ""), ts.lost_because
        assert ort.lost_because is None
    else:  # a lead outside the noise is kept, whatever serves it
        assert "preferred to" not in ctx.selection.reason
        assert ort.lost_because and ort.lost_because.startswith("slower"), ort.lost_because


def test_two_graph_runtimes_are_ranked_by_their_figures_alone(tmp_path):
    ctx = _context(tmp_path)
    ov = _candidate(ctx, "openvino", "openvino", _rounds(10.0, [w * 0.98 for w in NOISY_LEAD]))
    ort = _candidate(ctx, "onnxruntime", "onnxruntime", _rounds(10.0, STEADY))
    ctx.candidates = [ov, ort]

    Select().run(ctx, StepLog("select"))

    assert ctx.selection is not None and ctx.selection.candidate == "openvino-fp32", ctx.selection
    assert "preferred to" not in ctx.selection.reason
