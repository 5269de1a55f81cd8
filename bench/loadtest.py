"""A bounded load test on loopback: many clients on /v2 while conversion jobs run and deployments
change, against `kiln api` + `kiln worker` processes on a fresh data directory.

    .venv/bin/python bench/loadtest.py [--minutes 10] [--clients 16]

Prints requests served, errors (by kind: provoked ones are bad requests sent on purpose), latency
p50/p99, and the API process's resident memory after warm-up and at the end. Every loop is bounded
in time; everything stops by itself.

Authentication is on, as installed. Unless --no-abuse, an abuser runs beside the clients all along:
64 MiB bodies without a token and with one, an unknown token, offsets past 2**63, non-ASCII bytes in
the binary-extension header, /metrics with a team's token, and slow clients trickling their headers
a byte at a time. Each must get its expected 4xx (counted apart) and cost no memory.
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

import httpx  # noqa: E402 - after the sys.path set-up above
import numpy as np  # noqa: E402 - after the sys.path set-up above

from tests.conftest import ZOO, zoo_signature  # noqa: E402 - after the sys.path set-up above
from tests.service.procs import KilnApi, KilnWorker, Processes, free_port, kiln_env, wait_for  # noqa: E402 - after the sys.path set-up above

GROWTH_MB = 50


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    def __init__(self, host: str, clients: int, auth: dict[str, str]) -> None:
        self.host, self.clients, self.auth = host, clients, auth
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
                conn.request(
                    "POST",
                    "/v2/models/mlp/infer",
                    body=bad if provoke else good,
                    headers={"Content-Type": "application/json", **self.auth},
                )
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


class Abuser:
    """Abusive requests, one after another until `stop_at`, each expecting its 4xx."""

    BIG = 64 << 20

    def __init__(self, port: int, admin: dict[str, str], team_infer: dict[str, str]) -> None:
        self.port, self.admin, self.team_infer = port, admin, team_infer
        self.expected = 0
        self.unexpected: dict[str, int] = {}

    def _raw(self, head: bytes, body: bytes = b"") -> int:
        import socket

        from tests.service.procs import read_response

        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head + body)
            return read_response(sock)[0]

    def _check(self, what: str, got: int, want: int) -> None:
        if got == want:
            self.expected += 1
        else:
            key = f"{what}: {got}"
            self.unexpected[key] = self.unexpected.get(key, 0) + 1

    def _slow(self, n: int) -> None:
        """n connections that trickle their headers; the server must close each."""
        import socket

        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=1) for _ in range(n)]
        closed, deadline = 0, time.monotonic() + 30
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while socks and time.monotonic() < deadline:
            for sock in list(socks):
                try:
                    sock.sendall(b"X")
                    sock.settimeout(0.05)
                    if sock.recv(1) == b"":
                        raise ConnectionResetError
                except TimeoutError:
                    continue
                except OSError:
                    socks.remove(sock)
                    sock.close()
                    closed += 1
            time.sleep(1)
        for sock in socks:
            sock.close()
        self._check("slow client closed", closed, n)

    def run(self, stop_at: float) -> None:
        big = b'{"model": "' + b"x" * self.BIG + b'"}'
        json_head = (
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n{extra}\r\n"
        )
        i = 0
        while time.monotonic() < stop_at:
            kind = i % 7
            if kind == 0:
                self._check(
                    "big body, no token",
                    self._raw(json_head.format(path="/v1/jobs", n=len(big), extra="").encode(), big[: 1 << 16]),
                    401,
                )
            elif kind == 1:
                auth = f"Authorization: {self.admin['Authorization']}\r\n"
                self._check(
                    "big body, token",
                    self._raw(json_head.format(path="/v1/deployments", n=len(big), extra=auth).encode()),
                    413,
                )
            elif kind == 2:
                self._check(
                    "unknown token",
                    self._raw(
                        json_head.format(path="/v1/jobs", n=2, extra="Authorization: Bearer kiln_x\r\n").encode(), b"{}"
                    ),
                    401,
                )
            elif kind == 3:
                r = httpx.get(
                    f"http://127.0.0.1:{self.port}/v1/jobs", params={"offset": str(2**63)}, headers=self.admin
                )
                self._check("offset 2**63", r.status_code, 422)
            elif kind == 4:
                head = (
                    f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {self.admin['Authorization']}"
                    "\r\nContent-Length: 2\r\nInference-Header-Content-Length: "
                ).encode() + b"\xb2\r\n\r\n"
                self._check("header bytes", self._raw(head, b"{}"), 400)
            elif kind == 5:
                r = httpx.get(f"http://127.0.0.1:{self.port}/metrics", headers=self.team_infer)
                self._check("metrics, team token", r.status_code, 403)
            else:
                self._slow(20)
            i += 1
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--no-churn", action="store_true", help="only the inference load: no jobs, no deployment changes")
    ap.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the API process (e.g. MALLOC_ARENA_MAX=2)",
    )
    ap.add_argument("--sample", type=float, default=60.0, help="print the API's resident memory every this many s")
    ap.add_argument("--no-abuse", action="store_true", help="no abusive requests beside the load")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-load-"))
    procs = Processes()
    try:
        env = kiln_env(tmp / "data", None, "filesystem://", job_requeue_after_s=30, header_timeout_s=5)
        api_env = dict(env, **dict(kv.split("=", 1) for kv in args.api_env))
        api = procs.add(KilnApi(free_port(), api_env, tmp / "api.log")).start()
        procs.add(KilnWorker(env, tmp / "worker.log")).start()
        admin = {"Authorization": f"Bearer {(tmp / 'data' / 'admin-token').read_text().strip()}"}
        h = httpx.Client(base_url=api.url, timeout=120, headers=admin)
        team = h.post("/v1/tokens", json={"name": "team-app", "owner": "team-b", "scopes": ["infer"]}).json()
        abuser = Abuser(api.port, admin, {"Authorization": f"Bearer {team['token']}"})
        for name, zoo in (("mlp", "mlp"), ("mlp2", "mlp")):
            h.post(
                "/v1/models",
                data={"name": name, "signature": json.dumps(zoo_signature(zoo))},
                files={"file": (f"{zoo}.py", (ZOO / f"{zoo}.py").read_bytes() + f"\n# {name}\n".encode())},
            )
        job = h.post(
            "/v1/jobs", json={"model": "mlp", "targets": ["onnxruntime", "torchscript"], "bench_seconds": 0.1}
        ).json()
        wait_for(lambda: h.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 600, "the first job")
        cands = [c["id"] for c in h.get(f"/v1/jobs/{job['id']}").json()["candidates"] if c["passed"]]
        h.post(
            "/v1/deployments", json={"name": "mlp", "candidate": cands[0], "max_queue_delay_ms": 1}
        ).raise_for_status()
        load = Load(api.url.removeprefix("http://"), args.clients, admin)
        changes = {"jobs": 0, "deploys": 0}

        def churn(until: float, rounds: int | None = None) -> None:
            """Jobs run and deployments change while the load goes on."""
            i = 0
            while time.monotonic() < until and (rounds is None or i < rounds):
                j = h.post(
                    "/v1/jobs", json={"model": "mlp2", "targets": ["onnxruntime"], "bench_seconds": 0.1, "threads": 1}
                ).json()
                changes["jobs"] += 1
                cand = cands[i % len(cands)]
                h.post(
                    "/v1/deployments",
                    json={"name": "mlp", "candidate": cand, "max_queue_delay_ms": random.choice([0, 1, 2])},
                ).raise_for_status()
                changes["deploys"] += 1
                if i % 3 == 2:
                    h.post("/v1/deployments/mlp/rollback")
                i += 1
                wait_for(
                    lambda: h.get(f"/v1/jobs/{j['id']}").json()["status"] in ("succeeded", "failed"),  # noqa: B023 - called in this iteration
                    600,
                    "a churn job",
                )

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
        print(
            f"warm-up done: {warm_served} requests, {changes['deploys']} deployment changes; API {warm:.1f} MB",
            flush=True,
        )
        total = args.minutes * 60
        stop = time.monotonic() + total

        def sample() -> None:
            t0 = time.monotonic()
            while time.monotonic() < stop - args.sample / 2:
                time.sleep(min(args.sample, max(0.0, stop - time.monotonic())))
                print(f"  {time.monotonic() - t0:5.0f} s: API {rss_mb(api.pid):.1f} MB, {load.ok} served", flush=True)

        side = [threading.Thread(target=sample, daemon=True)]
        if not args.no_abuse:
            side.append(threading.Thread(target=abuser.run, args=(stop - 10,)))
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
        print(
            f"after warm-up: {args.minutes:g} min, {args.clients} clients, "
            f"{changes['jobs'] - warm_changes['jobs']} jobs and "
            f"{changes['deploys'] - warm_changes['deploys']} deployment changes meanwhile"
        )
        print(
            f"requests served: {served} ({served / total:.0f}/s), provoked 400s: {load.provoked}, "
            f"other errors: {sum(load.errors.values())} {load.errors or ''}"
        )
        print(f"latency p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")
        print(f"API resident memory: {warm:.1f} MB after warm-up, {end:.1f} MB at the end ({end - warm:+.1f} MB)")
        if not args.no_abuse:
            print(
                f"abusive requests answered as expected: {abuser.expected}, "
                f"otherwise: {sum(abuser.unexpected.values())} {abuser.unexpected or ''}"
            )
        errors = sum(load.errors.values()) + sum(abuser.unexpected.values())
        ok = errors == 0 and end - warm <= GROWTH_MB
        print(
            f"goals (no unprovoked errors, abuse answered as expected, memory within {GROWTH_MB} MB of warm-up): "
            f"{'met' if ok else 'MISSED'}"
        )
        if not ok:
            sys.exit(1)
    finally:
        procs.close(extra_needles=(str(tmp),))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
