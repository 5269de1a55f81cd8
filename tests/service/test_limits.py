"""Body limits over a real socket: a declared Content-Length over the limit is refused before any of
the body is read, and a chunked body without one is cut off while it streams, not after."""

from __future__ import annotations

import json
import select
import socket

import pytest

from tests.service.procs import metric, read_response
from tests.service.test_serving import Server

LIMIT = 1 << 20
CHUNK = 64 << 10


@pytest.fixture
def server(tmp_path, monkeypatch):
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KILN_AUTH", "off")
    monkeypatch.setenv("KILN_MAX_UPLOAD_BYTES", str(LIMIT))
    monkeypatch.setenv("KILN_MAX_INFER_BYTES", str(LIMIT))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_BROKER_URL", raising=False)
    clear_caches()
    with Server() as srv:
        yield srv
    clear_caches()


def _response(sock: socket.socket) -> tuple[int, dict]:
    status, body = read_response(sock)
    return status, json.loads(body)


def _head(path: str, port: int, length: str, content_type: str = "application/octet-stream") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n{length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("path", ["/v1/models", "/v2/models/x/infer"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(server, path):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(path, server.port, f"Content-Length: {10 << 30}"))  # 10 GiB announced, none sent
        status, body = _response(sock)
    assert status == 413
    detail = body["error"] if path.startswith("/v2") else body["detail"]
    assert detail == f"request body is larger than the limit of {LIMIT} bytes"


def _stream(sock: socket.socket) -> int:
    """Send 64 KiB chunks until the server answers (or the client's 256 MiB run out); bytes sent."""
    sent = 0
    chunk = f"{CHUNK:x}\r\n".encode() + b"#" * CHUNK + b"\r\n"
    while sent < 256 * LIMIT:
        if select.select([sock], [], [], 0)[0]:
            break  # the server answered
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += CHUNK
    return sent


def test_a_chunked_upload_is_cut_off_while_it_streams(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            _head("/v1/models", server.port, "Transfer-Encoding: chunked", "multipart/form-data; boundary=kiln")
        )
        part = (
            b'--kiln\r\nContent-Disposition: form-data; name="file"; filename="big.py"\r\n'
            b"Content-Type: text/x-python\r\n\r\n"
        )
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")  # a file part that never ends
        sent = _stream(sock)
        status, body = _response(sock)
    assert status == 413, body  # FastAPI's form parser once turned this into a 400 "error parsing the body"
    assert body["title"] == "Payload too large"
    assert body["detail"] == f"request body is larger than the limit of {LIMIT} bytes"
    # answered once the limit was crossed (plus what socket buffers hold), not after the whole body
    assert sent < 16 * LIMIT, f"{sent} bytes went in before the server refused"


def _failures_413(url: str) -> float:
    """This version's 413 count (the metrics registry is the process's, shared by every test)."""
    import httpx

    return metric(httpx.get(f"{url}/metrics").text, 'kiln_inference_failures_total{code="413",model="mlp",version="1"}')


def test_a_chunked_inference_body_is_cut_off_while_it_streams(server):
    import httpx

    from tests.service.test_serving import convert

    with httpx.Client(base_url=server.url, timeout=120) as http:
        job = convert(http, "mlp", "mlp")
        assert http.post("/v1/deployments", json={"name": "mlp", "job": job}).json()["state"] == "ready"
    before = _failures_413(server.url)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head("/v2/models/mlp/infer", server.port, "Transfer-Encoding: chunked", "application/json"))
        sent = _stream(sock)
        status, body = _response(sock)
    assert status == 413, body  # it was a 500 "inference failed" once
    assert body == {"error": f"request body is larger than the limit of {LIMIT} bytes"}
    assert sent < 16 * LIMIT, f"{sent} bytes went in before the server refused"
    assert _failures_413(server.url) == before + 1
    ok = httpx.post(
        f"{server.url}/v2/models/mlp/infer",
        json={"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]},
    )
    assert ok.status_code == 200, ok.text  # and the deployment serves the next request
