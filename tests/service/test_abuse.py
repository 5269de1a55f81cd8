"""Abusive requests against a real `kiln api` process over real sockets: what an unauthenticated or
oversized request may cost, metrics per team, nasty query strings and headers, file modes, slow
clients. Each of these cost the API dearly (or was a 500) before the request gate."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import ZOO, zoo_signature
from tests.service.procs import KilnApi, Proc, Processes, answers, free_port, kiln_env, read_response, wait_for

HEADER_TIMEOUT_S = 2


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def kiln(tmp_path_factory):
    """`kiln api` with authentication on, its admin token, and tokens of two teams."""
    tmp = tmp_path_factory.mktemp("abuse")
    procs = Processes()
    env = kiln_env(tmp / "data", None, "filesystem://", header_timeout_s=HEADER_TIMEOUT_S)
    api = KilnApi(free_port(), env, tmp / "api.log")
    procs.add(api)
    try:
        api.start()
        admin = {"Authorization": f"Bearer {(tmp / 'data' / 'admin-token').read_text().strip()}"}
        tokens = {}
        for team in ("team-a", "team-b"):
            for scope in ("manage", "infer"):
                r = httpx.post(
                    f"{api.url}/v1/tokens",
                    headers=admin,
                    json={"name": f"{team}-{scope}", "owner": team, "scopes": [scope]},
                )
                assert r.status_code == 201, r.text
                tokens[f"{team}-{scope}"] = {"Authorization": f"Bearer {r.json()['token']}"}
        yield api, admin, tokens, tmp
    finally:
        procs.close()


def _post_head(port: int, path: str, length: int, headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{headers}\r\n"
    ).encode()


def test_a_big_body_without_a_token_is_refused_from_its_headers(kiln):
    api, _, tokens, _ = kiln
    before = rss_kib(api.pid)
    body = b'{"model": "' + b"x" * (64 << 20) + b'"}'
    # only the start of the body is ever sent on this connection: a server that waited for the
    # rest before answering would never answer, and the read would time out (no clock needed)
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(_post_head(api.port, "/v1/jobs", len(body)))
        sock.sendall(body[: 1 << 16])
        status, answer = read_response(sock)
    assert status == 401 and b"authentication required" in answer
    # and the whole body, sent anyway, costs the API nothing
    r = httpx.post(f"{api.url}/v1/jobs", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 401
    assert rss_kib(api.pid) - before < 10 * 1024, (before, rss_kib(api.pid))
    # an unknown token is refused just as early
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(_post_head(api.port, "/v1/deployments", len(body), "Authorization: Bearer kiln_nope\r\n"))
        assert read_response(sock)[0] == 401


def test_a_big_json_body_with_a_token_is_a_413_and_echoes_nothing(kiln):
    api, _, tokens, _ = kiln
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(
            _post_head(api.port, "/v1/jobs", 64 << 20, f"Authorization: {tokens['team-a-manage']['Authorization']}\r\n")
        )
        status, answer = read_response(sock)
    assert status == 413 and b"larger than the limit of 1048576 bytes" in answer
    # under the limit but long: the detail quotes only the start of it
    job_id = "j" * 500_000
    r = httpx.post(f"{api.url}/v1/deployments", headers=tokens["team-a-manage"], json={"name": "x", "job": job_id})
    assert r.status_code == 404 and len(r.text) < 2000, len(r.text)


def _zip_with_manifest(manifest: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mlp.py", (ZOO / "mlp.py").read_text())
        z.writestr("kiln.json", json.dumps(manifest))
    return buf.getvalue()


def test_a_manifest_with_a_million_inputs_is_refused_at_once(kiln):
    api, _, tokens, _ = kiln
    inputs = [{"name": f"x{i}", "dtype": "float32", "shape": ["batch", 4]} for i in range(10**6)]
    payload = _zip_with_manifest({"entry": "mlp.py:build_model", "signature": {"inputs": inputs}})
    started = time.perf_counter()
    r = httpx.post(
        f"{api.url}/v1/models",
        headers=tokens["team-a-manage"],
        data={"name": "many"},
        files={"file": ("many.zip", payload)},
        timeout=60,
    )
    elapsed = time.perf_counter() - started
    # refused by its size, before it was parsed: the reason says so (a parsed manifest would be
    # refused later, by its count of inputs); the clock is only a backstop for a loaded machine
    assert r.status_code == 400, r.text
    assert "a manifest may have at most 1048576 bytes" in r.json()["detail"], r.text
    assert elapsed < 30, f"{elapsed:.2f} s"
    # and 10,000 inputs given as a field: refused by count, fast
    small = {"inputs": inputs[:10_000]}
    r = httpx.post(
        f"{api.url}/v1/models",
        headers=tokens["team-a-manage"],
        data={"name": "many", "signature": json.dumps(small)},
        files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
        timeout=60,
    )
    assert r.status_code == 400 and "at most 256 inputs" in r.json()["detail"]


def test_a_dimension_range_whose_samples_would_not_fit_is_refused_at_upload(kiln):
    api, _, tokens, tmp = kiln
    store = tmp / "data" / "artifacts"
    before = sorted(p.name for p in store.rglob("*") if p.is_file())
    sig = zoo_signature("mlp")
    sig["dims"] = {"batch": [1, 4, 10**9]}
    r = httpx.post(
        f"{api.url}/v1/models",
        headers=tokens["team-a-manage"],
        data={"name": "huge", "signature": json.dumps(sig)},
        files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
    )
    assert r.status_code == 400 and "GiB" in r.json()["detail"], r.text
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == before  # nothing refused is kept


def test_metrics_are_for_admins_and_scrapers_not_teams(kiln):
    api, admin, tokens, _ = kiln
    for team_token in (tokens["team-b-infer"], tokens["team-b-manage"], tokens["team-a-manage"]):
        r = httpx.get(f"{api.url}/metrics", headers=team_token)
        assert r.status_code == 403 and "kiln_" not in r.text
    assert httpx.get(f"{api.url}/metrics", headers=admin).status_code == 200
    r = httpx.post(f"{api.url}/v1/tokens", headers=tokens["team-a-manage"], json={"name": "s", "scopes": ["metrics"]})
    assert r.status_code == 403  # a team cannot give itself every team's series
    scraper = httpx.post(f"{api.url}/v1/tokens", headers=admin, json={"name": "prom", "scopes": ["metrics"]}).json()
    headers = {"Authorization": f"Bearer {scraper['token']}"}
    assert httpx.get(f"{api.url}/metrics", headers=headers).status_code == 200
    assert httpx.get(f"{api.url}/v1/jobs", headers=headers).status_code == 403


# as they go in the query string: percent-escapes included (%ff is not UTF-8)
NASTY = [
    "9223372036854775808",
    str(2**63 * 4),
    "-1",
    "1e309",
    "NaN",
    "%C3%A9%C3%A9",
    "%00",
    "x" * 5000,
    "",
    "0x10",
    "%5B%5D",
    "%7B%7D",
    "%ff",
    "%ff%fe%80",
]


def _operations(api) -> list[tuple[str, str, list[str]]]:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    ops = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
            ops.append((method.upper(), path, names))
    return ops


def test_nasty_query_strings_are_4xx_on_every_route(kiln):
    api, admin, _, _ = kiln
    ops = _operations(api)
    assert any(names for _, _, names in ops)
    tried = 0
    for method, path, names in ops:
        concrete = path.replace("{", "").replace("}", "")
        for name in names + ["offset", "limit"]:
            for value in NASTY:
                r = httpx.request(
                    method,
                    f"{api.url}{concrete}?{name}={value}",
                    headers=admin,
                    json={} if method in ("POST", "PATCH") else None,
                    timeout=30,
                )
                tried += 1
                assert r.status_code < 500, (method, path, name, value, r.status_code, r.text[:300])
    # the two that were 500s, on the dashboard too
    for path, param in (
        ("/v1/jobs", "offset"),
        ("/v1/models", "offset"),
        ("/", "offset"),
        ("/v1/jobs/x/logs", "after"),
    ):
        r = httpx.get(f"{api.url}{path}", params={param: str(2**63)}, headers=admin)
        assert 400 <= r.status_code < 500, (path, param, r.status_code)
    assert tried > 100


def test_arbitrary_header_bytes_are_4xx(kiln):
    api, admin, tokens, _ = kiln
    values = [b"\xb2", b"\xff\xfe", "²".encode(), b"1" * 300, b"-5", b"\x00", b"12\xb2"]
    for value in values:
        for header in (
            b"Inference-Header-Content-Length",
            b"Authorization",
            b"Content-Length",
            b"Cookie",
            b"X-CSRF-Token",
            b"Idempotency-Key",
        ):
            with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
                auth = b"" if header == b"Authorization" else f"Authorization: {admin['Authorization']}\r\n".encode()
                sock.sendall(
                    b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                    + auth
                    + header
                    + b": "
                    + value
                    + b"\r\nContent-Type: application/json\r\n"
                    + (b"" if header == b"Content-Length" else b"Content-Length: 2\r\n")
                    + b"\r\n{}"
                )
                try:
                    status, _ = read_response(sock)
                except (ConnectionError, AssertionError):
                    continue  # the server may close a connection whose headers do not parse
                assert 400 <= status < 500, (header, value, status)


def _trickle_headers(sock: socket.socket, started: float) -> float | None:
    """Sends a request's headers a byte at a time: seconds from `started` until the server closed
    the connection, or None if it never did."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    for ch in b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        try:
            sock.sendall(bytes([ch]))
            sock.settimeout(0.5)
            if sock.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_slow_headers_are_timed_out(kiln):
    api, _, _, _ = kiln
    with socket.create_connection(("127.0.0.1", api.port), timeout=HEADER_TIMEOUT_S * 5) as sock:
        closed_after = _trickle_headers(sock, time.monotonic())
    assert closed_after is not None and closed_after < HEADER_TIMEOUT_S + 2, closed_after
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_slow_headers_of_a_later_request_on_a_kept_alive_connection_are_timed_out(kiln):
    """The header timer is set once per connection and moved when it fires: the second request's
    time counts from its own first byte, neither from the connection's start nor not at all."""
    api, _, _, _ = kiln
    with socket.create_connection(("127.0.0.1", api.port), timeout=HEADER_TIMEOUT_S * 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT_S * 0.6)  # the connection's first deadline falls inside the next request
        closed_after = _trickle_headers(sock, time.monotonic())
    assert closed_after is not None, "a trickling second request was never cut off"
    assert HEADER_TIMEOUT_S - 0.5 < closed_after < HEADER_TIMEOUT_S + 2, closed_after
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_kiln_up_keeps_its_files_private_and_its_token_out_of_a_log(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    data = tmp_path / "data"
    up = Proc(
        "up",
        [sys.executable, "-m", "workers.cli", "up", "--port", str(port), "--data-dir", str(data)],
        env,
        tmp_path / "up.log",
    )  # stdout is a file, not a terminal
    procs = Processes()
    procs.add(up)
    try:
        up.start()
        wait_for(
            lambda: (data / "admin-token").exists() and answers(f"http://127.0.0.1:{port}"),
            120,
            "kiln up",
            diagnose=up.tail,
        )
        token = (data / "admin-token").read_text().strip()
        wait_for(lambda: "admin-token" in up.log.read_text(), 20, "the line saying where the token is")
        assert token not in up.log.read_text() and token[:12] not in up.log.read_text()
        others = stat.S_IRWXG | stat.S_IRWXO
        for path in [data, *data.rglob("*")]:
            if path.is_symlink():
                continue
            assert not path.stat().st_mode & others, f"{path} is {oct(path.stat().st_mode)}"
        assert (data / "kiln.db").exists()
    finally:
        procs.close()


def test_the_store_sweep_removes_only_old_unreferenced_files(tmp_path, monkeypatch):
    from service.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    kept_ref = store.put_file(_file(tmp_path, "a", b"referenced"))
    old_orphan = store.put_file(_file(tmp_path, "b", b"orphan"))
    young_orphan = store.put_file(_file(tmp_path, "c", b"young"))
    day_ago = time.time() - 2 * 86400
    for sha in (kept_ref, old_orphan):
        os.utime(store.local_path(sha), (day_ago, day_ago))
    removed = store.sweep({kept_ref}, older_than_s=86400)
    assert removed == [old_orphan]
    assert store.exists(kept_ref) and store.exists(young_orphan) and not store.exists(old_orphan)


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path
