"""The torch.export targets end to end with the real sandbox, job runner, API and runners: the
ExportedProgram (`torch_export`) and the AOTInductor package (`aotinductor`) are built in the box,
validated and benchmarked against eager, the package is deployed and answers /v2 at every batch
size of its dynamic range; neither artifact loads in-process outside the box; and a model that
torch.export cannot capture gets failed candidates that say why and what to write instead."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import boundary, runtimes
from service.errors import RuntimeUnavailable
from service.runner import IsolatedRuntime
from service.runtimes.base import ArtifactInfo
from service.states import CandidateStatus, move_candidate
from tests.conftest import ZOO, zoo_bundle, zoo_signature
from tests.service.conftest import convert
from tests.service.procs import kiln_cli, user_env
from tests.service.test_serving import infer
from tests.workers.test_engine import convert as convert_locally
from workers import engine
from workers.compilers import COMPILERS
from workers.context import Candidate

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")
TARGETS = ["onnxruntime", "torch_export", "aotinductor"]
PT2 = ("torch_export-fp32", "aotinductor-fp32")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A server whose job converted the zoo's MLP to ONNX Runtime (the in-process reference, itself
    validated against eager) and both torch.export targets, with the AOTInductor package deployed."""
    from tests.service.conftest import serving

    data = tmp_path_factory.mktemp("export-targets")
    with serving(data, auth=False) as srv, httpx.Client(base_url=srv.url, timeout=300) as http:
        job_id = convert(http, "mlp", "mlp", targets=TARGETS)
        job = http.get(f"/v1/jobs/{job_id}").json()
        by_id = {c["name"]: c for c in job["candidates"]}
        r = http.post(
            "/v1/deployments",
            json={"name": "mlp-aoti", "candidate": by_id["aotinductor-fp32"]["id"], "max_queue_delay_ms": 5},
        )
        assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        yield http, job, by_id, data


def artifact(http: httpx.Client, candidate: dict, where: Path) -> Path:
    """A candidate's artifact directory as the API hands it out."""
    r = http.get(f"/v1/candidates/{candidate['id']}/artifact", params={"format": "zip"})
    assert r.status_code == 200, r.text
    target = where / candidate["name"]
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(target)
    return next(target.iterdir())  # the archive holds the candidate's directory


def test_both_targets_are_built_in_the_box_validated_and_benchmarked(mlp):
    http, job, by_id, _ = mlp
    assert job["status"] == "succeeded", job["error"]
    for name in PT2:
        c = by_id[name]
        assert c["status"] == "built" and c["passed"], (name, c["reason"], c["validation"])
        assert c["model_file"] == "model.pt2"
        logits = c["validation"]["outputs"]["logits"]
        assert logits["max_abs"] < 1e-4 and logits["top1"] == 1.0
        # the dynamic batch dimension survived: timed at min, opt and max of its range
        assert [p["batch"] for p in c["benchmark"]] == [1, 8, 32], c["benchmark"]
        assert c["speedup"] is not None
    assert any("compiled by AOTInductor" in str(n) for n in by_id["aotinductor-fp32"]["notes"])
    report = http.get(f"/v1/jobs/{job['id']}/report").json()
    reported = {c["id"]: c for c in report["candidates"]}
    assert all(reported[name]["status"] == "built" for name in PT2)


def test_the_aotinductor_package_is_served_over_v2_at_every_batch_size(mlp, tmp_path):
    http, _, by_id, _ = mlp
    reference = runtimes.load(artifact(http, by_id["onnxruntime-fp32"], tmp_path))  # ONNX: in-process
    rng = np.random.default_rng(0)
    for batch in (1, 5, 32):
        x = rng.standard_normal((batch, 64), dtype=np.float32)
        r = infer(http, "mlp-aoti", {"x": (x, "FP32")})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == [batch, 10]
        got = np.asarray(out["data"], np.float32).reshape(batch, 10)
        assert np.allclose(got, reference.run({"x": x})["logits"], atol=1e-4)
    # outside the range the signature gives: refused, with the range
    big = np.zeros((33, 64), np.float32)
    assert infer(http, "mlp-aoti", {"x": (big, "FP32")}).status_code == 400


def test_loading_either_artifact_gives_an_isolated_runner_and_never_loads_it_here(mlp, tmp_path, monkeypatch):
    http, _, by_id, _ = mlp
    reference = runtimes.load(artifact(http, by_id["onnxruntime-fp32"], tmp_path))
    x = np.random.default_rng(1).standard_normal((3, 64), dtype=np.float32)
    monkeypatch.delenv(runtimes.INSIDE_BOX, raising=False)
    for name in PT2:
        directory = artifact(http, by_id[name], tmp_path)
        rt = runtimes.load(directory)
        try:
            assert isinstance(rt, IsolatedRuntime)
            assert [s.name for s in rt.inputs] == ["x"] and [s.name for s in rt.outputs] == ["logits"]
            assert np.allclose(rt.run({"x": x})["logits"], reference.run({"x": x})["logits"], atol=1e-4)
        finally:
            rt.close()
        with pytest.raises(RuntimeUnavailable, match="only inside the isolation boundary"):
            runtimes.load(directory, isolated=False)


def test_a_model_torch_export_cannot_capture_gets_failed_candidates_that_name_the_fix(tmp_path):
    ctx = convert_locally(tmp_path, "controlflow", targets=("torch_export", "aotinductor"))
    line = next(
        i for i, text in enumerate((ZOO / "controlflow.py").read_text().splitlines(), 1) if "if x.sum() > 0:" in text
    )
    assert {c.id for c in ctx.candidates} == set(PT2)
    for c in ctx.candidates:
        assert c.status == "failed", (c.id, c.status)
        assert c.reason.startswith("torch.export could not capture the model")
        assert f"controlflow.py:{line} in forward" in c.reason and "torch.cond" in c.reason
        assert "\n" not in c.reason
    assert not (tmp_path / "out" / "aotinductor-fp32").exists()


def test_a_package_built_for_another_cpu_or_torch_is_rebuilt_not_loaded(tmp_path):
    import torch

    ctx = engine.prepare(zoo_bundle(tmp_path, "mlp"), tmp_path / "out", signature=zoo_signature("mlp"))
    compiler = COMPILERS["aotinductor"]
    cand = Candidate(id="aotinductor-fp32", target="aotinductor", precision="fp32", artifact_dir="aotinductor-fp32")
    move_candidate(cand, CandidateStatus.BUILT)
    here = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for extra, stale in (
        (here, None),
        ({**here, "cpu_capability": "NO AVX"}, "built for cpu_capability NO AVX"),
        ({**here, "torch": "2.0.0"}, "built for torch 2.0.0"),
    ):
        (ctx.out / cand.id).mkdir(exist_ok=True)
        ArtifactInfo(runtime="aotinductor", file="model.pt2", extra=extra).save(ctx.out / cand.id)
        why = compiler.stale(ctx, cand)
        assert (why is None) if stale is None else (why is not None and stale in why), why


def test_the_command_line_knows_the_targets_and_what_they_build(tmp_path):
    env = user_env(tmp_path)
    shown = kiln_cli("convert", "--help", env=env, cwd=tmp_path)
    assert "torch_export" in shown.stdout and "aotinductor" in shown.stdout
    # fp16 and int8 are no candidates of these targets: nothing to build, and the reason says what is
    done = kiln_cli(
        "convert",
        str(zoo_bundle(tmp_path, "mlp")),
        "--input",
        "x:float32[batch,64]",
        "--dim",
        "batch=1:8:32",
        "--target",
        "aotinductor,torch_export",
        "--precision",
        "fp16,int8",
        "--out",
        str(tmp_path / "out"),
        env=env,
        cwd=tmp_path,
    )
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "torch_export and aotinductor build fp32" in said, said
