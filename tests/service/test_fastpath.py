"""The /v2 inference fast path: which requests it takes, and that it answers as the routes do."""

from __future__ import annotations

import asyncio


def test_inference_requests_take_the_fast_path_and_others_the_router(tmp_path, monkeypatch):
    """POST .../infer is answered ahead of the framework's layers (its middleware stack, replaced
    here by a stand-in that records what reaches it), with the routes' own checks and error body;
    anything else goes on to them."""
    from service.app import create_app
    from service.artifacts import get_store
    from service.serving.manager import Manager
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_AUTH", "off")
    clear_caches()
    reached: list[str] = []
    app = create_app()
    app.state.manager = Manager(get_store())

    async def router(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(method: str, path: str) -> tuple[int, bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [],
        }
        app.middleware_stack = router  # what the framework would build on its first request
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, body = asyncio.run(call("POST", "/v2/models/nope/infer"))
    assert (status, body) == (404, b'{"error":"model \'nope\' is not deployed"}')
    status, body = asyncio.run(call("POST", "/v2/models/nope/versions/x/infer"))
    assert status == 404 and b"versions are numbers" in body
    assert reached == []
    assert asyncio.run(call("GET", "/v2/models/nope"))[0] == 204
    assert asyncio.run(call("POST", "/v2/models/nope/infer/more"))[0] == 204
    assert reached == ["/v2/models/nope", "/v2/models/nope/infer/more"]
    clear_caches()
