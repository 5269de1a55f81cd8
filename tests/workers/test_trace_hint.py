"""A model whose trace fails on an index taken inside torch's TransformGetItemToIndex mode gets a
capture report that says why: Hugging Face's attention masks (GPT-2's in transformers 4.57) read a
mask tensor that way inside nested torch.vmap, and torch.jit.trace failed with a bare
"RuntimeError: unordered_map::at", so the report said only that. The zoo's masked_attention builds
its mask the same way, without transformers."""

from __future__ import annotations

import pytest

from service import boundary
from tests.conftest import ZOO
from tests.workers.test_engine import convert

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")


def test_a_trace_failing_on_a_vmapped_index_says_where_and_why(tmp_path):
    ctx = convert(tmp_path, "masked_attention", targets=("torchscript",))
    trace = ctx.capture("trace")
    assert trace is not None and not trace.ok
    assert "unordered_map::at" in (trace.error or ""), trace.error
    line = next(
        i for i, text in enumerate((ZOO / "masked_attention.py").read_text().splitlines(), 1) if "& keep[b, k])" in text
    )
    assert trace.hint and f"masked_attention.py:{line} in mask_function" in trace.hint, trace.hint
    assert "inside torch.vmap" in trace.hint and "TransformGetItemToIndex" in trace.hint
    hazard = next(h for h in ctx.hazards if h.kind == "untraceable")
    assert hazard.detail == f"torch.jit.trace failed: {trace.hint}"
    assert "**untraceable**" in (tmp_path / "out" / "summary.md").read_text()
    # the other captures are unaffected: the export capture still agrees with eager
    export = ctx.capture("export")
    assert export is not None and export.ok and export.agrees, export and export.error
    # and the TorchScript candidate, with no capture to build from (the script fails on the nested
    # function), says why in its own reason, not only "see the capture step"
    script = ctx.capture("script")
    assert script is not None and not script.ok
    cand = ctx.candidate("torchscript-fp32")
    assert not cand.passed and f"trace failed ({trace.hint[:60]}" in (cand.reason or ""), cand.reason
    assert "script failed (UnsupportedNodeError" in cand.reason
