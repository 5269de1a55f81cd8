"""The /v1 API in-process against real SQLite and PostgreSQL: uploads, jobs, errors."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from tests.conftest import ZOO, zoo_signature

MLP = (ZOO / "mlp.py").read_bytes()
SIG = json.dumps(zoo_signature("mlp"))


def upload(api, name="mlp", content=MLP, filename="mlp.py", signature=SIG, **extra):
    data = {"name": name, **({"signature": signature} if signature else {}), **extra}
    return api.post("/v1/models", data=data, files={"file": (filename, content)})


def assert_problem(r, status, *needles):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for needle in needles:
        assert needle in body["detail"], body["detail"]
    return body


def zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_upload_creates_versions_and_recognises_identical_uploads(api):
    r = upload(api)
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["name"], v["version"], v["kind"], v["existing"]) == ("mlp", 1, "python", False)
    assert len(v["sha256"]) == 64 and v["signature"]["inputs"][0]["name"] == "x"
    assert r.headers["location"] == "/v1/models/mlp/versions/1"
    again = upload(api)
    assert again.status_code == 200 and again.json()["existing"] and again.json()["version"] == 1
    changed = upload(api, content=MLP + b"\n# changed\n")
    assert changed.status_code == 201 and changed.json()["version"] == 2
    assert [x["version"] for x in api.get("/v1/models/mlp").json()["versions"]] == [1, 2]
    assert api.get("/v1/models").json()["total"] == 1
    assert api.get("/v1/models/mlp/versions/2").json()["sha256"] == changed.json()["sha256"]
    assert_problem(api.get("/v1/models/mlp/versions/9"), 404, "no version 9")
    assert api.delete("/v1/models/mlp/versions/2").status_code == 204
    assert_problem(api.get("/v1/models/nope"), 404, "'nope' does not exist")


@pytest.mark.parametrize(
    "filename, content, needle",
    [
        ("garbage.bin", b"\x00\x01\x02 not a model", "not a model bundle"),
        ("empty.py", b"", "empty (0 bytes)"),
        ("evil.zip", zip_bytes({"model.py": MLP, "../../evil.py": b"x"}), "outside the bundle directory"),
        ("bomb.zip", zip_bytes({"model.py": MLP, "zeros": b"\0" * (64 << 20)}), "archive bomb"),
        ("broken.zip", b"PK\x03\x04 truncated", "neither a zip nor a tar"),
        ("noentry.zip", zip_bytes({"other.py": MLP}), "no model.py"),
    ],
)
def test_bad_uploads_are_clear_400s(api, filename, content, needle):
    assert_problem(upload(api, content=content, filename=filename), 400, needle)
    assert api.get("/v1/models").json()["total"] == 0


def test_bad_signature_and_entry_and_name(api):
    assert_problem(upload(api, signature="{not json"), 400, "neither JSON nor YAML")
    assert_problem(upload(api, signature=json.dumps({"inputs": ["x:float99[b]"]})), 400, "unsupported dtype")
    assert_problem(upload(api, signature=None), 400, "no signature")
    assert_problem(upload(api, entry="nope.py:build"), 400, "'nope.py' is not in the bundle")
    assert_problem(upload(api, name="../etc"), 400, "model name")
    r = api.post("/v1/models", data={"name": "x"})
    assert_problem(r, 422, "file")


def test_upload_size_limit_is_413(kiln_env, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_MAX_UPLOAD_BYTES", "1000")
    clear_caches()
    with TestClient(create_app()) as api:
        r = upload(api, content=b"#" * 5000)
        assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["detail"]


def test_jobs_create_idempotency_cancel_retry(api):
    assert upload(api).status_code == 201
    body = {"model": "mlp", "targets": ["onnxruntime"], "precisions": ["fp32", "int8"]}
    r = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["queue"], job["version"], job["progress"]) == ("queued", "cpu", 1, 0.0)
    same = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert same.status_code == 202 and same.json()["id"] == job["id"]
    assert_problem(
        api.post("/v1/jobs", json={**body, "precisions": ["fp16"]}, headers={"Idempotency-Key": "k1"}),
        409,
        "different request body",
    )
    other = api.post("/v1/jobs", json=body).json()
    assert other["id"] != job["id"]
    page = api.get("/v1/jobs", params={"limit": 1}).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    assert api.get("/v1/jobs", params={"status": "queued", "model": "mlp"}).json()["total"] == 2
    assert api.get("/v1/jobs", params={"model": "other"}).json()["total"] == 0
    canceled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    assert_problem(api.post(f"/v1/jobs/{job['id']}/cancel"), 409, "already canceled")
    retry = api.post(f"/v1/jobs/{job['id']}/retry")
    assert retry.status_code == 202 and retry.json()["retry_of"] == job["id"] and retry.json()["status"] == "queued"
    assert_problem(api.post(f"/v1/jobs/{other['id']}/retry"), 409, "only failed or canceled")
    assert_problem(api.get(f"/v1/jobs/{job['id']}/report"), 404, "no report yet")


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "mlp", "targets": ["tflite"]}, 400, "unknown target 'tflite'"),
        ({"model": "mlp", "precisions": ["int4"]}, 400, "unknown precision 'int4'"),
        ({"model": "mlp", "policy": "vibes"}, 400, "policy"),
        ({"model": "nope"}, 404, "model 'nope' does not exist"),
        ({"model": "mlp", "version": 7}, 404, "no version 7"),
        ({"model": "mlp", "frobnicate": 1}, 422, "frobnicate"),
        ({"targets": ["onnxruntime"]}, 422, "model"),
    ],
)
def test_bad_job_requests(api, body, status, needle):
    upload(api)
    assert_problem(api.post("/v1/jobs", json=body), status, needle)


def test_unknown_things_are_404_problems(api):
    assert_problem(api.get("/v1/jobs/abc"), 404, "job abc does not exist")
    assert_problem(api.get("/v1/candidates/abc/artifact"), 404, "candidate abc")
    assert_problem(api.get("/v1/nowhere"), 404)
    assert_problem(api.get("/v1/jobs", params={"status": "lost"}), 400, "unknown status")


def test_health_and_openapi(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    paths = api.get("/openapi.json").json()["paths"]
    for p in ("/v1/models", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/candidates/{candidate_id}/artifact"):
        assert p in paths


def test_inference_bodies_have_their_own_limit(kiln_env, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_MAX_INFER_BYTES", "2000")
    clear_caches()
    with TestClient(create_app()) as api:
        r = api.post("/v2/models/x/infer", content=b"{" + b" " * 5000 + b"}")
        assert r.status_code == 413 and r.json() == {"error": "request body is larger than the limit of 2000 bytes"}
        assert upload(api, content=MLP + b"#" * 5000).status_code == 201  # uploads keep the upload limit


def test_deeply_nested_json_is_a_400_not_a_500(api):
    body = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


def test_a_job_with_no_worker_for_its_queue_says_so(api):
    from service import jobs as job_store
    from service.db import session_scope

    upload(api)
    job = api.post("/v1/jobs", json={"model": "mlp", "targets": ["tensorrt"]}).json()
    assert job["queue"] == "gpu" and "none is online" in job["waiting"] and "--queues gpu" in job["waiting"]
    with session_scope() as s:
        job_store.worker_seen(s, "gpu-host:1", "gpu-host", ["gpu"])
    assert api.get(f"/v1/jobs/{job['id']}").json()["waiting"] is None
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"


def test_too_many_multipart_fields_or_files_is_a_400(api):
    fields = [("name", "mlp"), ("signature", SIG)] + [(f"f{i}", "x") for i in range(1500)]
    r = api.post("/v1/models", data=dict(fields), files={"file": ("mlp.py", MLP)})
    assert_problem(r, 400, "Too many fields")
    files = [("file", ("mlp.py", MLP))] + [(f"extra{i}", (f"e{i}.bin", b"x")) for i in range(1500)]
    r = api.post("/v1/models", data={"name": "mlp", "signature": SIG}, files=files)
    assert_problem(r, 400, "Too many files")
    assert api.get("/v1/models/mlp").status_code == 404  # nothing was stored
