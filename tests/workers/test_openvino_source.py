"""The openvino target's fp32 IR comes from whichever source runs faster in the box: the ONNX export,
or the eager model converted by OpenVINO's PyTorch frontend. Either way the IR has the signature's
input and output names and its dynamic dimensions, and passes validation at every batch size."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from service import runtimes
from service import samples as sample_io
from service.runtimes.openvino import check_ir, read_ir
from tests.conftest import zoo_bundle, zoo_signature
from workers import engine

OUTPUTS = ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1"]


@pytest.fixture(scope="module")
def hf_job(tmp_path_factory):
    # named outputs (a ModelOutput-like dict, one tensor returned twice) and a dynamic batch and length
    tmp_path = tmp_path_factory.mktemp("ov-source")
    ctx = engine.convert(
        zoo_bundle(tmp_path, "hf_like"),
        tmp_path / "out",
        entry="hf_like.py:build_model",
        signature=zoo_signature("hf_like"),
        options={
            "targets": ["openvino"],
            "precisions": ["fp32"],
            "threads": 1,
            "bench_seconds": 0.2,
            "batch_sizes": [1, 2],
        },
    )
    return ctx, tmp_path / "out"


def _matches_eager_at_batch_1_and_2(ctx, ir_dir):
    samples, refs = sample_io.load(ctx.samples_file), sample_io.load(ctx.reference_file)
    rt = runtimes.load(ir_dir, threads=1)
    try:
        for batch in (1, 2):
            i = next(k for k, s in enumerate(samples) if s["ids"].shape[0] == batch)
            got = rt.run(samples[i])
            for name in OUTPUTS:
                np.testing.assert_allclose(got[name], refs[i][name], atol=1e-4, rtol=1e-3)
    finally:
        rt.close()


def _has_the_signatures_names(xml):
    ir = read_ir(xml)
    assert [p.get_names() for p in ir.inputs] == [{"ids"}]
    assert [str(p.get_partial_shape()) for p in ir.inputs] == ["[?,?]"]
    assert [p.get_names() for p in ir.outputs] == [{n} for n in OUTPUTS]


def test_fp32_ir_from_the_faster_source_keeps_the_signature(hf_job):
    ctx, out = hf_job
    cand = next(c for c in ctx.candidates if c.id == "openvino-fp32")
    assert cand.passed, (cand.status, cand.reason, cand.validation, cand.notes)
    assert [p.batch for p in cand.benchmark] == [1, 2]
    assert sorted(cand.validation.outputs) == sorted(OUTPUTS)
    # the note names the source kept and both medians
    (note,) = [n for n in cand.notes if n.startswith("OpenVINO IR converted from")]
    figures = r"p50 [0-9.]+ ms against [0-9.]+ ms from the"
    assert re.fullmatch(
        rf"OpenVINO IR converted from the eager model \(PyTorch frontend\): {figures} \S+ ONNX export", note
    ) or re.fullmatch(
        rf"OpenVINO IR converted from the \S+ ONNX export: {figures} eager model \(PyTorch frontend\)", note
    ), cand.notes

    _has_the_signatures_names(out / "openvino-fp32" / "model.xml")
    _matches_eager_at_batch_1_and_2(ctx, out / "openvino-fp32")


def test_ir_from_the_eager_model_keeps_the_signature(hf_job, tmp_path):
    """Whichever IR the timing kept, the one from the eager model has the signature's names and
    dynamic dimensions, and gives the eager outputs (converted in a child: model code never runs in
    the test process)."""
    ctx, out = hf_job
    args = {
        "bundle": ctx.bundle.model_dump(),
        "signature": ctx.signature.to_json(),
        "samples_file": str(ctx.samples_file),
        "sample_labels": ctx.sample_labels,
    }
    code = (
        "import json, sys, openvino as ov, torch; from service.signature import Signature;"
        "from service import samples; from workers.sandbox_ops import _eager_ir;"
        "a = json.loads(sys.argv[1]); sig = Signature.parse(a['signature']);"
        "m = _eager_ir(ov, torch, a, sig, samples.load(a['samples_file']));"
        "ov.save_model(m, sys.argv[2], compress_to_fp16=False)"
    )
    ir_dir = tmp_path / "ir"
    ir_dir.mkdir()
    subprocess.run([sys.executable, "-c", code, json.dumps(args), str(ir_dir / "model.xml")], check=True)
    shutil.copy(out / "openvino-fp32" / "kiln-artifact.json", ir_dir)
    check_ir(ir_dir / "model.xml")
    _has_the_signatures_names(ir_dir / "model.xml")
    _matches_eager_at_batch_1_and_2(ctx, ir_dir)
