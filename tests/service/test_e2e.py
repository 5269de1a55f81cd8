"""End-to-end and fault tests with real processes: `kiln api` and `kiln worker` as subprocesses, a
Redis server each test starts on a free port, and real SQLite and PostgreSQL (a fresh database
for this module on the local server, dropped afterwards). No mocks, no Celery eager mode.

Each test starts its own Redis, API and worker (tests/service/procs.py); the data directory and
the database are shared by the tests of one database kind, and whatever a test leaves unfinished
is marked canceled at its end so that the next test's requeue loop does not pick it up.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from service.client import KilnClient
from tests.conftest import ZOO, zoo_signature
from tests.service.conftest import PG_ADMIN
from tests.service.procs import (
    KilnApi,
    KilnWorker,
    Proc,
    Processes,
    RedisServer,
    alive,
    answers,
    descendants,
    free_port,
    kiln_env,
    processes_matching,
    sandboxes,
    tcp_sockets,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CNN = ZOO / "cnn.py"
CNN_SIGNATURE = zoo_signature("cnn", "SMALL_SIGNATURE")
JOB_OPTIONS = {"targets": ["onnxruntime", "torchscript"], "precisions": ["fp32", "int8"], "bench_seconds": 0.05}
# The fault tests need a job that runs long enough to be hit, not every candidate: one is quicker.
QUICK = {"targets": ["onnxruntime"], "precisions": ["fp32"], "bench_seconds": 0.05}
STEPS = ["load", "capture", "export", "compile", "validate", "benchmark", "select", "report"]
# Short, so recovery is quick: the requeue loop runs every STALE_S / 3 seconds. Well above the 2 s
# heartbeat, so a busy worker is never taken for a dead one.
STALE_S = 6
JOB_TIMEOUT_S = 180  # one CNN job takes about 20 s on an idle 2-core machine
TERMINAL = ("succeeded", "failed", "canceled")

# --- databases and data directories (one of each per database kind, for this module) -----------------


@pytest.fixture(scope="module")
def postgresql_db() -> Iterator[str]:
    name = f"kiln_e2e_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def stores() -> dict[str, Path]:
    """A data directory per database kind, shared by this module's tests (the uploads live there)."""
    return {}


def database(request, stores: dict[str, Path], tmp_path_factory, kind: str) -> tuple[Path, str]:
    """(data dir, database URL) of one kind; the PostgreSQL database is created on first use."""
    if kind not in stores:
        stores[kind] = tmp_path_factory.mktemp(f"kiln-{kind}")
    data = stores[kind]
    if kind == "postgresql":
        return data, request.getfixturevalue("postgresql_db")
    return data, f"sqlite:///{data / 'kiln.db'}"


# --- one Kiln per test: Redis, the API, workers --------------------------------------------------------


class Kiln:
    """A running Kiln made of real processes, and a few HTTP helpers around its API."""

    def __init__(self, procs: Processes, logs: Path, data_dir: Path, database_url: str, **settings: Any) -> None:
        self.procs, self.logs, self.data_dir, self.database_url = procs, logs, data_dir, database_url
        self.redis = RedisServer(free_port(), logs / "redis.log")
        self.env = kiln_env(data_dir, database_url, self.redis.url, job_stale_after_s=STALE_S, **settings)
        self.api = KilnApi(free_port(), self.env, logs / "api.log")
        self.workers: list[KilnWorker] = []
        procs.add(self.redis)
        procs.add(self.api)

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def headers(self) -> dict[str, str]:
        """Authentication as the admin: the token the first API start wrote to DATA_DIR/admin-token."""
        path = self.data_dir / "admin-token"
        return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}

    def start_worker(self) -> KilnWorker:
        worker = KilnWorker(self.env, self.logs / f"worker{len(self.workers) + 1}.log")
        self.procs.add(worker)
        self.workers.append(worker)
        return worker.start()

    def diagnose(self) -> str:
        return self.procs.logs()

    # HTTP, with a fresh connection each time (the API may have been restarted in between)
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers, timeout=60, **kw)

    def events(self, job_id: str, deadline_s: float = JOB_TIMEOUT_S) -> list[tuple[str, Any]]:
        """A job's server-sent events to its end, read by the Python client (service.client), so its
        stream parser is the one these tests hold against the real server."""
        deadline = time.monotonic() + deadline_s
        token = self.headers.get("Authorization", "").removeprefix("Bearer ") or None
        events = []
        with KilnClient(self.url, token) as client:
            for event in client.events(job_id):
                events.append(event)
                assert time.monotonic() < deadline, f"the event stream did not end within {deadline_s}s"
        return events

    def push(self, path: Path, name: str, entry: str, signature: dict) -> dict:
        r = self.post(
            "/v1/models",
            data={"name": name, "entry": entry, "signature": json.dumps(signature)},
            files={"file": (path.name, path.read_bytes())},
        )
        assert r.status_code in (200, 201), r.text
        return r.json()

    def push_cnn(self) -> dict:
        return self.push(CNN, "cnn-small", "cnn.py:build_small", CNN_SIGNATURE)

    def create_job(self, version: dict, **options: Any) -> dict:
        r = self.post(
            "/v1/jobs", json={"model": version["name"], "version": version["version"], **(options or JOB_OPTIONS)}
        )
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(self, job_id: str, check: Callable[[dict], bool], what: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        def probe() -> dict | None:
            job = self.job(job_id)
            return job if check(job) else None

        return wait_for(probe, timeout, f"job {job_id}: {what}", interval=0.25, diagnose=self.diagnose)

    def wait_done(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        return self.wait_job(job_id, lambda j: j["status"] in TERMINAL, "to finish", timeout)

    def wait_sandboxed_step(self, job_id: str, steps: tuple[str, ...] = ("capture", "export")) -> dict:
        """Wait until the job runs one of `steps` with its model code in a live sandbox process.
        The job as then seen, with the pids of those sandbox processes under "sandboxes" (a scan
        made later could miss a box that ended meanwhile, between one step and the next)."""
        seen: list[int] = []

        def sandboxed(job: dict) -> bool:
            seen[:] = sandboxes(job_id)
            return job["status"] == "running" and job["current_step"] in steps and bool(seen)

        job = self.wait_job(job_id, sandboxed, f"running {' or '.join(steps)} in a sandbox", 120)
        return {**job, "sandboxes": list(seen)}


@pytest.fixture
def make_kiln(request, stores, tmp_path_factory, tmp_path):
    """make_kiln(kind, worker=True, redis=True, **KILN_settings) -> a started Kiln; all of it is
    killed afterwards, and jobs it left unfinished are marked canceled."""
    procs = Processes()
    made: list[Kiln] = []

    def make(kind: str = "postgresql", *, worker: bool = True, redis: bool = True, **settings: Any) -> Kiln:
        data_dir, url = database(request, stores, tmp_path_factory, kind)
        kiln = Kiln(procs, tmp_path / "logs", data_dir, url, **settings)
        made.append(kiln)
        if redis:
            kiln.redis.start()
        kiln.api.start()  # the API migrates the database first, so the workers never race it
        if worker:
            kiln.start_worker()
        return kiln

    yield make
    procs.close()
    # Killing a worker's tree leaves no sandbox behind (they die with their parent, too).
    needles = [str(k.data_dir) for k in made]
    try:
        wait_for(lambda: not any(sandboxes(n) for n in needles), 10, "no sandbox to outlive its worker")
    finally:
        procs.close(extra_needles=needles)
        for kiln in made:
            engine = create_engine(kiln.database_url)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE jobs SET status = 'canceled', cancel_requested = true "
                        "WHERE status IN ('queued', 'running')"
                    )
                )
            engine.dispose()


def assert_all_steps_ok(job: dict) -> None:
    assert [s["name"] for s in job["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in job["steps"]), [(s["name"], s["status"], s["error"]) for s in job["steps"]]


def assert_succeeded(job: dict, attempts: int) -> None:
    assert job["status"] == "succeeded", f"{job['status']}: {job['error']}"
    assert job["progress"] == 1.0 and job["error"] is None
    assert job["attempts"] == attempts
    assert_all_steps_ok(job)
    assert job["selected_candidate"]


# --- 1. the whole flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_end_to_end_upload_convert_follow_download_and_run(make_kiln, kind, tmp_path):
    kiln = make_kiln(kind)
    ready = kiln.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}, ready.text
    version = kiln.push_cnn()
    created = kiln.post("/v1/jobs", json={"model": version["name"], "version": version["version"], **JOB_OPTIONS})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/jobs/{job_id}"
    assert created.json()["status"] in ("queued", "running")

    events = kiln.events(job_id)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end" and events[-1][1] == {"status": "succeeded"}, events[-3:]
    assert "job" in kinds and "log" in kinds
    summaries = [d for e, d in events if e == "job"]
    assert "running" in [s["status"] for s in summaries]
    progress = [s["progress"] for s in summaries]
    assert progress == sorted(progress) and progress[-1] == 1.0, progress
    assert any("job succeeded" in line["line"] for e, d in events if e == "log" for line in d)

    job = kiln.job(job_id)
    assert_succeeded(job, attempts=1)
    assert {(c["target"], c["precision"]) for c in job["candidates"]} >= {
        ("onnxruntime", "fp32"),
        ("onnxruntime", "int8"),
        ("torchscript", "fp32"),
    }

    report = kiln.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200, report.text
    report = report.json()
    assert report["status"] == "succeeded"
    selected = next(c for c in job["candidates"] if c["id"] == job["selected_candidate"])
    assert report["selection"]["candidate"] == selected["name"] and selected["passed"]

    # The selected artifact as a zip, loaded by the runtime that serves it, on a real input.
    r = kiln.get(f"/v1/candidates/{selected['id']}/artifact", params={"format": "zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text[:500]
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "artifact")
    from service import runtimes

    image = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    runtime = runtimes.load(tmp_path / "artifact" / selected["name"], threads=1)
    try:
        logits = runtime.run({"image": image})["logits"]
    finally:
        runtime.close()
    assert logits.shape == (2, 10) and np.isfinite(logits).all()

    # The plain ONNX file of the fp32 candidate, run with onnxruntime directly, computes the same.
    fp32 = next(c for c in job["candidates"] if c["name"] == "onnxruntime-fp32")
    r = kiln.get(f"/v1/candidates/{fp32['id']}/artifact")
    assert r.status_code == 200 and r.content, r.text[:500]
    import onnxruntime as ort

    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    reference = session.run(["logits"], {"image": image})[0]
    assert reference.shape == (2, 10)
    cosine = (logits * reference).sum(1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1))
    assert (cosine > 0.99).all(), cosine


# --- 2. a worker killed mid-job -------------------------------------------------------------------------


def test_worker_killed_mid_job_is_taken_over_by_a_new_worker(make_kiln):
    kiln = make_kiln("postgresql")
    first = kiln.workers[0]
    job_id = kiln.create_job(kiln.push_cnn(), **QUICK)["id"]
    running = kiln.wait_sandboxed_step(job_id)
    pool = first.pool_children()
    doomed = [first.pid, *pool, *running["sandboxes"]]
    assert len(doomed) >= 3, "expected the worker, its pool child and the sandbox"
    # The pool process runs the job over PostgreSQL connections of its own: the ones it inherited
    # from the worker's main process (which goes on using them) must stay untouched.
    child = int(running["worker"].rpartition(":")[2])
    assert child in pool
    assert tcp_sockets(child, 5432) - tcp_sockets(first.pid, 5432), "the job ran on inherited connections"

    first.kill()  # SIGKILL to the worker's process group and every descendant (the sandbox too)
    wait_for(lambda: not [p for p in doomed if alive(p)], 10, "the killed processes to be gone")
    # as far as the database knows it is still running, unless the API's requeue loop already
    # noticed the dead worker and put it back (it may, any time from the kill on)
    assert kiln.job(job_id)["status"] in ("running", "queued")

    # The API's requeue loop sees the worker's pid is gone and puts the job back in the queue.
    queued = kiln.wait_job(job_id, lambda j: j["status"] == "queued", "put back in the queue", 30)
    assert queued["attempts"] == 1

    second = kiln.start_worker()
    job = kiln.wait_done(job_id)
    assert_succeeded(job, attempts=2)
    assert job["worker"] != running["worker"]
    # the second worker resumed the interrupted conversion rather than starting over
    log = second.log.read_text()
    assert f"running job {job_id} (attempt 2)" in log
    assert "[load]" not in log and "[benchmark]" in log


def test_kill_9_of_the_worker_alone_leaves_no_sandbox_alive(make_kiln):
    """Only the worker's main process gets SIGKILL (no cleanup runs, nothing signals the group): its
    pool process, and the box running the model's code, are gone within 5 s all the same."""
    kiln = make_kiln("sqlite")
    worker = kiln.workers[0]
    job_id = kiln.create_job(kiln.push_cnn(), **QUICK)["id"]
    kiln.wait_sandboxed_step(job_id)
    doomed = [*worker.pool_children(), *sandboxes(job_id), *processes_matching("bwrap", job_id)]
    assert sandboxes(job_id) and worker.pool_children()
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(
        lambda: not [p for p in doomed if alive(p)] and not sandboxes(job_id),
        5,
        "the pool process and the sandbox to die with the worker",
    )


def test_kill_9_of_kiln_up_leaves_no_sandbox_alive(tmp_path):
    """`kiln up` (API and worker in one command) killed with SIGKILL mid-job: every process it started,
    the box of the running job included, is gone within 5 s."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONUNBUFFERED"] = "1"
    up = Proc(
        "up",
        [
            sys.executable,
            "-m",
            "workers.cli",
            "up",
            "--port",
            str(port),
            "--open",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env,
        tmp_path / "up.log",
    )
    procs = Processes()
    procs.add(up)
    try:
        up.start()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url), 120, "kiln up to answer", diagnose=up.tail)
        r = httpx.post(
            f"{url}/v1/models",
            data={"name": "cnn-small", "entry": "cnn.py:build_small", "signature": json.dumps(CNN_SIGNATURE)},
            files={"file": (CNN.name, CNN.read_bytes())},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        job_id = httpx.post(f"{url}/v1/jobs", json={"model": "cnn-small", **QUICK}, timeout=30).json()["id"]
        wait_for(lambda: sandboxes(job_id), 120, "the job's sandbox", diagnose=up.tail)
        tree = descendants(up.pid)
        assert sandboxes(job_id)[0] in tree
        os.kill(up.pid, signal.SIGKILL)
        wait_for(lambda: not [p for p in tree if alive(p)], 5, "everything kiln up started to die with it")
    finally:
        procs.close()


# --- 3. Redis restarted during a job --------------------------------------------------------------------


def test_redis_restart_during_a_job(make_kiln):
    kiln = make_kiln("postgresql")
    version = kiln.push_cnn()
    job_id = kiln.create_job(version, **QUICK)["id"]
    kiln.wait_sandboxed_step(job_id)

    kiln.redis.kill()
    with pytest.raises(OSError):
        kiln.redis.ping()
    time.sleep(2)
    kiln.redis.start()  # same port, empty: the job's message is gone with the old server

    job = kiln.wait_done(job_id)
    assert_succeeded(job, attempts=1)
    # Both the API and the worker reconnected: a new job goes through the new Redis.
    ready = kiln.get("/readyz")
    assert ready.status_code == 200, ready.text
    again = kiln.create_job(version, **QUICK)["id"]
    kiln.wait_job(again, lambda j: j["status"] == "running", "taken up by the worker", 60)
    assert kiln.post(f"/v1/jobs/{again}/cancel").status_code == 202
    assert kiln.wait_done(again, 30)["status"] == "canceled"


# --- 4. the API restarted during a job ------------------------------------------------------------------


def test_api_restart_during_a_job(make_kiln):
    kiln = make_kiln("postgresql")
    job_id = kiln.create_job(kiln.push_cnn(), **QUICK)["id"]
    kiln.wait_sandboxed_step(job_id)

    kiln.api.kill()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{kiln.url}/healthz", timeout=2)
    time.sleep(1)
    kiln.api.start()

    events = kiln.events(job_id)
    assert events[-1] == ("end", {"status": "succeeded"})
    job = kiln.job(job_id)
    assert_succeeded(job, attempts=1)
    assert kiln.get(f"/v1/jobs/{job_id}/report").json()["status"] == "succeeded"


# --- 5. cancel a running job ----------------------------------------------------------------------------


# A model that takes long to build: its load step is surely still running when the cancel comes.
SLOW_MODEL = (
    "import time\nfrom torch import nn\n\n\ndef build_model():\n    time.sleep(600)\n    return nn.Linear(4, 2)\n"
)
SLOW_SIGNATURE = {"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 4]}}


def test_cancel_running_job_kills_its_sandbox(make_kiln, tmp_path):
    kiln = make_kiln("postgresql")
    slow = tmp_path / "slow.py"
    slow.write_text(SLOW_MODEL)
    version = kiln.push(slow, "slow", "slow.py:build_model", SLOW_SIGNATURE)
    job_id = kiln.create_job(version, **QUICK)["id"]
    boxes = kiln.wait_sandboxed_step(job_id, ("load",))["sandboxes"]
    assert boxes

    t0 = time.monotonic()
    r = kiln.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    job = kiln.wait_job(job_id, lambda j: j["status"] in TERMINAL, "to stop after cancel", 90)
    elapsed = time.monotonic() - t0
    assert job["status"] == "canceled", f"{job['status']}: {job['error']}"
    # far less than the 600 s build: the cancel killed the box; the bound allows a loaded machine
    assert elapsed < 60, f"cancel took {elapsed:.1f}s"
    assert job["error"] == "canceled while running"
    assert not [p for p in boxes if alive(p)] and not sandboxes(job_id)
    assert kiln.workers[0].running()  # the worker itself lives on
    r = kiln.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409, r.text


# --- 6. a job whose worker keeps dying ----------------------------------------------------------------


def test_job_whose_worker_keeps_dying_fails_after_max_attempts(make_kiln):
    """The process running the job is SIGKILLed each time it takes the job up, while model code
    runs (as the out-of-memory killer or a crash in native code would do). Celery's prefork pool
    replaces the process and hands the message back; the API's requeue loop sends the job again,
    until it gives up after MAX_ATTEMPTS.

    The test kills the process itself: model code cannot, since the sandbox runs it in a PID
    namespace of its own, where the worker is not visible (os.getppid() there is the namespace's
    init, not the worker)."""
    from service.jobs import MAX_ATTEMPTS

    kiln = make_kiln("postgresql")
    worker = kiln.workers[0]
    job_id = kiln.create_job(kiln.push_cnn(), **QUICK)["id"]
    victims: list[int] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = kiln.wait_job(
            job_id,
            lambda j, n=attempt: j["status"] == "running" and j["attempts"] == n and bool(sandboxes(job_id)),
            f"attempt {attempt} running model code",
            60,
        )
        pid = int(job["worker"].rpartition(":")[2])
        assert pid in worker.pool_children() and pid not in victims
        os.kill(pid, signal.SIGKILL)
        victims.append(pid)

    job = kiln.wait_done(job_id, 60)
    assert job["status"] == "failed", f"{job['status']}: {job['error']}"
    assert job["attempts"] == MAX_ATTEMPTS
    assert f"died {MAX_ATTEMPTS} times" in job["error"], job["error"]
    # nothing of the job is left running, and the worker carries on with a fresh pool process
    wait_for(lambda: not sandboxes(job_id), 10, "the sandboxes of the killed processes to die")
    assert worker.running() and set(worker.pool_children()).isdisjoint(victims)
    wait_for(
        lambda: worker.log.read_text().count("exited with 'signal 9 (SIGKILL)'") == MAX_ATTEMPTS,
        10,
        "Celery to log each killed pool process",
        diagnose=kiln.diagnose,
    )
    time.sleep(STALE_S / 3 + 1)  # a further pass of the requeue loop leaves the failed job alone
    job = kiln.job(job_id)
    assert (job["status"], job["attempts"]) == ("failed", MAX_ATTEMPTS)


# --- 7. faulty uploads over HTTP ---------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _onnx_reading(location: str) -> bytes:
    """An ONNX model whose weight points at a file of the server's."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    return helper.make_model(graph).SerializeToString()


def test_faulty_uploads_are_400_problems(make_kiln):
    kiln = make_kiln("postgresql", worker=False, redis=False)
    mlp = (ZOO / "mlp.py").read_bytes()
    signature = json.dumps(zoo_signature("mlp"))
    cases = {
        "garbage": ("garbage.bin", b"\x00\x01\x02 not a model" * 100, "not a model bundle"),
        "traversal": ("evil.zip", _zip({"model.py": mlp, "../../evil.py": b"x"}), "outside the bundle directory"),
        "bomb": ("bomb.zip", _zip({"model.py": mlp, "zeros": b"\0" * (64 << 20)}), "archive bomb"),
        "empty": ("empty.py", b"", "empty (0 bytes)"),
        "engine": ("model.plan", b"ftrt" + bytes(64), "TensorRT engines are not accepted"),
        "external-data": ("model.onnx", _onnx_reading("/etc/passwd"), "keeps its data in another file"),
    }
    for label, (filename, content, needle) in cases.items():
        name = f"bad-{label}"
        r = kiln.post("/v1/models", data={"name": name, "signature": signature}, files={"file": (filename, content)})
        assert r.status_code == 400, (label, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), label
        body = r.json()
        assert body["status"] == 400 and body["title"] and needle in body["detail"], (label, body)
        assert kiln.get(f"/v1/models/{name}").status_code == 404, label
    # and one without a token is refused before anything is stored
    r = httpx.post(
        f"{kiln.url}/v1/models",
        data={"name": "anonymous", "signature": signature},
        files={"file": ("mlp.py", mlp)},
        timeout=30,
    )
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert kiln.get("/v1/models/anonymous").status_code == 404
    assert kiln.get("/healthz").status_code == 200


# --- 8. the broker down when a job is created -------------------------------------------------------------


def test_job_created_while_broker_down_is_sent_once_it_is_back(make_kiln):
    kiln = make_kiln("postgresql", job_requeue_after_s=3)
    version = kiln.push_cnn()
    kiln.redis.kill()

    t0 = time.monotonic()
    r = kiln.post("/v1/jobs", json={"model": version["name"], "version": version["version"], **QUICK})
    assert r.status_code == 202, r.text
    assert time.monotonic() - t0 < 10
    job_id = r.json()["id"]
    assert r.json()["status"] == "queued"
    assert kiln.get("/readyz").status_code == 503
    time.sleep(4)  # longer than job_requeue_after_s: the requeue loop tried and failed too
    job = kiln.job(job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)

    kiln.redis.start()
    job = kiln.wait_done(job_id)
    assert_succeeded(job, attempts=1)
    api_log = kiln.api.log.read_text()
    assert f"could not enqueue job {job_id} now" in api_log
