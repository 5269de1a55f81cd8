"""The artifact store: local directory and S3-compatible object storage (moto's server speaks the
S3 protocol over HTTP here, standing in for AWS S3, MinIO or Ceph)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import time

import pytest

from service.artifacts import ArtifactStore, S3Store
from service.errors import NotFound, PayloadTooLarge, StorageFull
from tests.service.procs import tmpfs


def test_local_store_is_content_addressed_and_atomic(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    data = os.urandom(3 << 20)
    sha, size = store.put_stream(io.BytesIO(data))
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data)
    assert store.path(sha).read_bytes() == data
    assert store.put_stream(io.BytesIO(data))[0] == sha  # stored once
    assert list((tmp_path / "a" / "tmp").iterdir()) == []  # nothing left half-written
    with pytest.raises(PayloadTooLarge):
        store.put_stream(io.BytesIO(data), limit=1 << 20)
    assert list((tmp_path / "a" / "tmp").iterdir()) == []
    with pytest.raises(NotFound):
        store.path("../../etc/passwd")
    d = tmp_path / "cand"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"onnx")
    (d / "kiln-artifact.json").write_text("{}")
    files = store.put_directory(d)
    out = store.materialize(files, tmp_path / "m" / "x")
    assert (out / "model.onnx").read_bytes() == b"onnx"


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@ROOT_ONLY
def test_a_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as small:
        store = ArtifactStore(small)
        with pytest.raises(StorageFull, match="No space left on device"):
            store.put_stream(io.BytesIO(os.urandom(2 << 20)))
        assert list((small / "tmp").iterdir()) == []
        assert not (small / "sha256").exists() or not any((small / "sha256").rglob("*"))


@ROOT_ONLY
def test_materialize_onto_another_filesystem_than_the_store(tmp_path):
    """Artifacts on their own volume, the serving cache in the data directory: the folder appears whole."""
    with tmpfs(tmp_path / "volume", "4m") as mounted:
        store = ArtifactStore(mounted)
        files = {
            "model.onnx": store.put_stream(io.BytesIO(b"graph"))[0],
            "kiln-artifact.json": store.put_stream(io.BytesIO(b"{}"))[0],
        }
        dest = store.materialize(files, tmp_path / "cache" / "abc")
        assert sorted(p.name for p in dest.iterdir()) == ["kiln-artifact.json", "model.onnx"]
        assert (dest / "model.onnx").read_bytes() == b"graph"
        assert store.materialize(files, dest) == dest  # already there: reused
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc"]  # no temporary folder left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a loopback port, with a bucket."""
    port = _free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
    mp = pytest.MonkeyPatch()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        mp.setenv(k, env[k])
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="kiln-test")
    yield url
    mp.undo()
    proc.kill()
    proc.wait()


def test_s3_store_shares_artifacts_between_hosts_through_their_caches(tmp_path, s3_endpoint):
    a = S3Store("s3://kiln-test/team", tmp_path / "host-a", endpoint_url=s3_endpoint)
    b = S3Store("s3://kiln-test/team", tmp_path / "host-b", endpoint_url=s3_endpoint)
    data = os.urandom(9 << 20)  # several parts
    sha, size = a.put_stream(io.BytesIO(data))
    assert size == len(data)
    assert not b.local_path(sha).exists() and b.exists(sha)
    assert b.path(sha).read_bytes() == data  # downloaded once into b's cache
    assert b.local_path(sha).is_file()
    assert b.s3.head_object(Bucket="kiln-test", Key=f"team/sha256/{sha[:2]}/{sha}")["ContentLength"] == len(data)
    with pytest.raises(NotFound):
        b.path("0" * 64)
    # a corrupt object is refused, not cached
    b.s3.put_object(Bucket="kiln-test", Key=f"team/sha256/{'1' * 2}/{'1' * 64}", Body=b"not what the name says")
    from service.errors import Unavailable

    with pytest.raises(Unavailable, match="corrupt"):
        b.path("1" * 64)
    assert not b.local_path("1" * 64).exists()
