"""The Open Inference Protocol over gRPC: tritonclient.grpc against the real server (uvicorn with
the gRPC endpoint on its event loop), authentication on, a real conversion and deployment."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.service.conftest import convert, serving
from tests.service.procs import free_port

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def grpc_served(tmp_path_factory):
    data = tmp_path_factory.mktemp("grpc")
    port = free_port()
    with serving(data, auth=True, KILN_GRPC_PORT=str(port)) as srv:
        token = (data / "admin-token").read_text().strip()
        with httpx.Client(base_url=srv.url, timeout=120, headers={"authorization": f"Bearer {token}"}) as http:
            job = convert(http, "mlp", "mlp")
            r = http.post("/v1/deployments", json={"name": "mlp", "job": job, "max_queue_delay_ms": 5})
            assert r.status_code == 201 and r.json()["state"] == "ready", r.text
            # runs of milliseconds: concurrent requests meet a busy runtime (tests/zoo/wide.py)
            r = http.post("/v1/deployments", json={"name": "wide", "job": convert(http, "wide", "wide")})
            assert r.status_code == 201 and r.json()["state"] == "ready", r.text
            client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
            yield client, http, {"authorization": f"Bearer {token}"}
            client.close()


def _input(name, array, datatype="FP32"):
    tensor = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _error(call):
    with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_health_and_metadata(grpc_served):
    client, http, auth = grpc_served
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "kiln" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata("mlp", headers=auth)
    want = http.get("/v2/models/mlp").json()
    assert model.name == "mlp" and list(model.versions) == want["versions"] and model.platform == want["platform"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in want["inputs"]
    ]
    assert [t.name for t in model.outputs] == [t["name"] for t in want["outputs"]]
    assert client.is_model_ready("mlp", headers=auth) and client.is_model_ready("mlp", "1", headers=auth)


def test_binary_inference_matches_http(grpc_served):
    client, http, auth = grpc_served
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    result = client.infer("mlp", [_input("x", x)], headers=auth)
    got = result.as_numpy("logits")
    body = {"inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    want = http.post("/v2/models/mlp/infer", json=body).json()["outputs"][0]
    assert got.shape == tuple(want["shape"]) and np.array_equal(got.ravel(), np.asarray(want["data"], np.float32))
    assert result.get_response().model_version == "1"
    # one named output asked for, on an explicit version
    only = client.infer(
        "mlp",
        [_input("x", x)],
        model_version="1",
        headers=auth,
        outputs=[tritonclient_grpc.InferRequestedOutput("logits")],
    )
    assert np.array_equal(only.as_numpy("logits"), got)


def test_typed_contents_are_accepted(grpc_served):
    from tritonclient.grpc import service_pb2 as pb  # the client's own message classes

    client, _, auth = grpc_served
    x = np.arange(64, dtype=np.float32).reshape(1, 64) / 64
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = client._client_stub.ModelInfer(request, metadata=list(auth.items()))
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
    assert np.array_equal(got, client.infer("mlp", [_input("x", x)], headers=auth).as_numpy("logits"))


def test_errors_are_status_codes_with_the_http_messages(grpc_served):
    client, http, auth = grpc_served
    x = np.zeros((1, 64), np.float32)
    status, message = _error(lambda: client.infer("mlp", [_input("x", x)]))
    assert status == "StatusCode.UNAUTHENTICATED" and "authentication required" in message
    status, _ = _error(lambda: client.infer("mlp", [_input("x", x)], headers={"authorization": "Bearer nope"}))
    assert status == "StatusCode.UNAUTHENTICATED"

    def same_as_http(call, body, path="/v2/models/mlp/infer"):
        status, message = _error(call)
        r = http.post(path, json=body)
        assert message == r.json()["error"], (message, r.json())
        return status, r.status_code

    assert same_as_http(
        lambda: client.infer("nope", [_input("x", x)], headers=auth),
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
        "/v2/models/nope/infer",
    ) == ("StatusCode.NOT_FOUND", 404)
    wide = x.astype(np.float64)
    assert same_as_http(
        lambda: client.infer("mlp", [_input("x", wide, "FP64")], headers=auth),
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": [0.0] * 64}]},
    ) == ("StatusCode.INVALID_ARGUMENT", 400)
    short = np.zeros((1, 63), np.float32)
    assert same_as_http(
        lambda: client.infer("mlp", [_input("x", short)], headers=auth),
        {"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]},
    ) == ("StatusCode.INVALID_ARGUMENT", 400)
    status, message = _error(
        lambda: client.infer(
            "mlp", [_input("x", x)], headers=auth, outputs=[tritonclient_grpc.InferRequestedOutput("nope")]
        )
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith("unknown output(s) nope")


def test_more_errors_have_the_http_messages(grpc_served):
    client, http, auth = grpc_served
    x = np.zeros((1, 64), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    cases = [
        # (gRPC call, HTTP path, HTTP body, gRPC status, HTTP status)
        (
            lambda: client.infer("mlp", [_input("x", x)], model_version="9", headers=auth),
            "/v2/models/mlp/versions/9/infer",
            body,
            "StatusCode.NOT_FOUND",
            404,
        ),
        (
            lambda: client.infer("mlp", [_input("x", x)], model_version="one", headers=auth),
            "/v2/models/mlp/versions/one/infer",
            body,
            "StatusCode.NOT_FOUND",
            404,
        ),
        (
            lambda: client.infer("mlp", [_input("y", x)], headers=auth),
            "/v2/models/mlp/infer",
            {"inputs": [{**body["inputs"][0], "name": "y"}]},
            "StatusCode.INVALID_ARGUMENT",
            400,
        ),
        (
            lambda: client.infer("mlp", [_input("x", np.zeros((1, 2, 32), np.float32))], headers=auth),
            "/v2/models/mlp/infer",
            {"inputs": [{**body["inputs"][0], "shape": [1, 2, 32]}]},
            "StatusCode.INVALID_ARGUMENT",
            400,
        ),
        (
            lambda: client.infer(
                "mlp", [_input("x", x)], headers=auth, outputs=[tritonclient_grpc.InferRequestedOutput("nope")]
            ),
            "/v2/models/mlp/infer",
            {**body, "outputs": [{"name": "nope"}]},
            "StatusCode.INVALID_ARGUMENT",
            400,
        ),
    ]
    for call, path, http_body, grpc_status, http_status in cases:
        status, message = _error(call)
        r = http.post(path, json=http_body)
        assert (status, r.status_code) == (grpc_status, http_status), (message, r.text)
        assert message == r.json()["error"], (message, r.json())
    # tokens refused: without the infer scope, unknown, not a Kiln token; the same words on both
    token = http.post("/v1/tokens", json={"name": "scraper", "scopes": ["metrics"]})
    assert token.status_code == 201, token.text
    for bearer, grpc_status, http_status in (
        (f"Bearer {token.json()['token']}", "StatusCode.PERMISSION_DENIED", 403),
        ("Bearer kiln_" + "x" * 40, "StatusCode.UNAUTHENTICATED", 401),
        ("Bearer nope", "StatusCode.UNAUTHENTICATED", 401),
    ):
        for _ in range(2):  # the first asks the database, the second the cache
            status, message = _error(lambda: client.infer("mlp", [_input("x", x)], headers={"authorization": bearer}))  # noqa: B023 - called at once
            r = http.post("/v2/models/mlp/infer", json=body, headers={"authorization": bearer})
            assert (status, r.status_code) == (grpc_status, http_status), (message, r.text)
            assert message == r.json()["error"], (message, r.json())


def _batch_stats(http, model="mlp", version=1):
    from tests.service.procs import metric

    text = http.get("/metrics").text
    labels = f'{{model="{model}",version="{version}"}}'
    return (
        metric(text, f"kiln_inference_batch_size_count{labels}"),
        metric(text, f"kiln_inference_batch_size_sum{labels}"),
    )


def test_concurrent_grpc_requests_are_batched_and_each_gets_its_own_rows(grpc_served):
    from concurrent.futures import ThreadPoolExecutor

    client, http, auth = grpc_served
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(48)]
    alone = [client.infer("wide", [_input("x", x)], headers=auth).as_numpy("logits") for x in xs]
    before = _batch_stats(http, "wide")

    def call(i):
        return client.infer("wide", [_input("x", xs[i])], headers=auth).as_numpy("logits")

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(call, range(48)))
    for x, want, got in zip(xs, alone, results):
        assert got.shape == (len(x), 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    runs, rows = (a - b for a, b in zip(_batch_stats(http, "wide"), before))
    assert rows == sum(len(x) for x in xs)
    assert runs < 48, f"48 concurrent gRPC requests ran in {runs} runs: batching joined none"
