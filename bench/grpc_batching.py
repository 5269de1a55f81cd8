"""One client against `kiln api`: HTTP JSON, HTTP binary and gRPC (tritonclient.grpc), with batching
off and on, timed in interleaved rounds in one run (workers/benchmark.py), so that a busy machine
slows every row alike.

    .venv/bin/python bench/grpc_batching.py [--model mlp] [--seconds 20] [--delay-ms 2]

Aims (issue: serving that beats what users would write by hand): gRPC >= 1.3x HTTP JSON at one
client; with batching on, a lone client within +0.2 ms p50 of batching off. Each ratio is the
median of per-round ratios with a ~95% interval. Authentication is on (every request carries the
admin token), as installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget of the interleaved rounds")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms of the batching deployment")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-grpc-"))
    os.environ["KILN_DATA_DIR"] = str(tmp / "data")
    import numpy as np
    import serving as sb  # bench/serving.py: conversion and process helpers
    import tritonclient.grpc as tg

    from workers.benchmark import interleaved, machine_load, ratio

    servers = sb.Servers()
    try:
        converted = sb.convert([args.model])[args.model]
        port, grpc_port = sb.free_port(), sb.free_port()
        log = tmp / "api.log"
        proc = servers.start(
            [sys.executable, "-m", "workers.cli", "api", "--port", str(port)],
            {**os.environ, "KILN_GRPC_PORT": str(grpc_port)},
            log,
        )
        sb.wait_http(port, "/v2/health/live", proc, log)
        auth = sb.admin_auth()
        sig = converted["signature"]
        spec = sig["inputs"][0]
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for dep, opts in {
            "off": {"max_batch_size": 1},
            "on": {"max_batch_size": 32, "max_queue_delay_ms": args.delay_ms},
        }.items():
            body = json.dumps({"name": f"m-{dep}", "job": converted["job"], **opts}).encode()
            status, _, resp = sb.request(
                port, "POST", "/v1/deployments", body, {"Content-Type": "application/json", **auth}
            )
            assert status == 201, resp[:300]
        conn = http.client.HTTPConnection("127.0.0.1", port)
        js = json.dumps(
            {"inputs": [{"name": spec["name"], "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": spec["name"],
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        binary = header + x.tobytes()

        def http_call(dep: str, body: bytes, extra: dict) -> None:
            conn.request("POST", f"/v2/models/m-{dep}/infer", body, {**auth, **extra})
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status

        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = tg.InferInput(spec["name"], shape, "FP32")
        tensor.set_data_from_numpy(x)
        grpc_auth = {k.lower(): v for k, v in auth.items()}

        def grpc_call(dep: str) -> None:
            client.infer(f"m-{dep}", [tensor], headers=grpc_auth)

        bin_headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        rows = {
            "HTTP JSON, batching off": lambda: http_call("off", js, {"Content-Type": "application/json"}),
            "HTTP binary, batching off": lambda: http_call("off", binary, bin_headers),
            "HTTP binary, batching on": lambda: http_call("on", binary, bin_headers),
            "gRPC, batching off": lambda: grpc_call("off"),
            "gRPC, batching on": lambda: grpc_call("on"),
        }
        before = machine_load()
        timed = interleaved(
            rows,
            batch=1,
            budget_s=args.seconds,
            pause_s=0.0,
            pairs=[
                ("HTTP JSON, batching off", "gRPC, batching off"),
                ("HTTP binary, batching off", "HTTP binary, batching on"),
            ],
        )
        after = machine_load()
        print(
            f"\n{args.model} ({converted['candidate']}), one sequential client, {len(timed['gRPC, batching off'].rounds)} "
            f"interleaved rounds; load {before['load_1m']:.2f} -> {after['load_1m']:.2f} on {before['cpus']} CPUs\n"
        )
        print("| row | p50 ms (interval) | p99 ms | req/s at p50 |")
        print("|---|---|---|---|")
        for name, t in timed.items():
            p = t.point()
            print(
                f"| {name} | {p['p50_ms']:.3f} ({p['p50_low_ms']:.3f}-{p['p50_high_ms']:.3f}) | {p['p99_ms']:.3f} | "
                f"{1e3 / p['p50_ms']:.0f} |"
            )
        g, gl, gh = ratio(timed["HTTP JSON, batching off"].rounds, timed["gRPC, batching off"].rounds)
        on = np.array(timed["HTTP binary, batching on"].rounds) - np.array(timed["HTTP binary, batching off"].rounds)
        gon = np.array(timed["gRPC, batching on"].rounds) - np.array(timed["gRPC, batching off"].rounds)
        print(
            f"\ngRPC vs HTTP JSON (batching off): {g:.2f}x ({gl:.2f}-{gh:.2f}); aim >= 1.3x: "
            f"{'met' if g >= 1.3 else 'MISSED'}"
        )
        for label, d in (("HTTP binary", on), ("gRPC", gon)):
            med = float(np.median(d)) * 1e3
            print(
                f"{label}: batching on costs a lone client {med:+.3f} ms p50 (per-round median); aim <= +0.2 ms: "
                f"{'met' if med <= 0.2 else 'MISSED'}"
            )
        client.close()
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    sys.exit(code)
