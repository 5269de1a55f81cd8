"""The `kiln` command as a new user meets it: against a real `kiln up` (authentication on) on a free port
with its data in a directory of its own, run from another directory."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.service.procs import KilnUp, Processes, kiln_cli, user_env

pytestmark = pytest.mark.slow

BROKEN = """\
import torch


class Net(torch.nn.Module):
    def forward(self, x):
        return x * 2


def build_model():
    raise RuntimeError("broken on purpose")
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """One `kiln up` for the module; `.home` is its user's home, `.elsewhere` a directory with no data."""
    root = tmp_path_factory.mktemp("kiln-up")
    home = root / "home"
    home.mkdir()
    procs = Processes()
    # a data directory whose path is longer than a line of 80 columns (the banner must not wrap in it)
    server = procs.add(
        KilnUp(root / "data" / ("a-data-directory-with-a-rather-long-name-" * 2), user_env(home), root / "up.log")
    )
    server.home, server.elsewhere = home, root / "elsewhere"
    server.elsewhere.mkdir()
    try:
        yield server.start()
    finally:
        procs.close()


def kiln(up, *args: str, home=None, **env: str):
    return kiln_cli(*args, env={**user_env(home or up.home), **env}, cwd=up.elsewhere)


def test_every_command_that_talks_to_a_server_takes_server_and_token():
    import typer.main

    from workers.cli import app

    def walk(group, path=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, (*path, name))
            else:
                yield " ".join((*path, name)), {p.name: p for p in cmd.params}

    commands = dict(walk(typer.main.get_command(app)))
    talking = {
        name: params
        for name, params in commands.items()
        if ("server" in params or "remote" in params) and name != "token admin"
    }  # that one reads a file
    assert {"push", "job create", "job list", "job watch", "token create", "convert"} <= talking.keys()
    for name, params in talking.items():
        assert "token" in params, f"kiln {name} has no --token"
        assert params["token"].envvar == "KILN_TOKEN", name
        if "server" in params:
            assert params["server"].envvar == "KILN_SERVER", name


def test_token_and_server_options_and_their_environment_variables(up, tmp_path):
    stranger = tmp_path / "stranger"  # a user with no record of any kiln up
    stranger.mkdir()
    r = kiln(up, "job", "list", "--server", up.url, "--token", up.admin_token(), home=stranger)
    assert r.returncode == 0, r.stderr
    r = kiln(up, "job", "list", home=stranger, KILN_SERVER=up.url, KILN_TOKEN=up.admin_token())
    assert r.returncode == 0, r.stderr
    r = kiln(up, "job", "list", "--server", up.url, "--token", "kiln_not-a-real-token", home=stranger)
    assert r.returncode == 2 and "unknown or revoked" in r.stderr and "HTTP 401" in r.stderr, r.stderr


def test_the_cli_finds_a_kiln_up_on_any_port_with_any_data_dir(up):
    # no --server, no --token, no KILN_*: the CLI of the same user finds the server and its token
    r = kiln(up, "job", "list")
    assert r.returncode == 0, r.stdout + r.stderr
    r = kiln(up, "token", "admin")
    assert r.returncode == 0 and r.stdout.strip() == up.admin_token(), r.stderr


def test_job_create_watch_exits_1_when_the_job_fails(up, tmp_path):
    bundle = tmp_path / "broken.py"
    bundle.write_text(BROKEN)
    env = {"KILN_SERVER": up.url, "KILN_TOKEN": up.admin_token()}
    r = kiln(up, "push", str(bundle), "--name", "broken", "--input", "x:float32[1,4]", **env)
    assert r.returncode == 0, r.stderr
    r = kiln(up, "job", "create", "--model", "broken", "--target", "onnxruntime", "--watch", **env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed" in r.stdout and "RuntimeError: broken on purpose (broken.py:10)" in r.stdout, r.stdout
    assert "skipped" not in r.stdout + r.stderr, r.stdout + r.stderr  # the failure, not seven steps after it
    job_id = r.stdout.split()[1]
    r = kiln(up, "job", "watch", job_id, **env)
    assert r.returncode == 1, r.stdout + r.stderr
    r = kiln(up, "job", "retry", job_id, "--watch", **env)
    assert r.returncode == 1, r.stdout + r.stderr


ONE_INPUT = """\
import torch


class Net(torch.nn.Module):
    def forward(self, x):
        return x * 2


def build_model():
    return Net()
"""


@pytest.mark.parametrize(
    "source, inputs, says",
    [
        (
            "import torch\n\ndef build_model(:\n    pass\n",
            ["x:float32[1,4]"],
            ["model.py:3", "SyntaxError", "def build_model(:"],
        ),
        (
            ONE_INPUT,
            ["x:float32[1,4]", "y:float32[1,4]"],
            ["2 input(s) (x, y)", "Net.forward(x)", "model.py:5", "takes 1"],
        ),
        (ONE_INPUT, ["image:float32[1,4]"], ["input 1 is 'image' where forward has 'x'", "Net.forward(x)"]),
        (
            ONE_INPUT.replace("def build_model", "def make_model"),
            ["x:float32[1,4]"],
            ["defines no 'build_model'", "make_model"],
        ),
    ],
)
def test_bad_bundles_are_refused_at_upload_in_one_line(up, tmp_path, source, inputs, says):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.py").write_text(source)
    args = [a for spec in inputs for a in ("--input", spec)]
    r = kiln(up, "push", str(folder), "--name", "refused", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    for part in says:
        assert part in r.stderr, r.stderr
    # nothing was stored, and the same sentence comes from a local run
    headers = {"Authorization": f"Bearer {up.admin_token()}"}
    r = httpx.get(f"{up.url}/v1/models/refused", headers=headers)
    assert r.status_code == 404, r.text
    # the API's problem detail is the same one line
    sig = {"inputs": inputs}
    r = httpx.post(
        f"{up.url}/v1/models",
        headers=headers,
        data={"name": "refused", "signature": json.dumps(sig)},
        files={"file": ("model.py", source.encode())},
    )
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
    assert "\n" not in r.json()["detail"] and all(part in r.json()["detail"] for part in says), r.text
    r = kiln(up, "convert", str(folder), *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and all(part in r.stderr for part in says), r.stderr


def test_what_the_source_cannot_tell_is_left_to_the_sandbox(up, tmp_path):
    bundle = tmp_path / "varargs.py"
    bundle.write_text(ONE_INPUT.replace("def forward(self, x)", "def forward(self, *xs)").replace("x * 2", "xs[0]"))
    r = kiln(up, "push", str(bundle), "--name", "varargs", "--input", "a:float32[1,4]", "--input", "b:float32[1,4]")
    assert r.returncode == 0, r.stderr


def test_a_local_run_of_a_model_that_raises_says_where_in_one_line(tmp_path):
    bundle = tmp_path / "broken.py"
    bundle.write_text(BROKEN)
    r = kiln_cli(
        "convert",
        str(bundle),
        "--input",
        "x:float32[1,4]",
        "--out",
        str(tmp_path / "out"),
        env=user_env(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == "no candidate passed: model code raised RuntimeError: broken on purpose (broken.py:10)", r.stderr
    assert "skipped" not in r.stdout + r.stderr and "candidate " not in r.stdout, r.stdout + r.stderr


def test_help_keeps_its_examples_and_flags_take_no_value(tmp_path):
    env = user_env(tmp_path)
    r = kiln_cli("convert", "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "'x:float32[batch,3,224,224]'" in r.stdout, r.stdout
    r = kiln_cli("job", "create", "--help", env=env, cwd=tmp_path)
    watch = next(line for line in r.stdout.splitlines() if "--watch" in line)
    assert "<bool>" not in watch and "Follow the job" in watch, r.stdout


def test_a_gpu_job_waits_for_a_gpu_worker_instead_of_failing_on_a_cpu_one(up, tmp_path):
    from workers.compilers.gpu import cuda_device

    if cuda_device() is not None:
        pytest.skip("this machine has a CUDA device: its worker rightly takes the gpu queue")
    bundle = tmp_path / "one.py"
    bundle.write_text(ONE_INPUT)
    assert kiln(up, "push", str(bundle), "--name", "gpu-only", "--input", "x:float32[1,4]").returncode == 0
    r = kiln(up, "job", "create", "--model", "gpu-only", "--target", "tensorrt")
    assert r.returncode == 0, r.stderr
    assert "waiting for a worker on the gpu queue" in r.stdout, r.stdout
    job_id = r.stdout.split()[1]
    headers = {"Authorization": f"Bearer {up.admin_token()}"}
    time.sleep(8)  # the kiln up worker polls its queues continuously: it would have taken the job by now
    job = httpx.get(f"{up.url}/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued" and job["queue"] == "gpu", job
    assert "waiting for a worker on the gpu queue" in job["waiting"], job
    assert kiln(up, "job", "cancel", job_id).returncode == 0


def test_a_local_tensorrt_conversion_without_a_gpu_is_refused_at_once(tmp_path):
    from workers.compilers.gpu import cuda_device

    if cuda_device() is not None:
        pytest.skip("this machine has a CUDA device")
    bundle = tmp_path / "one.py"
    bundle.write_text(ONE_INPUT)
    started = time.monotonic()
    r = kiln_cli(
        "convert",
        str(bundle),
        "--input",
        "x:float32[1,4]",
        "--target",
        "tensorrt",
        "--out",
        str(tmp_path / "out"),
        env=user_env(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "needs a CUDA GPU" in r.stderr, r.stderr
    assert "worker" not in r.stderr.split("needs")[0] and "load" not in r.stdout, r.stdout + r.stderr
    # refused before anything was laid out: no copy of the bundle, no saved conversion state (a
    # refusal after load, capture and export would leave both); the clock is only a backstop
    work = tmp_path / "out" / ".work"
    assert not (work / "bundle").exists() and not (work / "state.json").exists(), sorted(tmp_path.rglob("*"))
    assert time.monotonic() - started < 120


def tiny_onnx(path):
    """y = relu(x @ W), x: float32[batch, 4] -> y: float32[batch, 3]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_models_deployments_and_inference_from_the_cli(up, tmp_path):
    import json

    import numpy as np

    model = tiny_onnx(tmp_path / "tiny.onnx")
    r = kiln(up, "model", "push", str(model), "--name", "tiny")
    assert r.returncode == 0 and "pushed tiny version 1" in r.stdout, r.stdout + r.stderr
    r = kiln(up, "model", "list")
    assert r.returncode == 0 and "tiny" in r.stdout, r.stdout + r.stderr
    assert json.loads(kiln(up, "model", "show", "tiny").stdout)["versions"][0]["kind"] == "onnx"
    r = kiln(up, "job", "create", "--model", "tiny", "--target", "onnxruntime", "--bench-seconds", "0.05", "--watch")
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split()[1]

    for _ in range(2):  # two versions of one deployment
        r = kiln(up, "deploy", "tiny-serve", "--job", job_id)
        assert r.returncode == 0 and "ready" in r.stdout, r.stdout + r.stderr
    r = kiln(up, "deployment", "list")
    assert r.returncode == 0 and "tiny-serve" in r.stdout, r.stdout
    assert "default version 2" in kiln(up, "deployment", "show", "tiny-serve").stdout
    r = kiln(up, "deployment", "rollback", "tiny-serve")
    assert r.returncode == 0 and "default version 1" in r.stdout, r.stdout + r.stderr
    r = kiln(up, "deployment", "set-default", "tiny-serve", "2")
    assert r.returncode == 0 and "default version 2" in r.stdout, r.stdout + r.stderr

    x = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], dtype=np.float32)
    expected = np.maximum(x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10), 0)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "x.json").write_text(json.dumps({"x": x.tolist()}))
    for name in ("x.npy", "x.npz", "x.json"):
        r = kiln(up, "infer", "tiny-serve", str(tmp_path / name), "--out", str(tmp_path / f"y-{name}.npz"))
        assert r.returncode == 0, r.stdout + r.stderr
        with np.load(tmp_path / f"y-{name}.npz") as got:
            np.testing.assert_allclose(got["y"], expected, rtol=1e-5)
    r = kiln(up, "infer", "tiny-serve", str(tmp_path / "x.npy"))
    assert r.returncode == 0 and "y float32[2, 3]" in r.stdout, r.stdout
    np.savez(tmp_path / "wrong.npz", image=x)
    r = kiln(up, "infer", "tiny-serve", str(tmp_path / "wrong.npz"))
    assert r.returncode == 2 and "has image but tiny-serve takes x" in r.stderr, r.stderr

    r = kiln(up, "model", "delete", "tiny", "--version", "1")  # a deployment uses it
    assert r.returncode != 0 and "error:" in r.stderr, r.stdout + r.stderr
    assert kiln(up, "deployment", "delete", "tiny-serve").returncode == 0
    assert kiln(up, "deployment", "show", "tiny-serve").returncode != 0
    r = kiln(up, "model", "delete", "tiny", "--version", "1")
    assert r.returncode == 0, r.stdout + r.stderr


def test_convert_remote_writes_what_a_local_run_writes(up, tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    r = kiln(
        up,
        "convert",
        str(model),
        "--remote",
        up.url,
        "--name",
        "tiny-remote",
        "--target",
        "onnxruntime",
        "--precision",
        "fp32,fp16",
        "--bench-seconds",
        "0.05",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "report.json").is_file() and (out / "summary.md").is_file()
    assert "onnxruntime-fp32" in (out / "summary.md").read_text()
    for name in ("onnxruntime-fp32", "onnxruntime-fp16"):
        assert (out / name / "model.onnx").is_file() and (out / name / "kiln-artifact.json").is_file(), name


def requiring_folder(root, requirements: list[str]):
    """A folder bundle whose kiln.yaml gives the entry point, the signature and `requirements`."""
    root.mkdir(parents=True)
    (root / "model.py").write_text(ONE_INPUT)
    (root / "kiln.yaml").write_text(
        json.dumps(
            {
                "entry": "model.py:build_model",
                "signature": {"inputs": ["x:float32[batch,4]"], "dims": {"batch": [1, 2, 4]}},
                "requirements": requirements,
            }
        )
    )
    return root


def test_requirements_are_checked_by_every_way_in(up, tmp_path):
    """`kiln push`, `kiln convert --remote` and a local `kiln convert` all refuse, in one line and with exit
    code 2, a bundle whose requirements the server (or this machine) does not meet, naming every unmet one."""
    import importlib.metadata

    numpy_version = importlib.metadata.version("numpy")  # `kiln up` runs in this environment
    folder = requiring_folder(tmp_path / "needs", ["kiln-no-such-package>=1", "numpy<1", "numpy>=1"])
    remote = ["convert", str(folder), "--remote", up.url, "--out", str(tmp_path / "remote")]
    for args, where in ((["push", str(folder), "--name", "needs"], "server"), (remote, "server")):
        r = kiln(up, *args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert f"bundle requires kiln-no-such-package>=1: not installed on this {where}" in r.stderr, r.stderr
        assert f"bundle requires numpy<1: this {where} has {numpy_version}" in r.stderr, r.stderr
        assert "numpy>=1" not in r.stderr, r.stderr
    r = kiln(up, "convert", str(folder), "--out", str(tmp_path / "local"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert "kiln-no-such-package>=1: not installed on this machine" in r.stderr, r.stderr
    assert f"numpy<1: this machine has {numpy_version}" in r.stderr, r.stderr
    headers = {"Authorization": f"Bearer {up.admin_token()}"}
    assert httpx.get(f"{up.url}/v1/models/needs", headers=headers).status_code == 404
    garbled = requiring_folder(tmp_path / "garbled", ["numpy>>1"])
    for args in (["push", str(garbled), "--name", "garbled"], ["convert", str(garbled), "--out", str(tmp_path / "g")]):
        r = kiln(up, *args)
        assert r.returncode == 2 and "'numpy>>1' is not a PEP 508 requirement" in r.stderr, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_folder_is_a_bundle_wherever_the_cli_takes_one(up, tmp_path):
    """The README lists folders as bundles: `kiln push`, `kiln convert --remote` (from inside the folder, as
    `.`) and a local `kiln convert` take one; a bundle that is not there is one line and exit code 2."""
    folder = requiring_folder(tmp_path / "folder-model", ["numpy>=1"])
    r = kiln(up, "push", str(folder), "--name", "folder-pushed")
    assert r.returncode == 0 and "pushed folder-pushed version 1 (python" in r.stdout, r.stdout + r.stderr
    quick = ["--target", "onnxruntime", "--precision", "fp32", "--bench-seconds", "0.05"]
    out = tmp_path / "remote"
    r = kiln_cli("convert", ".", "--remote", up.url, *quick, "--out", str(out), env=user_env(up.home), cwd=folder)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "report.json").is_file() and (out / "onnxruntime-fp32" / "model.onnx").is_file()
    headers = {"Authorization": f"Bearer {up.admin_token()}"}
    assert httpx.get(f"{up.url}/v1/models/folder-model", headers=headers).status_code == 200  # named after it
    r = kiln(up, "convert", str(folder), *quick, "--out", str(tmp_path / "local"))
    assert r.returncode == 0 and (tmp_path / "local" / "onnxruntime-fp32" / "model.onnx").is_file(), r.stderr
    missing = tmp_path / "not-there"
    for args in (
        ["push", str(missing), "--name", "missing"],
        ["convert", str(missing), "--remote", up.url],
        ["convert", str(missing)],
        ["push", str(folder), "--name", "missing", "--weights", str(tmp_path / "no-weights.safetensors")],
    ):
        r = kiln(up, *args)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr, r.stderr


def test_kiln_up_says_nothing_a_user_should_not_see(up):
    """Run last in this module, after jobs that failed and succeeded: the log of `kiln up` (a file, not a
    terminal) has no third-party warnings, no Celery task lines, no escape codes, and an unbroken banner."""
    log = up.log.read_text()
    for noise in (
        "SecurityWarning",
        "superuser privileges",
        "No hostname was supplied",
        "succeeded in",
        "Warning:",
        "\x1b[",
    ):
        assert noise not in log, f"{noise!r} in the log of kiln up:\n{log[-3000:]}"
    assert f"  data:     {up.data_dir.resolve()}\n" in log, log[:2000]
