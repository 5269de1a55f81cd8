"""Serving: deployments and the Open Inference Protocol against real runtimes, in a real uvicorn
server; tritonclient talks to it unchanged."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import FAST, Server, convert, serving

__all__ = ["FAST", "Server", "convert"]  # other test modules import these from here


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server with the MLP, the several-inputs model, the row-mixing model and the wide MLP (as widemlp) deployed."""
    data = tmp_path_factory.mktemp("serving")
    # authentication off: tests/service/test_auth.py covers it
    with serving(data, auth=False) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        jobs = {
            "mlp": convert(http, "mlp", "mlp"),
            "multi": convert(http, "multi", "multi_io"),
            "rowmix": convert(http, "rowmix", "rowmix"),
            "widemlp": convert(http, "widemlp", "wide"),
        }
        for name, job in jobs.items():
            r = http.post("/v1/deployments", json={"name": name, "job": job, "max_queue_delay_ms": 20})
            assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        yield srv, http, jobs, data


def infer(http, name, inputs, **extra):
    body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": dt, "data": a.ravel().tolist()}
            for n, (a, dt) in inputs.items()
        ],
        **extra,
    }
    return http.post(f"/v2/models/{name}/infer", json=body)


def local_runtime(http, data: Path, job_id: str):
    """The selected artifact loaded directly, to compare the server's answers with."""
    from service import runtimes

    job = http.get(f"/v1/jobs/{job_id}").json()
    r = http.get(f"/v1/candidates/{job['selected_candidate']}/artifact", params={"format": "zip"})
    import io
    import zipfile

    target = data / f"local-{job_id}"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(target)
    return runtimes.load(next(target.iterdir()))


def test_metadata_and_health(served):
    srv, http, _, _ = served
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = http.get("/v2/models/multi").json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]},
        {"name": "features", "datatype": "FP32", "shape": [-1, 8]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["scores", "embedding"] and meta["outputs"][1]["shape"] == [-1, 16]
    assert http.get("/v2/models/multi/versions/1").json()["name"] == "multi"
    assert http.get("/v2/models/multi/ready").json()["ready"] is True
    assert http.get("/v2/models/multi/versions/1/ready").status_code == 200
    assert http.get("/v2/models/nope").status_code == 404
    assert http.get("/v2/models/nope").json() == {"error": "model 'nope' is not deployed"}
    assert http.get("/v2/models/multi/versions/7").status_code == 404


def test_json_inference_matches_the_runtime(served):
    srv, http, jobs, data = served
    rt = local_runtime(http, data, jobs["multi"])
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    feats = rng.standard_normal((3, 8)).astype(np.float32)
    want = rt.run({"image": image, "features": feats})
    r = infer(http, "multi", {"image": (image, "FP32"), "features": (feats, "FP32")}, id="req-7")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "multi" and body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["scores"]["shape"] == [3, 5] and out["scores"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["scores"]["data"]).reshape(3, 5), want["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.array(out["embedding"]["data"]).reshape(3, 16), want["embedding"], rtol=1e-5, atol=1e-6
    )
    # nested data, and choosing one output
    nested = {
        "inputs": [
            {"name": "image", "shape": [3, 3, 16, 16], "datatype": "FP32", "data": image.tolist()},
            {"name": "features", "shape": [3, 8], "datatype": "FP32", "data": feats.tolist()},
        ],
        "outputs": [{"name": "embedding"}],
    }
    r = http.post("/v2/models/multi/versions/1/infer", json=nested)
    assert [o["name"] for o in r.json()["outputs"]] == ["embedding"]


def test_binary_tensor_extension(served):
    srv, http, jobs, data = served
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [4, 64], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    # no Content-Type, as tritonclient's synchronous client sends it
    r = http.post(
        "/v2/models/mlp/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    out = meta["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 4 * 10 * 4 and "data" not in out
    got = np.frombuffer(r.content[n:], np.float32).reshape(4, 10)
    want = local_runtime(http, data, jobs["mlp"]).run({"x": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"inputs": [{"name": "y", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}, "unknown input 'y'"),
        (
            {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": [0] * 64}]},
            "datatype FP64, the model takes FP32",
        ),
        ({"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]}, "axis 1 is 63"),
        (
            {"inputs": [{"name": "x", "shape": [64, 64], "datatype": "FP32", "data": [0] * 4096}]},
            "outside this deployment's range 1..32",
        ),
        ({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 10}]}, "10 values given"),
        ({"inputs": [{"name": "x", "shape": [64], "datatype": "FP32", "data": [0] * 64}]}, "rank 2"),
        ({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "STRING", "data": [0] * 64}]}, "not supported"),
        (
            {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}]},
            "cannot be read as FP32",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
                "outputs": [{"name": "z"}],
            },
            "unknown output(s) z",
        ),
        ({"inputs": []}, "at least one tensor"),
        ({"wrong": 1}, "'inputs' list"),
        # shapes whose element count overflows 64 bits, or whose rank numpy cannot hold, are bad input, not a 500
        ({"inputs": [{"name": "x", "shape": [2**32, 2**32], "datatype": "FP32", "data": []}]}, "is too large"),
        ({"inputs": [{"name": "x", "shape": [0, 2**62], "datatype": "FP32", "data": []}]}, "is too large"),
        ({"inputs": [{"name": "x", "shape": [1] * 100, "datatype": "FP32", "data": [0]}]}, "rank 100 is more than"),
    ],
)
def test_bad_inference_requests_are_400_with_reason(served, body, needle):
    _, http, _, _ = served
    r = http.post("/v2/models/mlp/infer", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_bad_bodies(served):
    _, http, _, _ = served
    r = http.post("/v2/models/mlp/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}
    ).encode()
    r = http.post(
        "/v2/models/mlp/infer",
        content=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400 and "256" in r.json()["error"]
    r = http.post("/v2/models/mlp/infer", content=header, headers={"Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]
    assert http.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
    deep = {
        "inputs": [
            {
                "name": "x",
                "shape": [1],
                "datatype": "FP32",
                "data": [0],
                "parameters": json.loads("[" * 100 + "]" * 100),
            }
        ]
    }
    assert http.post("/v2/models/mlp/infer", json=deep).status_code == 400


def test_concurrent_clients_get_their_own_rows_and_batching_joins_them(served):
    """The wide MLP's runs take milliseconds on any CPU (its weights come from memory), so requests
    sent together meet a busy runtime and wait: they must be joined. (A model that runs in
    microseconds is not a test of joining: each request may find the runtime free, and a lone
    request of it runs on the event loop.)"""
    _, http, _, _ = served
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(40)]
    alone = [
        np.array(infer(http, "widemlp", {"x": (x, "FP32")}).json()["outputs"][0]["data"]).reshape(len(x), 10)
        for x in xs
    ]
    before = _batch_stats(http, "widemlp")

    def call(i):
        with httpx.Client(base_url=str(http.base_url), timeout=60) as c:
            return i, np.array(infer(c, "widemlp", {"x": (xs[i], "FP32")}).json()["outputs"][0]["data"])

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(call, range(40)))
    for i, got in results:
        np.testing.assert_allclose(got.reshape(len(xs[i]), 10), alone[i], rtol=1e-4, atol=1e-5)
    runs, rows = (a - b for a, b in zip(_batch_stats(http, "widemlp"), before))
    assert rows == sum(len(x) for x in xs)
    assert runs < 40, f"40 concurrent requests ran in {runs} runs: batching joined none"


def _batch_stats(http, model, version=1):
    """Runs and rows so far. The metrics registry is the process's: other tests in this pytest run
    leave series for other versions of a model of the same name, so the version is part of the key."""
    from tests.service.procs import metric

    text = http.get("/metrics").text
    labels = f'{{model="{model}",version="{version}"}}'
    return metric(text, f"kiln_inference_batch_size_count{labels}"), metric(
        text, f"kiln_inference_batch_size_sum{labels}"
    )


def test_model_whose_rows_depend_on_each_other_is_served_unbatched(served):
    _, http, _, _ = served
    dep = http.get("/v1/deployments/rowmix").json()["versions"][0]
    assert dep["batching"] is False and "not independent" in dep["batching_note"]
    mlp = http.get("/v1/deployments/mlp").json()["versions"][0]
    assert mlp["batching"] is True and mlp["max_batch_size"] == 32


def test_tritonclient_works_unchanged(served):
    import tritonclient.http as tc

    srv, _, _, _ = served
    client = tc.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["shape"] == [-1, 64]
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    results = []
    for binary in (True, False):
        inp = tc.InferInput("x", [2, 64], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = tc.InferRequestedOutput("logits", binary_data=binary)
        res = client.infer("mlp", [inp], outputs=[out], request_id="t1")
        assert res.get_response()["id"] == "t1"
        results.append(res.as_numpy("logits"))
    assert results[0].shape == (2, 10)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)
    client.close()


def test_deployment_versions_default_rollback_force_and_delete(served):
    srv, http, jobs, data = served
    job = http.get(f"/v1/jobs/{jobs['mlp']}").json()
    cand = job["selected_candidate"]
    r = http.post("/v1/deployments", json={"name": "life", "candidate": cand})
    assert r.status_code == 201 and r.json()["default_version"] == 1
    r = http.post("/v1/deployments", json={"name": "life", "candidate": cand, "max_batch_size": 4})
    assert r.json()["default_version"] == 2 and r.json()["versions"][1]["max_batch_size"] == 4
    # joined batches never go past what the model accepts (the signature's batch range, 1..32 here)
    big = http.post("/v1/deployments", json={"name": "wide", "candidate": cand, "max_batch_size": 4096}).json()
    assert big["versions"][0]["max_batch_size"] == 32 and "batches stop at 32" in big["versions"][0]["batching_note"]
    assert http.delete("/v1/deployments/wide").status_code in (200, 204)
    assert infer(http, "life", {"x": (np.zeros((1, 64), np.float32), "FP32")}).json()["model_version"] == "2"
    r = http.post("/v1/deployments/life/rollback")
    assert r.status_code == 200 and r.json()["default_version"] == 1
    assert infer(http, "life", {"x": (np.zeros((1, 64), np.float32), "FP32")}).json()["model_version"] == "1"
    r = http.patch("/v1/deployments/life", json={"default_version": 2})
    assert r.json()["default_version"] == 2
    assert http.post("/v1/deployments/life/rollback").json()["default_version"] == 1
    # a candidate that failed validation needs force
    from service.db import session_scope
    from service.tables import CandidateRow

    with session_scope() as s:
        row = s.get(CandidateRow, cand)
        row.passed = False
    r = http.post("/v1/deployments", json={"name": "life", "candidate": cand})
    assert r.status_code == 409 and "force" in r.json()["detail"]
    r = http.post("/v1/deployments", json={"name": "life", "candidate": cand, "force": True})
    assert r.status_code == 201 and r.json()["versions"][-1]["forced"] is True
    with session_scope() as s:
        s.get(CandidateRow, cand).passed = True
    # a version that cannot load leaves the default serving
    with session_scope() as s:
        files = dict(s.get(CandidateRow, cand).files)
    from service.artifacts import get_store

    model_file = get_store().path(files["model.onnx"])
    saved = model_file.read_bytes()
    shutil.rmtree(data / "cache", ignore_errors=True)
    model_file.write_bytes(b"not an onnx model")
    try:
        r = http.post("/v1/deployments", json={"name": "life", "candidate": cand})
        body = r.json()
        assert body["versions"][-1]["state"] == "failed" and body["versions"][-1]["error"]
        assert body["default_version"] == 3
    finally:
        model_file.write_bytes(saved)
        shutil.rmtree(data / "cache", ignore_errors=True)
    assert infer(http, "life", {"x": (np.zeros((1, 64), np.float32), "FP32")}).status_code == 200
    assert http.delete("/v1/deployments/life").status_code == 204
    assert http.post("/v2/models/life/infer", json={"inputs": []}).status_code == 404
    assert http.get("/v1/deployments/life").status_code == 404


def test_deployment_requests_that_make_no_sense(served):
    _, http, jobs, _ = served
    assert http.post("/v1/deployments", json={"name": "x"}).status_code == 400
    assert http.post("/v1/deployments", json={"name": "x", "candidate": "nope"}).status_code == 404
    assert http.post("/v1/deployments", json={"name": "x", "job": "nope"}).status_code == 404
    assert http.post("/v1/deployments", json={"name": "x", "job": jobs["mlp"], "instances": 0}).status_code == 422
    assert http.post("/v1/deployments/mlp/rollback").status_code == 409
    model_version = http.get(f"/v1/jobs/{jobs['mlp']}").json()["version"]
    r = http.delete(f"/v1/models/mlp/versions/{model_version}")
    assert r.status_code == 409 and "used by a deployment" in r.json()["detail"]


def test_restart_loads_every_deployment_again(served):
    srv, http, _, _ = served
    with Server() as second, httpx.Client(base_url=second.url, timeout=60) as h2:
        deadline = time.time() + 60
        while h2.get("/v2/health/ready").status_code != 200:
            assert time.time() < deadline, h2.get("/v1/deployments").json()
            time.sleep(0.2)
        r = infer(h2, "mlp", {"x": (np.zeros((1, 64), np.float32), "FP32")})
        assert r.status_code == 200
        assert {d["name"] for d in h2.get("/v1/deployments").json()} >= {"mlp", "multi", "rowmix"}


def test_memory_holds_only_the_versions_worth_keeping(served):
    """Default, the one before it and the newest stay loaded; older ones wait on standby and load
    again when they become the default."""
    _, http, jobs, _ = served
    cand = http.get(f"/v1/jobs/{jobs['mlp']}").json()["selected_candidate"]
    for _ in range(5):
        assert http.post("/v1/deployments", json={"name": "many", "candidate": cand}).status_code == 201

    def states():
        return {v["version"]: v["state"] for v in http.get("/v1/deployments/many").json()["versions"]}

    deadline = time.time() + 10
    while sum(s == "ready" for s in states().values()) > 2 and time.time() < deadline:
        time.sleep(0.1)
    assert states() == {1: "standby", 2: "standby", 3: "standby", 4: "ready", 5: "ready"}
    r = http.patch("/v1/deployments/many", json={"default_version": 1})
    assert r.status_code == 200 and r.json()["default_version"] == 1
    assert infer(http, "many", {"x": (np.zeros((1, 64), np.float32), "FP32")}).json()["model_version"] == "1"
    assert http.delete("/v1/deployments/many").status_code == 204
