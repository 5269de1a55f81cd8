"""Attacks from model code on the sandbox: each must fail, and the failure must be the sandbox's doing.

These run as root (CI does); elsewhere the isolation is unavailable and says so in `notes`."""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path

import pytest

from workers import isolation
from workers.sandbox import MIN_MEMORY_BYTES, Limits, run_op

pytestmark = pytest.mark.skipif(not isolation.available(), reason="isolation needs root on Linux")


def attack(tmp_path: Path, body: str, **limits) -> dict:
    """Run `body` as a model's build function; it returns a dict of what it managed."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "model.py").write_text("import os, socket, signal, subprocess, pickle, time\n"
                                     "def build_model():\n" + textwrap.indent(body, "    ") + "\n")
    res = run_op("call_entry", {"bundle_dir": str(bundle), "entry": "model.py:build_model"}, tmp_path / "work",
                 limits=Limits(memory_bytes=MIN_MEMORY_BYTES * 2, timeout_s=60, **limits))
    assert res.notes == [], res.notes
    return res


def outcome(res) -> str:
    return res.error["message"] if res.error else res.reason


def test_writes_outside_the_working_directory_fail(tmp_path):
    victim = tmp_path / "outside.txt"
    res = attack(tmp_path, f"open({str(victim)!r}, 'w').write('x')")
    assert res.outcome == "error" and "Read-only file system" in outcome(res)
    assert not victim.exists()
    res = attack(tmp_path, "open('inside.txt', 'w').write('x')\nreturn None")
    assert res.outcome == "ok" and (tmp_path / "work" / "inside.txt").read_text() == "x"


def test_hidden_folders_look_empty_but_readable_paths_stay(tmp_path):
    data = tmp_path / "data"
    (data / "work" / "job1").mkdir(parents=True)
    (data / "admin-token").write_text("s3cret")
    (data / "kiln.db").write_text("db")
    (data / "work" / "job1" / "samples.txt").write_text("mine")
    res = attack(tmp_path, f"return print(sorted(os.listdir({str(data)!r}))) or open({str(data / 'admin-token')!r}).read()",
                 hide=(data,), readable=(data / "work" / "job1",))
    assert res.outcome == "error" and "No such file or directory" in outcome(res)
    assert "'admin-token'" not in res.log and "'kiln.db'" not in res.log
    res = attack(tmp_path, f"print(open({str(data / 'work' / 'job1' / 'samples.txt')!r}).read())\nreturn None",
                 hide=(data,), readable=(data / "work" / "job1",))
    assert res.outcome == "ok" and "mine" in res.log


@pytest.mark.parametrize("port", [6379, 5432])
def test_no_network_not_even_loopback_redis_or_postgres(tmp_path, port):
    res = attack(tmp_path, f"socket.create_connection(('127.0.0.1', {port}), timeout=3)")
    assert res.outcome == "error"
    assert "unreachable" in outcome(res).lower() or "refused" in outcome(res).lower()


def test_cannot_see_or_signal_the_worker(tmp_path):
    me = os.getpid()
    res = attack(tmp_path, f"print('pids', sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
                           f"os.kill({me}, signal.SIGKILL)")
    assert res.outcome == "error" and "ProcessLookupError" in res.reason
    pids = res.log.split("pids", 1)[1]
    assert str(me) not in pids  # its own /proc shows only the sandbox's processes


def test_no_capabilities_so_no_remount_and_no_escape(tmp_path):
    res = attack(tmp_path, "print(open('/proc/self/status').read())\n"
                           "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                           "rc = libc.mount(None, b'/', None, 32 | 4096, None)\n"
                           "return {'rc': rc, 'errno': ctypes.get_errno()}")
    assert res.outcome == "ok"
    assert "CapEff:\t0000000000000000" in res.log and "NoNewPrivs:\t1" in res.log
    assert res.result["value"]["rc"] != 0  # EPERM: the read-only view cannot be undone


def test_a_pickle_that_runs_a_shell_cannot_leave_a_marker_outside(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    res = attack(tmp_path, f"pickle.loads(open({str(tmp_path / 'evil.pkl')!r}, 'rb').read())\n"
                           "pickle.loads(pickle.dumps(0))\nreturn None")
    assert res.outcome == "ok"
    assert "Read-only file system" in res.log  # the shell ran, inside the sandbox, and failed
    assert not marker.exists()


def test_process_count_is_bounded(tmp_path):
    res = attack(tmp_path, "kids = []\n"
                           "try:\n"
                           "    for _ in range(200):\n"
                           "        kids.append(subprocess.Popen(['sleep', '30']))\n"
                           "except OSError as exc:\n"
                           "    return {'started': len(kids), 'error': str(exc)}\n"
                           "return {'started': len(kids)}", processes=24)
    assert res.outcome == "ok", res.reason
    assert res.result["value"]["started"] < 24 and "error" in res.result["value"]
