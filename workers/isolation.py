"""Isolation of the sandbox child, as root on Linux: its own network, mount and PID namespaces, a
read-only view of the filesystem with secrets hidden and only its working directory writable, no
capabilities, and a pids cgroup bounding its processes.

The functions that run in the forked child (`enter`, `finish_in_child`) make only system calls:
in the child of a threaded parent, anything that takes a lock may deadlock. Every step that fails
is reported, never fatal: the rlimits of workers/sandbox.py still hold.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import uuid
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 38, 47, 4
SYS_CAPSET, CAP_VERSION_3, CAP_LAST = 126, 0x20080522, 63
PIDS_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# Prepared in the parent, so the child only passes pointers.
_RDONLY = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
_RDWR = _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
_CAP_HEADER = _CapHeader(CAP_VERSION_3, 0)
_CAP_NONE = (_CapData * 2)()


def available() -> bool:
    """Whether this process can isolate children (root on Linux)."""
    return os.geteuid() == 0 and hasattr(os, "fork")


class PidsCgroup:
    """A cgroup (v1 or v2 pids controller) that bounds how many processes the sandbox may have."""

    def __init__(self, limit: int) -> None:
        self.path: Path | None = None
        self.note: str | None = None
        for root in PIDS_ROOTS:
            if (root / "cgroup.procs").exists() and os.access(root, os.W_OK) and (
                    root.name == "pids" or "pids" in _read(root / "cgroup.controllers")):
                path = root / f"kiln-sandbox-{uuid.uuid4().hex[:12]}"
                try:
                    path.mkdir()
                    (path / "pids.max").write_text(str(limit))
                    self.path = path
                    return
                except OSError as exc:
                    self.note = f"process limit unavailable: {exc.strerror}"
                    try:
                        path.rmdir()
                    except OSError:
                        pass
                    return
        self.note = "process limit unavailable: no writable pids cgroup"

    def procs_path(self) -> bytes | None:
        return str(self.path / "cgroup.procs").encode() if self.path else None

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Plan:
    """What one child's isolation does, with every path encoded in the parent."""

    def __init__(self, workdir: Path, hide: tuple[Path, ...], readable: tuple[Path, ...], cgroup_procs: bytes | None):
        self.workdir = str(workdir).encode()
        # only hide what exists and does not contain the working directory's own path above it
        self.hide = [str(p).encode() for p in hide if p.is_dir()]
        self.readable = [str(p).encode() for p in readable if p.exists()]
        self.readable_dirs = [p for p in readable if p.exists()]
        self.cgroup_procs = cgroup_procs


def enter(plan: Plan, report: callable) -> bool:
    """In the forked child: namespaces, filesystem view, cgroup. Returns whether a PID namespace
    was entered (then the caller must fork once more: the next child is PID 1 in it)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if plan.cgroup_procs:
        try:
            fd = os.open(plan.cgroup_procs, os.O_WRONLY)
            os.write(fd, b"0")  # "0" is the writing process itself
            os.close(fd)
        except OSError as exc:
            report(f"process limit unavailable: {errno.errorcode.get(exc.errno, exc.errno)}")
    if _libc.unshare(CLONE_NEWNET) != 0:
        report(f"network isolation unavailable: {_err()}")
    if _libc.unshare(CLONE_NEWNS) != 0:
        report(f"filesystem isolation unavailable: {_err()}")
        return _unshare_pid(report)
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        report(f"filesystem isolation unavailable: {_err()}")
        return _unshare_pid(report)
    # Keep the readable paths reachable through file descriptors before tmpfs hides their parents.
    keep = []
    for path in plan.readable:
        try:
            keep.append((path, os.open(path, os.O_PATH)))
        except OSError:
            pass
    for path in plan.hide:
        if _libc.mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755") != 0:
            report(f"could not hide {path.decode()}: {_err()}")
    for path, fd in keep:
        try:
            _makedirs(path)
            source = f"/proc/self/fd/{fd}".encode()
            if _libc.mount(source, path, None, MS_BIND | MS_REC, None) != 0:
                report(f"could not expose {path.decode()}: {_err()}")
        finally:
            os.close(fd)
    # The working directory becomes its own mount, so it can stay writable under a read-only root.
    if _libc.mount(plan.workdir, plan.workdir, None, MS_BIND | MS_REC, None) != 0:
        report(f"filesystem isolation unavailable: {_err()}")
    setattr_ = _libc.syscall
    if setattr_(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(_RDONLY), ctypes.sizeof(_RDONLY)) != 0:
        # older kernels: only the root mount goes read-only
        if _libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
            report(f"read-only filesystem unavailable: {_err()}")
    elif setattr_(SYS_MOUNT_SETATTR, AT_FDCWD, plan.workdir, AT_RECURSIVE, ctypes.byref(_RDWR),
                  ctypes.sizeof(_RDWR)) != 0:
        report(f"working directory not writable: {_err()}")
    # Popen changed into the working directory before these mounts; enter it again through them.
    os.chdir(plan.workdir)
    return _unshare_pid(report)


def _unshare_pid(report: callable) -> bool:
    if _libc.unshare(CLONE_NEWPID) != 0:
        report(f"process isolation unavailable: {_err()}")
        return False
    return True


def finish_in_child(pid_namespace: bool, report: callable) -> None:
    """In the last child before exec: its own /proc, then no capabilities and no way to regain them."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if pid_namespace and _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        report(f"private /proc unavailable: {_err()}")
    for cap in range(CAP_LAST + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability the kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if _libc.syscall(SYS_CAPSET, ctypes.byref(_CAP_HEADER), ctypes.byref(_CAP_NONE)) != 0:
        report(f"could not drop capabilities: {_err()}")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


SIGNALED = 0x80  # how the relay inside the namespace passes on "died of signal N": exit code 0x80|N


def relay(child: int, *, inside_namespace: bool) -> None:
    """In a process between the sandbox's parent and the sandbox: wait for the child, then end the
    same way. The relay inside the PID namespace is its init, which cannot signal itself, so it
    passes a signal on as an exit code that the outer relay turns back into the signal."""
    os.closerange(3, 65536)  # lets Popen see the exec it waits for; keeps no pipe of the parent's open
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(1)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    if inside_namespace:
        os._exit(SIGNALED | sig if sig else code)
    if sig is None and code & SIGNALED:
        sig = code & ~SIGNALED
    if sig:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP cannot be handled anyway
            pass
        os.kill(os.getpid(), sig)
    os._exit(code)


def _makedirs(path: bytes) -> None:
    parts = path.split(b"/")
    for i in range(2, len(parts) + 1):
        p = b"/".join(parts[:i])
        if p:
            try:
                os.mkdir(p, 0o755)
            except FileExistsError:
                pass
            except OSError:
                return


def _err() -> str:
    code = ctypes.get_errno()
    return errno.errorcode.get(code, str(code))
