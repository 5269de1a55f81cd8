"""One client against `kiln api`: HTTP JSON, HTTP binary and gRPC (tritonclient.grpc), with batching
off and on, timed in interleaved rounds in one run (workers/benchmark.py), so that a busy machine
slows every row alike.

    .venv/bin/python bench/grpc_batching.py [--model mlp] [--seconds 20] [--delay-ms 2]

Aims (issue: serving that beats what users would write by hand): gRPC >= 1.3x HTTP JSON at one
client; with batching on, a lone client within +0.2 ms p50 of batching off. Each ratio is the
median of per-round ratios with a ~95% interval. Authentication is on (every request carries the
admin token), as installed.

The Python clients cost as much as the server does (tritonclient.grpc's call alone is ~0.4 ms), so
when nghttp2's `h2load` is installed (Debian: nghttp2-client) the same two requests are also sent
by one C client, in alternating rounds: `h2load --h1` for HTTP JSON and h2c for gRPC (the request
body framed as gRPC's length-prefixed message). That shows what the server's side of each protocol
costs. h2load counts a gRPC error as a success (it arrives as HTTP 200 with a grpc-status
trailer), so every round checks that each answer carried the bytes of a real inference response.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
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
    ap.add_argument("--c-rounds", type=int, default=10, help="alternating h2load rounds per protocol (0: none)")
    ap.add_argument("--c-requests", type=int, default=2000, help="requests per h2load round")
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
        if args.c_rounds and shutil.which("h2load"):
            c_client_rounds(args, port, grpc_port, auth, js, spec["name"], shape, x, tmp)
        elif args.c_rounds:
            print("\nh2load not found (Debian: nghttp2-client): no C-client rows")
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def c_client_rounds(args, port: int, grpc_port: int, auth: dict, js: bytes, name: str, shape, x, tmp: Path) -> None:
    """HTTP JSON and gRPC from one C client (h2load), one connection, in alternating rounds."""
    import grpc
    import numpy as np

    from service.serving.proto import inference_pb2 as pb
    from workers.benchmark import machine_load

    req = pb.ModelInferRequest(model_name="m-off", raw_input_contents=[x.tobytes()])
    req.inputs.add(name=name, datatype="FP32", shape=shape)
    message = req.SerializeToString()
    # one answer by the real channel first: the framed bytes h2load sends must be a valid call
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        reply = call(message, metadata=[(k.lower(), v) for k, v in auth.items()], timeout=10)
    grpc_answer = 5 + len(reply)  # gRPC's 5-byte prefix + the response message
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("POST", "/v2/models/m-off/infer", js, {**auth, "Content-Type": "application/json"})
    json_answer = len(conn.getresponse().read())
    conn.close()
    (tmp / "grpc.bin").write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    (tmp / "empty.bin").write_bytes(b"\0" * 5)  # an empty request message
    live = 5 + len(pb.ServerLiveResponse(live=True).SerializeToString())
    (tmp / "json.bin").write_bytes(js)
    headers = [f"-H{k}: {v}" for k, v in auth.items()]
    runs = {
        "HTTP JSON (h2load --h1)": (
            ["--h1", f"-d{tmp / 'json.bin'}", "-Hcontent-type: application/json", *headers],
            f"http://127.0.0.1:{port}/v2/models/m-off/infer",
            json_answer,
        ),
        "gRPC (h2load, h2c)": (
            [f"-d{tmp / 'grpc.bin'}", "-Hcontent-type: application/grpc", "-Hte: trailers", *headers],
            f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer",
            grpc_answer,
        ),
        # the transport's own cost: a call that does no work in Kiln's handler
        "gRPC ServerLive, empty call (h2load, h2c)": (
            [f"-d{tmp / 'empty.bin'}", "-Hcontent-type: application/grpc", "-Hte: trailers", *headers],
            f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ServerLive",
            live,
        ),
    }
    p50s: dict[str, list[float]] = {k: [] for k in runs}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    before = machine_load()
    for r in range(args.c_rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for label in order:
            opts, url, answer = runs[label]
            log = tmp / "h2load.log"
            out = subprocess.run(
                ["h2load", "-c1", "-m1", f"-n{args.c_requests}", f"--log-file={log}", *opts, url],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
            data = re.search(r"traffic: .*\((\d+)\) data", out)
            assert done and int(done.group(2)) == args.c_requests, out
            # every answer the size of a real inference response: no error passed for a success
            assert data and int(data.group(1)) == answer * args.c_requests, (label, answer, out)
            lat = np.loadtxt(log, usecols=2, ndmin=1) / 1e3
            p50s[label].append(float(np.median(lat)))
            rates[label].append(float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1)))
    after = machine_load()
    print(
        f"\none C client (h2load), one connection, {args.c_rounds} alternating rounds of {args.c_requests} requests; "
        f"load {before['load_1m']:.2f} -> {after['load_1m']:.2f}\n"
    )
    print("| row | p50 ms (median of rounds; min-max) | req/s (median of rounds) |")
    print("|---|---|---|")
    for label in runs:
        p = p50s[label]
        print(f"| {label} | {np.median(p):.3f} ({min(p):.3f}-{max(p):.3f}) | {np.median(rates[label]):.0f} |")
    per_round = np.array(p50s["HTTP JSON (h2load --h1)"]) / np.array(p50s["gRPC (h2load, h2c)"])
    g = float(np.median(per_round))
    print(
        f"\ngRPC vs HTTP JSON, C client: {g:.2f}x (rounds {per_round.min():.2f}-{per_round.max():.2f}); aim >= 1.3x: "
        f"{'met' if g >= 1.3 else 'MISSED'}"
    )


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    sys.exit(code)
