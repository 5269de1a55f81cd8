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
from tests.service.procs import KilnApi, KilnWorker, Processes, free_port, kiln_env, read_response, tmpfs, wait_for
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
            codes = list(
                pool.map(
                    lambda x: httpx.post(f"{srv.url}/v2/models/picky/infer", json=body(x), timeout=60).status_code, xs
                )
            )
        assert codes == [200, 200, 200, 500, 200, 200, 200, 200]
        assert http.post("/v2/models/picky/infer", json=body(np.ones((2, 4), np.float32))).status_code == 200
        metrics = http.get("/metrics").text
        assert 'kiln_inference_failures_total{code="500",model="picky",version="1"} 2.0' in metrics


def test_deployment_changes_under_load_fail_no_request(local):
    """Clients on the default version while versions are deployed, rolled back and unloaded: a
    request routed to a version that is unloaded before it runs goes to the new default instead."""
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        job = convert(http, "mlp", "mlp", targets=["onnxruntime", "torchscript"])
        cands = [c["id"] for c in http.get(f"/v1/jobs/{job}").json()["candidates"] if c["passed"]]
        assert len(cands) == 2
        assert http.post("/v1/deployments", json={"name": "mlp", "candidate": cands[0]}).status_code == 201
        stop = threading.Event()
        codes: dict[str, int] = {}
        x = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.25] * 64}]}

        def client() -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v2/models/mlp/infer", json=x)
                    key = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {r.text[:120]}"
                    codes[key] = codes.get(key, 0) + 1

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            for i in range(12):
                r = http.post(
                    "/v1/deployments",
                    json={"name": "mlp", "candidate": cands[i % 2], "max_queue_delay_ms": [0, 1, 2][i % 3]},
                )
                assert r.status_code == 201, r.text
                if i % 3 == 2:
                    assert http.post("/v1/deployments/mlp/rollback").status_code == 200
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert codes.get("200", 0) > 100 and set(codes) == {"200"}, codes
        versions = http.get("/v1/deployments/mlp").json()["versions"]
        assert len(versions) == 13

        def old_ones_unloaded() -> bool:  # unloading runs in the background, after the deploy answered
            states = [v["state"] for v in http.get("/v1/deployments/mlp").json()["versions"]]
            return sum(s == "ready" for s in states) <= 3

        wait_for(old_ones_unloaded, 60, "all but at most 3 versions to be unloaded")


@pytest.mark.parametrize("warm", [True, False], ids=["version-had-requests", "version-never-ran"])
def test_a_request_whose_version_is_unloaded_before_it_runs_goes_to_the_new_default(local, warm):
    """Routed to v1, its body still arriving, while v2..v4 are deployed and v1 unloaded: the request
    runs on v4. (It once waited forever when v1 had run before, and was a 500 "cannot schedule new
    futures after shutdown" when it had not.)"""
    import socket

    with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        job = convert(http, "mlp", "mlp")
        deploy = {"name": "mlp", "job": job}
        assert http.post("/v1/deployments", json=deploy).json()["default_version"] == 1
        body = json.dumps(
            body_of := {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.25] * 64}]}
        ).encode()
        if warm:
            assert http.post("/v2/models/mlp/infer", json=body_of).status_code == 200
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            time.sleep(0.5)  # routed to v1 (the default), now waiting for the rest of its body
            for version in (2, 3, 4):
                assert http.post("/v1/deployments", json=deploy).json()["default_version"] == version

            def v1_unloaded() -> bool:
                states = {v["version"]: v["state"] for v in http.get("/v1/deployments/mlp").json()["versions"]}
                return states[4] == "ready" and states[1] != "ready"

            wait_for(v1_unloaded, 30, "v1 to be unloaded (only the default, the one before and the newest stay)")
            sock.sendall(body[10:])
            status, payload = read_response(sock)
        assert status == 200, payload
        assert json.loads(payload)["model_version"] == "4"


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
    with tmpfs(tmp_path / "store", "8m") as store:
        monkeypatch.setenv("KILN_ARTIFACT_DIR", str(store))
        clear_caches()
        with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            r = http.post(
                "/v1/models",
                data={"name": "mlp", "signature": json.dumps(zoo_signature("mlp"))},
                files={"file": ("mlp.py", (ZOO / "mlp.py").read_bytes())},
            )
            assert r.status_code == 201, r.text
            job = http.post(
                "/v1/jobs",
                json={
                    "model": "mlp",
                    "targets": ["onnxruntime"],
                    "precisions": ["fp32"],
                    "bench_seconds": 0.05,
                    "threads": 1,
                },
            ).json()
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
    clear_caches()


@pytest.mark.slow
def test_shutdown_drains_requests_in_flight(local, tmp_path):
    with Server() as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        job = convert(http, "mlp", "mlp")
        assert http.post("/v1/deployments", json={"name": "mlp", "job": job}).status_code == 201
    procs = Processes()
    try:
        api = procs.add(
            KilnApi(free_port(), kiln_env(local, None, "filesystem://", auth="false"), tmp_path / "api.log")
        ).start()
        wait_for(
            lambda: httpx.get(f"{api.url}/v2/health/ready").status_code == 200,
            60,
            "deployments loaded",
            diagnose=procs.logs,
        )
        answer = {}
        first_half_sent = threading.Event()

        def call() -> None:
            # the body comes in two halves 3 s apart, so the request is in flight when the server
            # is told to stop (batching no longer holds a lone request back)
            raw = json.dumps(body(np.ones((1, 64), np.float32))).encode()

            def halves():
                yield raw[: len(raw) // 2]
                first_half_sent.set()  # asked for the next chunk: the first has been written
                time.sleep(3.0)
                yield raw[len(raw) // 2 :]

            t0 = time.perf_counter()
            r = httpx.post(
                f"{api.url}/v2/models/mlp/infer",
                content=halves(),
                headers={"content-type": "application/json", "content-length": str(len(raw))},
                timeout=30,
            )
            answer.update(status=r.status_code, seconds=time.perf_counter() - t0)

        t = threading.Thread(target=call)
        t.start()
        assert first_half_sent.wait(30), "the request's first half was never sent"
        time.sleep(0.3)  # for the server to read the head it was sent, well within the 3 s gap
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
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=60,
        )

    def start(self) -> Postgres:
        self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self._ctl("start")
        return self

    def _ctl(self, action: str) -> None:
        self._as_postgres(
            str(self.BIN / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-w",
            "-m",
            "fast",
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            action,
        )

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
        r = http.post(
            "/v1/models",
            data={
                "name": "cnn",
                "entry": "cnn.py:build_small",
                "signature": json.dumps(zoo_signature("cnn", "SMALL_SIGNATURE")),
            },
            files={"file": ("cnn.py", (ZOO / "cnn.py").read_bytes())},
        )
        assert r.status_code == 201, r.text
        job = http.post(
            "/v1/jobs", json={"model": "cnn", "targets": ["onnxruntime", "torchscript"], "bench_seconds": 0.3}
        ).json()
        wait_for(
            lambda: http.get(f"/v1/jobs/{job['id']}").json()["current_step"] in ("capture", "export"),
            120,
            "the job to be under way",
            diagnose=procs.logs,
        )
        pg.restart()
        # while it was down the API said so plainly, and now it answers again
        done = wait_for(
            lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and j,
            240,
            "the job to finish",
            diagnose=procs.logs,
        )
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1  # rode it out; not restarted
    finally:
        procs.close(extra_needles=(str(tmp_path),))
        pg.stop()
