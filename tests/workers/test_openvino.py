"""The openvino target: IR candidates (fp32, int8 by NNCF calibrated on the job's samples) built from the
ONNX export in the real sandbox, validated against eager, benchmarked beside ONNX Runtime, loaded by the
OpenVINO runtime at several batch sizes, and served over /v2 by the real API."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import httpx
import numpy as np
import pytest

from service import runtimes
from service import samples as sample_io
from service.errors import InvalidBundle
from service.runtimes.base import ArtifactInfo
from tests.conftest import ZOO, zoo_bundle, zoo_signature
from workers import engine
from workers.compilers.int8 import calibration_indices

CNN_SIGNATURE = zoo_signature("cnn", "SMALL_SIGNATURE")


@pytest.fixture(scope="module")
def cnn_job(tmp_path_factory):
    """One conversion of the small zoo CNN to ONNX Runtime and OpenVINO, fp32, int8 and bf16."""
    tmp = tmp_path_factory.mktemp("openvino")
    ctx = engine.convert(
        zoo_bundle(tmp, "cnn"),
        tmp / "out",
        entry="cnn.py:build_small",
        signature=CNN_SIGNATURE,
        options={
            "targets": ["onnxruntime", "openvino"],
            "precisions": ["fp32", "int8", "bf16"],
            "threads": 1,
            "bench_seconds": 0.2,
            "batch_sizes": [1, 4],
        },
    )
    return ctx, tmp / "out"


def test_registered_as_a_graph_runtime_and_a_target():
    from service.options import TARGETS, ConversionOptions
    from workers.compilers import COMPILERS

    assert "openvino" in runtimes.available() and "openvino" in TARGETS and "openvino" in COMPILERS
    assert runtimes.get("openvino").runs_code is False
    assert ConversionOptions().targets == ["onnxruntime", "torchscript"]  # the defaults stay


def test_fp32_and_int8_candidates_are_built_validated_and_benchmarked(cnn_job):
    ctx, out = cnn_job
    by_id = {c.id: c for c in ctx.candidates}
    for cid in ("openvino-fp32", "openvino-int8"):
        cand = by_id[cid]
        assert cand.passed, (cid, cand.status, cand.reason, cand.validation)
        assert [p.batch for p in cand.benchmark] == [1, 4] and all(p.p50_ms > 0 for p in cand.benchmark)
        assert cand.build_s and cand.build_s > 0 and cand.speedup
        assert sorted(p.name for p in (out / cid).iterdir()) == ["kiln-artifact.json", "model.bin", "model.xml"]
        info = ArtifactInfo.load(out / cid)
        assert (info.runtime, info.file, info.precision, info.device) == (
            "openvino",
            "model.xml",
            cand.precision,
            "cpu",
        )
        assert info.extra["inference_precision"] == "f32"
    # the same job benchmarked ONNX Runtime beside it
    assert by_id["onnxruntime-fp32"].passed and by_id["onnxruntime-fp32"].benchmark
    assert by_id["openvino-fp32"].validation.outputs["logits"].max_abs < 1e-4
    assert by_id["openvino-int8"].validation.outputs["logits"].cosine > 0.98
    # int8 was calibrated on the job's own samples, the ones ONNX Runtime's static int8 uses
    n = len(calibration_indices(ctx.sample_labels))
    assert n >= 1
    assert any(f"calibrated on {n} sample(s)" in note for note in by_id["openvino-int8"].notes), by_id[
        "openvino-int8"
    ].notes
    assert ArtifactInfo.load(out / "openvino-int8").extra["calibration_samples"] == n
    xml = (out / "openvino-int8" / "model.xml").read_text()
    assert (
        'type="FakeQuantize"' in xml and 'type="FakeQuantize"' not in (out / "openvino-fp32" / "model.xml").read_text()
    )
    # fp32 weights are kept fp32 (openvino.save_model compresses to fp16 unless told not to)
    assert 'element_type="f16"' not in (out / "openvino-fp32" / "model.xml").read_text()


def test_bf16_where_the_cpu_plugin_computes_in_it(cnn_job):
    from service.runtimes.openvino import cpu_precisions

    ctx, out = cnn_job
    cand = next(c for c in ctx.candidates if c.id == "openvino-bf16")
    if "bf16" in cpu_precisions():
        assert cand.passed, (cand.status, cand.reason, cand.validation)
        info = ArtifactInfo.load(out / "openvino-bf16")
        assert (info.precision, info.extra["inference_precision"]) == ("bf16", "bf16")
        # the IR is the fp32 one; the plugin computes in bf16
        assert 'element_type="bf16"' not in (out / "openvino-bf16" / "model.xml").read_text()
    else:
        assert cand.status == "unavailable" and "bf16" in cand.reason


@pytest.mark.parametrize("cid", ["openvino-fp32", "openvino-int8"])
def test_runtime_gives_the_eager_rows_at_batch_1_and_4(cnn_job, cid):
    ctx, out = cnn_job
    samples = sample_io.load(ctx.samples_file)
    refs = sample_io.load(ctx.reference_file)
    i = max(range(len(samples)), key=lambda k: samples[k]["image"].shape[0])
    x, want = samples[i]["image"], refs[i]["logits"]
    assert x.shape[0] == 4
    rt = runtimes.load(out / cid, threads=1)
    try:
        assert [s.name for s in rt.inputs] == ["image"] and [s.name for s in rt.outputs] == ["logits"]
        whole = rt.run({"image": x})["logits"]
        rows = np.concatenate([rt.run({"image": x[r : r + 1]})["logits"] for r in range(4)])
    finally:
        rt.close()
    assert whole.dtype == np.float32 and whole.shape == (4, 10) and rows.shape == (4, 10)
    for got in (whole, rows):
        if cid.endswith("fp32"):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
        else:
            cos = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.min() > 0.98, cos
            assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def test_runtime_refuses_an_ir_with_an_extension_operation(cnn_job, tmp_path):
    _, out = cnn_job
    shutil.copytree(out / "openvino-fp32", tmp_path / "ir")
    xml = tmp_path / "ir" / "model.xml"
    text = xml.read_text()
    assert 'version="opset1"' in text
    xml.write_text(text.replace('version="opset1"', 'version="my_extension"', 1))
    with pytest.raises(InvalidBundle, match="only OpenVINO's standard operation sets"):
        runtimes.load(tmp_path / "ir")


def test_runtime_reads_only_an_ir_never_another_frontends_format(cnn_job, tmp_path):
    """Found by review: an IR whose <net version> the IR reader declines was offered by OpenVINO to
    every other frontend (ONNX, TensorFlow, Paddle...) in the API process. Such a file is refused, and a
    broken weights file gives OpenVINO's reason, not the line of its source it was raised at."""
    _, out = cnn_job
    shutil.copytree(out / "openvino-fp32", tmp_path / "ir")
    xml = tmp_path / "ir" / "model.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<net name=", '<net version="12" name=', 1).replace('version="11"', "", 1))
    assert '<net version="12"' in xml.read_text()
    with pytest.raises(InvalidBundle, match="IR version '12'; versions 10, 11 load"):
        runtimes.load(tmp_path / "ir")
    xml.write_text(text)
    (tmp_path / "ir" / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(InvalidBundle) as info:
        runtimes.load(tmp_path / "ir")
    assert "Exception from" not in str(info.value) and "\n" not in str(info.value), info.value


def test_served_over_v2_like_an_onnx_artifact(tmp_path_factory):
    from tests.service.conftest import convert, serving

    data = tmp_path_factory.mktemp("ov-serving")
    with serving(data, auth=False) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        job_id = convert(http, "mlp-ov", "mlp", targets=["openvino"], precisions=["fp32"])
        job = http.get(f"/v1/jobs/{job_id}").json()
        r = http.post("/v1/deployments", json={"name": "mlp-ov", "job": job_id, "max_queue_delay_ms": 5})
        assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        meta = http.get("/v2/models/mlp-ov").json()
        assert meta["platform"] == "openvino", meta
        assert [i["name"] for i in meta["inputs"]] == ["x"] and [o["name"] for o in meta["outputs"]] == ["logits"]
        cand = http.get(f"/v1/candidates/{job['selected_candidate']}").json()
        assert cand["target"] == "openvino", cand
        rng = np.random.default_rng(0)
        for batch in (1, 4):
            x = rng.standard_normal((batch, 64)).astype(np.float32)
            body = {"inputs": [{"name": "x", "shape": [batch, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
            r = http.post("/v2/models/mlp-ov/infer", json=body)
            assert r.status_code == 200, r.text
            (o,) = r.json()["outputs"]
            assert o["name"] == "logits" and o["datatype"] == "FP32" and o["shape"] == [batch, 10]
            served = np.asarray(o["data"], dtype=np.float32).reshape(batch, 10)
            np.testing.assert_allclose(served, _mlp_eager(x), atol=1e-4, rtol=1e-3)


def _mlp_eager(x: np.ndarray) -> np.ndarray:
    """The zoo MLP computed by eager PyTorch in a child process (the test process never imports model code)."""
    code = (
        "import sys, numpy as np, torch; sys.path.insert(0, sys.argv[1]); import mlp;"
        "x = np.load(sys.argv[2]); m = mlp.build_model().eval();"
        "np.save(sys.argv[2], m(torch.from_numpy(x)).detach().numpy())"
    )
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/x.npy"
        np.save(path, x)
        subprocess.run([sys.executable, "-c", code, str(ZOO), path], check=True)
        return np.load(path)
