"""What the isolated runner costs: /v2 latency and throughput of TorchScript artifacts served through
runner processes inside the isolation boundary, against the same artifacts run in the API process.

    .venv/bin/python bench/isolation.py [--models mlp,cnn] [--seconds 4] [--rounds 3] [--clients 32]

1. Converts the zoo's MLP and CNN to TorchScript fp32 in this process (upload + `run_job`).
2. Starts two API servers over the same data directory, one after the other's deployments exist:
   `kiln api` as shipped (TorchScript in a boxed runner, service/runner.py) and the same API with
   TorchScript loaded in-process (only this benchmark can do that: `--serve-in-process`). Both with
   authentication on, one instance per deployment, batching off.
3. Per model and client count (1, --clients), binary /v2 requests at batch 1, measured in
   interleaved rounds (runner, in-process, runner, in-process, ...) so that load from elsewhere on a
   shared machine hits both alike. Prints each round, then medians with their spread (min-max over
   the rounds), the p50 difference and the req/s ratio, beside the aims: the runner adds at most
   0.2 ms p50 to the MLP, and at most 3 % to the CNN.

The load client is bench/serving.py's (wrk when on PATH, else Python keep-alive clients).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import serving as sv  # bench/serving.py, beside this file


def serve_in_process(port: int) -> None:
    """The API with TorchScript artifacts loaded in this process: the baseline, never the product."""
    from service.runtimes.torchscript import TorchScriptRuntime
    from workers import serve

    TorchScriptRuntime.runs_code = False
    serve.run_api("127.0.0.1", port)


def convert(models: list[str]) -> dict[str, str]:
    """Upload and convert each model to TorchScript fp32; returns {model: job id}."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import zoo_signature
    from workers.jobrunner import run_job

    jobs = {}
    with TestClient(create_app()) as api:
        sv.AUTH.update(sv.admin_auth())
        api.headers.update(sv.AUTH)
        for name in models:
            filename, entry = sv.ZOO[name]
            r = api.post(
                "/v1/models",
                data={"name": name, "signature": json.dumps(zoo_signature(name)), "entry": f"{filename}:{entry}"},
                files={"file": (filename, (sv.ROOT / "tests" / "zoo" / filename).read_bytes())},
            )
            assert r.status_code == 201, r.text
            r = api.post(
                "/v1/jobs",
                json={
                    "model": name,
                    "targets": ["torchscript"],
                    "precisions": ["fp32"],
                    "bench_seconds": 0.05,
                    "batch_sizes": [1],
                },
            )
            job_id = r.json()["id"]
            how = run_job(job_id)
            if how != "succeeded":
                raise RuntimeError(f"conversion of {name} {how}: {api.get(f'/v1/jobs/{job_id}').text[:800]}")
            jobs[name] = job_id
            print(f"converted {name} to TorchScript", flush=True)
    logging.disable(logging.NOTSET)
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per round and server")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--serve-in-process", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_in_process:
        serve_in_process(args.serve_in_process)
        return
    import numpy as np

    models = [m for m in args.models.split(",") if m]
    use_wrk = shutil.which("wrk") is not None
    watch = sv.CpuWatch(None)
    time.sleep(1.0)
    idle = watch.stop()
    print(
        f"{os.cpu_count()} CPU(s); other processes used {idle.other:.2f} core(s) before the run; "
        f"load client: {'wrk' if use_wrk else 'python http.client'}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-isolation-"))
    os.environ["KILN_DATA_DIR"] = str(tmp / "data")
    servers = sv.Servers()
    try:
        jobs = convert(models)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        boxed_port, inproc_port = sv.free_port(), sv.free_port()
        boxed = servers.start(
            [sys.executable, "-m", "workers.cli", "api", "--port", str(boxed_port)], env, tmp / "api-runner.log"
        )
        sv.wait_http(boxed_port, "/healthz", boxed, tmp / "api-runner.log")
        for name, job_id in jobs.items():
            status, _, body = sv.request(
                boxed_port,
                "POST",
                "/v1/deployments",
                json.dumps({"name": name, "job": job_id, "max_batch_size": 1}).encode(),
                {**sv.AUTH, "Content-Type": "application/json"},
                timeout=300,
            )
            assert status == 201 and json.loads(body)["state"] == "ready", body[:500]
        inproc = servers.start(
            [sys.executable, __file__, "--serve-in-process", str(inproc_port)], env, tmp / "api-inprocess.log"
        )
        sv.wait_http(inproc_port, "/healthz", inproc, tmp / "api-inprocess.log")
        for name in models:
            sv.wait_http(inproc_port, f"/v2/models/{name}/ready", inproc, tmp / "api-inprocess.log", timeout=300)
        results = []
        for name in models:
            sig = json.loads(sv.request(boxed_port, "GET", f"/v2/models/{name}", headers=sv.AUTH)[2])
            spec = sig["inputs"][0]
            shape = [1 if not isinstance(d, int) or d < 0 else d for d in spec["shape"]]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            payload = sv.payloads(spec["name"], x, tmp, name)["binary"]
            path = f"/v2/models/{name}/infer"
            for conns in (1, args.clients):
                rounds = {"runner": [], "in-process": []}
                for r in range(args.rounds):
                    for label, port, proc in (("runner", boxed_port, boxed), ("in-process", inproc_port, inproc)):
                        load = sv.load(port, path, payload, conns, args.seconds, tmp, use_wrk, proc.pid)
                        rounds[label].append(load)
                        print(
                            f"  {name} {conns:>2} client(s) round {r + 1} {label:<10} {load.rps:8.0f} req/s  "
                            f"p50 {load.p50_ms:7.3f} ms  p99 {load.p99_ms:7.3f} ms  errors {load.errors}  "
                            f"other cores {load.cpu.other if load.cpu else 0:.2f}",
                            flush=True,
                        )
                results.append((name, conns, rounds))
        report(results)
    finally:
        servers.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def report(results) -> None:
    def med(xs):
        return statistics.median(xs)

    print(
        "\nmodel clients | runner req/s  p50 ms (min-max) | in-process req/s  p50 ms (min-max) | "
        "p50 +ms  req/s ratio | aim"
    )
    for name, conns, rounds in results:
        b, i = rounds["runner"], rounds["in-process"]
        bp, ip = [x.p50_ms for x in b], [x.p50_ms for x in i]
        br, ir = [x.rps for x in b], [x.rps for x in i]
        delta = med(bp) - med(ip)
        ratio = med(br) / med(ir) if med(ir) else float("nan")
        # per round, so that the spread of the difference shows too
        deltas = [x - y for x, y in zip(bp, ip)]
        if name == "mlp":
            aim = f"p50 +{delta:.3f} ms vs <= 0.2 ms: {'met' if delta <= 0.2 else 'MISSED'}"
        else:
            aim = f"p50 +{100 * delta / med(ip):.1f}% vs <= 3%: {'met' if delta <= 0.03 * med(ip) else 'MISSED'}"
        print(
            f"{name:<5} {conns:>7} | {med(br):8.0f}  {med(bp):7.3f} ({min(bp):.3f}-{max(bp):.3f}) | "
            f"{med(ir):8.0f}  {med(ip):7.3f} ({min(ip):.3f}-{max(ip):.3f}) | "
            f"{delta:+.3f} ({min(deltas):+.3f}..{max(deltas):+.3f})  {ratio:.3f} | {aim}"
        )


if __name__ == "__main__":
    main()
