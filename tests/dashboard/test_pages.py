"""The dashboard without a browser: signing in and out, what a page answers before sign-in, the
headers and static files, and the pieces the pages are drawn with (charts, numbers, try-it)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from service.dashboard import charts, formatting, tryit
from tests.conftest import ZOO, zoo_signature


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The app in-process with authentication on, and its admin token."""
    from fastapi.testclient import TestClient

    from service import auth
    from service.app import create_app
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KILN_AUTH", "on")
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_BROKER_URL", raising=False)
    clear_caches()
    auth._cache.clear()
    with TestClient(create_app()) as client:
        yield client, auth.read_admin_token(tmp_path / "data")
    from service import db

    db.get_engine().dispose()
    clear_caches()


def sign_in(client, token):
    return client.post("/dashboard/session", json={"token": token})


@pytest.mark.parametrize("path", ["/", "/models", "/deployments", "/jobs/0123"])
def test_pages_ask_to_sign_in_first(app, path):
    client, _ = app
    r = client.get(path)
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    assert "Sign in to Kiln" in r.text and 'id="sign-in-form"' in r.text
    assert 'role="alert"' not in r.text  # nothing was refused yet: no error to show


def test_signing_in_sets_an_httponly_cookie_and_the_page_gets_its_csrf_token(app):
    from service.auth import csrf_token

    client, token = app
    r = sign_in(client, token)
    assert r.status_code == 200 and r.json() == {"owner": "default", "scopes": ["admin"]}
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"kiln_session={token}") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/")
    assert page.status_code == 200 and "Conversion jobs" in page.text
    assert f'<meta name="csrf-token" content="{csrf_token(token)}">' in page.text
    assert token not in page.text  # the token itself never reaches the page
    assert "team <strong>default</strong>" in page.text


def test_sign_in_refuses_bad_tokens_non_json_and_infer_only_tokens(app):
    client, token = app
    r = sign_in(client, "kiln_nope")
    assert r.status_code == 401 and r.json()["detail"] == "the token is unknown or revoked"
    assert "set-cookie" not in r.headers
    # a cross-site form can post text/plain or a form without a preflight; neither signs in
    r = client.post("/dashboard/session", content=json.dumps({"token": token}), headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "set-cookie" not in r.headers
    r = client.post("/dashboard/session", data={"token": token})
    assert r.status_code == 400
    infer = client.post(
        "/v1/tokens", headers={"Authorization": f"Bearer {token}"}, json={"name": "reader", "scopes": ["infer"]}
    ).json()["token"]
    r = sign_in(client, infer)
    assert r.status_code == 403 and "needs manage or admin" in r.json()["detail"]


def test_a_refused_cookie_shows_the_sign_in_page_with_the_reason(app):
    client, _ = app
    client.cookies.set("kiln_session", "kiln_revoked")
    r = client.get("/models")
    assert r.status_code == 401 and "the token is unknown or revoked" in r.text
    client.cookies.clear()


def test_sign_out_needs_the_csrf_token(app):
    from service.auth import csrf_token

    client, token = app
    sign_in(client, token)
    assert client.delete("/dashboard/session").status_code == 403
    r = client.delete("/dashboard/session", headers={"X-CSRF-Token": csrf_token(token)})
    assert r.status_code == 204 and 'kiln_session=""' in r.headers["set-cookie"]
    client.cookies.clear()
    assert client.get("/").status_code == 401


def test_pages_without_authentication(tmp_path, monkeypatch):
    """`kiln up --open`: no sign-in, no team shown, pages for an empty Kiln."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KILN_AUTH", "off")
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    clear_caches()
    try:
        with TestClient(create_app()) as client:
            for path, text in (
                ("/", "No conversion jobs yet"),
                ("/models", "No models yet"),
                ("/deployments", "Nothing is deployed"),
            ):
                r = client.get(path)
                assert r.status_code == 200 and text in r.text, path
                assert "Sign out" not in r.text
            # a job no worker can take says so, on its page and in the list
            upload = client.post(
                "/v1/models",
                data={"name": "mlp", "signature": json.dumps(zoo_signature("mlp"))},
                files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
            )
            assert upload.status_code == 201, upload.text
            job = client.post("/v1/jobs", json={"model": "mlp"}).json()
            page = client.get(f"/jobs/{job['id']}").text
            assert "waiting for a worker on the cpu queue: none is online" in page
            assert "waiting for a worker on the cpu queue" in client.get("/").text
            r = client.get("/jobs/0123")
            assert r.status_code == 404 and "job 0123 does not exist" in r.text
            r = client.get("/?status=bogus")
            assert r.status_code == 200 and "unknown status &#39;bogus&#39;" in r.text
    finally:
        clear_caches()


def test_headers_and_static_files(app):
    client, token = app
    sign_in(client, token)
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text  # no inline script: the CSP would block it
    urls = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page.text)
    assert {u.split("?")[0].rsplit("/", 1)[1] for u in urls} >= {"kiln.css", "kiln.js", "jobs.js", "kiln.svg"}
    for url in urls:
        r = client.get(url)  # static files need no sign-in (the sign-in page uses them)
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"], url
    assert client.get("/dashboard/static/kiln.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/static/..%2Fsession.py").status_code == 404
    assert client.get("/dashboard/static/nope.js").status_code == 404
    assert not [
        p
        for p in client.get("/openapi.json").json()["paths"]
        if not p.startswith(("/v1", "/v2", "/healthz", "/readyz", "/metrics"))
    ]


def test_number_formats():
    assert formatting.num(2.384185791015625e-07) == "2.38e-07"
    assert formatting.num(0.0511) == "0.0511" and formatting.num(0) == "0" and formatting.num(None) == "—"
    assert formatting.num(123456.7) == "123,457" and formatting.num(float("inf")) == "∞"
    assert formatting.cosine(0.9984247631619281) == "0.998425" and formatting.percent(1.0) == "100.0%"
    assert formatting.speedup(4.352266880923711) == "4.35×"
    assert formatting.duration(0.0001) == "<1 ms" and formatting.duration(0.139) == "139 ms"
    assert formatting.duration(19.71) == "19.7 s" and formatting.duration(125) == "2 min 5 s"
    assert formatting.size(120272) == "117.5 KiB" and formatting.size(300) == "300 B"
    assert (
        formatting.tolerance({"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.99999})
        == "|Δ| ≤ 0.0001 + 0.001·|ref|, cos ≥ 0.99999"
    )
    assert (
        formatting.tolerance({"atol": None, "rtol": None, "min_cosine": 0.98, "min_top1": 0.99})
        == "cos ≥ 0.98, top-1 ≥ 99%"
    )
    assert (
        formatting.tensor({"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]})
        == "image: float32[batch, 3, 32, 32]"
    )
    assert formatting.tensor({"name": "logits"}) == "logits"


def _svg(markup) -> ET.Element:
    return ET.fromstring(str(markup))  # well-formed XML, or this raises


def test_charts_draw_each_candidate_and_mark_eager():
    point = lambda b, p50: (b, {"batch": b, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50 * 2})  # noqa: E731 - a one-line row maker
    series = [
        charts.Series("ort", charts.color(0), [point(1, 0.15), point(4, 0.6)]),
        charts.Series("eager", charts.EAGER_COLOR, [point(1, 0.64), point(4, 1.5)], dashed=True),
    ]
    svg = _svg(charts.latency_chart(series, [1, 4]))
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert len(svg.findall(".//s:g[@class='series']", ns)) == 2
    assert len(svg.findall(".//s:circle", ns)) == 4
    points = [
        charts.Point("ort", "#000", 4.35, 2.5e-7, passed=True, selected=True),
        charts.Point("exact", "#111", 0.9, 0.0, passed=True),  # zero error sits on the floor
        charts.Point("bad", "#222", 2.0, 0.3, passed=False),
    ]
    svg = _svg(charts.tradeoff_chart(points))
    assert len(svg.findall(".//s:g[@class='point pass']", ns)) == 2
    assert len(svg.findall(".//s:g[@class='point fail']", ns)) == 1
    assert svg.find(".//s:g[@class='eager']", ns) is not None


def test_charts_with_nothing_to_draw():
    assert "no benchmark yet" in str(charts.latency_chart([], []))
    assert "no validated" in str(charts.tradeoff_chart([]))
    assert charts.nice_ticks(0, 0.657) == [0, 0.2, 0.4, 0.6, 0.8]
    assert charts.nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_try_it_request_from_a_signature():
    body = json.loads(
        tryit.example_request(
            {
                "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
                "dims": {"batch": {"min": 1, "opt": 2, "max": 4}},
            }
        )
    )
    (image,) = body["inputs"]
    assert image["shape"] == [1, 3, 32, 32] and image["datatype"] == "FP32" and len(image["data"]) == 3072
    big = json.loads(
        tryit.example_request(
            {"inputs": ["x:float32[batch,3,224,224]", "ids:int64[batch,8]"], "dims": {"batch": [2, 4, 8]}}
        )
    )
    x, ids = big["inputs"]
    assert x["shape"] == [2, 3, 224, 224] and x["data"] == "<301056 random values in [-1, 1)>"
    assert ids["datatype"] == "INT64" and len(ids["data"]) == 16 and all(isinstance(v, int) for v in ids["data"])
