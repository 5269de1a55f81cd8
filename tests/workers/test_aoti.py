"""An AOTInductor package serves the whole batch range it was built for, down to batch 1, when
that range ends at 2: compiled from the saved capture, such a range used to be narrowed to the
constant 2, and the package read two rows of token ids at batch 1 (its runner aborted on the
embedding's 'index out of bounds')."""

from __future__ import annotations

import numpy as np
import pytest

from service import boundary, runtimes
from service.runner import IsolatedRuntime
from workers import engine

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")

# Token ids through an embedding and a projection: the least that shows it (the projection's
# matmul on [batch, seq, d] is where AOTInductor checks `batch > 1`).
TOKENS = """
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(1000, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def build():
    return Tokens().eval()
"""
SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, 1000]}],
    "outputs": ["hidden"],
    "dims": {"batch": [1, 1, 2], "seq": [8, 16, 32]},
}


def test_a_package_for_batch_1_to_2_runs_at_batch_1(tmp_path, monkeypatch):
    bundle = tmp_path / "tokens.py"
    bundle.write_text(TOKENS)
    ctx = engine.convert(
        bundle,
        tmp_path / "out",
        entry="tokens.py:build",
        signature=SIGNATURE,
        options={"targets": ["aotinductor"], "precisions": ["fp32"], "bench_seconds": 0.05, "threads": 1},
    )
    (cand,) = ctx.candidates
    # validation runs the min sample (batch 1) in the isolated runner
    assert cand.status == "built" and cand.passed, (cand.reason, cand.validation)
    assert cand.validation is not None and cand.validation.outputs["hidden"].max_abs < 1e-4

    monkeypatch.delenv(runtimes.INSIDE_BOX, raising=False)
    rt = runtimes.load(tmp_path / "out" / cand.artifact_dir)
    try:
        assert isinstance(rt, IsolatedRuntime)
        ids = np.random.default_rng(0).integers(0, 1000, size=(2, 32)).astype(np.int64)
        for seq in (8, 32):
            both = rt.run({"ids": ids[:, :seq]})["hidden"]
            for row in range(2):
                one = rt.run({"ids": ids[row : row + 1, :seq]})["hidden"]
                assert one.shape == (1, seq, 16)
                # a row alone gives what it gave beside another
                np.testing.assert_allclose(one[0], both[row], atol=1e-5)
    finally:
        rt.close()
