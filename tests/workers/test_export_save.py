"""A model whose torch.export program the serializer refuses as captured gets passing torch.export
candidates: Hugging Face's attention masks (GPT-2's among them) read the padding mask inside torch's
TransformGetItemToIndex mode, which export records as a `flat_apply` node holding a function
constant, and torch.export.save failed on it ("SerializeError: Failed serializing node flat_apply"),
so there was no export capture and neither torch_export nor aotinductor had a candidate. The zoo's
masked_attention builds its mask the same way, without transformers."""

from __future__ import annotations

import pytest

from service import boundary
from tests.workers.test_engine import convert

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")


def test_a_program_with_an_unserializable_mask_node_gets_passing_pt2_candidates(tmp_path):
    ctx = convert(tmp_path, "masked_attention", targets=("torch_export", "aotinductor"))
    export = ctx.capture("export")
    assert export is not None and export.ok, export and export.error
    assert export.agrees, export.disagreeing_samples
    # saved lowered, and the record says why
    assert any("flat_apply" in w and "run_decompositions" in w for w in export.warnings), export.warnings
    assert {c.id for c in ctx.candidates} == {"torch_export-fp32", "aotinductor-fp32"}
    for c in ctx.candidates:
        assert c.status == "built" and c.passed, (c.id, c.reason, c.validation)
        assert c.validation is not None and c.validation.outputs["hidden"].max_abs < 1e-4
