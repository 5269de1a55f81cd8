"""Scale-out figures on this machine: conversion throughput (jobs per minute) with one worker
against two, and inference throughput with one serving replica against two behind a round-robin
client. Everything is a separate process sharing only Redis, PostgreSQL and an S3-compatible
store (moto's server), as on several machines.

    .venv/bin/python bench/scale.py [--jobs 6] [--seconds 10] [--clients 8]

On a 2-core machine the workers and replicas compete for the same two cores as each other and as
the load client: the ratios say how much of the work parallelises here, not what separate
machines would give.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the sys.path set-up above
from sqlalchemy import create_engine, text  # noqa: E402 - after the sys.path set-up above

from tests.conftest import ZOO, zoo_signature  # noqa: E402 - after the sys.path set-up above
from tests.service.procs import KilnApi, KilnWorker, Processes, RedisServer, free_port, kiln_env, wait_for  # noqa: E402 - after the sys.path set-up above
from tests.service.test_scale import AWS, MotoS3  # noqa: E402 - after the sys.path set-up above

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def convert_throughput(ha: httpx.Client, jobs: int) -> float:
    """Submit `jobs` conversions of the small CNN at once; jobs per minute until all succeeded."""
    t0 = time.perf_counter()
    ids = [
        ha.post(
            "/v1/jobs",
            json={
                "model": "cnn",
                "targets": ["onnxruntime"],
                "precisions": ["fp32"],
                "bench_seconds": 0.2,
                "threads": 1,
            },
        ).json()["id"]
        for _ in range(jobs)
    ]
    for job_id in ids:
        wait_for(lambda: ha.get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed"), 900, "a job")  # noqa: B023 - waited for here
    return jobs / ((time.perf_counter() - t0) / 60)


def infer_throughput(urls: list[str], seconds: float, clients: int) -> float:
    """Requests per second from `clients` threads, each sending to the replicas in turn."""
    import http.client

    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]})
    count = [0] * clients
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        conns = [http.client.HTTPConnection(u.removeprefix("http://")) for u in urls]
        n = i
        while time.perf_counter() < stop:
            c = conns[n % len(conns)]
            c.request("POST", "/v2/models/mlp/infer", body=body, headers={"Content-Type": "application/json"})
            c.getresponse().read()
            count[i] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    procs = Processes()
    db = f"kiln_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        s3 = procs.add(MotoS3(free_port(), tmp / "s3.log")).start()
        import boto3

        boto3.client(
            "s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        ).create_bucket(Bucket="kiln")
        redis = procs.add(RedisServer(free_port(), tmp / "redis.log")).start()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

        def env(name: str) -> dict[str, str]:
            return {
                **kiln_env(
                    tmp / name, url, redis.url, auth="false", artifact_url="s3://kiln/bench", s3_endpoint_url=s3.url
                ),
                **AWS,
            }

        a = procs.add(KilnApi(free_port(), env("api-a"), tmp / "api-a.log")).start()
        b = procs.add(KilnApi(free_port(), env("api-b"), tmp / "api-b.log")).start()
        ha = httpx.Client(base_url=a.url, timeout=60)
        for name, zoo, entry, sig in (
            ("cnn", "cnn", "cnn.py:build_small", zoo_signature("cnn", "SMALL_SIGNATURE")),
            ("mlp", "mlp", None, zoo_signature("mlp")),
        ):
            ha.post(
                "/v1/models",
                data={"name": name, "signature": json.dumps(sig), **({"entry": entry} if entry else {})},
                files={"file": (f"{zoo}.py", (ZOO / f"{zoo}.py").read_bytes())},
            ).raise_for_status()
        w1 = procs.add(KilnWorker(env("worker-1"), tmp / "worker-1.log", queues="cpu")).start()
        one = convert_throughput(ha, args.jobs)
        procs.add(KilnWorker(env("worker-2"), tmp / "worker-2.log", queues="cpu")).start()
        two = convert_throughput(ha, args.jobs)
        print(f"conversion ({args.jobs} jobs of the small CNN, onnxruntime fp32, 1 thread each):")
        print(f"  1 worker : {one:6.2f} jobs/min")
        print(f"  2 workers: {two:6.2f} jobs/min  ({two / one:.2f}x)")
        job = ha.post("/v1/jobs", json={"model": "mlp", "targets": ["onnxruntime"], "bench_seconds": 0.1}).json()
        wait_for(lambda: ha.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 300, "the MLP job")
        ha.post("/v1/deployments", json={"name": "mlp", "job": job["id"], "threads": 1}).raise_for_status()
        wait_for(lambda: httpx.get(f"{b.url}/v2/models/mlp/ready").status_code == 200, 30, "replica B")
        w1.kill()  # the load test measures serving only
        single = infer_throughput([a.url], args.seconds, args.clients)
        double = infer_throughput([a.url, b.url], args.seconds, args.clients)
        print(f"inference (MLP, batch 1, {args.clients} client threads, JSON, {args.seconds:g} s each):")
        print(f"  1 replica : {single:8.0f} req/s")
        print(f"  2 replicas: {double:8.0f} req/s  ({double / single:.2f}x, round-robin)")
    finally:
        procs.close(extra_needles=(str(tmp),))
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
