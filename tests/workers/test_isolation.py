"""Attacks from model code on the isolation boundary (service/boundary.py): each must fail, and the
failure must be the boundary's doing. They run where bubblewrap can build the box (CI installs it)."""

from __future__ import annotations

import os
import pickle
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from service import boundary
from tests.service.procs import processes_matching, tmpfs, wait_for
from workers.sandbox import MIN_MEMORY_BYTES, Limits, run_op

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")


def attack(tmp_path: Path, body: str, *, limits: Limits | None = None, work: Path | None = None):
    """Run `body` as a model's build function; it returns a dict of what it managed."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "model.py").write_text(
        "import os, socket, signal, subprocess, pickle, time\n"
        "def build_model():\n" + textwrap.indent(body, "    ") + "\n"
    )
    limits = limits or Limits(memory_bytes=MIN_MEMORY_BYTES * 2, timeout_s=60)
    res = run_op(
        "call_entry",
        {"bundle_dir": str(bundle), "entry": "model.py:build_model"},
        work or tmp_path / "work",
        limits=Limits(**{**limits.__dict__, "readable": (bundle,)}),
    )
    assert res.isolated and not any("UNISOLATED" in n for n in res.notes), res.notes
    return res


def outcome(res) -> str:
    return res.error["message"] if res.error else res.reason


@pytest.fixture
def host_secret():
    """A secret in the host's temporary directory, where other processes leave theirs."""
    path = Path(tempfile.gettempdir()) / f"kiln-test-secret-{uuid.uuid4().hex}"
    path.write_text("s3cret-" + uuid.uuid4().hex)
    yield path
    path.unlink(missing_ok=True)


def test_host_files_outside_the_bundle_cannot_be_read(tmp_path, host_secret):
    log = tmp_path / "kiln-up.log"  # what `kiln up > kiln-up.log` leaves: it holds the admin token
    log.write_text("admin token: kiln_s3cret\n")
    res = attack(
        tmp_path,
        textwrap.dedent(f"""\
        found = {{}}
        for path in ({str(host_secret)!r}, {str(log)!r}, '/root/.bash_history', '/etc/shadow', '/etc/hostname'):
            try:
                found[path] = open(path).read()
            except OSError as exc:
                found[path] = type(exc).__name__
        found['/root'] = sorted(os.listdir('/root')) if os.path.isdir('/root') else []
        found['/tmp'] = sorted(os.listdir('/tmp'))
        found['/etc'] = sorted(os.listdir('/etc'))
        return found"""),
    )
    assert res.outcome == "ok", res.log
    found = res.result["value"]
    assert found[str(host_secret)] == "FileNotFoundError" and found[str(log)] == "FileNotFoundError"
    assert found["/etc/shadow"] == "FileNotFoundError" and found["/root/.bash_history"] == "FileNotFoundError"
    assert "s3cret" not in res.log and "s3cret" not in str(found)
    # what is there: only the Python installation's parents, the box's own scratch, the loader's files
    assert host_secret.name not in found["/tmp"] and "shadow" not in found["/etc"] and "passwd" not in found["/etc"]


def test_proc_sys_is_read_only_and_the_box_is_not_root(tmp_path):
    res = attack(
        tmp_path,
        textwrap.dedent("""\
        return {'uid': os.getuid(), 'euid': os.geteuid(),
                'core_pattern': os.access('/proc/sys/kernel/core_pattern', os.W_OK),
                'sysrq': os.access('/proc/sysrq-trigger', os.W_OK),
                'proc_sys_writable_dirs': [d for d, _, _ in os.walk('/proc/sys/kernel') if os.access(d, os.W_OK)][:3]}"""),
    )
    assert res.outcome == "ok", res.log
    got = res.result["value"]
    assert got["core_pattern"] is False and got["sysrq"] is False and got["proc_sys_writable_dirs"] == []
    assert got["uid"] != 0 and got["euid"] != 0


def test_on_the_host_the_box_runs_as_an_unprivileged_user(tmp_path):
    """Seen from the host (not through the box's own user namespace), model code is not root."""
    marker = uuid.uuid4().hex
    done: dict = {}
    thread = threading.Thread(
        target=lambda: done.update(
            res=attack(tmp_path, f"time.sleep(4)  # {marker}\nreturn {{}}", work=tmp_path / f"work-{marker}")
        )
    )
    thread.start()
    try:
        pids = wait_for(lambda: processes_matching("workers.sandbox_child", marker), 30, "the boxed process")
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            caps = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
            assert "0" not in uids and int(caps, 16) == 0, status
    finally:
        thread.join()
    assert done["res"].outcome == "ok"


def test_writes_outside_the_working_directory_do_not_reach_the_host(tmp_path, host_secret):
    victim = tmp_path / "outside.txt"
    res = attack(tmp_path, f"open({str(victim)!r}, 'w').write('x')\nopen({str(host_secret)!r}, 'w').write('pwned')")
    assert not victim.exists() and "pwned" not in host_secret.read_text()
    res = attack(tmp_path, f"open({str(tmp_path / 'bundle' / 'model.py')!r}, 'a').write('#')")
    assert res.outcome == "error" and ("Read-only file system" in outcome(res) or "Permission denied" in outcome(res))
    assert not (tmp_path / "bundle" / "model.py").read_text().endswith("#")
    res = attack(tmp_path, "open('inside.txt', 'w').write('x')\nreturn None")
    assert res.outcome == "ok" and (tmp_path / "work" / "inside.txt").read_text() == "x"


def test_the_data_directory_and_the_artifact_store_are_not_there(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "artifacts").mkdir(parents=True)
    (data / "admin-token").write_text("kiln_s3cret")
    (data / "kiln.db").write_text("db")
    res = attack(tmp_path, f"return {{'exists': os.path.exists({str(data)!r})}}")
    assert res.outcome == "ok" and res.result["value"] == {"exists": False}


@pytest.mark.parametrize("port", [6379, 5432])
def test_no_network_not_even_loopback_redis_or_postgres(tmp_path, port):
    res = attack(tmp_path, f"socket.create_connection(('127.0.0.1', {port}), timeout=3)")
    assert res.outcome == "error"
    assert "unreachable" in outcome(res).lower() or "refused" in outcome(res).lower()


def test_cannot_see_or_signal_the_worker(tmp_path):
    me = os.getpid()
    res = attack(
        tmp_path, f"print('pids', sorted(p for p in os.listdir('/proc') if p.isdigit()))\nos.kill({me}, signal.SIGKILL)"
    )
    assert res.outcome == "error" and "ProcessLookupError" in res.reason
    pids = res.log.split("pids", 1)[1]
    assert str(me) not in pids  # its own /proc shows only the box's processes


def test_no_capabilities_so_no_remount_and_no_escape(tmp_path):
    res = attack(
        tmp_path,
        "print(open('/proc/self/status').read())\n"
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "rc = libc.mount(None, b'/', None, 32 | 4096, None)\n"
        "nested = libc.unshare(0x10000000)\n"  # CLONE_NEWUSER: no nested user namespace
        "return {'rc': rc, 'nested': nested}",
    )
    assert res.outcome == "ok", res.log
    assert "CapEff:\t0000000000000000" in res.log and "NoNewPrivs:\t1" in res.log
    assert res.result["value"]["rc"] != 0 and res.result["value"]["nested"] != 0


def test_a_pickle_that_runs_a_shell_cannot_leave_a_marker_outside(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    res = attack(tmp_path, f"pickle.loads(open({str(tmp_path / 'bundle' / 'evil.pkl')!r}, 'rb').read())\nreturn None")
    assert res.outcome == "ok", res.log
    assert not marker.exists()


def test_process_count_is_bounded_at_its_default(tmp_path):
    limits = Limits(memory_bytes=MIN_MEMORY_BYTES * 2, timeout_s=60)
    res = attack(
        tmp_path,
        "kids = []\n"
        "try:\n"
        "    for _ in range(600):\n"
        "        kids.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as exc:\n"
        "    return {'started': len(kids), 'error': str(exc)}\n"
        "return {'started': len(kids)}",
        limits=limits,
    )
    assert res.outcome == "ok", res.reason
    assert res.result["value"]["started"] < limits.processes and "error" in res.result["value"]


def test_memory_is_bounded_at_its_default_half_of_this_machine(tmp_path):
    half = boundary.default_memory_bytes()
    assert half <= boundary.total_memory_bytes() // 2
    gib = half // (1 << 30) + 2  # more than the default allows, less than the machine has
    res = attack(
        tmp_path,
        textwrap.dedent(f"""\
        import numpy as np
        keep = []
        for i in range({gib}):
            keep.append(np.ones(1 << 27))  # 1 GiB, touched
            print('GiB', i + 1, flush=True)
        return {{'allocated': len(keep)}}"""),
        limits=Limits(timeout_s=120),
    )
    assert res.outcome == "memory", (res.outcome, res.reason, res.log[-300:])
    assert f"GiB {gib}" not in res.log


def test_disk_is_bounded_at_its_default_half_of_the_free_space(tmp_path):
    with tmpfs(tmp_path / "small", "96m") as small:
        quota = boundary.default_disk_bytes(small)
        assert quota <= 48 << 20
        res = attack(
            tmp_path,
            textwrap.dedent("""\
            with open('big.bin', 'wb') as f:
                for _ in range(90):
                    f.write(b'x' * (1 << 20))
                    f.flush()
                    time.sleep(0.03)
            return {}"""),
            limits=Limits(timeout_s=60),
            work=small / "work",
        )
        assert res.outcome in ("disk", "file_size"), (res.outcome, res.reason)
        big = small / "work" / "big.bin"
        assert not big.exists() or big.stat().st_size <= quota


def test_a_leftover_box_of_an_earlier_attempt_is_killed_before_the_next_runs(tmp_path):
    """The box's cgroup is named after its work: a second run in the same working directory first
    kills whatever the first left (as if its supervisor had died without cleaning up)."""
    from service.boundary import Box, _Cgroups

    work = (tmp_path / "work").resolve()
    notes: list[str] = []
    leftover = _Cgroups.create(Box(name=f"op:{work}"), notes)
    if leftover is None:
        pytest.skip(f"no cgroups here: {notes}")
    import subprocess

    stray = subprocess.Popen(
        ["sleep", "60"],
        preexec_fn=lambda: [os.write(fd := os.open(leftover.procs_files()[0], os.O_WRONLY), b"0"), os.close(fd)],
    )
    try:
        assert attack(tmp_path, "return {}", work=work).outcome == "ok"
        assert stray.wait(timeout=5) == -9
    finally:
        if stray.poll() is None:
            stray.kill()
        leftover.remove()


def test_a_box_weighs_as_much_as_a_process_using_every_cpu(tmp_path):
    """Under load, a box (a serving runner, say) gets the CPU share of as many busy threads as the
    machine has CPUs, not that of one thread: cgroup v1 counts a child cgroup as one entity of
    weight 1024 beside every process of the service's own cgroup. On v2 the service sits in a leaf
    of its own, a sibling of equal default weight, and nothing needs setting."""
    from service.boundary import BOX_CPU_SHARES, Box, _Cgroups

    notes: list[str] = []
    cg = _Cgroups.create(Box(name=f"op:{(tmp_path / 'work').resolve()}"), notes)
    if cg is None:
        pytest.skip(f"no cgroups here: {notes}")
    try:
        if cg.v2:
            weight, service = cg.dirs["v2"] / "cpu.weight", cg.dirs["v2"].parent / "kiln-service" / "cpu.weight"
            if weight.exists() and service.exists():
                assert (
                    weight.read_text().strip()
                    == (cg.dirs["v2"].parent / "kiln-service" / "cpu.weight").read_text().strip()
                )
        elif "cpu" not in cg.dirs:
            pytest.skip("no v1 cpu controller here")
        else:
            shares = int((cg.dirs["cpu"] / "cpu.shares").read_text())
            assert shares == BOX_CPU_SHARES == 1024 * (os.cpu_count() or 1)
            assert shares > int((cg.dirs["cpu"].parent / "cpu.shares").read_text()) or os.cpu_count() == 1
    finally:
        cg.remove()


def test_a_job_may_set_its_own_memory_limit(tmp_path):
    from service.errors import KilnError
    from workers.engine import convert

    bundle = tmp_path / "hungry.py"
    bundle.write_text(
        "import numpy as np, torch\n"
        "def build_model():\n"
        "    build_model.keep = np.ones(3 << 27)  # 3 GiB, touched\n"
        "    return torch.nn.Linear(4, 4)\n"
    )
    signature = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]}
    try:
        ctx = convert(
            bundle,
            tmp_path / "out",
            signature=signature,
            options={"targets": ["onnxruntime"], "memory_limit_bytes": 2 << 30, "bench_seconds": 0.05},
        )
        load = ctx.step("load")
        assert load.status == "failed" and "2.0 GiB memory limit" in (load.error or ""), load
    except KilnError as exc:  # the pipeline may raise the step's error instead
        assert "2.0 GiB memory limit" in str(exc)


def test_links_left_in_the_working_directory_do_not_steer_the_worker(tmp_path):
    """The box's working directory survives from op to op; the worker (root) must never follow what
    the box left there: the request, result and log live beside it, out of the box's reach."""
    from workers.sandbox import control_dir

    victim = tmp_path / "victim"
    victim.write_text("precious")
    work = tmp_path / "work"
    body = (
        "for name in ('request.json', 'result.json', 'output.log', '.sandbox'):\n"
        f"    os.symlink({str(victim)!r}, name)\n"
        f"open({str(control_dir(work) / 'result.json')!r}, 'w').write('{{}}')\n"
    )
    res = attack(tmp_path, body, work=work)
    assert res.outcome == "error"  # the control directory is not there to write in
    res = attack(tmp_path, "return {'again': True}", work=work)
    assert res.outcome == "ok" and res.result["value"] == {"again": True}
    assert victim.read_text() == "precious"


def test_deleted_files_still_open_count_against_the_disk_quota(tmp_path):
    with tmpfs(tmp_path / "small", "96m") as small:
        res = attack(
            tmp_path,
            textwrap.dedent("""\
            keep = []
            for i in range(8):
                f = open(f'f{i}', 'wb')
                for _ in range(10):
                    f.write(b'x' * (1 << 20))
                    f.flush()
                os.unlink(f'f{i}')  # gone from every listing, still taking space
                keep.append(f)
                time.sleep(0.3)
            time.sleep(240)  # still open: however late the watcher looks, only its kill ends this
            return {}"""),
            limits=Limits(timeout_s=300),
            work=small / "work",
        )
        assert res.outcome == "disk", (res.outcome, res.reason)


def test_the_root_and_dev_shm_are_bounded_too(tmp_path):
    res = attack(
        tmp_path,
        textwrap.dedent("""\
        found = {}
        for path in ('/evil', '/dev/evil', '/usr/evil'):
            try:
                open(path, 'w').write('x')
                found[path] = 'written'
            except OSError as exc:
                found[path] = exc.strerror
        try:
            with open('/dev/shm/big', 'wb') as f:
                for _ in range(400):
                    f.write(b'x' * (1 << 20))
            found['shm'] = 'written'
        except OSError as exc:
            found['shm'] = exc.strerror
        return found"""),
    )
    assert res.outcome == "ok", res.log
    found = res.result["value"]
    assert all(v != "written" for v in found.values()), found
    assert found["shm"] == "No space left on device"
