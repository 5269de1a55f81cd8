"""Several machines' worth of Kiln as separate processes that share only Redis, PostgreSQL and an
S3-compatible store (moto's server): two workers with their own working and cache directories, and
two API/serving replicas on different ports."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ZOO, zoo_signature
from tests.service.conftest import PG_ADMIN
from tests.service.procs import KilnApi, KilnWorker, Proc, Processes, RedisServer, free_port, kiln_env, wait_for

pytestmark = pytest.mark.slow
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3(Proc):
    def __init__(self, port: int, log: Path) -> None:
        super().__init__(
            "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {**os.environ, **AWS}, log
        )
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> MotoS3:
        super().start()
        wait_for(lambda: httpx.get(self.url, timeout=1).status_code < 500, 30, "moto's S3 server", diagnose=self.tail)
        return self


@pytest.fixture
def cluster(tmp_path):
    procs = Processes()
    db = f"kiln_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        s3 = procs.add(MotoS3(free_port(), tmp_path / "logs" / "s3.log")).start()
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3.url,
            **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        ).create_bucket(Bucket="kiln")
        redis = procs.add(RedisServer(free_port(), tmp_path / "logs" / "redis.log")).start()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

        def env(name: str) -> dict[str, str]:
            return {
                **kiln_env(
                    tmp_path / name,
                    url,
                    redis.url,
                    auth="false",
                    artifact_url="s3://kiln/scale",
                    s3_endpoint_url=s3.url,
                    job_stale_after_s=6,
                    # the fallback check of the database, out of reach of any wait in the test: a
                    # replica that picks up another's change does so by the Redis notification
                    sync_interval_s=3600,
                ),
                **AWS,
            }

        api_a = procs.add(KilnApi(free_port(), env("api-a"), tmp_path / "logs" / "api-a.log")).start()
        api_b = procs.add(KilnApi(free_port(), env("api-b"), tmp_path / "logs" / "api-b.log")).start()
        w1 = procs.add(KilnWorker(env("worker-1"), tmp_path / "logs" / "worker-1.log", queues="cpu")).start()
        w2 = procs.add(KilnWorker(env("worker-2"), tmp_path / "logs" / "worker-2.log", queues="cpu")).start()
        yield {"a": api_a, "b": api_b, "w1": w1, "w2": w2, "procs": procs, "tmp": tmp_path, "s3": s3}
    finally:
        procs.close(extra_needles=(str(tmp_path),))
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def infer(url: str, name: str, x: np.ndarray) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/{name}/infer",
        timeout=30,
        json={"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
    )


def test_two_workers_two_replicas_sharing_only_redis_postgres_and_s3(cluster):
    a, b, procs, tmp = cluster["a"], cluster["b"], cluster["procs"], cluster["tmp"]
    ha, hb = httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)
    # upload through replica A
    r = ha.post(
        "/v1/models",
        data={
            "name": "cnn",
            "entry": "cnn.py:build_small",
            "signature": json.dumps(zoo_signature("cnn", "SMALL_SIGNATURE")),
        },
        files={"file": ("cnn.py", (ZOO / "cnn.py").read_bytes())},
    )
    assert r.status_code == 201, r.text
    job = ha.post(
        "/v1/jobs",
        json={"model": "cnn", "targets": ["onnxruntime", "torchscript"], "precisions": ["fp32"], "bench_seconds": 0.5},
    ).json()
    # kill whichever worker takes it, mid-job: the other one finishes it
    running = wait_for(
        lambda: (
            (j := hb.get(f"/v1/jobs/{job['id']}").json())["status"] == "running"
            and j["current_step"] in ("capture", "export", "compile")
            and j
        ),
        120,
        "the job to be running",
        diagnose=procs.logs,
    )
    taker_pid = int(running["worker"].rpartition(":")[2])
    taker = next(w for w in (cluster["w1"], cluster["w2"]) if taker_pid in [w.pid, *w.pool_children()])
    other = cluster["w2"] if taker is cluster["w1"] else cluster["w1"]
    taker.kill()
    done = wait_for(
        lambda: (j := ha.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and j,
        180,
        "the job to finish on the other worker",
        diagnose=procs.logs,
    )
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    finisher_pid = int(done["worker"].rpartition(":")[2])
    assert finisher_pid in [other.pid, *other.pool_children()]
    # the worker that finished fetched the bundle from object storage into its own cache; the APIs
    # hold no working directories
    assert list((tmp / ("worker-1" if other is cluster["w1"] else "worker-2") / "artifacts" / "sha256").rglob("*"))
    assert not (tmp / "api-a" / "work").exists() and not (tmp / "api-b" / "work").exists()
    # deploy through replica B; both replicas serve it and give the same answers
    d = hb.post("/v1/deployments", json={"name": "cnn", "job": job["id"]})
    assert d.status_code == 201 and d.json()["state"] == "ready", d.text
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    body = {"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    got_b = hb.post("/v2/models/cnn/infer", json=body).json()["outputs"][0]["data"]
    got_a = wait_for(
        lambda: (r := ha.post("/v2/models/cnn/infer", json=body)).status_code == 200 and r.json(),
        60,
        "replica A to serve the deployment made through B",
        diagnose=procs.logs,
    )["outputs"][0]["data"]
    np.testing.assert_allclose(got_a, got_b, rtol=1e-6)
    assert ha.get("/v2/health/ready").status_code == 200 and hb.get("/v2/health/ready").status_code == 200
    # delete through A: B stops serving it by the Redis notification (the periodic check is an
    # hour away), within a bound that allows a loaded machine
    assert ha.delete("/v1/deployments/cnn").status_code == 204
    wait_for(
        lambda: hb.post("/v2/models/cnn/infer", json=body).status_code == 404,
        60,
        "replica B to stop serving the deleted deployment",
        diagnose=procs.logs,
    )
    # who is who, in metrics
    metrics = ha.get("/metrics").text
    assert "kiln_process_info{host=" in metrics and 'role="api"' in metrics
    # artifacts live in the bucket, by content address
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=cluster["s3"].url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kiln", Prefix="scale/sha256/").get("Contents", [])]
    assert len(keys) >= 4 and all(len(k.rsplit("/", 1)[1]) == 64 for k in keys)
