"""Faults the service must ride out: a runtime that raises, a shutdown with requests in flight,
the artifact store's disk full during a job, and the database restarting in the middle of a job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ZOO, zoo_signature
from tests.service.procs import KilnApi, KilnWorker, Processes, free_port, kiln_env, wait_for
from tests.service.test_serving import Server, convert


@pytest.fixture
def local(tmp_path, monkeypatch):
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KILN_AUTH", "off")
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_BROKER_URL", raising=False)
    clear_caches()
    yield tmp_path / "data"
    clear_caches()


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_a_runtime_that_raises_fails_that_request_and_serves_the_next(local):
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        job = convert(http, "picky", "picky", targets=["torchscript"])
        r = http.post("/v1/deployments", json={"name": "picky", "job": job, "max_queue_delay_ms": 50})
        assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        bad = http.post("/v2/models/picky/infer", json=body(np.full((1, 4), 5000, np.float32)))
        assert bad.status_code == 500 and "over 1000 are refused" in bad.json()["error"]
        # the bad request batched with good ones fails alone
        xs = [np.full((1, 4), 5000 if i == 3 else i, np.float32) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda x: httpx.post(f"{srv.url}/v2/models/picky/infer", json=body(x),
                                                       timeout=60).status_code, xs))
        assert codes == [200, 200, 200, 500, 200, 200, 200, 200]
        assert http.post("/v2/models/picky/infer", json=body(np.ones((2, 4), np.float32))).status_code == 200
        metrics = http.get("/metrics").text
        assert 'kiln_inference_failures_total{code="500",model="picky",version="1"} 2.0' in metrics


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem has no space left; returns it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (4 << 10))
        except OSError:
            pass
    return filler


def test_a_full_artifact_store_fails_the_job_with_that_reason_and_serves_nothing(local, tmp_path, monkeypatch):
    from tests.service.conftest import clear_caches
    from workers.jobrunner import run_job

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(store)], check=True)
    try:
        monkeypatch.setenv("KILN_ARTIFACT_DIR", str(store))
        clear_caches()
        with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            r = http.post("/v1/models", data={"name": "mlp", "signature": json.dumps(zoo_signature("mlp"))},
                          files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())})
            assert r.status_code == 201, r.text
            job = http.post("/v1/jobs", json={"model": "mlp", "targets": ["onnxruntime"], "precisions": ["fp32"],
                                              "bench_seconds": 0.05, "threads": 1}).json()
            filler = _fill(store)  # the bundle is stored; the built artifacts will not fit

            assert run_job(job["id"]) == "failed"
            failed = http.get(f"/v1/jobs/{job['id']}").json()
            assert failed["status"] == "failed"
            assert "artifact store could not write" in failed["error"] and "No space left" in failed["error"], failed
            for c in failed["candidates"]:  # nothing half-written is offered for download or serving
                assert http.get(f"/v1/candidates/{c['id']}/artifact").status_code == 404
                d = http.post("/v1/deployments", json={"name": "mlp", "candidate": c["id"], "force": True})
                assert d.status_code == 409 and "no artifact" in d.json()["detail"], d.text
            assert list((store / "tmp").iterdir()) == []  # no partial files left behind

            filler.unlink()  # space again: a retry builds, stores and serves
            retry = http.post(f"/v1/jobs/{job['id']}/retry").json()
            assert run_job(retry["id"]) == "succeeded", http.get(f"/v1/jobs/{retry['id']}").json()
            d = http.post("/v1/deployments", json={"name": "mlp", "job": retry["id"]})
            assert d.status_code == 201 and d.json()["state"] == "ready", d.text
            x = np.ones((1, 64), np.float32)
            assert http.post("/v2/models/mlp/infer", json=body(x)).status_code == 200
    finally:
        clear_caches()
        subprocess.run(["umount", "-l", str(store)], check=False)


@pytest.mark.slow
def test_shutdown_drains_requests_in_flight(local, tmp_path):
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        job = convert(http, "mlp", "mlp")
        # a long queue delay keeps the request in flight while the server is told to stop
        assert http.post("/v1/deployments", json={"name": "mlp", "job": job,
                                                  "max_queue_delay_ms": 3000}).status_code == 201
    procs = Processes()
    try:
        api = procs.add(KilnApi(free_port(), kiln_env(local, None, "filesystem://", auth="false"),
                                tmp_path / "api.log")).start()
        wait_for(lambda: httpx.get(f"{api.url}/v2/health/ready").status_code == 200, 60, "deployments loaded",
                 diagnose=procs.logs)
        answer = {}

        def call() -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{api.url}/v2/models/mlp/infer", json=body(np.ones((1, 64), np.float32)), timeout=30)
            answer.update(status=r.status_code, seconds=time.perf_counter() - t0)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.8)
        api.popen.send_signal(signal.SIGTERM)
        t.join(30)
        assert answer.get("status") == 200 and answer["seconds"] > 2.5, answer
        # uvicorn re-raises the signal once it has drained, so ending by SIGTERM is the clean exit
        assert api.popen.wait(20) in (0, -signal.SIGTERM)
        assert "Waiting for background tasks" in api.log.read_text() or "Shutting down" in api.log.read_text()
    finally:
        procs.close()


class Postgres:
    """A PostgreSQL server of the test's own, on a free port, that can be restarted."""

    BIN = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=60)

    def start(self) -> "Postgres":
        self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self._ctl("start")
        return self

    def _ctl(self, action: str) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "-l",
                          str(self.dir / "log"), "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                          action)

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        try:
            self._ctl("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="starting a PostgreSQL server of its own needs root (runuser)")
def test_postgres_restarted_during_a_job(tmp_path):
    pg = Postgres().start()
    procs = Processes()
    try:
        env = kiln_env(tmp_path / "data", pg.url, "filesystem://", auth="false")
        api = procs.add(KilnApi(free_port(), env, tmp_path / "api.log")).start()
        procs.add(KilnWorker(env, tmp_path / "worker.log")).start()
        http = httpx.Client(base_url=api.url, timeout=60)
        r = http.post("/v1/models", data={"name": "cnn", "entry": "cnn.py:build_small",
                                          "signature": json.dumps(zoo_signature("cnn", "SMALL_SIGNATURE"))},
                      files={"file": ("cnn.py", (ZOO / "cnn.py").read_bytes())})
        assert r.status_code == 201, r.text
        job = http.post("/v1/jobs", json={"model": "cnn", "targets": ["onnxruntime", "torchscript"],
                                          "bench_seconds": 0.3}).json()
        wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["current_step"] in ("capture", "export"), 120,
                 "the job to be under way", diagnose=procs.logs)
        pg.restart()
        # while it was down the API said so plainly, and now it answers again
        done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] in
                        ("succeeded", "failed") and j, 240, "the job to finish", diagnose=procs.logs)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1  # rode it out; not restarted
    finally:
        procs.close(extra_needles=(str(tmp_path),))
        pg.stop()
