"""The API fuzzed from its own OpenAPI schema (schemathesis): whatever the generated requests
hold, the answer is never a 5xx. Bounded: a few examples per operation, against the real server
with real SQLite, a zoo model uploaded and a job queued so that ids and names can exist."""

from __future__ import annotations

import json

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from tests.conftest import ZOO, zoo_signature
from tests.service.test_serving import Server


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from tests.service.conftest import clear_caches

    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_DATA_DIR", str(tmp_path_factory.mktemp("fuzz")))
    mp.setenv("KILN_AUTH", "off")
    mp.delenv("KILN_DATABASE_URL", raising=False)
    mp.delenv("KILN_BROKER_URL", raising=False)
    clear_caches()
    with Server() as srv:
        with httpx.Client(base_url=srv.url) as http:
            http.post(
                "/v1/models",
                data={"name": "mlp", "signature": json.dumps(zoo_signature("mlp"))},
                files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
            ).raise_for_status()
            http.post("/v1/jobs", json={"model": "mlp"}).raise_for_status()
        yield srv.url
    mp.undo()
    clear_caches()


def _schema():
    from service.app import create_app

    return schemathesis.openapi.from_dict(create_app().openapi())


schema = _schema()


@schema.parametrize()
@hypothesis.settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck)
)
def test_no_server_errors(case, base_url):
    if case.path.endswith("/events"):
        # A stream that stays open while the job lives: read its status and headers, then hang up.
        kw = case.as_transport_kwargs(base_url=base_url)
        with httpx.stream(
            kw["method"],
            kw["url"],
            params=kw.get("params"),
            headers=kw.get("headers"),
            cookies=kw.get("cookies"),
            timeout=30,
        ) as response:
            assert response.status_code < 500, f"{case.as_curl_command()} answered {response.status_code}"
        return
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=30)
