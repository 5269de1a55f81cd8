"""A bounded load test on loopback: many clients on /v2 while conversion jobs run and deployments
change, against `kiln api` + `kiln worker` processes on a fresh data directory.

    .venv/bin/python bench/loadtest.py [--minutes 10] [--clients 16]

Prints requests served, errors (by kind: provoked ones are bad requests sent on purpose), latency
p50/p99, and the API process's resident memory after warm-up and at the end. Every loop is bounded
in time; everything stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from tests.conftest import ZOO, zoo_signature  # noqa: E402
from tests.service.procs import KilnApi, KilnWorker, Processes, free_port, kiln_env, wait_for  # noqa: E402


GROWTH_MB = 50


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    def __init__(self, host: str, clients: int) -> None:
        self.host, self.clients = host, clients
        self.lat: list[float] = []
        self.ok = 0
        self.provoked = 0
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_at = 0.0

    def run(self, seconds: float) -> None:
        self.stop_at = time.perf_counter() + seconds
        threads = [threading.Thread(target=self._client, args=(i,)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        conn = http.client.HTTPConnection(self.host, timeout=30)
        good = json.dumps({"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 128}]})
        bad = json.dumps({"inputs": [{"name": "x", "shape": [2, 63], "datatype": "FP32", "data": [0.5] * 126}]})
        while time.perf_counter() < self.stop_at:
            provoke = rng.random() < 0.02
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v2/models/mlp/infer", body=bad if provoke else good,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except Exception as exc:  # noqa: BLE001 - counted
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(self.host, timeout=30)
            dt = time.perf_counter() - t0
            with self.lock:
                if status == 200 and not provoke:
                    self.ok += 1
                    self.lat.append(dt)
                elif status == 400 and provoke:
                    self.provoked += 1
                else:
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--no-churn", action="store_true", help="only the inference load: no jobs, no deployment changes")
    ap.add_argument("--api-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the API process (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--sample", type=float, default=60.0, help="print the API's resident memory every this many s")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-load-"))
    procs = Processes()
    try:
        env = kiln_env(tmp / "data", None, "filesystem://", auth="false", job_requeue_after_s=30)
        api_env = dict(env, **dict(kv.split("=", 1) for kv in args.api_env))
        api = procs.add(KilnApi(free_port(), api_env, tmp / "api.log")).start()
        procs.add(KilnWorker(env, tmp / "worker.log")).start()
        h = httpx.Client(base_url=api.url, timeout=120)
        for name, zoo in (("mlp", "mlp"), ("mlp2", "mlp")):
            h.post("/v1/models", data={"name": name, "signature": json.dumps(zoo_signature(zoo))},
                   files={"file": (f"{zoo}.py", (ZOO / f"{zoo}.py").read_bytes() + f"\n# {name}\n".encode())})
        job = h.post("/v1/jobs", json={"model": "mlp", "targets": ["onnxruntime", "torchscript"],
                                       "bench_seconds": 0.1}).json()
        wait_for(lambda: h.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 600, "the first job")
        cands = [c["id"] for c in h.get(f"/v1/jobs/{job['id']}").json()["candidates"] if c["passed"]]
        h.post("/v1/deployments", json={"name": "mlp", "candidate": cands[0], "max_queue_delay_ms": 1}).raise_for_status()
        load = Load(api.url.removeprefix("http://"), args.clients)
        changes = {"jobs": 0, "deploys": 0}

        def churn(until: float, rounds: int | None = None) -> None:
            """Jobs run and deployments change while the load goes on."""
            i = 0
            while time.monotonic() < until and (rounds is None or i < rounds):
                j = h.post("/v1/jobs", json={"model": "mlp2", "targets": ["onnxruntime"], "bench_seconds": 0.1,
                                             "threads": 1}).json()
                changes["jobs"] += 1
                cand = cands[i % len(cands)]
                h.post("/v1/deployments", json={"name": "mlp", "candidate": cand,
                                                "max_queue_delay_ms": random.choice([0, 1, 2])}).raise_for_status()
                changes["deploys"] += 1
                if i % 3 == 2:
                    h.post("/v1/deployments/mlp/rollback")
                i += 1
                wait_for(lambda: h.get(f"/v1/jobs/{j['id']}").json()["status"] in ("succeeded", "failed"), 600,
                         "a churn job")

        # Warm-up: the load, plus (unless --no-churn) one round of the churn that serves every candidate
        # once, so that each runtime the run will use has been loaded (TorchScript brings torch into the
        # API process: a one-time cost of ~250 MB that is not growth); then 20 s of load alone.
        if not args.no_churn:
            warming = threading.Thread(target=churn, args=(time.monotonic() + 600, len(cands)))
            warming.start()
            while warming.is_alive():
                load.run(5)
            warming.join()
        load.run(20)
        warm = rss_mb(api.pid)
        warm_served, warm_changes = load.ok, dict(changes)
        print(f"warm-up done: {warm_served} requests, {changes['deploys']} deployment changes; API {warm:.1f} MB",
              flush=True)
        total = args.minutes * 60
        stop = time.monotonic() + total

        def sample() -> None:
            t0 = time.monotonic()
            while time.monotonic() < stop - args.sample / 2:
                time.sleep(min(args.sample, max(0.0, stop - time.monotonic())))
                print(f"  {time.monotonic() - t0:5.0f} s: API {rss_mb(api.pid):.1f} MB, {load.ok} served", flush=True)

        side = [threading.Thread(target=sample, daemon=True)]
        if not args.no_churn:
            side.append(threading.Thread(target=churn, args=(stop - 30,)))
        for t in side:
            t.start()
        load.run(total)
        for t in side[1:]:
            t.join()
        end = rss_mb(api.pid)
        lat = np.array(load.lat) * 1e3
        served = load.ok - warm_served
        print(f"after warm-up: {args.minutes:g} min, {args.clients} clients, "
              f"{changes['jobs'] - warm_changes['jobs']} jobs and "
              f"{changes['deploys'] - warm_changes['deploys']} deployment changes meanwhile")
        print(f"requests served: {served} ({served / total:.0f}/s), provoked 400s: {load.provoked}, "
              f"other errors: {sum(load.errors.values())} {load.errors or ''}")
        print(f"latency p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")
        print(f"API resident memory: {warm:.1f} MB after warm-up, {end:.1f} MB at the end ({end - warm:+.1f} MB)")
        errors = sum(load.errors.values())
        ok = errors == 0 and end - warm <= GROWTH_MB
        print(f"goals (no unprovoked errors, memory within {GROWTH_MB} MB of warm-up): {'met' if ok else 'MISSED'}")
        if not ok:
            sys.exit(1)
    finally:
        procs.close(extra_needles=(str(tmp),))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
