"""Code-bearing artifacts attack the service: TorchScript that reads or writes host files when it is
validated, benchmarked or served (with an infer-only token), and ONNX with custom operators. Each
attack worked before TorchScript ran in isolated runners (service/runner.py)."""

from __future__ import annotations

import io
import json
import tempfile
import uuid
from pathlib import Path

import pytest

from service import boundary
from tests.service.test_auth import bearer, secure  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")
MAGIC = 7777

# Scripted, so the file read happens whenever the artifact runs: for one magic value the rest of the
# row gives a size and spells a path, and the answer is that file's bytes.
LEAK_SOURCE = f"""
import torch

class Leak(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x[0, 0]) == {MAGIC}:
            size = int(x[0, 1])
            path = ""
            for i in range(2, x.shape[1]):
                c = int(x[0, i])
                if c == 0:
                    break
                path += chr(c)
            data = torch.from_file(path, size=size, dtype=torch.uint8).to(torch.float32)
            return torch.nn.functional.pad(data, (0, x.shape[1] - size)).reshape(1, -1).expand(x.shape[0], -1)
        return x.to(torch.float32) * 2.0
"""

# A scripted module that build_model returns: running it writes a file.
WRITER_SOURCE = """
import torch

class Writer(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8).fill_(65)
        return self.linear(x)

def build_model():
    return torch.jit.script(Writer(MARKER))
"""


def scripted(tmp_path: Path, source: str, cls: str) -> bytes:
    import importlib.util

    import torch

    path = tmp_path / f"{cls.lower()}_src.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(getattr(module, cls)()), buf)
    return buf.getvalue()


WIDTH = 256


def magic_row(path: Path) -> list[int]:
    size = min(path.stat().st_size, 64)
    row = [MAGIC, size] + list(str(path).encode()) + [0]
    assert len(row) <= WIDTH
    return row + [0] * (WIDTH - len(row))


@pytest.fixture
def host_secret():
    path = Path(tempfile.gettempdir()) / f"kiln-test-secret-{uuid.uuid4().hex}"
    path.write_text("s3cret-" + uuid.uuid4().hex[:20])
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("kiln_env", ["sqlite"], indirect=True)
def test_a_torchscript_upload_cannot_read_host_files_when_served(secure, tmp_path, host_secret):  # noqa: F811 - the imported fixture
    from workers.jobrunner import run_job

    api, admin, token_file = secure
    manage = api.post(
        "/v1/tokens", headers=bearer(admin), json={"name": "m", "owner": "team-a", "scopes": ["manage"]}
    ).json()
    infer = api.post("/v1/tokens", headers=bearer(manage["token"]), json={"name": "app", "scopes": ["infer"]}).json()
    signature = {
        "inputs": [{"name": "x", "dtype": "int64", "shape": ["batch", WIDTH], "value_range": [0, 100]}],
        "outputs": [{"name": "y"}],
    }
    r = api.post(
        "/v1/models",
        headers=bearer(manage["token"]),
        data={"name": "leak", "signature": json.dumps(signature)},
        files={"file": ("leak.pt", scripted(tmp_path, LEAK_SOURCE, "Leak"))},
    )
    assert r.status_code == 201, r.text
    job = api.post(
        "/v1/jobs",
        headers=bearer(manage["token"]),
        json={"model": "leak", "targets": ["torchscript"], "precisions": ["fp32"], "bench_seconds": 0.05, "threads": 1},
    ).json()
    assert run_job(job["id"]) == "succeeded", api.get(f"/v1/jobs/{job['id']}", headers=bearer(manage["token"])).text
    r = api.post("/v1/deployments", headers=bearer(manage["token"]), json={"name": "leak", "job": job["id"]})
    assert r.status_code == 201 and r.json()["state"] == "ready", r.text

    def infer_row(row: list[int]):
        body = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "INT64", "data": row}]}
        return api.post("/v2/models/leak/infer", headers=bearer(infer["token"]), json=body)

    ok = infer_row([1] * WIDTH)
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"][:2] == [2.0, 2.0]
    for secret in (host_secret, token_file):  # a secret in the host's /tmp, and the admin token itself
        r = infer_row(magic_row(secret))
        leaked = bytes(int(v) for v in r.json()["outputs"][0]["data"][:8]) if r.status_code == 200 else b""
        assert secret.read_bytes()[:8] not in leaked, f"{secret} leaked through /v2"
        assert r.status_code >= 400, r.text
        assert secret.read_text()[:8] not in r.text
    # the deployment still serves afterwards
    assert infer_row([3] * WIDTH).status_code == 200


@pytest.mark.parametrize("kiln_env", ["sqlite"], indirect=True)
def test_torchscript_that_reads_a_host_file_at_validation_gets_nothing(api, tmp_path, host_secret):
    """Every run reads the secret: the eager reference (in the sandbox) fails to, and so the job
    fails, with no byte of the secret anywhere in what it reports."""
    from workers.jobrunner import run_job

    source = (
        LEAK_SOURCE.replace(f"if int(x[0, 0]) == {MAGIC}:", "if True:")
        .replace("size = int(x[0, 1])", f"size = {host_secret.stat().st_size}")
        .replace('path = ""', f"path = {str(host_secret)!r}")
        .replace("for i in range(2, x.shape[1]):", "for i in range(0):")
    )
    signature = {"inputs": [{"name": "x", "dtype": "int64", "shape": ["batch", WIDTH], "value_range": [0, 100]}]}
    r = api.post(
        "/v1/models",
        data={"name": "reader", "signature": json.dumps(signature)},
        files={"file": ("reader.pt", scripted(tmp_path, source, "Leak"))},
    )
    assert r.status_code == 201, r.text
    job = api.post(
        "/v1/jobs",
        json={
            "model": "reader",
            "targets": ["torchscript", "onnxruntime"],
            "precisions": ["fp32"],
            "bench_seconds": 0.05,
            "threads": 1,
        },
    ).json()
    assert run_job(job["id"]) == "failed"
    report = api.get(f"/v1/jobs/{job['id']}").text + api.get(f"/v1/jobs/{job['id']}/logs").text
    assert "No such file" in report, report[-2000:]  # the model's own error, its telling line
    assert host_secret.read_text() not in report


def test_a_scripted_module_from_build_model_writes_nothing_outside_the_box(tmp_path):
    from workers.engine import convert

    marker = Path(tempfile.gettempdir()) / f"kiln-test-marker-{uuid.uuid4().hex}"
    bundle = tmp_path / "writer.py"
    bundle.write_text(WRITER_SOURCE.replace("MARKER", repr(str(marker))))
    signature = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}], "outputs": [{"name": "y"}]}
    try:
        ctx = convert(
            bundle,
            tmp_path / "out",
            signature=signature,
            options={
                "targets": ["torchscript", "onnxruntime"],
                "precisions": ["fp32"],
                "bench_seconds": 0.05,
                "threads": 1,
            },
        )
        ran = [c for c in ctx.candidates if c.target == "torchscript" and c.validation is not None]
        assert ran, [(c.id, c.status, c.reason) for c in ctx.candidates]  # the module did run, in the box
        assert not marker.exists(), "a scripted module wrote a file on the host"
    finally:
        marker.unlink(missing_ok=True)


def _onnx_with_custom_op() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Exfiltrate", ["x"], ["y"], domain="com.evil.ops")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil.ops", 1)]
    )
    return model.SerializeToString()


@pytest.mark.parametrize("kiln_env", ["sqlite"], indirect=True)
def test_onnx_with_a_custom_operator_domain_is_refused_at_upload_and_stored_nowhere(api, kiln_env):
    from service.config import get_settings

    store = get_settings().artifact_dir
    before = sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []
    r = api.post("/v1/models", data={"name": "evil"}, files={"file": ("evil.onnx", _onnx_with_custom_op())})
    assert r.status_code == 400, r.text
    assert "com.evil.ops" in r.json()["detail"] and "custom" in r.json()["detail"]
    assert api.get("/v1/models/evil").status_code == 404
    after = sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []
    assert after == before


def test_an_onnx_artifact_with_a_custom_domain_is_refused_before_loading(tmp_path):
    from service import runtimes
    from service.errors import InvalidBundle
    from service.runtimes.base import ArtifactInfo

    (tmp_path / "model.onnx").write_bytes(_onnx_with_custom_op())
    ArtifactInfo(runtime="onnxruntime", file="model.onnx").save(tmp_path)
    with pytest.raises(InvalidBundle, match="custom"):
        runtimes.load(tmp_path)


def test_a_file_an_op_reports_must_be_a_plain_file_in_its_sandbox(tmp_path):
    from service.errors import ConversionError
    from workers.context import BundleInfo, Context
    from workers.sandboxed import produced, sandbox_dir

    ctx = Context(
        workdir=str(tmp_path / "work"),
        out_dir=str(tmp_path / "out"),
        bundle=BundleInfo(kind="python", root=str(tmp_path)),
        signature={"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}]},
    )
    box = sandbox_dir(ctx)
    (box / "ok.onnx").write_bytes(b"x")
    (box / "sub").mkdir()
    (box / "link.onnx").symlink_to("/etc/passwd")
    (box / "dirlink").symlink_to("/etc")
    assert produced(ctx, str(box / "ok.onnx")) == box / "ok.onnx"
    for bad in (
        "/etc/passwd",
        str(box / "link.onnx"),
        str(box / "dirlink" / "passwd"),
        str(box / "sub"),
        str(box / ".." / "work" / "sandbox" / "ok.onnx") + "/..",
        "relative.onnx",
    ):
        with pytest.raises(ConversionError):
            produced(ctx, bad)


def test_a_runner_that_speaks_nonsense_is_cut_off(tmp_path):
    import socket

    import orjson

    from service.runner import _HEADER, Channel, ChannelError

    for header in (
        {"tensors": [["y", "<f4", [1 << 50]]]},
        {"tensors": [["y", "<f4", [-1]]]},
        {"tensors": [["y", "|O", [1]]]},
        [1, 2],
        {"tensors": [["y", "<f4"]]},
    ):
        a, b = socket.socketpair()
        body = orjson.dumps(header)
        a.sendall(_HEADER.pack(len(body)) + body)
        with pytest.raises(ChannelError):
            Channel(b, max_bytes=1 << 30).recv()
        a.close()
        b.close()


def test_onnx_sparse_attribute_tensors_with_external_data_are_refused(tmp_path):
    from onnx import TensorProto, helper

    from service.errors import InvalidBundle
    from service.onnx_policy import check_onnx

    values = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    values.data_location = TensorProto.EXTERNAL
    values.ClearField("float_data")
    values.external_data.add(key="location", value="/etc/shadow")
    sparse = helper.make_sparse_tensor(values, helper.make_tensor("i", TensorProto.INT64, [1], [0]), [4])
    node = helper.make_node("Constant", [], ["y"], sparse_value=sparse)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(InvalidBundle, match="another file"):
        check_onnx(path)


def test_code_bearing_artifacts_load_in_process_only_inside_the_box(tmp_path, monkeypatch):
    """The in-process load that the sandboxed benchmark uses is refused anywhere else (the worker,
    the API), before the file is opened: a TorchScript artifact there goes through the runner."""
    from service import runtimes
    from service.errors import RuntimeUnavailable
    from service.runtimes.base import ArtifactInfo

    (tmp_path / "model.pt").write_bytes(b"not even read")
    ArtifactInfo(runtime="torchscript", file="model.pt").save(tmp_path)
    monkeypatch.delenv(runtimes.INSIDE_BOX, raising=False)
    with pytest.raises(RuntimeUnavailable, match="only inside the isolation boundary"):
        runtimes.load(tmp_path, isolated=False)
