import numpy as np
import pytest

from service.errors import InvalidOptions
from service.options import ConversionOptions, Tolerance
from workers.validation import OutputComparison, looks_like_scores


def _compare(got, ref, tol, scores=False):
    c = OutputComparison(scores)
    c.add(np.asarray(got, np.float32), np.asarray(ref, np.float32), tol)
    return c.result(tol)


def test_identical_outputs_pass_every_check():
    ref = np.random.default_rng(0).standard_normal((4, 10))
    m = _compare(ref, ref, Tolerance(atol=1e-6, rtol=0, min_cosine=0.999999, min_top1=1.0), scores=True)
    assert m.passed and m.max_abs == 0 and m.rel == 0 and m.cosine == pytest.approx(1.0) and m.top1 == 1.0


def test_relative_error_is_finite_when_reference_is_zero():
    m = _compare(np.zeros(5), np.zeros(5), Tolerance(atol=0, rtol=0, min_cosine=0.99))
    assert m.rel == 0 and m.cosine == 1.0 and m.passed
    m = _compare(np.full(5, 1e-3), np.zeros(5), Tolerance(atol=1e-2))
    assert np.isfinite(m.rel) and m.passed  # within atol even though the reference is all zero


def test_abs_tolerance_failure_is_explained():
    m = _compare([1.0, 2.0, 3.5], [1.0, 2.0, 3.0], Tolerance(atol=0.1, rtol=0.01))
    assert not m.passed and m.max_abs == pytest.approx(0.5)
    assert "max abs error" in m.failed_checks[0]


def test_top1_agreement_counts_rows():
    ref = np.array([[0, 1.0], [1.0, 0], [0, 1.0], [1.0, 0]])
    got = ref.copy()
    got[0] = [1.0, 0]
    m = _compare(got, ref, Tolerance(min_top1=0.99), scores=True)
    assert m.top1 == pytest.approx(0.75) and not m.passed and "top-1" in m.failed_checks[0]


def test_non_finite_outputs_fail():
    m = _compare([np.nan, 1.0], [0.5, 1.0], Tolerance(atol=1.0))
    assert not m.passed


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs"):
        _compare(np.zeros((2, 3)), np.zeros((3, 2)), Tolerance())


def test_scores_heuristic():
    assert looks_like_scores(np.zeros((2, 10), np.float32), True)
    assert not looks_like_scores(np.zeros((2, 10), np.float32), False)  # dynamic last axis
    assert not looks_like_scores(np.zeros((2,), np.float32), True)
    assert not looks_like_scores(np.zeros((2, 10), np.int64), True)


def test_options_validate_names_and_merge_tolerances():
    opts = ConversionOptions.parse(
        {
            "targets": ["onnxruntime"],
            "precisions": ["float16", "int8"],
            "tolerances": {"fp16": {"atol": 0.5}, "logits": {"min_cosine": 0.9}},
        }
    )
    assert opts.precisions == ["fp16", "int8"]
    t = opts.tolerance_for("fp16", "logits")
    assert t.atol == 0.5 and t.min_cosine == 0.9 and t.rtol == 1e-2
    with pytest.raises(InvalidOptions, match="unknown target 'tflite'"):
        ConversionOptions.parse({"targets": ["tflite"]})
    with pytest.raises(InvalidOptions, match="unknown precision 'int4'"):
        ConversionOptions.parse({"precisions": ["int4"]})
    with pytest.raises(InvalidOptions, match="policy"):
        ConversionOptions.parse({"policy": "vibes"})
