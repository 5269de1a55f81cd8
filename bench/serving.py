"""Serving overhead and throughput of Kiln (/v2 over HTTP, and gRPC) against the raw runtime, a
hand-written FastAPI server around the same ONNX Runtime session, one around eager PyTorch, and
LitServe with and without batching, measured in one run, for the zoo's MLP and CNN.

    .venv/bin/python bench/serving.py [--models mlp,cnn] [--seconds 5] [--clients 32] [--delays 0,1,2]
        [--noise-budget 120] [--no-litserve]

What it does, in order:

1. Converts each model in this process (upload + `run_job`, as the API and a worker would), with
   the `onnxruntime` target at fp32 only and a tiny conversion benchmark, into a temporary
   KILN_DATA_DIR. The selected candidate is the artifact served below, by every server.
2. Starts `kiln api` (uvicorn, one process, its gRPC endpoint on a second port) over that data dir
   and deploys each model several times through POST /v1/deployments: batching on (max_batch_size
   = 32, or the batch dimension's validated max when smaller, and max_queue_delay_ms in --delays)
   and batching off (max_batch_size 1). Every deployment's answer is checked against the raw
   runtime. Kiln runs as installed, with authentication on: every request carries the admin token
   that its first start wrote (the same header goes to the other servers, which ignore it);
   --open serves Kiln with authentication off instead.
3. Per model, times the served artifact in this process while the Kiln server idles:
   `service.runtimes.load(dir).run(...)` at batch 1, with the intra-op thread count Kiln's server
   gives a deployment of one instance (os.cpu_count() // instances) and, as Kiln serves it,
   intra-op threads that spin within a run and stop when it returns (KILN_SERVING_SPIN_WAIT's
   default); and eager PyTorch at batch 1 with as many torch threads.
4. Loads Kiln from the clients below: over HTTP, one client (JSON, binary, binary with batching
   off) and --clients concurrent clients (binary with each delay and with batching off, JSON with
   the best delay and off); then one client in interleaved rounds (every contender sees the same
   machine): gRPC with `tritonclient.grpc`, HTTP JSON and binary from http.client, and the raw
   runtime in this process (the gRPC and CNN aims use these); and gRPC from --clients concurrent
   clients (threads in 4 processes). With wrk, Kiln binary is also timed in alternating rounds
   against the raw runtime and bench/bare_server.py, the floor for a Python server (one thread,
   blocking sockets, no checks, around the same runtime with Kiln's settings).
5. Then, one at a time (their idle ORT/torch worker threads spin, so they never run side by side):
   bench/ort_server.py (FastAPI + the same ORT session, a plain `def` endpoint as a user would
   write it), bench/eager_server.py (FastAPI + eager PyTorch), and LitServe without and with
   batching (bench/litserve_server.py, run from the benchmark's own environment
   bench/.venv-litserve, git-ignored, which the script makes on first use with `python3 -m venv`
   and `pip install litserve onnxruntime numpy`; --no-litserve leaves it out). They speak v2
   JSON only; each is checked against the raw runtime and loaded at 1 and --clients clients.

Each load: 1 s of warm-up, then --seconds measured, each followed by waiting until the server is
idle again (wrk leaves requests in flight when it stops and no server drops work for a client
that went away).

The HTTP client: `wrk` (C, event-driven, one thread, keep-alive connections; a Lua script posts a
body read from a file and prints wrk's own latency percentiles, which it records per request from
sending to the full response). Without wrk on PATH it falls back to http.client keep-alive
connections (in this process for one client; in 4 processes of threads for concurrency), which
costs more client CPU and is labelled in the output. The gRPC rows always use Python clients, so
they are compared with the HTTP JSON row from a Python client, not with wrk's.

What limits the figures: client and server share the machine's cores (2 on the reference VM),
loopback only. With one sequential client the server and client mostly take turns, so the
figures are close to true per-request latency. With 32 clients the client takes CPU the server
would otherwise use, so throughput rows are a floor for a server on its own cores; the raw
runtime and eager rows were measured with the servers idle. p99 over a few seconds of a 20-50 ms
CNN is close to the maximum of 100-250 samples. ORT and torch keep their intra-op worker threads
spinning between calls (Kiln does not, by default), which shows as server CPU even for one
sequential client. Each row also says how many cores the server (with its child processes), the
client and everything else on the machine used while it ran (from /proc): on a shared machine
"other" shows when another tenant disturbed a row. From a --noise-budget of seconds, the script
waits before each measured run for other processes to go quiet, and measures a disturbed row
again, keeping the least disturbed run.

The issue's aims are printed beside the figures, each with met/MISSED; nothing fails on a miss.
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


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its live descendants (LitServe serves from child processes)."""
    if pid is None:
        return 0.0
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += process_cpu(p)
        todo += children.get(p, [])
    return total


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
    def __init__(self, server_pid: int | None = None, also: tuple[int, ...] = ()) -> None:
        """`also`: more servers (this script's own children) whose CPU counts as the server's."""
        self.pids = (server_pid, *also)
        self.t = time.perf_counter()
        self.busy, self.steal = machine_cpu()
        self.srv = sum(tree_cpu(p) for p in self.pids)
        self.me, self.kids = own_cpu()

    def stop(self) -> Cpu:
        wall = max(1e-9, time.perf_counter() - self.t)
        busy, steal = machine_cpu()
        srv = sum(tree_cpu(p) for p in self.pids) - self.srv
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
        before = tree_cpu(pid)
        time.sleep(0.3)
        if tree_cpu(pid) - before <= 2.0 / CLK:
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

    rt = runtimes.load(directory, threads=threads, spin=False)
    try:
        return rt.run(inputs)
    finally:
        rt.close()


def measure_raw(directory: Path, inputs: dict, threads: int, seconds: float) -> tuple[list[float], Cpu, dict]:
    from service import runtimes

    rt = runtimes.load(directory, threads=threads, spin=False)
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


# --- gRPC (tritonclient.grpc) and LitServe ---------------------------------------------------------------


def one_client_interleaved(
    http_port: int, grpc_port: int, dep: str, i: dict, seconds: float, pid: int, threads: int
) -> list[Row]:
    """One sequential client in interleaved rounds (workers/benchmark.py), so that every contender
    sees the same machine: HTTP JSON and binary (http.client), gRPC (tritonclient.grpc), and the raw
    runtime in this process. All are Python callers, so their ratios compare the servers."""
    import numpy as np
    import tritonclient.grpc as tg

    from service import runtimes
    from workers.benchmark import interleaved

    js, binary = i["payloads"]["json"], i["payloads"]["binary"]
    conn = http.client.HTTPConnection(HOST, http_port, timeout=60)
    client = tg.InferenceServerClient(f"{HOST}:{grpc_port}")
    tensor = tg.InferInput(i["input"], list(i["x"].shape), "FP32")
    tensor.set_data_from_numpy(i["x"])
    headers = {k.lower(): v for k, v in AUTH.items()}
    got = client.infer(dep, [tensor], headers=headers).as_numpy(i["output"])
    if not np.allclose(got, i["ref"], atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"{dep} over gRPC: the answer differs from the raw runtime's")

    def over_http(p: Payload):
        def call() -> None:
            conn.request("POST", f"/v2/models/{dep}/infer", p.body, p.headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")

        return call

    def over_grpc() -> None:
        client.infer(dep, [tensor], headers=headers)

    rt = runtimes.load(i["art"], threads=threads, spin=False)
    feeds = {i["input"]: i["x"]}
    contenders = {
        "Kiln JSON, 1 client (Python client)": over_http(js),
        "Kiln gRPC, 1 client (Python client)": over_grpc,
        "Kiln binary, 1 client (Python client)": over_http(binary),
        "raw runtime, in-process (interleaved)": lambda: rt.run(feeds),
    }
    names = list(contenders)
    QUIET.wait(pid)
    watch = CpuWatch(pid)
    try:
        timed = interleaved(
            contenders, batch=1, budget_s=2 * seconds, pause_s=0.0, pairs=[(names[0], names[1]), (names[3], names[2])]
        )
    finally:
        rt.close()
    cpu = watch.stop()
    conn.close()
    client.close()
    rows = []
    for label, t in timed.items():
        pt = t.point()
        server = "raw" if label.startswith("raw") else "kiln"
        rows.append(Row(label, "seq-py", server, pt["p50_ms"], pt["p99_ms"], 1e3 / pt["p50_ms"], cpu))
    return rows


def wrk_vs_raw(
    port: int, dep: str, payload: Payload, i: dict, seconds: float, threads: int, tmp: Path, pid: int, servers
):
    """Kiln binary from wrk (one connection), the bare-socket floor (bench/bare_server.py: the same
    request into the least a Python server can do around the same runtime) and the raw runtime in
    this process, in alternating rounds of a second or so, so that all see the same machine: what a
    lone client's request costs beyond the run, with a C client whose own cost is small (the Python
    client's is not: reading and writing 600 KB bodies in Python costs it milliseconds of its own)."""
    import numpy as np

    from service import runtimes

    bare_port = free_port()
    bare_log = tmp / "bare-server.log"
    bare = servers.start(
        [
            sys.executable,
            str(ROOT / "bench" / "bare_server.py"),
            "--artifact",
            str(i["art"]),
            "--port",
            str(bare_port),
            "--threads",
            str(threads),
        ],
        dict(os.environ),
        bare_log,
    )
    rt = runtimes.load(i["art"], threads=threads, spin=False)
    feeds = {i["input"]: i["x"]}
    rounds = max(3, round(2 * seconds))
    kiln_p50: list[float] = []
    bare_p50: list[float] = []
    raw_p50: list[float] = []
    try:
        wait_port(bare_port, bare, bare_log)
        path = f"/v2/models/{dep}/infer"
        got = decode(*request(bare_port, "POST", path, payload.body, payload.headers), i["output"])
        if not np.allclose(got, i["ref"], atol=1e-5, rtol=1e-4):
            raise RuntimeError("the bare-socket server's answer differs from the raw runtime's")
        QUIET.wait(pid)
        watch = CpuWatch(pid, also=(bare.pid,))
        for _ in range(rounds):
            kiln_p50.append(run_wrk(port, path, payload, 1, 1.0, tmp).p50_ms)
            bare_p50.append(run_wrk(bare_port, path, payload, 1, 1.0, tmp).p50_ms)
            times, _ = time_loop(lambda: rt.run(feeds), 1.0, warmup=1)
            raw_p50.append(pct(times, 50) * 1e3)
        cpu = watch.stop()
    finally:
        rt.close()
        servers.stop(bare)
    for key, p50s in (("kiln", kiln_p50), ("bare", bare_p50)):
        ratios = sorted(k / r for k, r in zip(p50s, raw_p50))
        WRK_RAW[key] = {"median": ratios[len(ratios) // 2], "low": ratios[0], "high": ratios[-1], "rounds": rounds}
    kp, bp, rp = (sorted(v)[rounds // 2] for v in (kiln_p50, bare_p50, raw_p50))
    return [
        Row("Kiln binary, 1 client (wrk, interleaved)", "seq-wrk", "kiln", kp, float("nan"), 1e3 / kp, cpu),
        Row("bare-socket floor, binary (wrk, interleaved)", "seq-wrk", "bare", bp, float("nan"), 1e3 / bp, cpu),
        Row("raw runtime, in-process (interleaved with wrk)", "seq-wrk", "raw", rp, float("nan"), 1e3 / rp, cpu),
    ]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until something accepts connections on the port (or the process ends: its log is the reason)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[1]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on :{port} after {timeout:.0f}s: {log.read_text()[-2000:]}")


WRK_RAW: dict[str, dict[str, float]] = {}


def batching_cost(port: int, on_dep: str, off_dep: str, payload: Payload, seconds: float, tmp: Path, pid: int):
    """A lone client (wrk, one connection) of the batching-on and the batching-off deployment in
    alternating rounds of a second or so: what batching costs a lone request, measured on the same
    machine (the rows measured one after the other, 6 s each, differed by +0.24 ms on a quiet
    machine). Fills LONE and returns the rows."""
    rounds = max(5, round(2 * seconds))
    on: list[float] = []
    off: list[float] = []
    QUIET.wait(pid)
    watch = CpuWatch(pid)
    for _ in range(rounds):
        on.append(run_wrk(port, f"/v2/models/{on_dep}/infer", payload, 1, 1.0, tmp).p50_ms)
        off.append(run_wrk(port, f"/v2/models/{off_dep}/infer", payload, 1, 1.0, tmp).p50_ms)
    cpu = watch.stop()
    diffs = sorted(a - b for a, b in zip(on, off))
    LONE.update(median=diffs[len(diffs) // 2], low=diffs[0], high=diffs[-1], rounds=rounds)
    a, b = sorted(on)[rounds // 2], sorted(off)[rounds // 2]
    return [
        Row("Kiln binary, 1 client, batching on (wrk, interleaved)", "seq-lone", "kiln", a, float("nan"), 1e3 / a, cpu),
        Row(
            "Kiln binary, 1 client, batching off (wrk, interleaved)", "seq-lone", "kiln", b, float("nan"), 1e3 / b, cpu
        ),
    ]


LONE: dict[str, float] = {}


def _grpc_worker(port: int, model: str, name: str, x, headers: dict, seconds: float, threads: int) -> tuple[list, int]:
    """tritonclient.grpc clients in threads until `seconds` pass: (latencies, errors)."""
    import tritonclient.grpc as tg

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def one() -> None:
        client = tg.InferenceServerClient(f"{HOST}:{port}")
        tensor = tg.InferInput(name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        mine = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                client.infer(model, [tensor], headers=headers)
            except Exception:  # noqa: BLE001 - counted as an error, as wrk counts them
                with lock:
                    errors[0] += 1
            mine.append(time.perf_counter() - t0)
        client.close()
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=one) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat, errors[0]


def grpc_load(port: int, http_port: int, dep: str, i: dict, conns: int, seconds: float, pid: int, mb: int) -> Row:
    """`conns` concurrent gRPC clients (threads in 4 processes, as the Python HTTP fallback)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    headers = {k.lower(): v for k, v in AUTH.items()}
    procs = min(4, conns)
    per = [conns // procs + (1 if k < conns % procs else 0) for k in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        args = (port, dep, i["input"], i["x"], headers)
        list(pool.map(_grpc_worker, *zip(*[(*args, 1.0, k) for k in per])))  # warm-up: spawn, connect
        drain(pid)
        QUIET.wait(pid)
        before = batch_stats(http_port).get(dep, (0.0, 0.0))
        watch, mine = CpuWatch(pid), tree_cpu(os.getpid())
        parts = [pool.submit(_grpc_worker, *args, seconds, k) for k in per]
        lat, errors = [], 0
        for f in parts:
            part, e = f.result()
            lat += part
            errors += e
        cpu = watch.stop()
        clients = (tree_cpu(os.getpid()) - mine) / seconds  # the pool's processes are not reaped yet
        cpu.other, cpu.client = max(0.0, cpu.other + cpu.client - clients), clients
    drain(pid)
    after = batch_stats(http_port).get(dep, (0.0, 0.0))
    row = Row(
        f"Kiln gRPC, {conns} clients, batching {mb} (Python clients)",
        "conc-py",
        "kiln",
        pct(lat, 50) * 1e3,
        pct(lat, 99) * 1e3,
        len(lat) / seconds,
        cpu,
        errors,
    )
    row.mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    return row


LITSERVE_ENV = ROOT / "bench" / ".venv-litserve"


def litserve_python() -> Path | None:
    """The Python of the benchmark's own LitServe environment (bench/.venv-litserve, git-ignored),
    made on first use with `python3 -m venv` + pip; None (with the reason printed) if it cannot be."""
    py = LITSERVE_ENV / "bin" / "python"
    try:
        if not py.exists():
            print("making bench/.venv-litserve (pip install litserve onnxruntime numpy) ...", flush=True)
            subprocess.run(["python3", "-m", "venv", str(LITSERVE_ENV)], check=True, capture_output=True)
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "litserve", "onnxruntime", "numpy"],
                check=True,
                capture_output=True,
                timeout=900,
            )
        done = subprocess.run(
            [str(py), "-c", "import litserve, onnxruntime; print(litserve.__version__, onnxruntime.__version__)"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        print(f"note: no LitServe rows: {exc} {err[-500:]!r}", flush=True)
        return None
    print(
        f"LitServe {done.stdout.split()[0]} (onnxruntime {done.stdout.split()[1]}) in bench/.venv-litserve", flush=True
    )
    return py


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
    ap.add_argument("--no-litserve", action="store_true", help="leave out the LitServe rows (and its environment)")
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
    grpc_port = free_port()
    kiln = servers.start(
        cmd, {**os.environ, "KILN_DATA_DIR": str(data_dir), "KILN_GRPC_PORT": str(grpc_port)}, kiln_log
    )
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
    litserve_py = None if args.no_litserve else litserve_python()
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

        js, binary = i["payloads"]["json"], i["payloads"]["binary"]
        onnx_file = next(Path(i["art"]).rglob("*.onnx"))
        mb = i["max_batch"]
        n = args.clients

        def measure(
            label: str, group: str, server: str, port: int, pid: int, path: str, p: Payload, conns: int, dep=None
        ) -> Row:
            before = batch_stats(kiln_port).get(dep, (0.0, 0.0)) if dep else None
            r = load(port, path, p, conns, args.seconds, tmp, use_wrk, pid)
            row = Row(label, group, server, r.p50_ms, r.p99_ms, r.rps, r.cpu, r.errors, tries=r.tries)
            if dep:  # mean rows per runtime call over the warm-up and measured run
                after = batch_stats(kiln_port).get(dep, (0.0, 0.0))
                row.mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            return add(row, r.client)

        def add(row: Row, client_kind: str = "") -> Row:
            rows.append(row)  # noqa: B023 - called in this iteration
            print(
                f"  {name}: {row.label}: p50 {row.p50_ms:.3f} ms, p99 {row.p99_ms:.3f} ms, {row.rps:.0f} req/s"  # noqa: B023 - same
                + (f", ERRORS {row.errors}" if row.errors else "")
                + (f", mean batch {row.mean_batch:.1f}" if row.mean_batch is not None else "")
                + (
                    f"; cores: server {row.cpu.server:.2f}, client {row.cpu.client:.2f}, other {row.cpu.other:.2f}"
                    if row.cpu
                    else ""
                )
                + (f" (least disturbed of {row.tries} runs)" if row.tries > 1 else ""),
                flush=True,
            )
            return row

        def kiln_row(label: str, group: str, dep: str, p: Payload, conns: int) -> Row:
            return measure(label, group, "kiln", kiln_port, kiln.pid, f"/v2/models/{dep}/infer", p, conns, dep)

        # Kiln over HTTP. One client: nothing to batch with, so the batching-on deployment with
        # delay 0 (what a user gets), and the batching-off one to show what batching costs a lone client.
        seq_dep = f"{name}-on{delays[0]:g}"
        kiln_row("Kiln JSON, 1 client", "seq", seq_dep, js, 1)
        kiln_row("Kiln binary, 1 client", "seq", seq_dep, binary, 1)
        kiln_row("Kiln binary, 1 client, no batching", "seq", f"{name}-off", binary, 1)
        best: tuple[float, Row] | None = None
        for d in delays:
            row = kiln_row(f"Kiln binary, {n} clients, batching {mb}/{d:g}ms", "conc", f"{name}-on{d:g}", binary, n)
            if best is None or row.rps > best[1].rps:
                best = (d, row)
        kiln_row(f"Kiln binary, {n} clients, no batching", "conc", f"{name}-off", binary, n)
        kiln_row(f"Kiln JSON, {n} clients, batching {mb}/{best[0]:g}ms", "conc", f"{name}-on{best[0]:g}", js, n)
        kiln_row(f"Kiln JSON, {n} clients, no batching", "conc", f"{name}-off", js, n)

        # Kiln over gRPC (tritonclient.grpc, a Python client), beside HTTP JSON from a Python
        # client (http.client), timed in interleaved rounds so that both see the same machine
        for row in one_client_interleaved(kiln_port, grpc_port, seq_dep, i, args.seconds, kiln.pid, threads):
            add(row)
        add(grpc_load(grpc_port, kiln_port, f"{name}-on{best[0]:g}", i, n, args.seconds, kiln.pid, mb))
        if use_wrk:
            for row in wrk_vs_raw(kiln_port, seq_dep, binary, i, args.seconds, threads, tmp, kiln.pid, servers):
                add(row)
            for row in batching_cost(kiln_port, seq_dep, f"{name}-off", binary, args.seconds, tmp, kiln.pid):
                add(row)

        # the hand-written servers and LitServe, one at a time (ORT's and torch's idle worker threads spin)
        hands = [
            (
                "hand-written ORT",
                "hand",
                [sys.executable, str(ROOT / "bench" / "ort_server.py"), "--onnx", str(onnx_file)],
                [("", 1)],
            ),
            (
                "hand-written eager",
                "eager-hand",
                [
                    sys.executable,
                    str(ROOT / "bench" / "eager_server.py"),
                    "--model",
                    str(ROOT / "tests" / "zoo" / ZOO[name][0]),
                    "--entry",
                    ZOO[name][1],
                    "--output",
                    i["output"],
                ],
                [("", 1)],
            ),
        ]
        if litserve_py is not None:
            lit = [str(litserve_py), str(ROOT / "bench" / "litserve_server.py"), "--onnx", str(onnx_file)]
            lit += ["--path", f"/v2/models/{name}/infer"]
            timeout_s = max(delays) / 1e3
            hands.append(("LitServe", "litserve", [*lit, "--max-batch-size", "1"], [("", 1)]))
            hands.append(
                (
                    f"LitServe batching {mb}/{max(delays):g}ms",
                    "litserve",
                    [*lit, "--max-batch-size", str(mb), "--batch-timeout", str(timeout_s)],
                    [("", 0)],
                )
            )
        for label, server, cmd, _ in hands:
            port = free_port()
            log = tmp / f"{server}-{name}-{port}.log"
            proc = servers.start([*cmd, "--port", str(port), "--threads", str(threads)], dict(os.environ), log)
            try:
                wait_http(port, "/health", proc, log, timeout=180)
                path = f"/v2/models/{name}/infer"
                got = decode(*request(port, "POST", path, js.body, js.headers), i["output"])
                if not np.allclose(got, i["ref"], atol=1e-3, rtol=1e-3):
                    raise RuntimeError(f"{label} {name}: the answer differs from the raw runtime's")
                if "batching" not in label:
                    measure(f"{label} JSON, 1 client", "seq", server, port, proc.pid, path, js, 1)
                measure(f"{label} JSON, {n} clients", "conc", server, port, proc.pid, path, js, n)
            finally:
                servers.stop(proc)
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
        f"(ORT intra-op threads {threads}); hand-written: FastAPI around the same ORT session, and around eager "
        f"PyTorch, {threads} threads; {args.seconds:g}s per row; Kiln authentication "
        f"{'on (admin token)' if AUTH else 'off'}"
    )
    head = (
        f"{'':<52}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'+raw ms':>9}{'vs ORT':>8}"
        f"{'batch':>6}{'cores: srv':>11}{'cli':>5}{'other':>6}{'runs':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        over = f"{r.p50_ms - raw.p50_ms:>+9.3f}" if r.group.startswith("seq") else f"{'':>9}"
        ref = hand.get(r.group)
        vs = f"{r.rps / ref.rps:>7.2f}x" if (r.server != "hand" and ref and ref.rps) else f"{'':>8}"
        batch = f"{r.mean_batch:>6.1f}" if r.mean_batch is not None else f"{'':>6}"
        cpu = f"{r.cpu.server:>11.2f}{r.cpu.client:>5.2f}{r.cpu.other:>6.2f}" if r.cpu else f"{'':>22}"
        cpu += f"{r.tries:>5}" if r.server != "raw" and r.server != "eager" else ""
        err = f"  ERRORS {r.errors}" if r.errors else ""
        print(f"{r.label:<52}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{r.rps:>8.0f}{over}{vs}{batch}{cpu}{err}")
    print(
        "batch 1 per request everywhere, so rows/s = req/s. +raw ms: p50 minus the raw runtime's p50 (one client). "
        "vs ORT: req/s over the hand-written FastAPI + ORT server's (JSON, wrk) at the same concurrency. batch: "
        "mean rows per runtime call (Kiln's metrics). cores: CPU used during the row by the server (with its child "
        "processes), the client and everything else on the machine (other > 0.1: another tenant disturbed the "
        "row); runs: how often the row was measured (the least disturbed is shown). '(Python client)' rows: "
        "tritonclient.grpc / http.client instead of wrk, timed in interleaved rounds (one client) or threads in 4 "
        "processes (many), so only comparable with each other."
    )

    def one(label_start: str, group: str) -> Row | None:
        return next((r for r in rows if r.label.startswith(label_start) and r.group == group), None)

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def conc(prefix: str) -> list[Row]:
        return [r for r in rows if r.group == "conc" and r.label.startswith(prefix) and "no batching" not in r.label]

    sj, sb, sb_off = (
        one("Kiln JSON, 1", "seq"),
        one("Kiln binary, 1 client", "seq"),
        one("Kiln binary, 1 client, no", "seq"),
    )
    oj, ob = sj.p50_ms - raw.p50_ms, sb.p50_ms - raw.p50_ms
    print(
        f"overhead over the raw runtime (p50, one client): JSON {oj:+.3f} ms, binary {ob:+.3f} ms "
        f"(raw p50 {raw.p50_ms:.3f} ms)"
    )
    on_b = max(conc("Kiln binary"), key=lambda r: r.rps)
    on_j = conc("Kiln JSON")[0]
    off_b = one(f"Kiln binary, {args.clients} clients, no batching", "conc")
    ort1, ortn = hand.get("seq"), hand.get("conc")
    if name == "mlp":
        r1 = sj.rps / ort1.rps if ort1 and ort1.rps else float("nan")
        rn = on_j.rps / ortn.rps if ortn and ortn.rps else float("nan")
        print(f"  aim: Kiln >= 1.2x the hand-written ORT server, 1 client (JSON both): {r1:.2f}x -> {mark(r1 >= 1.2)}")
        print(
            f"  aim: Kiln >= 1.5x the hand-written ORT server, {args.clients} clients (JSON both, Kiln batching): "
            f"{rn:.2f}x -> {mark(rn >= 1.5)} (binary: {on_b.rps / ortn.rps if ortn and ortn.rps else float('nan'):.2f}x)"
        )
        if LONE:
            w = LONE
            print(
                f"  aim: batching on costs a lone client <= +0.2 ms p50 (wrk, {w['rounds']:.0f} alternating rounds; "
                f"the median of the per-round differences, lowest-highest): {w['median']:+.3f} ms "
                f"({w['low']:+.3f} to {w['high']:+.3f}) -> {mark(w['median'] <= 0.2)}"
            )
        lone = sb.p50_ms - sb_off.p50_ms
        print(
            f"  {'' if LONE else 'aim: '}batching on costs a lone client <= +0.2 ms p50 (rows one after the other): "
            f"{sb.p50_ms:.3f} - {sb_off.p50_ms:.3f} = {lone:+.3f} ms" + ("" if LONE else f" -> {mark(lone <= 0.2)}")
        )
        for r in (on_b, on_j):
            k = r.p99_ms / r.p50_ms if r.p50_ms else float("nan")
            print(f"  aim: {r.label}: p99 <= 2.5x p50: {r.p99_ms:.2f}/{r.p50_ms:.2f} = {k:.2f}x -> {mark(k <= 2.5)}")
        gj, gg = one("Kiln JSON, 1 client (Python", "seq-py"), one("Kiln gRPC, 1 client", "seq-py")
        if gj and gg:
            g = gj.p50_ms / gg.p50_ms
            print(
                f"  aim: gRPC >= 1.3x HTTP JSON at 1 client (p50, Python clients, interleaved): {gj.p50_ms:.3f}/"
                f"{gg.p50_ms:.3f} ms = {g:.2f}x -> {mark(g >= 1.3)}"
            )
        print(f"  target: MLP binary overhead < 0.8 ms: {ob:.3f} ms -> {mark(ob < 0.8)}")
    elif name == "cnn":
        kb, kr = one("Kiln binary, 1 client (Python", "seq-py"), one("raw runtime, in-process (inter", "seq-py")
        if WRK_RAW:
            w, b = WRK_RAW["kiln"], WRK_RAW["bare"]
            print(
                f"  aim: CNN binary /v2 within 3% of the runtime alone (p50, wrk and the runtime in "
                f"{w['rounds']:.0f} alternating rounds; the median of the per-round ratios, lowest-highest): "
                f"{w['median'] - 1:+.1%} ({w['low'] - 1:+.1%} to {w['high'] - 1:+.1%}) -> {mark(w['median'] <= 1.03)}"
            )
            print(
                f"  the floor, bench/bare_server.py in the same rounds (one thread, blocking sockets, no checks): "
                f"{b['median'] - 1:+.1%} ({b['low'] - 1:+.1%} to {b['high'] - 1:+.1%})"
            )
        if kb and kr:
            within = kb.p50_ms / kr.p50_ms - 1
            print(
                f"  CNN binary /v2 against the runtime alone (p50, interleaved rounds, Python client): "
                f"{kb.p50_ms:.2f} vs {kr.p50_ms:.2f} ms = {within:+.1%} (wrk, not "
                f"interleaved: {sb.p50_ms / raw.p50_ms - 1:+.1%})"
            )
    rb = on_b.rps / off_b.rps if off_b and off_b.rps else float("inf")
    print(
        f"batching on/off, {args.clients} clients, binary: {on_b.rps:.0f}/{off_b.rps if off_b else 0:.0f} req/s = {rb:.2f}x"
    )
    others = [r for r in rows if r.server in ("hand", "eager-hand", "litserve")]
    for group, kiln_row in (("seq", sj), ("conc", on_j)):
        print(
            f"Kiln JSON ({kiln_row.label.removeprefix('Kiln JSON, ')}) {kiln_row.rps:.0f} req/s vs "
            + "; ".join(
                f"{r.label.removesuffix(' JSON, 1 client').split(' JSON,')[0]} {kiln_row.rps / r.rps:.2f}x"
                for r in others
                if r.group == group and r.rps
            )
        )
    disturbed = [r.label for r in rows if r.cpu and r.cpu.other > 0.1]
    if disturbed:
        print(f"  warning: other processes used > 0.1 core during: {'; '.join(disturbed)}")


if __name__ == "__main__":
    main()
