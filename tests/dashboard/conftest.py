"""The dashboard under a real browser: the real app under uvicorn with authentication on, a
conversion worker in a thread running queued jobs with workers.jobrunner.run_job (what the Celery
task calls), and Debian's chromium driven by Playwright, signed in with the admin token.

Playwright cannot download its browsers here: it launches the system's chromium by its path
(KILN_CHROMIUM, else `chromium` on PATH, else /usr/bin/chromium)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ARTIFACTS

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1440, "height": 900}


def chromium_path() -> str:
    path = os.environ.get("KILN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            f"no chromium at {path}: the dashboard tests need Debian's chromium (apt-get install chromium) "
            "or KILN_CHROMIUM set to a Chromium binary"
        )
    return path


class Worker:
    """A conversion worker in a thread: takes queued jobs from the database, oldest first, and runs
    each with workers.jobrunner.run_job, so job pages see the same rows, steps and events a Celery
    worker would write."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.finished: dict[str, str] = {}
        self.thread = threading.Thread(target=self._loop, name="kiln-test-worker", daemon=True)

    def _next(self) -> str | None:
        from sqlalchemy import select

        from service.db import session_scope
        from service.tables import Job

        with session_scope() as s:
            return s.scalar(select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(1))

    def _announce(self, online: bool) -> None:
        """Say this worker serves the cpu queue, as `kiln worker` does (else queued jobs say none is online)."""
        from service import jobs
        from service.db import session_scope

        with session_scope() as s:
            if online:
                jobs.worker_seen(s, "test-worker", "localhost", ["cpu"])
            else:
                jobs.worker_gone(s, "test-worker")

    def _loop(self) -> None:
        from workers.jobrunner import run_job

        announced = 0.0
        while not self.stop.is_set():
            if time.monotonic() - announced > 5:
                self._announce(True)
                announced = time.monotonic()
            job_id = self._next()
            if job_id is None:
                self.stop.wait(0.2)
                continue
            self.finished[job_id] = run_job(job_id)
        self._announce(False)


@dataclass
class Kiln:
    url: str
    token: str
    http: httpx.Client  # the /v1 API with the admin token
    data: Path
    worker: Worker


@pytest.fixture(scope="module")
def kiln(tmp_path_factory) -> Iterator[Kiln]:
    """A fresh Kiln with authentication on, its API client and a worker."""
    from service import auth
    from tests.service.conftest import clear_caches
    from tests.service.test_serving import Server

    data = tmp_path_factory.mktemp("dashboard")
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_DATA_DIR", str(data))
    mp.setenv("KILN_AUTH", "on")
    mp.delenv("KILN_DATABASE_URL", raising=False)
    mp.delenv("KILN_BROKER_URL", raising=False)
    clear_caches()
    worker = Worker()
    try:
        with Server() as srv:
            token = auth.read_admin_token(data)
            assert token, "the server made no admin token at first start"
            with httpx.Client(base_url=srv.url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as http:
                worker.thread.start()
                yield Kiln(url=srv.url, token=token, http=http, data=data, worker=worker)
                # stop whatever still runs, so the worker thread ends with its sandbox
                for job in http.get("/v1/jobs", params={"limit": 500}).json()["items"]:
                    if job["status"] in ("queued", "running"):
                        http.post(f"/v1/jobs/{job['id']}/cancel")
                worker.stop.set()
                worker.thread.join(60)
    finally:
        mp.undo()
        clear_caches()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the dashboard tests need the playwright Python package (pip install playwright); "
            "never `playwright install`: they use the system's chromium"
        )
    executable = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(kiln, browser):
    """One signed-in browser tab for the module's tests (they follow one user's session)."""
    from playwright.sync_api import expect

    context = browser.new_context(base_url=kiln.url, viewport=VIEWPORT)
    context.set_default_timeout(20_000)
    tab = context.new_page()
    tab.on("dialog", lambda dialog: dialog.accept())  # confirm() before cancel and undeploy
    script_errors: list[str] = []
    tab.on("pageerror", lambda exc: script_errors.append(str(exc)))
    tab.goto("/")
    expect(tab.locator("h1")).to_have_text("Sign in to Kiln")
    tab.fill("input[name=token]", kiln.token)
    tab.click("#sign-in-form button[type=submit]")
    expect(tab.locator("h1")).to_have_text("Conversion jobs")
    yield tab
    context.close()
    assert not script_errors, f"the pages raised in the browser: {script_errors}"


@pytest.fixture(scope="session")
def shots() -> Path:
    """Where the screenshots go (KILN_TEST_ARTIFACTS, default test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
