"""Serving overhead and throughput of Kiln's /v2 endpoint against the raw runtime and against a
hand-written FastAPI + eager PyTorch server, measured in one run, for the zoo's MLP and CNN.

    .venv/bin/python bench/serving.py [--models mlp,cnn] [--seconds 5] [--clients 32] [--delays 0,1,2]

What it does, in order:

1. Converts each model in this process (upload + `run_job`, as the API and a worker would), with
   the `onnxruntime` target at fp32 only and a tiny conversion benchmark, into a temporary
   KILN_DATA_DIR. The selected candidate is the artifact served below.
2. Starts `kiln api` (uvicorn, one process) on a free loopback port over that data dir and deploys
   each model several times through POST /v1/deployments: batching on (max_batch_size = 32, or
   the batch dimension's validated max when smaller, and max_queue_delay_ms in --delays) and
   batching off (max_batch_size 1). Every deployment's answer is checked against the raw runtime.
   Kiln runs as installed, with authentication on: every request carries the admin token that
   its first start wrote (the same header goes to the hand-written server, which ignores it);
   --open serves Kiln with authentication off instead.
3. Per model, times the served artifact in this process while the Kiln server idles:
   `service.runtimes.load(dir).run(...)` at batch 1, with the intra-op thread count Kiln's server
   gives a deployment of one instance (os.cpu_count() // instances); and eager PyTorch at batch 1
   with as many torch threads, so that the hand-written server's compute is known.
4. Starts bench/eager_server.py under uvicorn in its own process (one process, like `kiln api`;
   torch intra-op threads = the Kiln runtime's threads; the endpoint is a plain `def`, so it runs
   in FastAPI's default thread pool, as a user would write it).
5. Loads each server from the client below, one configuration at a time: 1 s of warm-up, then
   --seconds measured, each followed by waiting until the server is idle again (wrk leaves
   requests in flight when it stops and neither server drops work for a client that went away).
   One sequential client with JSON and with the binary tensor extension
   (Inference-Header-Content-Length + binary_data_size + binary_data_output), and --clients
   concurrent clients at batch 1. The hand-written server speaks v2 JSON only, so every Kiln row
   is compared with the hand-written JSON row at the same concurrency.

The client: `wrk` (C, event-driven, one thread, keep-alive connections; a Lua script posts a body
read from a file and prints wrk's own latency percentiles, which it records per request from
sending to the full response). Without wrk on PATH it falls back to http.client keep-alive
connections (in this process for one client; in 4 processes of threads for concurrency), which
costs more client CPU and is labelled in the output.

What limits the figures: client and server share the machine's cores (2 on the reference VM),
loopback only. With one sequential client the server and client mostly take turns, so the
figures are close to true per-request latency. With 32 clients wrk's thread takes CPU the server
would otherwise use, so throughput rows are a floor for a server on its own cores; the raw
runtime and eager rows were measured with the servers idle. p99 over a few seconds of a 20-50 ms
CNN is close to the maximum of 100-250 samples. Both the ORT runtime and torch keep their
intra-op worker threads spinning between calls, which shows as ~2 cores of "server" CPU even for
one sequential client. Each row also says how many cores the server, the
client and everything else on the machine used while it ran (from /proc): on a shared machine
"other" shows when another tenant disturbed a row. From a --noise-budget of seconds, the script
waits before each measured run for other processes to go quiet, and measures a disturbed row
again, keeping the least disturbed run. Targets are printed beside the
figures; nothing fails on a miss.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
ZOO = {"mlp": ("mlp.py", "build_model"), "cnn": ("cnn.py", "build_model")}
KILN_MAX_BATCH = 32
AUTH: dict[str, str] = {}  # the Authorization header for Kiln when its authentication is on


# --- small helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120.0
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**AUTH, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if request(port, "GET", path, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not answering {path} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def pct(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


CLK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, stolen seconds) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / CLK, steal / CLK


def process_cpu(pid: int | None) -> float:
    """CPU seconds of a process (all its threads, and its reaped children)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK  # utime stime cutime cstime


def own_cpu() -> tuple[float, float]:
    """(this process, its reaped children): CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@dataclass
class Cpu:
    """Cores used while something ran: by the server, by the client (wrk, or this process), by
    everything else on the machine (other tenants of a shared machine), and stolen by the host."""

    server: float = 0.0
    client: float = 0.0
    other: float = 0.0
    steal: float = 0.0


class CpuWatch:
    def __init__(self, server_pid: int | None = None) -> None:
        self.pid = server_pid
        self.t = time.perf_counter()
        self.busy, self.steal = machine_cpu()
        self.srv = process_cpu(server_pid)
        self.me, self.kids = own_cpu()

    def stop(self) -> Cpu:
        wall = max(1e-9, time.perf_counter() - self.t)
        busy, steal = machine_cpu()
        srv = process_cpu(self.pid) - self.srv
        me, kids = own_cpu()
        client = (me - self.me) + (kids - self.kids)
        other = max(0.0, (busy - self.busy) - srv - client)
        return Cpu(server=srv / wall, client=client / wall, other=other / wall, steal=(steal - self.steal) / wall)


class Quiet:
    """For a shared machine, from one time budget for the whole script: before a measured run, waits
    until other processes use less than `cores` for half a second; after one that other processes
    disturbed (more than `disturbed` cores on average), allows measuring it again."""

    def __init__(self, budget_s: float, cores: float = 0.25, disturbed: float = 0.3) -> None:
        self.left, self.cores, self.disturbed = budget_s, cores, disturbed
        self.waited = self.repeated = 0.0

    def wait(self, server_pid: int | None, most_s: float = 10.0) -> None:
        end = time.monotonic() + most_s  # a row waits at most this long; the rest is for measuring again
        while self.left > 0 and time.monotonic() < end:
            watch = CpuWatch(server_pid)
            time.sleep(0.5)
            if watch.stop().other < self.cores:
                return
            self.left -= 0.5
            self.waited += 0.5

    def again(self, cpu: Cpu, cost_s: float) -> bool:
        """Whether to measure a disturbed run again (spending its cost from the budget)."""
        if cpu.other <= self.disturbed or self.left < cost_s:
            return False
        self.left -= cost_s
        self.repeated += cost_s
        return True


QUIET = Quiet(0)


def drain(pid: int, limit_s: float = 60.0) -> float:
    """Waits until the server is idle: wrk stops with requests in flight, and neither server notices
    that their clients went away, so each finishes them (a CNN's 32 abandoned requests are seconds
    of work that would otherwise land in the next row). Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = process_cpu(pid)
        time.sleep(0.3)
        if process_cpu(pid) - before <= 2.0 / CLK:
            break
    return time.monotonic() - start


class Servers:
    """Subprocesses this script started; each in its own session, stopped by its own pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)  # its own process group (start_new_session)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


# --- step 1: conversion, in this process -------------------------------------------------------------


def admin_auth() -> dict[str, str]:
    """With authentication on (Kiln's default), the admin token the first start wrote to the data dir."""
    from service.config import get_settings

    settings = get_settings()
    if not getattr(settings, "auth", False):
        return {}
    token = (settings.data_dir / "admin-token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def convert(models: list[str]) -> dict[str, dict]:
    """Upload and convert each model; returns {model: {"job": id, "files": {...}, "candidate": name,
    "signature": {...}}}."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.db import session_scope
    from service.tables import CandidateRow, Job
    from tests.conftest import zoo_signature
    from workers.jobrunner import run_job

    out: dict[str, dict] = {}
    with TestClient(create_app()) as api:
        AUTH.update(admin_auth())
        api.headers.update(AUTH)
        for name in models:
            filename, entry = ZOO[name]
            started = time.perf_counter()
            sig = zoo_signature(name)
            r = api.post(
                "/v1/models",
                data={"name": name, "signature": json.dumps(sig), "entry": f"{filename}:{entry}"},
                files={"file": (filename, (ROOT / "tests" / "zoo" / filename).read_bytes())},
            )
            if r.status_code != 201:
                raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text[:300]}")
            r = api.post(
                "/v1/jobs",
                json={
                    "model": name,
                    "targets": ["onnxruntime"],
                    "precisions": ["fp32"],
                    "bench_seconds": 0.05,
                    "batch_sizes": [1],
                },
            )
            if r.status_code not in (200, 201, 202):
                raise RuntimeError(f"job for {name} refused: {r.status_code} {r.text[:300]}")
            job_id = r.json()["id"]
            how = run_job(job_id)
            if how != "succeeded":
                raise RuntimeError(f"conversion of {name} {how}: {api.get(f'/v1/jobs/{job_id}').text[:1000]}")
            with session_scope() as s:
                job = s.get(Job, job_id)
                cand = s.get(CandidateRow, job.selected_candidate_id)
                signature = (job.report or {}).get("signature") or sig
                out[name] = {"job": job_id, "files": dict(cand.files), "candidate": cand.name, "signature": signature}
            print(f"converted {name}: {out[name]['candidate']} in {time.perf_counter() - started:.1f}s", flush=True)
    logging.disable(logging.NOTSET)
    return out


# --- step 2: the raw runtime and eager PyTorch, in this process --------------------------------------


def time_loop(fn, seconds: float, warmup: int = 5) -> tuple[list[float], Cpu]:
    """Calls fn back to back for `seconds`: latencies, and the cores used meanwhile (this process
    counts as the 'server')."""
    for _ in range(warmup):
        fn()
    best: tuple[list[float], Cpu] | None = None
    while True:
        QUIET.wait(None)
        lat: list[float] = []
        watch = CpuWatch(None)
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 >= end and len(lat) >= 20:
                break
        cpu = watch.stop()
        cpu.server, cpu.client = cpu.client, 0.0  # this process did the work
        if best is None or cpu.other < best[1].other:
            best = (lat, cpu)
        if not QUIET.again(cpu, seconds):
            return best


def reference(directory: Path, inputs: dict, threads: int) -> dict:
    """The raw runtime's answer, which every server's is checked against."""
    from service import runtimes

    rt = runtimes.load(directory, threads=threads)
    try:
        return rt.run(inputs)
    finally:
        rt.close()


def measure_raw(directory: Path, inputs: dict, threads: int, seconds: float) -> tuple[list[float], Cpu, dict]:
    from service import runtimes

    rt = runtimes.load(directory, threads=threads)
    try:
        outputs = rt.run(inputs)
        lat, cpu = time_loop(lambda: rt.run(inputs), seconds)
    finally:
        rt.close()
    return lat, cpu, outputs


def measure_eager(name: str, inputs: dict, threads: int, seconds: float) -> tuple[list[float], Cpu]:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from eager_server import build

    filename, entry = ZOO[name]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build(ROOT / "tests" / "zoo" / filename, entry)
        x = torch.from_numpy(next(iter(inputs.values())))

        def once() -> None:
            with torch.inference_mode():
                model(x)

        return time_loop(once, seconds)
    finally:
        torch.set_num_threads(before)


# --- payloads --------------------------------------------------------------------------------------


@dataclass
class Payload:
    kind: str  # json | binary
    body: bytes
    headers: dict[str, str]
    file: Path | None = None


def payloads(input_name: str, x, tmp: Path, model: str) -> dict[str, Payload]:
    shape = list(x.shape)
    doc = {"inputs": [{"name": input_name, "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
    js = Payload("json", json.dumps(doc).encode(), {**AUTH, "Content-Type": "application/json"})
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": input_name, "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary = Payload(
        "binary",
        header + raw,
        {**AUTH, "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    for p in (js, binary):
        p.file = tmp / f"{model}-{p.kind}.body"
        p.file.write_bytes(p.body)
    return {"json": js, "binary": binary}


def decode(status: int, headers: dict, body: bytes, output: str):
    import numpy as np

    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    n = int(headers.get("inference-header-content-length", len(body)))
    doc = json.loads(body[:n])
    item = next(o for o in doc["outputs"] if o["name"] == output)
    if "data" in item:
        return np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
    size = item["parameters"]["binary_data_size"]
    return np.frombuffer(body[n : n + size], dtype=np.float32).reshape(item["shape"])


# --- load clients ----------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    client: str = "wrk"
    notes: list[str] = field(default_factory=list)
    cpu: Cpu | None = None
    tries: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


WRK_LUA = """
local f = assert(io.open(%(file)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d, "
    .. "\\"errors\\": %%d}\\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def lua_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for these ASCII values


def run_wrk(port: int, path: str, payload: Payload, conns: int, seconds: float, tmp: Path) -> Load:
    script = tmp / f"{payload.file.stem}.lua"
    headers = "\n".join(f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in payload.headers.items())
    script.write_text(WRK_LUA % {"file": lua_str(str(payload.file)), "headers": headers})
    duration = max(1, round(seconds))
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://{HOST}:{port}{path}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 90)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    r = json.loads(line[len("WRKJSON ") :])
    none = float("nan") if not r["requests"] else None  # wrk says 0 for the percentiles of nothing
    return Load(
        requests=r["requests"],
        seconds=r["duration_us"] / 1e6,
        p50_ms=none or r["p50_us"] / 1e3,
        p99_ms=none or r["p99_us"] / 1e3,
        errors=r["errors"],
        client="wrk",
    )


def _py_worker(port: int, path: str, body: bytes, headers: dict, seconds: float, threads: int) -> tuple[list, int]:
    """Keep-alive http.client connections in threads until `seconds` pass: (latencies, errors)."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        mine = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=client) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat, errors[0]


def run_python(port: int, path: str, payload: Payload, conns: int, seconds: float) -> Load:
    started = time.perf_counter()
    if conns == 1:
        lat, errors = _py_worker(port, path, payload.body, payload.headers, seconds, 1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        procs = min(4, conns)
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
            parts = [pool.submit(_py_worker, port, path, payload.body, payload.headers, seconds, n) for n in per]
            lat, errors = [], 0
            for f in parts:
                part, e = f.result()
                lat += part
                errors += e
        started = time.perf_counter() - seconds  # spawn start-up is not load time
    elapsed = time.perf_counter() - started
    return Load(
        requests=len(lat),
        seconds=elapsed,
        p50_ms=pct(lat, 50) * 1e3,
        p99_ms=pct(lat, 99) * 1e3,
        errors=errors,
        client="python",
    )


def load(
    port: int, path: str, payload: Payload, conns: int, seconds: float, tmp: Path, use_wrk: bool, server_pid: int
) -> Load:
    """1 s of warm-up, then the measured run (with the cores each party used during it)."""
    runner = (
        (lambda d: run_wrk(port, path, payload, conns, d, tmp))
        if use_wrk
        else (lambda d: run_python(port, path, payload, conns, d))
    )
    runner(1)
    drain(server_pid)
    best: Load | None = None
    tries = 0
    while True:
        QUIET.wait(server_pid)
        watch = CpuWatch(server_pid)
        r = runner(seconds)
        r.cpu = watch.stop()
        started = time.monotonic()
        drain(server_pid)
        tries += 1
        if best is None or r.cpu.other < best.cpu.other:
            best = r
        if not QUIET.again(r.cpu, seconds + time.monotonic() - started):
            break
    best.tries = tries
    return best


# --- Kiln metrics (batch sizes actually run) ------------------------------------------------------------


def batch_stats(port: int) -> dict[str, tuple[float, float]]:
    """{deployment name: (sum of rows, number of runs)} from /metrics."""
    _, _, body = request(port, "GET", "/metrics")
    stats: dict[str, list[float]] = {}
    for line in body.decode().splitlines():
        for suffix, idx in (("kiln_inference_batch_size_sum{", 0), ("kiln_inference_batch_size_count{", 1)):
            if line.startswith(suffix):
                labels, value = line[len(suffix) :].rsplit("} ", 1)
                model = dict(kv.split("=", 1) for kv in labels.split(","))["model"].strip('"')
                stats.setdefault(model, [0.0, 0.0])[idx] = float(value)
    return {k: (v[0], v[1]) for k, v in stats.items()}


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    group: str  # raw | seq | conc
    server: str  # raw | eager | kiln | hand
    p50_ms: float
    p99_ms: float
    rps: float
    cpu: Cpu | None = None
    errors: int = 0
    mean_batch: float | None = None
    tries: int = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per configuration")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients for the throughput rows")
    ap.add_argument("--delays", default="0,1,2", help="max_queue_delay_ms values to try with batching on")
    ap.add_argument(
        "--noise-budget",
        type=float,
        default=120.0,
        help="seconds in all that the script may spend "
        "on a shared machine waiting for other processes to go quiet before a measured run, and "
        "measuring again a run they disturbed (the least disturbed one is kept)",
    )
    ap.add_argument(
        "--open",
        action="store_true",
        help="serve Kiln with authentication off (KILN_AUTH=false, "
        "as `kiln up --open`); by default it is on, as installed",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (data dir, logs, bodies)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ZOO]
    if unknown or not models:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    delays = [float(d) for d in args.delays.split(",")]
    if args.clients < 1 or args.seconds <= 0 or any(d < 0 for d in delays):
        ap.error("--clients, --seconds and --delays must be positive")
    use_wrk = shutil.which("wrk") is not None
    started = time.perf_counter()
    QUIET.left = max(0.0, args.noise_budget)
    watch = CpuWatch(None)
    time.sleep(1.0)
    idle = watch.stop()
    print(
        f"{os.cpu_count()} CPU(s); before starting, other processes used {idle.other:.2f} core(s) "
        f"(steal {idle.steal:.2f})",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-serving-"))
    data_dir = tmp / "data"
    os.environ["KILN_DATA_DIR"] = str(data_dir)  # before anything reads the settings
    if args.open:
        os.environ["KILN_AUTH"] = "false"
    servers = Servers()
    try:
        converted = convert(models)
        threads = max(1, os.cpu_count() or 1)  # what Kiln gives a deployment of one instance
        run(models, converted, args, delays, threads, use_wrk, tmp, data_dir, servers)
    finally:
        servers.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\ntotal {time.perf_counter() - started:.0f}s, of which {QUIET.waited:.0f}s waiting for other processes "
        f"to go quiet and {QUIET.repeated:.0f}s measuring disturbed rows again"
    )


def run(models, converted, args, delays, threads, use_wrk, tmp, data_dir, servers: Servers) -> None:
    import numpy as np
    import onnxruntime
    import torch

    from service.artifacts import get_store
    from service.signature import Signature

    rng = np.random.default_rng(0)
    info: dict[str, dict] = {}
    # the reference answers (the raw runtime's); its timing comes later, beside the server rows
    for name in models:
        c = converted[name]
        sig = Signature.parse(c["signature"])
        spec, out = sig.inputs[0], sig.outputs[0].name
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        x = rng.standard_normal(shape).astype(np.float32)
        art = get_store().materialize(c["files"], tmp / "raw" / name)
        raw_out = reference(art, {spec.name: x}, threads)
        bd = sig.dims[sig.batch_dim].max if sig.batch_dim else 1
        info[name] = {
            "input": spec.name,
            "output": out,
            "ref": raw_out[out],
            "shape": shape,
            "x": x,
            "art": art,
            "max_batch": min(KILN_MAX_BATCH, bd),
            "payloads": payloads(spec.name, x, tmp, name),
        }

    # Kiln: one `kiln api` process serving every deployment
    kiln_port = free_port()
    kiln_bin = Path(sys.executable).with_name("kiln")
    cmd = (
        [str(kiln_bin), "api", "--port", str(kiln_port)]
        if kiln_bin.exists()
        else [sys.executable, "-m", "workers.cli", "api", "--port", str(kiln_port)]
    )
    kiln_log = tmp / "kiln-api.log"
    kiln = servers.start(cmd, {**os.environ, "KILN_DATA_DIR": str(data_dir)}, kiln_log)
    wait_http(kiln_port, "/v2/health/live", kiln, kiln_log)
    for name in models:
        i = info[name]
        deps = {f"{name}-on{d:g}": {"max_batch_size": i["max_batch"], "max_queue_delay_ms": d} for d in delays}
        deps[f"{name}-off"] = {"max_batch_size": 1}
        for dep, opts in deps.items():
            body = json.dumps({"name": dep, "job": converted[name]["job"], **opts}).encode()
            status, _, resp = request(kiln_port, "POST", "/v1/deployments", body, {"Content-Type": "application/json"})
            doc = json.loads(resp)
            if status != 201 or doc.get("state") != "ready":
                raise RuntimeError(f"deployment {dep} failed: {status} {resp[:500]!r}")
            if opts["max_batch_size"] > 1 and not doc["versions"][-1]["batching"]:
                print(f"note: {dep} serves unbatched: {doc['versions'][-1]['batching_note']}")
            for p in i["payloads"].values():
                got = decode(*request(kiln_port, "POST", f"/v2/models/{dep}/infer", p.body, p.headers), i["output"])
                if not np.allclose(got, i["ref"], atol=1e-5, rtol=1e-4):
                    raise RuntimeError(f"{dep} {p.kind}: the answer differs from the raw runtime's")
    print(
        f"kiln api on :{kiln_port} serving {len(models) * (len(delays) + 1)} deployments; every answer checked "
        "against the raw runtime's",
        flush=True,
    )

    client = "wrk" if use_wrk else "python http.client (wrk not found)"
    for name in models:
        i = info[name]
        # in this process while the Kiln server idles (no hand-written server yet), just before the
        # sequential rows, so that they share the machine's conditions
        inputs = {i["input"]: i["x"]}
        raw, raw_cpu, _ = measure_raw(i["art"], inputs, threads, args.seconds)
        eager, eager_cpu = measure_eager(name, inputs, threads, args.seconds)
        print(
            f"  {name}: in-process: raw runtime ({converted[name]['candidate']}) p50 {pct(raw, 50) * 1e3:.3f} ms, "
            f"eager PyTorch p50 {pct(eager, 50) * 1e3:.3f} ms; cores: other {raw_cpu.other:.2f}, "
            f"{eager_cpu.other:.2f}",
            flush=True,
        )
        rows = [
            Row(
                "raw runtime, in-process",
                "raw",
                "raw",
                pct(raw, 50) * 1e3,
                pct(raw, 99) * 1e3,
                len(raw) / sum(raw),
                raw_cpu,
            ),
            Row(
                "eager PyTorch, in-process",
                "raw",
                "eager",
                pct(eager, 50) * 1e3,
                pct(eager, 99) * 1e3,
                len(eager) / sum(eager),
                eager_cpu,
            ),
        ]

        hand_port = free_port()
        hand_log = tmp / f"eager-{name}.log"
        hand = servers.start(
            [
                sys.executable,
                str(ROOT / "bench" / "eager_server.py"),
                "--model",
                str(ROOT / "tests" / "zoo" / ZOO[name][0]),
                "--entry",
                ZOO[name][1],
                "--port",
                str(hand_port),
                "--threads",
                str(threads),
                "--output",
                i["output"],
            ],
            dict(os.environ),
            hand_log,
        )
        try:
            wait_http(hand_port, "/health", hand, hand_log)
            js, binary = i["payloads"]["json"], i["payloads"]["binary"]
            got = decode(*request(hand_port, "POST", f"/v2/models/{name}/infer", js.body, js.headers), i["output"])
            if not np.allclose(got, i["ref"], atol=1e-3, rtol=1e-3):
                raise RuntimeError(f"hand-written {name}: the answer differs from the raw runtime's")

            def measure(label: str, group: str, server: str, dep: str | None, p: Payload, conns: int) -> Row:
                if server == "kiln":
                    port, pid, path = kiln_port, kiln.pid, f"/v2/models/{dep}/infer"
                    before = batch_stats(kiln_port).get(dep, (0.0, 0.0))
                else:
                    port, pid, path = hand_port, hand.pid, f"/v2/models/{name}/infer"  # noqa: B023 - called in this iteration
                r = load(port, path, p, conns, args.seconds, tmp, use_wrk, pid)
                row = Row(label, group, server, r.p50_ms, r.p99_ms, r.rps, r.cpu, r.errors, tries=r.tries)
                if server == "kiln":  # mean rows per runtime call over the warm-up and measured run
                    after = batch_stats(kiln_port).get(dep, (0.0, 0.0))
                    row.mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                rows.append(row)  # noqa: B023 - called in this iteration
                print(
                    f"  {name}: {label}: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms, {r.rps:.0f} req/s"  # noqa: B023 - same
                    + (f", ERRORS {r.errors}" if r.errors else "")
                    + (f", mean batch {row.mean_batch:.1f}" if row.mean_batch is not None else "")
                    + f"; cores: server {r.cpu.server:.2f}, client {r.cpu.client:.2f}, other {r.cpu.other:.2f}"
                    + (f" (least disturbed of {r.tries} runs)" if r.tries > 1 else ""),
                    flush=True,
                )
                return row

            # one client: nothing to batch with, so the batching-on deployment with delay 0 (what a user gets)
            seq_dep = f"{name}-on{delays[0]:g}"
            measure("Kiln JSON, 1 client", "seq", "kiln", seq_dep, js, 1)
            measure("Kiln binary, 1 client", "seq", "kiln", seq_dep, binary, 1)
            measure("hand-written JSON, 1 client", "seq", "hand", None, js, 1)
            n, mb = args.clients, i["max_batch"]
            best: tuple[float, Row] | None = None
            for d in delays:
                row = measure(
                    f"Kiln binary, {n} clients, batching {mb}/{d:g}ms", "conc", "kiln", f"{name}-on{d:g}", binary, n
                )
                if best is None or row.rps > best[1].rps:
                    best = (d, row)
            measure(f"Kiln binary, {n} clients, no batching", "conc", "kiln", f"{name}-off", binary, n)
            measure(
                f"Kiln JSON, {n} clients, batching {mb}/{best[0]:g}ms", "conc", "kiln", f"{name}-on{best[0]:g}", js, n
            )
            measure(f"Kiln JSON, {n} clients, no batching", "conc", "kiln", f"{name}-off", js, n)
            measure(f"hand-written JSON, {n} clients", "conc", "hand", None, js, n)
        finally:
            servers.stop(hand)
        report(name, i, rows, converted[name]["candidate"], threads, args)

    print(
        f"\nversions: python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}, torch "
        f"{torch.__version__}; {os.cpu_count()} CPU(s); client: {client}"
    )


def report(name: str, i: dict, rows: list[Row], candidate: str, threads: int, args) -> None:
    raw = rows[0]
    hand = {r.group: r for r in rows if r.server == "hand"}
    print(
        f"\n== {name}: {i['input']} float32{i['shape']} -> {i['output']}; Kiln serves {candidate} "
        f"(ORT intra-op threads {threads}); hand-written: eager PyTorch, {threads} torch threads; "
        f"{args.seconds:g}s per row; Kiln authentication {'on (admin token)' if AUTH else 'off'}"
    )
    head = (
        f"{'':<42}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'rows/s':>8}{'+raw ms':>9}{'vs hand':>8}"
        f"{'batch':>6}{'cores: srv':>11}{'cli':>5}{'other':>6}{'runs':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        over = f"{r.p50_ms - raw.p50_ms:>+9.3f}" if r.group == "seq" else f"{'':>9}"
        ref = hand.get(r.group)
        vs = (
            f"{r.rps / ref.rps:>7.2f}x"
            if (r.server == "kiln" and ref and ref.rps)
            else (f"{'inf':>8}" if r.server == "kiln" and ref else f"{'':>8}")
        )
        batch = f"{r.mean_batch:>6.1f}" if r.mean_batch is not None else f"{'':>6}"
        cpu = f"{r.cpu.server:>11.2f}{r.cpu.client:>5.2f}{r.cpu.other:>6.2f}" if r.cpu else f"{'':>22}"
        cpu += f"{r.tries:>5}" if r.server in ("kiln", "hand") else ""
        err = f"  ERRORS {r.errors}" if r.errors else ""
        print(f"{r.label:<42}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{r.rps:>8.0f}{r.rps:>8.0f}{over}{vs}{batch}{cpu}{err}")
    print(
        "batch 1 everywhere, so rows/s = req/s. +raw ms: p50 minus the raw runtime's p50 (one client). vs hand: rows/s over "
        "the hand-written JSON server's at the same concurrency. batch: mean rows per runtime call (Kiln's "
        "metrics). cores: CPU used during the row by the server, the client (wrk) and everything else on the "
        "machine (other > 0.1 means another tenant disturbed the row); runs: how often the row was measured "
        "(a disturbed run is measured again while the --noise-budget lasts; the least disturbed is shown)."
    )

    def find(server: str, group: str, enc: str, batching: bool | None = None) -> list[Row]:
        return [
            r
            for r in rows
            if r.server == server
            and r.group == group
            and enc in r.label
            and (batching is None or ("no batching" not in r.label) == batching)
        ]

    sj, sb = find("kiln", "seq", "JSON")[0], find("kiln", "seq", "binary")[0]
    on_b = max(find("kiln", "conc", "binary", True), key=lambda r: r.rps)
    off_b = find("kiln", "conc", "binary", False)[0]
    on_j, off_j = find("kiln", "conc", "JSON", True)[0], find("kiln", "conc", "JSON", False)[0]

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    oj, ob = sj.p50_ms - raw.p50_ms, sb.p50_ms - raw.p50_ms
    print(
        f"overhead over the raw runtime (p50, one client): JSON {oj:+.3f} ms, binary {ob:+.3f} ms "
        f"(raw p50 {raw.p50_ms:.3f} ms)"
    )
    if name == "mlp":
        print(f"  target: MLP binary overhead < 0.8 ms: {ob:.3f} ms -> {mark(ob < 0.8)}")
        print(
            f"  target: >= 1000 req/s from one sequential client: binary {sb.rps:.0f} -> {mark(sb.rps >= 1000)}; "
            f"JSON {sj.rps:.0f} -> {mark(sj.rps >= 1000)}"
        )
    elif name == "cnn":
        print(
            f"  target: CNN JSON p50 within 15 ms of compute: {oj:+.2f} ms -> {mark(oj <= 15)}; binary within "
            f"3 ms: {ob:+.2f} ms -> {mark(ob <= 3)}"
        )
    rb = on_b.rps / off_b.rps if off_b.rps else float("inf")
    rj = on_j.rps / off_j.rps if off_j.rps else float("inf")
    print(
        f"batching on/off, {args.clients} clients: binary {on_b.rps:.0f}/{off_b.rps:.0f} req/s = {rb:.2f}x "
        f"(best: {on_b.label.rsplit(' ', 1)[-1]}), JSON {on_j.rps:.0f}/{off_j.rps:.0f} = {rj:.2f}x"
    )
    if name == "mlp":
        print(f"  target: MLP batching >= 3x no batching: {rb:.2f}x -> {mark(rb >= 3)}")
    ratios, behind = [], []
    for r in rows:
        ref = hand.get(r.group)
        if r.server == "kiln" and ref:
            ratios.append(f"{r.label.removeprefix('Kiln ')} " + (f"{r.rps / ref.rps:.2f}x" if ref.rps else "inf"))
            if r.rps < ref.rps:
                behind.append(r.label)
    print("Kiln vs hand-written (rows/s, same concurrency): " + "; ".join(ratios))
    print(
        f"  target: Kiln ahead of the hand-written eager server on every row -> {mark(not behind)}"
        + (f" (behind: {'; '.join(behind)})" if behind else "")
    )
    disturbed = [r.label for r in rows if r.cpu and r.cpu.other > 0.1]
    if disturbed:
        print(f"  warning: other processes used > 0.1 core during: {'; '.join(disturbed)}")


if __name__ == "__main__":
    main()
