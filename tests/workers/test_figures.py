"""Figures and verdicts a user can act on: interleaved timing with intervals and a noisy verdict,
honest selection, validation by output kind, degenerate references, and no files left behind.
Conversions run for real (sandbox, exporters, ONNX Runtime)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from service import samples as sample_io
from service.options import ConversionOptions
from service.signature import Signature, TensorSpec
from workers import engine
from workers.benchmark import interleaved, median_interval, noisy, ratio
from workers.report import summary
from workers.steps.compile import scratch
from workers.validation import OutputComparison, degenerate_reference, output_kind

LINEAR = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
    "outputs": ["logits"],
    "dims": {"batch": [1, 4, 16]},
}


def _bundle(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "model.py"
    path.write_text(source)
    return path


def _convert(tmp_path: Path, source: str, signature: dict, **options):
    opts = {"targets": ["onnxruntime"], "precisions": ["fp32"], "threads": 1, "batch_sizes": [1], **options}
    return engine.convert(
        _bundle(tmp_path, source), tmp_path / "out", entry="model.py:build_model", signature=signature, options=opts
    )


# --- timing -------------------------------------------------------------------------------------


def test_median_interval_and_paired_ratio():
    assert median_interval([5.0]) == (5.0, 5.0)
    lo, hi = median_interval(list(range(100)))
    assert 35 <= lo < 49.5 < hi <= 64  # about the middle fifth of 100 values
    # paired rounds: both slow down together in round 3 (load), the ratio stays 2
    mid, lo, hi = ratio([2.0, 2.0, 20.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    assert (mid, lo, hi) == (2.0, 2.0, 2.0) and not noisy(lo, hi)
    assert noisy(1.0, 1.5) and noisy(0.0, 1.0) and not noisy(1.0, 1.2)


def test_interleaved_rounds_take_turns_and_stop_when_settled():
    calls: list[str] = []
    out = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, batch=1, budget_s=0.2, pairs=[("a", "b")]
    )
    assert len(out["a"].rounds) == len(out["b"].rounds) >= 7
    # turns: the calls come in alternating blocks, at least one switch per round (the order rotates,
    # so a round's last block and the next round's first are the same contender's)
    switches = sum(1 for x, y in zip(calls, calls[1:]) if x != y)
    assert switches >= len(out["a"].rounds)
    point = out["a"].point()
    assert point["rounds"] == len(out["a"].rounds) and point["p50_low_ms"] <= point["p50_ms"] <= point["p50_high_ms"]


NOISY_EAGER = """
import random, time
import torch

class Jittery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return self.fc(x)
        # eager only: every call stalls a random 0-40 ms, as on a machine whose load comes and goes
        time.sleep(random.uniform(0.0, 0.04))
        return self.fc(x)

def build_model():
    return Jittery()
"""


def test_an_unstable_eager_baseline_gives_a_noisy_verdict_not_a_precise_speedup(tmp_path):
    ctx = _convert(tmp_path, NOISY_EAGER, LINEAR, bench_seconds=0.3)
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed and cand.speedup
    assert cand.noisy and cand.speedup_high / cand.speedup_low > 1.3, (cand.speedup_low, cand.speedup_high)
    assert ctx.selection.noisy and "too noisy" in ctx.selection.reason
    assert ctx.benchmark_conditions["noisy"] == ["onnxruntime-fp32"]
    assert ctx.benchmark_conditions["threads"]["runtimes"] == 1
    text = summary(__import__("json").loads((ctx.out / "report.json").read_text()))
    assert "noisy (" in text and "NOISY: onnxruntime-fp32" in text


SLOW_IN_ORT = """
import torch

class Upsample(torch.nn.Module):
    # bicubic upsampling: one fused kernel in PyTorch, a slow cubic Resize in ONNX Runtime
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic")

def build_model():
    return Upsample()
"""


def test_a_candidate_slower_than_eager_is_not_presented_as_a_speedup(tmp_path):
    sig = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 8, 64, 64]}], "outputs": ["image"]}
    ctx = _convert(
        tmp_path,
        SLOW_IN_ORT,
        sig,
        bench_seconds=0.5,
        tolerances={"fp32": {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.9999}},
    )
    cand = ctx.candidate("onnxruntime-fp32")
    assert cand.passed, cand.validation
    assert cand.speedup_low is not None and cand.speedup_low < 1, (cand.speedup, cand.speedup_low)
    assert ctx.selection.candidate == cand.id and ctx.selection.beats_eager is False
    if not cand.noisy:
        assert ctx.selection.reason.startswith("no candidate is faster than eager PyTorch"), ctx.selection.reason
    else:
        assert "too noisy" in ctx.selection.reason
    assert "x eager PyTorch" not in ctx.selection.reason.split(";")[0] or "no candidate" in ctx.selection.reason


# --- validation by output kind -------------------------------------------------------------------


def _compare(kind: str, got: np.ndarray, ref: np.ndarray, precision: str = "int8"):
    tol = ConversionOptions().tolerance_for(precision, "out", "cpu", kind)
    c = OutputComparison(kind)
    c.add(got, ref, tol)
    return c.result(tol)


def test_output_kinds_by_default_and_as_declared():
    hidden = np.zeros((2, 8, 32), np.float32)
    assert output_kind(TensorSpec(name="last_hidden_state", shape=["batch", "seq", 32]), hidden) == "embedding"
    assert output_kind(TensorSpec(name="logits", shape=["batch", 10]), np.zeros((2, 10), np.float32)) == "scores"
    # 2-D and class-sized but not named like scores: never an argmax by default
    assert (
        output_kind(TensorSpec(name="pooler_output", shape=["batch", 32]), np.zeros((2, 32), np.float32)) == "embedding"
    )
    assert output_kind(TensorSpec(name="ids", shape=["batch"]), np.zeros(2, np.int64)) == "ids"
    assert output_kind(TensorSpec(name="h", kind="logits"), hidden) == "scores"  # declared wins, aliases resolve
    with pytest.raises(ValueError, match="unknown output kind 'vibes'"):
        TensorSpec(name="h", kind="vibes")
    assert (
        Signature.parse(
            {"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}], "outputs": [{"name": "y", "kind": "hidden"}]}
        )
        .outputs[0]
        .kind
        == "embedding"
    )


def test_an_embedding_int8_candidate_with_high_cosine_passes_where_argmax_checks_would_refuse_it():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 8, 32)).astype(np.float32)
    got = (ref + 0.012 * rng.standard_normal(ref.shape)).astype(np.float32)
    kind = output_kind(TensorSpec(name="last_hidden_state", shape=["batch", "seq", 32]), ref)
    m = _compare(kind, got, ref)
    assert m.cosine >= 0.9999 and m.passed and m.top1 is None, m.failed_checks
    # the same outputs judged as class scores: the argmax over hidden units flips
    as_scores = _compare("scores", got, ref)
    assert as_scores.top1 is not None and as_scores.top1 < 0.99


def test_a_logits_candidate_with_flipped_classes_fails():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((64, 10)).astype(np.float32) * 3
    got = ref.copy()
    for row in range(10):  # ten rows now predict their runner-up class
        order = np.argsort(ref[row])
        got[row, order[-1]], got[row, order[-2]] = ref[row, order[-2]], ref[row, order[-1]]
    m = _compare("scores", got, ref)
    assert m.cosine > 0.98  # close as vectors
    assert not m.passed and m.rows == 64 and m.top1 == pytest.approx(54 / 64)
    assert any("top-1 agreement 0.8438 < 0.95 over 64 rows" in f for f in m.failed_checks)


def test_ids_are_compared_exactly():
    ref = np.arange(64) % 7
    got = ref.copy()
    got[:5] += 1
    m = _compare("ids", got, ref, precision="fp32")
    assert not m.passed and m.exact == pytest.approx(59 / 64) and "exact agreement" in m.failed_checks[0]


def test_enough_rows_are_generated_for_the_statistics():
    sig = Signature.parse(LINEAR)
    samples = sample_io.generate(sig, min_rows=sample_io.MIN_ROWS)
    assert sum(sample_io.rows(sig, s) for _, s in samples) >= 64
    static = Signature.parse({"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}]})
    assert len(sample_io.generate(static, min_rows=64)) == 64


def test_degenerate_references():
    rng = np.random.default_rng(2)
    one_class = rng.standard_normal((64, 10)) * 0.01
    one_class[:, 3] += 5
    assert "class 3 for every one of its 64 rows" in degenerate_reference("scores", [one_class])
    assert "constant" in degenerate_reference("embedding", [np.ones((4, 8))])
    flat = np.tile(rng.standard_normal(32), (16, 1)) + 1e-7 * rng.standard_normal((16, 32))
    assert "barely changes" in degenerate_reference("embedding", [flat])
    assert degenerate_reference("scores", [rng.standard_normal((64, 10))]) is None
    assert degenerate_reference("embedding", [rng.standard_normal((4, 8, 16))]) is None


ONE_CLASS = """
import torch

class Constant(torch.nn.Module):
    # the untrained head of a model whose features are dead: every input gets class 2
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.fc.weight.mul_(1e-6)
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))

    def forward(self, x):
        return self.fc(x)

def build_model():
    return Constant()
"""


def test_a_degenerate_reference_is_flagged_in_the_report(tmp_path):
    ctx = _convert(tmp_path, ONE_CLASS, LINEAR, bench_seconds=0.05)
    assert "logits" in ctx.degenerate and "class 2 for every one" in ctx.degenerate["logits"]
    assert ctx.candidate("onnxruntime-fp32").validation.outputs["logits"].rows >= 64
    text = (ctx.out / "summary.md").read_text()
    assert "degenerate" in text and "give real samples" in text


# --- nothing left behind --------------------------------------------------------------------------


def test_scratch_holds_what_a_builder_writes_to_its_directory_or_tmp(tmp_path, monkeypatch):
    cwd = tmp_path / "where-kiln-was-run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = os.environ.get("TMPDIR")
    with scratch(tmp_path / "job" / "scratch" / "c") as path:
        Path("sym_shape_infer_temp.onnx").write_bytes(b"x")  # as ONNX Runtime's shape inference does
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(b"y")
        assert Path(f.name).parent == path and (path / "sym_shape_infer_temp.onnx").exists()
    assert list(cwd.iterdir()) == [] and not path.exists() and Path.cwd() == cwd
    assert os.environ.get("TMPDIR") == before


def test_an_int8_conversion_leaves_nothing_outside_its_directories(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    job = tmp_path / "job"
    job.mkdir()
    sig = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
        "outputs": ["embedding"],
        "dims": {"batch": [1, 4, 16]},
    }
    src = "import torch\ndef build_model():\n    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))\n"
    ctx = engine.convert(
        _bundle(job, src),
        job / "out",
        entry="model.py:build_model",
        signature=sig,
        options={
            "targets": ["onnxruntime"],
            "precisions": ["fp32", "int8"],
            "threads": 1,
            "bench_seconds": 0.05,
            "batch_sizes": [1],
        },
    )
    assert ctx.selection and ctx.selection.candidate
    by_id = {c.id: c for c in ctx.candidates}
    assert by_id["onnxruntime-int8-dynamic"].passed, by_id["onnxruntime-int8-dynamic"].validation
    assert by_id["onnxruntime-int8-dynamic"].validation.outputs["embedding"].kind == "embedding"
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in job.iterdir()) == ["model.py", "out"]
    assert not (ctx.work / "scratch").exists() or not any((ctx.work / "scratch").iterdir())
