"""The sandbox with real child processes: each test writes a small misbehaving bundle and runs it."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from service.errors import InvalidEntryPoint, SandboxError
from workers.sandbox import MIN_MEMORY_BYTES, Limits, SandboxResult, run_op

QUICK = Limits(timeout_s=20, memory_bytes=MIN_MEMORY_BYTES, file_size_bytes=1 << 20)


def run_model(
    tmp_path: Path, body: str, limits: Limits = QUICK, entry: str = "model.py:build_model", **kw
) -> SandboxResult:
    """Run ``build_model`` (whose body is given) from a one-file bundle through the call_entry op."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    header = "import json, os, signal, sys, time\n\ndef build_model():\n"
    source = header + textwrap.indent(textwrap.dedent(body), "    ")
    (bundle / "model.py").write_text(source)
    args = {"bundle_dir": str(bundle), "entry": entry}
    return run_op("call_entry", args, tmp_path / "work", limits=replace(limits, readable=(bundle,)), **kw)


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie no one reaps counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_soon(pid: int, within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ok_returns_the_result_and_streams_output(tmp_path):
    lines = []
    body = "print('hello from the model')\nprint('bye', file=sys.stderr)\nreturn {}"
    res = run_model(tmp_path, body, on_output=lines.append)
    assert res.outcome == "ok", res.log
    assert res.ok and res.result == {"type": "dict", "value": {}} and res.error is None and res.returncode == 0
    assert res.raise_for_outcome() == {"type": "dict", "value": {}}
    assert "hello from the model" in res.log and "bye" in res.log
    assert lines == ["hello from the model", "bye"]
    from workers.sandbox import control_dir

    assert (control_dir(tmp_path / "work") / "output.log").read_text() == res.log


def test_exception_is_an_error_with_its_traceback(tmp_path):
    res = run_model(tmp_path, "raise ValueError('boom')")
    assert res.outcome == "error"
    assert res.reason == "model code raised ValueError: boom (model.py:4)"  # the model's own file and line
    assert res.error["type"] == "ValueError" and res.error["message"] == "boom"
    assert "build_model" in res.error["traceback"] and res.error["kiln_error"] is None
    with pytest.raises(SandboxError, match="model code raised ValueError: boom"):
        res.raise_for_outcome()


def test_missing_entry_point_is_reraised_as_invalid_entry_point(tmp_path):
    res = run_model(tmp_path, "return {}", entry="missing.py:build_model")
    assert res.outcome == "error" and res.error["kiln_error"] == "InvalidEntryPoint"
    with pytest.raises(InvalidEntryPoint, match="is not in the bundle"):
        res.raise_for_outcome()


def test_unknown_op_is_an_error(tmp_path):
    res = run_op("no_such_op", {}, tmp_path, limits=QUICK)
    assert res.outcome == "error" and res.error["type"] == "LookupError"
    assert "no_such_op" in res.reason


def test_hang_is_killed_at_the_timeout(tmp_path):
    start = time.monotonic()
    res = run_model(tmp_path, "time.sleep(3600)", Limits(timeout_s=3, memory_bytes=MIN_MEMORY_BYTES))
    # killed, not run to its end: the upper bounds leave room for a loaded machine, far below 3600 s
    assert time.monotonic() - start < 30
    assert res.outcome == "timeout" and res.reason == "model code ran longer than 3 s and was killed"
    assert res.returncode == -signal.SIGKILL and 3 <= res.duration_s < 3 + 15


def pids_running(marker: str) -> list[int]:
    """Processes (seen from here) whose command line holds `marker`: the sandbox may run in its own
    PID namespace, so the pids it records itself mean nothing out here."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def all_gone_soon(marker: str, within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while pids_running(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_timeout_kills_grandchildren(tmp_path):
    # os.system blocks on a shell that becomes the sleep; the odd duration marks it
    res = run_model(
        tmp_path,
        "os.system('echo started > grandchild.txt; exec sleep 3600.4242')",
        Limits(timeout_s=2, memory_bytes=MIN_MEMORY_BYTES),
    )
    assert res.outcome == "timeout"
    assert (tmp_path / "work" / "grandchild.txt").read_text().strip() == "started"
    assert all_gone_soon("3600.4242")


def test_background_processes_do_not_outlive_a_successful_op(tmp_path):
    res = run_model(tmp_path, "os.system('sleep 3600.4343 & echo $! > background.pid')\nreturn {}")
    assert res.outcome == "ok", res.log
    assert (tmp_path / "work" / "background.pid").read_text().strip().isdigit()
    assert all_gone_soon("3600.4343")


def test_cancel_kills_the_child(tmp_path):
    asked: list[float] = []
    said_yes: list[float] = []

    def cancel() -> bool:
        asked.append(time.monotonic())
        if len(asked) > 3:
            said_yes.append(time.monotonic())
            return True
        return False

    start = time.monotonic()
    res = run_model(tmp_path, "time.sleep(3600)", cancel=cancel)
    assert res.outcome == "canceled" and res.returncode == -signal.SIGKILL
    # killed soon after the cancel was seen (not left to its hour), however loaded the machine
    assert said_yes and time.monotonic() - said_yes[0] < 10, (said_yes, time.monotonic())
    assert time.monotonic() - start < 60


def test_unbounded_allocation_hits_the_memory_limit(tmp_path):
    res = run_model(tmp_path, "return bytearray(50 << 30)")
    assert res.outcome == "memory"
    assert res.reason == "model code exceeded the 1.0 GiB memory limit"


def test_sigkill_not_sent_by_the_parent_counts_as_memory(tmp_path):
    res = run_model(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert res.outcome == "memory" and "out-of-memory killer" in res.reason


def test_big_file_hits_the_file_size_limit(tmp_path):
    res = run_model(tmp_path, "open('big.bin', 'wb').write(b'x' * (2 << 20))")
    assert res.outcome == "file_size", res.reason
    assert res.reason == "model code tried to write a file larger than the 1.0 MiB limit"
    assert res.error["errno"] == 27  # EFBIG: Python ignores SIGXFSZ, so the write fails instead


def test_death_by_sigxfsz_is_file_size(tmp_path):
    body = "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\nopen('big.bin', 'wb').write(b'x' * (2 << 20))"
    res = run_model(tmp_path, body)
    assert res.outcome == "file_size" and res.returncode == -signal.SIGXFSZ


def test_segfault_is_a_crash(tmp_path):
    res = run_model(tmp_path, "os.kill(os.getpid(), signal.SIGSEGV)")
    assert res.outcome == "crashed" and res.returncode == -signal.SIGSEGV
    assert res.reason == "the sandbox process died with signal SIGSEGV"
    with pytest.raises(SandboxError, match="SIGSEGV"):
        res.raise_for_outcome()


def test_exit_without_result_is_a_crash(tmp_path):
    res = run_model(tmp_path, "os._exit(3)")
    assert res.outcome == "crashed" and res.returncode == 3
    assert "exited with code 3" in res.reason


def test_environment_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_SECRET", "hunter2")
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql://kiln:pw@db/kiln")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    limits = Limits(timeout_s=20, memory_bytes=MIN_MEMORY_BYTES, threads=1)
    res = run_model(tmp_path, "json.dump(dict(os.environ), open('env.json', 'w'))\nreturn {}", limits)
    assert res.outcome == "ok", res.log
    env = json.loads((tmp_path / "work" / "env.json").read_text())
    work = tmp_path / "work"
    assert "hunter2" not in json.dumps(env) and "pw@db" not in json.dumps(env)
    allowed = {
        "PATH",
        "LANG",
        "LC_ALL",
        "HOME",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONNOUSERSITE",
        "USER",
        "LOGNAME",
        "PWD",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "KILN_INSIDE_BOX",  # says only that the process is inside the box (service/runtimes)
    }
    # the interpreter itself may add LC_CTYPE when it coerces the C locale
    assert set(env) - {"LC_CTYPE"} <= allowed
    assert env["HOME"] == str(work) and env["TMPDIR"] == str(work / "tmp") and (work / "tmp").is_dir()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["PYTHONNOUSERSITE"] == env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"


def test_no_network_as_root(tmp_path):
    res = run_model(tmp_path, "open('net.txt', 'w').write(open('/proc/net/dev').read())\nreturn {}")
    assert res.outcome == "ok", res.log
    # Only a run outside the box (KILN_INSECURE_NO_SANDBOX) sees the host's network; notes about
    # cgroups (a box whose limits are rlimits only) say nothing about its network namespace.
    if not res.isolated:
        pytest.skip(f"ran without the isolation boundary: {res.notes}")
    rows = (tmp_path / "work" / "net.txt").read_text().splitlines()[2:]
    assert [row.split(":")[0].strip() for row in rows] == ["lo"]


def test_a_torch_model_fits_in_the_minimum_memory_limit(tmp_path):
    body = "import torch\nmodel = torch.nn.Linear(4, 4)\nmodel(torch.randn(2, 4))\nreturn model"
    res = run_model(tmp_path, body, Limits(timeout_s=60, memory_bytes=MIN_MEMORY_BYTES))
    assert res.outcome == "ok", res.log
    assert res.result["type"] == "Linear"


def test_memory_below_what_torch_needs_is_refused():
    with pytest.raises(ValueError, match="at least 1.0 GiB"):
        Limits(memory_bytes=512 << 20)


def test_without_bubblewrap_model_code_is_refused_unless_asked_for_loudly(tmp_path, monkeypatch):
    from service import boundary
    from service.config import get_settings
    from service.errors import SandboxUnavailable

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap to be found
    boundary._probe.cache_clear()
    get_settings.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap .*not installed.*apt-get install bubblewrap"):
            run_model(tmp_path, "return {}")
        monkeypatch.setenv("KILN_INSECURE_NO_SANDBOX", "true")
        get_settings.cache_clear()
        res = run_model(tmp_path, "return {'uid': os.getuid()}")
        assert res.outcome == "ok", res.log
        assert not res.isolated and any("UNISOLATED" in n for n in res.notes)
    finally:
        monkeypatch.undo()
        boundary._probe.cache_clear()
        get_settings.cache_clear()
