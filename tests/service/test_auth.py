"""Authentication: tokens, scopes, team isolation, the first-start admin token, CSRF for the
dashboard's cookie, and no CORS unless configured."""

from __future__ import annotations

import json
import stat

import pytest

from tests.conftest import ZOO, zoo_signature


@pytest.fixture
def secure(kiln_env, monkeypatch, tmp_path):
    """The app with authentication on (the default) and its admin token."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import ADMIN_TOKEN_FILE, _cache
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_AUTH", "on")
    clear_caches()
    _cache.clear()
    with TestClient(create_app()) as api:
        path = tmp_path / "data" / ADMIN_TOKEN_FILE
        yield api, path.read_text().strip(), path


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def upload(api, token, name="mlp"):
    return api.post(
        "/v1/models",
        headers=bearer(token),
        data={"name": name, "signature": json.dumps(zoo_signature("mlp"))},
        files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
    )


def test_first_start_makes_an_admin_token_only_its_owner_can_read(secure):
    api, token, path = secure
    assert token.startswith("kiln_") and len(token) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = api.get("/v1/tokens", headers=bearer(token)).json()
    assert len(listed) == 1 and listed[0]["scopes"] == ["admin"] and listed[0]["token"] is None
    from service.db import session_scope
    from service.tables import ApiToken

    with session_scope() as s:  # only the hash is stored
        row = s.get(ApiToken, listed[0]["id"])
        assert token not in (row.token_hash, row.prefix) and len(row.token_hash) == 64


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/jobs", "/v1/deployments", "/v1/tokens", "/metrics", "/v2/models/mlp"]
)
def test_everything_but_health_needs_a_token(secure, path):
    api, _, _ = secure
    r = api.get(path)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.get(path, headers=bearer("kiln_not-a-real-token")).status_code == 401
    assert api.get(path, headers={"Authorization": "Basic abc"}).status_code == 401
    for open_path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert api.get(open_path).status_code in (200, 503)


def test_scopes_and_revocation(secure):
    api, admin, _ = secure
    infer = api.post("/v1/tokens", headers=bearer(admin), json={"name": "app", "scopes": ["infer"]}).json()["token"]
    manage = api.post("/v1/tokens", headers=bearer(admin), json={"name": "ci", "scopes": ["manage"]}).json()
    r = api.get("/v1/models", headers=bearer(infer))
    assert r.status_code == 403 and "do not allow manage" in r.json()["detail"]
    assert api.get("/v2/models/none", headers=bearer(infer)).status_code == 404  # allowed in, model unknown
    assert api.get("/v1/models", headers=bearer(manage["token"])).status_code == 200
    r = api.post("/v1/tokens", headers=bearer(manage["token"]), json={"name": "x", "scopes": ["admin"]})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = api.post("/v1/tokens", headers=bearer(manage["token"]), json={"name": "x", "owner": "other"})
    assert r.status_code == 403
    assert api.post("/v1/tokens", headers=bearer(admin), json={"name": "x", "scopes": ["root"]}).status_code == 400
    assert api.delete(f"/v1/tokens/{manage['id']}", headers=bearer(admin)).status_code == 204
    r = api.get("/v1/models", headers=bearer(manage["token"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # /v2 inference (an async route: tokens are looked up off the event loop) checks the same way
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    for _ in range(2):  # the first asks the database, the second the cache
        assert api.post("/v2/models/none/infer", headers=bearer(infer), json=body).status_code == 404
        r = api.post("/v2/models/none/infer", headers=bearer(manage["token"]), json=body)
        assert r.status_code == 401 and "revoked" in r.json()["error"], r.text
        assert api.post("/v2/models/none/infer", json=body).status_code == 401
        r = api.post("/v2/models/none/infer", headers=bearer("kiln_" + "x" * 40), json=body)
        assert r.status_code == 401 and "unknown or revoked" in r.json()["error"], r.text


def test_teams_cannot_see_each_others_models_jobs_or_deployments(secure):
    api, admin, _ = secure
    a = api.post(
        "/v1/tokens", headers=bearer(admin), json={"name": "a", "owner": "team-a", "scopes": ["manage"]}
    ).json()
    b = api.post(
        "/v1/tokens", headers=bearer(admin), json={"name": "b", "owner": "team-b", "scopes": ["manage"]}
    ).json()
    assert upload(api, a["token"]).status_code == 201
    job = api.post("/v1/jobs", headers=bearer(a["token"]), json={"model": "mlp"}).json()
    for path in ("/v1/models/mlp", "/v1/models/mlp/versions/1", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/logs"):
        assert api.get(path, headers=bearer(a["token"])).status_code == 200, path
        r = api.get(path, headers=bearer(b["token"]))
        assert r.status_code == 404, path  # not 403: nothing says it exists
    assert api.get("/v1/models", headers=bearer(b["token"])).json()["total"] == 0
    assert api.get("/v1/jobs", headers=bearer(b["token"])).json()["total"] == 0
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(b["token"])).status_code == 404
    assert api.post("/v1/jobs", headers=bearer(b["token"]), json={"model": "mlp"}).status_code == 404
    # team b may use the same model name for its own model
    assert upload(api, b["token"]).json()["version"] == 1
    assert [t["owner"] for t in api.get("/v1/tokens", headers=bearer(a["token"])).json()] == ["team-a"]


def test_teams_cannot_see_or_touch_each_others_candidates_or_deployments(secure):
    from workers.jobrunner import run_job

    api, admin, _ = secure
    a = api.post(
        "/v1/tokens", headers=bearer(admin), json={"name": "a", "owner": "team-a", "scopes": ["manage"]}
    ).json()
    b = api.post(
        "/v1/tokens", headers=bearer(admin), json={"name": "b", "owner": "team-b", "scopes": ["manage"]}
    ).json()
    b_app = api.post("/v1/tokens", headers=bearer(b["token"]), json={"name": "b-app", "scopes": ["infer"]}).json()
    assert upload(api, a["token"]).status_code == 201
    job = api.post(
        "/v1/jobs",
        headers=bearer(a["token"]),
        json={"model": "mlp", "targets": ["onnxruntime"], "bench_seconds": 0.05, "threads": 1},
    ).json()
    assert run_job(job["id"]) == "succeeded"
    cand = api.get(f"/v1/jobs/{job['id']}", headers=bearer(a["token"])).json()["selected_candidate"]
    r = api.post("/v1/deployments", headers=bearer(a["token"]), json={"name": "mlp", "job": job["id"]})
    assert r.status_code == 201 and r.json()["state"] == "ready", r.text
    x = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    assert api.post("/v2/models/mlp/infer", headers=bearer(a["token"]), json=x).status_code == 200
    for token in (b["token"], b_app["token"]):  # b's management and b's application token alike
        assert api.get("/v2/models/mlp", headers=bearer(token)).status_code == 404
        assert api.get("/v2/models/mlp/ready", headers=bearer(token)).status_code == 404
        assert api.post("/v2/models/mlp/infer", headers=bearer(token), json=x).status_code == 404
        assert api.post("/v2/models/mlp/versions/1/infer", headers=bearer(token), json=x).status_code == 404
    theirs = bearer(b["token"])
    assert api.get("/v1/deployments", headers=theirs).json() == []
    for method, path, body in (
        ("GET", "/v1/deployments/mlp", None),
        ("PATCH", "/v1/deployments/mlp", {"default_version": 1}),
        ("POST", "/v1/deployments/mlp/rollback", None),
        ("DELETE", "/v1/deployments/mlp", None),
        ("GET", f"/v1/candidates/{cand}", None),
        ("GET", f"/v1/candidates/{cand}/artifact", None),
        ("POST", "/v1/deployments", {"name": "stolen", "job": job["id"]}),
        ("POST", "/v1/deployments", {"name": "stolen", "candidate": cand}),
    ):
        r = api.request(method, path, headers=theirs, json=body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)  # not 403: nothing says it exists
    # and team a's deployment is untouched
    assert api.get("/v1/deployments/mlp", headers=bearer(a["token"])).json()["state"] == "ready"
    assert api.post("/v2/models/mlp/infer", headers=bearer(a["token"]), json=x).status_code == 200


def test_dashboard_cookie_needs_csrf_for_changes(secure):
    from service.auth import csrf_token

    api, admin, _ = secure
    api.cookies.set("kiln_session", admin)
    try:
        assert api.get("/v1/models").status_code == 200  # reading with the cookie is fine
        r = api.post("/v1/tokens", json={"name": "x"})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = api.post("/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "wrong"})
        assert r.status_code == 403
        r = api.post("/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf_token(admin)})
        assert r.status_code == 201
    finally:
        api.cookies.clear()


def test_no_cors_unless_configured(secure):
    api, admin, _ = secure
    r = api.options("/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    r = api.get("/v1/models", headers={"Origin": "https://evil.example", **bearer(admin)})
    assert "access-control-allow-origin" not in r.headers


def test_no_api_takes_a_server_path_or_url(secure):
    """Every request body schema in the OpenAPI document: no field that names a path or a URL."""
    api, admin, _ = secure
    spec = api.get("/openapi.json").json()
    suspicious = []
    for name, schema in spec["components"]["schemas"].items():
        if name.endswith("Out") or name.startswith(("Page", "HTTPValidation", "ValidationError")):
            continue
        for field in schema.get("properties", {}):
            if any(w in field.lower() for w in ("path", "url", "uri", "file_name", "location", "dir")):
                suspicious.append(f"{name}.{field}")
    assert suspicious == []


@pytest.mark.parametrize(
    "argv, env",
    [
        (["up", "--open", "--host", "0.0.0.0"], {}),
        (["up", "--host", "0.0.0.0"], {"KILN_AUTH": "false"}),
        (["api", "--host", "10.1.2.3"], {"KILN_AUTH": "false"}),
    ],
)
def test_without_authentication_kiln_listens_only_on_loopback(argv, env, tmp_path):
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    full.update(env, KILN_DATA_DIR=str(tmp_path / "data"))
    r = subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv, "--port", "1"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2, (r.returncode, said)
    assert "only on a loopback address" in said and argv[argv.index("--host") + 1] in said, said


def test_open_network_is_an_explicit_choice(monkeypatch):
    from service.errors import InvalidOptions
    from tests.service.conftest import clear_caches
    from workers.serve import check_exposure

    monkeypatch.setenv("KILN_AUTH", "false")
    clear_caches()
    with pytest.raises(InvalidOptions, match="KILN_OPEN_NETWORK"):
        check_exposure("0.0.0.0")
    check_exposure("127.0.0.1")
    check_exposure("::1")
    monkeypatch.setenv("KILN_OPEN_NETWORK", "true")
    clear_caches()
    check_exposure("0.0.0.0")
    monkeypatch.setenv("KILN_AUTH", "true")
    monkeypatch.delenv("KILN_OPEN_NETWORK")
    clear_caches()
    check_exposure("0.0.0.0")
    clear_caches()


def test_a_busy_tokens_entry_running_out_sends_one_lookup_and_a_revocation_still_lands(secure, monkeypatch):
    """When a token's cache entry runs out under load, the requests in flight are answered from
    the stale entry while one lookup refreshes it (not one database write each); a token revoked
    on another replica (here: in the database, not through this process) stops working once that
    lookup is back."""
    import threading
    import time

    from service import auth
    from service.db import new_session, session_scope
    from service.tables import ApiToken

    api, admin, _ = secure
    made = api.post("/v1/tokens", headers=bearer(admin), json={"name": "app", "scopes": ["infer"]}).json()
    token = made["token"]
    principal = auth.authenticate(new_session, token)  # cached now
    key = auth.hash_token(token)
    auth._cache._items[key] = (time.monotonic() - 0.01, principal)  # just past its time: stale for CACHE_S more

    lookups: list[int] = []
    real = auth._look_up
    release = threading.Event()  # the lookup comes back only once every caller has been answered
    monkeypatch.setattr(auth, "_look_up", lambda f, k: (lookups.append(1), release.wait(30), real(f, k))[-1])
    with session_scope() as s:  # revoked elsewhere: this process's cache is not told
        s.get(ApiToken, made["id"]).revoked_at = auth.now()
    answers: list[object] = []
    callers = [threading.Thread(target=lambda: answers.append(auth.cached(token, new_session))) for _ in range(32)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(answers) == 32 and all(a is not None for a in answers)  # none waited for the database
    release.set()
    deadline = time.time() + 5
    while time.time() < deadline and auth._cache._refreshing:
        time.sleep(0.01)
    assert lookups == [1]  # one lookup for 32 requests
    with pytest.raises(auth.Unauthorized, match="revoked"):
        auth.cached(token, new_session)
