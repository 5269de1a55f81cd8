"""The isolation boundary: the one place that says what untrusted code can see and use.

Everything a user supplies that can run code (model source, pickles, TorchScript, `.pt2`) runs in
a process started here, inside bubblewrap (`bwrap`, the sandbox Flatpak uses):

- a user namespace, entered as an unprivileged user of the host (`KILN_SANDBOX_UID`, `nobody` by
  default) with every capability dropped and `no_new_privs`; no nested user namespaces;
- no network (not even loopback), its own PID, IPC and UTS namespaces, a new session;
- a filesystem that is empty but for what is bound into it read-only: the system's `/usr` and
  libraries, the Python environment, Kiln's own packages, and the paths the caller names (a bundle,
  an artifact); one writable working directory when the caller names one, and a size-limited tmpfs
  on `/tmp`. Nothing else of the host: no `/root`, no host `/tmp`, no data directory, no logs;
- a private `/proc` whose `/proc/sys` is read-only, and a minimal `/dev`;
- a cgroup (v2, or v1 controllers) bounding memory, processes and CPU, named after the work so that a
  leftover of an earlier attempt is killed before the next one starts;
- death with its owner, done by the kernel: `bwrap` gets SIGKILL when the thread that started it
  goes (PR_SET_PDEATHSIG, set after dropping privileges), and `--die-with-parent` takes the box
  down with `bwrap`. The box's processes live in their own PID namespace, which ends with its init.

Where bubblewrap or namespaces are missing, `check()` says what is missing and how to install it,
and nothing untrusted runs, unless `KILN_INSECURE_NO_SANDBOX=true` says to run it unisolated
(rlimits, a scrubbed environment and death with the owner only); callers record that it did.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from service.config import get_settings
from service.errors import SandboxUnavailable

INSECURE_SETTING = "KILN_INSECURE_NO_SANDBOX"
UNISOLATED_NOTE = f"ran UNISOLATED: {INSECURE_SETTING}=true, so model code could reach this host"
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap); "
    "in a container, allow user namespaces (see docker-compose.yml)"
)
# Where Kiln's own packages appear inside the box when they are not installed in the environment.
KILN_ROOT_INSIDE = "/opt/kiln"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


# --- the machine ---------------------------------------------------------------------------------


def total_memory_bytes() -> int:
    """This host's RAM, or the memory limit of the cgroup this process runs in when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    own = _own_cgroup_memory_limit()
    return min(total, own) if own else total


def default_memory_bytes() -> int:
    """Half of this machine's memory: one job cannot take it all."""
    return total_memory_bytes() // 2


def default_disk_bytes(directory: Path) -> int:
    """Half of the free space where the box writes: one job cannot fill the disk."""
    directory = Path(directory)
    while not directory.exists():
        directory = directory.parent
    return shutil.disk_usage(directory).free // 2


def _own_cgroup_memory_limit() -> int | None:
    for ctl in _Cgroups.own_dirs(("memory",)):
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = _read(ctl / name).strip()
            if text.isdigit() and int(text) < (1 << 60):
                return int(text)
    return None


# --- what a box is -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """What one boxed process sees and may use."""

    name: str  # names its cgroup: a box of the same name left over from an earlier attempt is killed first
    read_only: tuple[Path, ...] = ()  # paths visible read-only, at the same place as on the host
    writable: Path | None = None  # the one writable directory, at the same place as on the host
    chdir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # the whole environment, besides PATH and locale
    memory_bytes: int | None = None  # cgroup memory limit (None: half of this machine's memory)
    processes: int = 256  # processes and threads
    cpus: float | None = None  # CPU time, in cores (None: no limit)
    tmp_bytes: int = 256 << 20  # the tmpfs on /tmp (its pages count as the box's memory)
    file_size_bytes: int | None = None  # RLIMIT_FSIZE: the largest file the box may write
    gpu: bool = False  # bind the host's NVIDIA devices


@dataclass
class Boxed:
    """A started box: its process (bwrap, or the command itself when unisolated) and its cgroup."""

    proc: subprocess.Popen
    cgroups: _Cgroups | None
    notes: list[str]
    isolated: bool

    def oom_killed(self) -> bool:
        """Whether the kernel killed something in the box for its memory limit."""
        return self.cgroups is not None and self.cgroups.oom_kills() > 0

    def kill(self) -> None:
        """Kill everything in the box; safe to call more than once."""
        if self.cgroups is not None:
            self.cgroups.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def release(self) -> None:
        """After the process was waited for: kill leftovers (by cgroup: its process group id may be
        another process's by now) and remove the cgroup."""
        if self.cgroups is not None:
            self.cgroups.kill()
            self.cgroups.remove()


def insecure() -> bool:
    """Whether running untrusted code without the boundary was asked for, loudly."""
    return bool(get_settings().insecure_no_sandbox)


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """Why the boundary cannot be built on this host, or None when it can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}"
    for tool in ("unshare", "setpriv", "mount") if os.geteuid() == 0 else ():
        if shutil.which(tool) is None:
            return f"util-linux's {tool} is not installed (Debian: apt-get install util-linux mount)"
    argv = _bwrap_command(["/bin/true"], Box(name="probe", read_only=(Path(sys.executable).parent,)))
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap could not start: {exc}"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return f"bubblewrap cannot create its namespaces here ({why[0]}); {INSTALL_HINT}"
    return None


def check() -> None:
    """Raise SandboxUnavailable, saying what is missing and how to install it, unless untrusted code can
    run inside the boundary here or running it unisolated was asked for."""
    why = _probe()
    if why is not None and not insecure():
        raise SandboxUnavailable(
            f"refusing to run untrusted model code: {why}; or, on a single-user machine "
            f"only, set {INSECURE_SETTING}=true to run it without isolation"
        )


def available() -> bool:
    """Whether the boundary can be built here."""
    return _probe() is None


# --- starting a box ------------------------------------------------------------------------------

# Boxes are started from this one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
# forked a process ends, and a box must live as long as its owner process, not as a request thread.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-box-spawner")


def _new_spawner() -> None:
    """In a forked child (a Celery pool process) the parent's spawner thread does not exist."""
    global _spawner
    _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-box-spawner")


os.register_at_fork(after_in_child=_new_spawner)


def start(
    argv: Sequence[str],
    box: Box,
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    pass_fds: Sequence[int] = (),
) -> Boxed:
    """Start `argv` inside the boundary (or, when asked for loudly, unisolated). Raises
    SandboxUnavailable when neither is possible. `pass_fds` are inherited at the same numbers."""
    check()
    isolated = _probe() is None
    notes: list[str] = [] if isolated else [UNISOLATED_NOTE]
    cgroups = _Cgroups.create(box, notes)
    if isolated and os.geteuid() == 0:
        for path in box.read_only:
            _grant_read(Path(path))
    try:
        command = _bwrap_command(argv, box) if isolated else list(argv)
        preexec = _preexec(box, cgroups.procs_files() if cgroups else [])
        env = _environment(box, isolated)
        proc = _spawner.submit(
            subprocess.Popen,
            command,
            env=env,
            cwd=str(box.chdir) if (box.chdir and not isolated) else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=preexec,
        ).result()
    except BaseException:
        if cgroups is not None:
            cgroups.remove()
        raise
    return Boxed(proc, cgroups, notes, isolated)


def _grant_read(path: Path) -> None:
    """Let the sandbox user's group read `path` (files the service wrote 0600, an artifact in a
    private data directory): only boxes that bind it see it, and only read-only."""
    gid = sandbox_uid()
    for root, dirs, files in os.walk(path):
        for name, extra in (
            (root, 0o050),
            *((os.path.join(root, d), 0o050) for d in dirs),
            *((os.path.join(root, f), 0o040) for f in files),
        ):
            try:
                st = os.lstat(name)
                if (st.st_mode & 0o170000) == 0o120000:  # a link: its target is not ours to open up
                    continue
                if st.st_gid != gid:
                    os.chown(name, -1, gid)
                if st.st_mode & extra != extra:
                    os.chmod(name, (st.st_mode & 0o7777) | extra)
            except OSError:
                pass


def _environment(box: Box, isolated: bool) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if "LC_ALL" in os.environ:
        env["LC_ALL"] = os.environ["LC_ALL"]
    env.update(box.env)
    if not isolated and env.get("PYTHONPATH") == KILN_ROOT_INSIDE:
        env["PYTHONPATH"] = str(_PACKAGE_ROOT)
    return env


def _base_args() -> list[str]:
    return [
        "--unshare-user",
        "--disable-userns",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "kiln-sandbox",
        "--uid",
        str(sandbox_uid()),
        "--gid",
        str(sandbox_uid()),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]


def _system_binds() -> list[str]:
    """The system's programs and libraries, read-only; nothing else of the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # the dynamic loader's cache and the few /etc files libraries read; no passwd, no secrets
    for path in (
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
        "/etc/alternatives",
        "/etc/nsswitch.conf",
    ):
        args += ["--ro-bind-try", path, path]
    # how many CPUs there are and their caches, for the thread pools of torch and ONNX Runtime
    args += ["--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
    return args


def python_paths() -> list[Path]:
    """The Python environment the box needs: the interpreter's installation and the virtual environment."""
    named = [Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent]
    # as named (the interpreter is started by that path, and a venv is found from it) and as resolved
    paths = {p.absolute() for p in named} | {p.resolve() for p in named} | {Path(sys.executable).resolve().parent}
    return sorted(p for p in paths if p.exists() and not _under_system(p))


def _under_system(path: Path) -> bool:
    return path == Path("/usr") or Path("/usr") in path.parents


def kiln_packages() -> list[Path]:
    """Kiln's own packages, when they are not inside the Python environment (an editable install)."""
    inside = python_paths()
    return [
        p
        for p in (_PACKAGE_ROOT / "service", _PACKAGE_ROOT / "workers")
        if p.is_dir() and not any(base in p.parents for base in inside)
    ]


def python_env(home: str) -> dict[str, str]:
    """The environment a Python program in the box needs; nothing of the caller's (no KILN_* secrets)."""
    return {
        "HOME": home,
        "TMPDIR": "/tmp",
        "USER": "kiln",
        "LOGNAME": "kiln",
        "PYTHONPATH": KILN_ROOT_INSIDE,
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _bwrap_command(argv: Sequence[str], box: Box) -> list[str]:
    """The command that starts `argv` in `box`.

    As root, bubblewrap runs as the unprivileged sandbox user, which cannot reach private paths (the
    Python installation under /root, a job's directory in the data directory) by name. So util-linux
    `unshare` first gives the launcher a private mount namespace, where `mount --bind` (as root) puts
    each path the box needs at a neutral place; `setpriv` then drops to the sandbox user (and sets
    the parent-death signal, which a uid change clears) and execs bwrap, which binds them from there.
    The host's mounts never change. One process throughout: each step execs the next."""
    binds: list[tuple[str, Path, str]] = [("--ro-bind", p, str(p)) for p in python_paths()]
    binds += [("--ro-bind", pkg, f"{KILN_ROOT_INSIDE}/{pkg.name}") for pkg in kiln_packages()]
    for path in box.read_only:
        path = Path(path)
        inside_writable = box.writable is not None and (path == box.writable or box.writable in path.parents)
        if path.exists() and not inside_writable:
            binds.append(("--ro-bind", path, str(path)))
    if box.writable is not None:
        binds.append(("--bind", box.writable, str(box.writable)))
    # Every place the box may write is bounded: /tmp and /dev/shm are sized tmpfs, the root (a tmpfs
    # bwrap makes, which the box would own) goes read-only at the end.
    args = [
        "bwrap",
        *_base_args(),
        *_system_binds(),
        "--size",
        str(box.tmp_bytes),
        "--tmpfs",
        "/tmp",
        "--size",
        str(box.tmp_bytes),
        "--tmpfs",
        "/dev/shm",
    ]
    stage_lines: list[str] = []
    if os.geteuid() == 0:
        stage = _stage_dir([src for _, src, _ in binds])
        stage_lines.append(f"mount -t tmpfs -o mode=755,size=64k kiln-stage {stage}")
        for i, (option, src, dest) in enumerate(binds):
            stage_lines.append(f"mkdir {stage}/{i} && mount --rbind {shlex.quote(str(src))} {stage}/{i}")
            args += [option, f"{stage}/{i}", dest]
    else:
        for option, src, dest in binds:
            args += [option, str(src), dest]
    if box.gpu:
        for dev in sorted(Path("/dev").glob("nvidia*")):
            args += ["--dev-bind-try", str(dev), str(dev)]
    if box.chdir is not None:
        args += ["--chdir", str(box.chdir)]
    args += ["--remount-ro", "/dev", "--remount-ro", "/"]
    command = [*args, "--", *argv]
    if os.geteuid() != 0:
        return command
    uid = str(sandbox_uid())
    launcher = (
        " && ".join(stage_lines)
        + " && exec setpriv --reuid "
        + uid
        + " --regid "
        + uid
        + " --clear-groups --pdeathsig KILL "
        + " ".join(shlex.quote(a) for a in command)
    )
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", launcher]


def _stage_dir(sources: Sequence[Path]) -> str:
    """An existing, unneeded directory to cover with the staging tmpfs (only in the launcher's own
    mount namespace): none of the paths to bind may lie under it."""
    for candidate in ("/srv", "/mnt", "/media", "/opt", "/boot"):
        c = Path(candidate)
        if c.is_dir() and not c.is_symlink() and not any(c == s or c in s.parents for s in sources):
            return candidate
    raise SandboxUnavailable("no directory to stage the sandbox's mounts in (/srv, /mnt, /media, /opt, /boot)")


def sandbox_uid() -> int:
    """The host user that boxes run as when the service runs as root; otherwise the service's own."""
    return int(get_settings().sandbox_uid) if os.geteuid() == 0 else os.geteuid()


def _preexec(box: Box, procs_files: list[bytes]) -> Callable[[], None]:
    """Runs in the forked child before exec. Only system calls: in the child of a threaded parent,
    anything that takes a lock may deadlock."""
    limits = [(resource.RLIMIT_CORE, 0)]
    if box.file_size_bytes is not None:
        limits.append((resource.RLIMIT_FSIZE, box.file_size_bytes))
    if not procs_files:
        # without a cgroup, the rlimits are what bounds the box; an address-space limit cannot bound a
        # CUDA process (its driver reserves ranges the size of host plus device memory)
        if not box.gpu:
            limits.append((resource.RLIMIT_AS, max(box.memory_bytes or default_memory_bytes(), 1 << 30)))
        if os.geteuid() == 0:  # else the box shares the service's user, whose own threads it would count
            limits.append((resource.RLIMIT_NPROC, box.processes))

    def preexec() -> None:
        for path in procs_files:  # join the cgroup while still allowed to
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for which, value in limits:
            hard = resource.getrlimit(which)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
        # the box dies with the thread that started it (as root, setpriv sets it again after the uid change)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the owner died between fork and prctl
            os._exit(1)

    return preexec


# --- cgroups -------------------------------------------------------------------------------------


# A v1 box's CPU weight: as much as one busy thread per CPU of the service beside it (1024 each).
BOX_CPU_SHARES = 1024 * (os.cpu_count() or 1)


class _Cgroups:
    """One box's cgroup: a v2 cgroup, or one directory per v1 controller (memory, pids, cpu)."""

    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, dirs: dict[str, Path], v2: bool) -> None:
        self.dirs, self.v2 = dirs, v2

    @staticmethod
    def own_dirs(controllers: Sequence[str]) -> list[Path]:
        """The cgroup directories this process is in, for these controllers (v2 first)."""
        found: list[Path] = []
        for line in _read(Path("/proc/self/cgroup")).splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, ctl, rel = parts
            rel = rel.lstrip("/")
            if ctl == "":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    if (root / "cgroup.controllers").exists():
                        found.insert(0, root / rel)
                        break
            else:
                for name in ctl.split(","):
                    if name in controllers:
                        found.append(Path("/sys/fs/cgroup") / name / rel)
        return [p for p in found if p.is_dir()]

    @classmethod
    def create(cls, box: Box, notes: list[str]) -> _Cgroups | None:
        """The box's cgroup with its limits, after killing a leftover of the same name; None (and a
        note) where this host gives none, and then rlimits bound the box instead."""
        name = "kiln-box-" + hashlib.sha256(box.name.encode()).hexdigest()[:16]
        memory = box.memory_bytes or default_memory_bytes()
        cpu_period = 100_000
        v2 = cls._v2_parent()
        dirs: dict[str, Path] = {}
        if v2 is not None:
            dirs = {"v2": v2 / name}
        else:
            for ctl in cls.CONTROLLERS:
                own = [p for p in cls.own_dirs((ctl,)) if p.parts[4:5] == (ctl,)]  # v1: /sys/fs/cgroup/<ctl>/...
                if own and os.access(own[0], os.W_OK):
                    dirs[ctl] = own[0] / name
        if not {"memory", "pids"} <= set(dirs) and "v2" not in dirs:
            notes.append("no writable memory and pids cgroup: memory and processes are bounded by rlimits only")
            return None
        cg = cls(dirs, v2 is not None)
        cg.kill()  # a box of the same name left by an earlier attempt
        cg.remove()
        try:
            for d in dirs.values():
                d.mkdir()
            if cg.v2:
                d = dirs["v2"]
                (d / "memory.max").write_text(str(memory))
                _write_if(d / "memory.swap.max", "0")
                (d / "pids.max").write_text(str(box.processes))
                if box.cpus and not _write_if(d / "cpu.max", f"{int(box.cpus * cpu_period)} {cpu_period}"):
                    notes.append("no cpu controller: the CPU limit is not applied")
            else:
                (dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory))
                _write_if(dirs["memory"] / "memory.memsw.limit_in_bytes", str(memory))
                (dirs["pids"] / "pids.max").write_text(str(box.processes))
                # v1 schedules each process of the service's own cgroup on its own, but a box's cgroup
                # as ONE entity of weight 1024: under load, a runner serving with all cores got the
                # share of a single thread (a TorchScript runner ran 3x slower than the same model
                # in-process at load 6). The weight of one busy thread per CPU restores parity.
                if "cpu" in dirs:
                    _write_if(dirs["cpu"] / "cpu.shares", str(BOX_CPU_SHARES))
                if box.cpus and not (
                    "cpu" in dirs
                    and _write_if(dirs["cpu"] / "cpu.cfs_period_us", str(cpu_period))
                    and _write_if(dirs["cpu"] / "cpu.cfs_quota_us", str(int(box.cpus * cpu_period)))
                ):
                    notes.append("no cpu controller: the CPU limit is not applied")
        except OSError as exc:
            cg.remove()
            notes.append(f"could not set up the box's cgroup ({exc.strerror}): bounded by rlimits only")
            return None
        return cg

    @classmethod
    def _v2_parent(cls) -> Path | None:
        """A v2 cgroup we may create children in, with the memory and pids controllers enabled.

        A v2 cgroup with processes in it cannot enable controllers for its children ("no internal
        processes"), which is where a service started by a container runtime or a login shell sits.
        Where this process may, it moves into a leaf of its own cgroup first ("kiln-service"), then
        enables memory, pids (and cpu) in the parent; if another process shares the cgroup, that fails
        and the boxes fall back to rlimits, with a note."""
        own = [p for p in cls.own_dirs(()) if (p / "cgroup.controllers").exists()]
        for parent in own[:1]:
            if parent.name == "kiln-service":  # moved there before (or forked from a process that was)
                parent = parent.parent
            wanted = {"memory", "pids"}
            if wanted <= set(_read(parent / "cgroup.subtree_control").split()) and os.access(parent, os.W_OK):
                return parent
            if not wanted <= set(_read(parent / "cgroup.controllers").split()) or not os.access(parent, os.W_OK):
                return None
            leaf = parent / "kiln-service"
            try:
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                enable = " ".join(
                    f"+{c}" for c in ("memory", "pids", "cpu") if c in _read(parent / "cgroup.controllers").split()
                )
                (parent / "cgroup.subtree_control").write_text(enable)
            except OSError:
                return None
            # boxes go beside the service's leaf, under the same parent
            return parent
        return None

    def procs_files(self) -> list[bytes]:
        return [str(d / "cgroup.procs").encode() for d in self.dirs.values()]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            found.update(int(x) for x in _read(d / "cgroup.procs").split() if x.isdigit())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in the cgroup, until it is empty (cgroup.kill where the kernel has it)."""
        if self.v2 and (self.dirs["v2"] / "cgroup.kill").exists():
            _write_if(self.dirs["v2"] / "cgroup.kill", "1")
        for _ in range(200):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)

    def oom_kills(self) -> int:
        for d in self.dirs.values():
            for name in ("memory.events", "memory.oom_control"):
                for line in _read(d / name).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        return int(value)
        return 0

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes still exiting
                    time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write_if(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:
        return False
