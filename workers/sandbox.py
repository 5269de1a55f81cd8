"""Run untrusted model code in a separate, limited child process inside the isolation boundary.

``run_op`` writes the request beside WORKDIR (``control_dir``), starts ``python -m workers.sandbox_child WORKDIR``
in a box (service/boundary.py: bubblewrap, an unprivileged user, no network, nothing of the host but
the Python environment, `Limits.readable` paths read-only and WORKDIR writable, a cgroup for memory,
processes and CPU), waits while enforcing the wall-clock limit and the disk quota and polling for
cancellation, kills the whole box afterwards, and turns the result it wrote and the exit status
into a ``SandboxResult``. Requests and results are JSON files; nothing is ever unpickled here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from service import boundary, errors
from service.runtimes import INSIDE_BOX

# The smallest memory limit accepted: ``import torch`` plus a forward pass of a small model.
MIN_MEMORY_BYTES = 1 << 30
LOG_TAIL_BYTES = 64 << 10
_POLL_S = 0.2
_DISK_POLL_S = 1.0
# How torch's CPU allocator words an allocation it could not make (it raises a plain RuntimeError).
_ALLOC_FAILURES = ("can't allocate memory", "not enough memory")


@dataclass(frozen=True)
class Limits:
    """Limits for one sandboxed op. None: fitted to this machine (service/boundary.py)."""

    timeout_s: float = 900.0  # wall clock, enforced by the parent
    memory_bytes: int | None = None  # the box's cgroup memory limit; default half of RAM
    file_size_bytes: int | None = None  # RLIMIT_FSIZE: the largest file; default the disk quota
    disk_bytes: int | None = None  # what the working directory may grow to; default half the free space
    processes: int = 256  # processes and threads in the box
    cpus: float | None = None  # CPU time in cores; None: no limit
    threads: int | None = None  # OMP_NUM_THREADS / MKL_NUM_THREADS in the child; None keeps torch's default
    readable: tuple[Path, ...] = ()  # paths the child may read (the bundle, samples), besides its workdir

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(
                f"memory_bytes must be at least {_size(MIN_MEMORY_BYTES)} (importing torch needs about 640 MiB), "
                f"got {_size(self.memory_bytes)}"
            )


@dataclass
class SandboxResult:
    """What happened to one sandboxed op."""

    outcome: str  # "ok" | "error" | "timeout" | "memory" | "file_size" | "disk" | "crashed" | "canceled"
    reason: str  # one human-readable line
    result: dict | None  # what the op returned, when ok
    error: dict | None  # {"type", "message", "traceback", "errno", "kiln_error"} when the op raised
    returncode: int | None
    log: str  # the last LOG_TAIL_BYTES of the child's combined stdout and stderr
    duration_s: float
    notes: list[str] = field(default_factory=list)  # e.g. that it ran unisolated
    isolated: bool = True

    @property
    def ok(self) -> bool:
        """Whether the op returned a result."""
        return self.outcome == "ok"

    def raise_for_outcome(self) -> dict:
        """The op's result when ok; otherwise raise the KilnError the op raised, or a SandboxError."""
        if self.ok and self.result is not None:
            return self.result
        name = (self.error or {}).get("kiln_error")
        kiln_error = getattr(errors, name, None) if isinstance(name, str) else None
        if isinstance(kiln_error, type) and issubclass(kiln_error, errors.KilnError):
            raise kiln_error(str((self.error or {}).get("message", "")))
        raise errors.SandboxError(self.reason, outcome=self.outcome)


def run_op(
    op: str,
    args: dict,
    workdir: Path,
    *,
    limits: Limits = Limits(),
    cancel: Callable[[], bool] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> SandboxResult:
    """Run ``workers.sandbox_ops.OPS[op](args, workdir)`` in a limited, isolated child process.

    ``workdir`` becomes the child's cwd and HOME, and (under ``tmp/``) its TMPDIR: the only place it
    may write. The child's output goes to ``control_dir(workdir)/output.log``. ``cancel`` is polled about
    every 0.2 s and kills the child when it returns True. ``on_output`` receives the child's output
    line by line as it is written. Raises SandboxUnavailable when the boundary cannot be built (and
    running unisolated was not asked for); never raises for anything the child does.
    """
    workdir = Path(workdir).resolve()
    # The request, the result and the log live beside the working directory, out of the box's reach:
    # the box could otherwise leave a link where the worker (root) writes or reads them next time.
    control = control_dir(workdir)
    control.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    (control / "request.json").write_text(json.dumps({"op": op, "args": args}))
    log_path = control / "output.log"
    disk_bytes = limits.disk_bytes or boundary.default_disk_bytes(workdir)
    _give_to_sandbox(workdir)
    env = boundary.python_env(home=str(workdir))
    env["TMPDIR"] = str(workdir / "tmp")
    env[INSIDE_BOX] = "1"  # code-bearing artifacts may then load in-process (service.runtimes.load)
    if limits.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(limits.threads)
    box = boundary.Box(
        name=f"op:{workdir}",
        read_only=tuple(Path(p).resolve() for p in limits.readable),
        writable=workdir,
        chdir=workdir,
        env=env,
        memory_bytes=limits.memory_bytes,
        processes=limits.processes,
        cpus=limits.cpus,
        file_size_bytes=limits.file_size_bytes or disk_bytes,
        gpu=Path("/dev/nvidiactl").exists(),
    )

    started = time.monotonic()
    killed_for = None
    floor = _free(workdir) - disk_bytes  # deleted files still open take space that a walk does not see
    # The child's output goes straight into the log file, so RLIMIT_FSIZE bounds the log too. The
    # request comes in on stdin, the result goes out through an inherited descriptor.
    with (
        open(log_path, "wb") as log,
        open(control / "request.json", "rb") as request,
        open(control / "result.json", "wb") as result,
    ):
        # -P: the workdir (which holds the upload) must not shadow the modules the child imports
        boxed = boundary.start(
            [sys.executable, "-P", "-m", "workers.sandbox_child", str(workdir), str(result.fileno())],
            box,
            stdin=request,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(result.fileno(),),
        )
    proc = boxed.proc
    feed = _LineFeed(log_path, on_output) if on_output else None
    try:
        delay, next_disk_check = 0.01, started + _DISK_POLL_S
        while not _exited(proc.pid):
            if feed:
                feed.pump()
            now = time.monotonic()
            if cancel is not None and cancel():
                killed_for = "canceled"
                break
            if now - started >= limits.timeout_s:
                killed_for = "timeout"
                break
            if now >= next_disk_check:
                next_disk_check = now + _DISK_POLL_S
                if _usage(workdir) > disk_bytes or _free(workdir) < floor:
                    killed_for = "disk"
                    break
            time.sleep(delay)
            delay = min(delay * 2, _POLL_S)  # quick ops return quickly, long ones cost little
    finally:
        # Also after a normal exit: background processes left by model code must not outlive it.
        boxed.kill()
        returncode = proc.wait()
        oom = boxed.oom_killed()
        boxed.release()
        if feed:
            feed.pump(final=True)
    duration_s = time.monotonic() - started
    if killed_for == "disk":
        _reclaim(workdir)

    reply = _read_reply(control / "result.json")
    if boxed.isolated and returncode > 128:  # bwrap ends with 128+N when the boxed process died of signal N
        returncode = -(returncode - 128)
    outcome, reason = _classify(
        killed_for, reply, returncode, limits, oom=oom, disk_bytes=disk_bytes, file_size_bytes=box.file_size_bytes
    )
    return SandboxResult(
        outcome=outcome,
        reason=reason,
        result=reply["result"] if reply and outcome == "ok" else None,
        error=reply.get("error") if reply and outcome != "ok" else None,
        returncode=returncode,
        log=_tail(log_path),
        duration_s=duration_s,
        notes=boxed.notes,
        isolated=boxed.isolated,
    )


def _give_to_sandbox(workdir: Path) -> None:
    """Make the working directory the sandbox user's (it runs as an unprivileged user of the host)."""
    if os.geteuid() != 0:
        return
    uid = boundary.sandbox_uid()
    for root, dirs, files in os.walk(workdir):
        for name in (root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)):
            try:
                os.lchown(name, uid, uid)
            except OSError:
                pass


def _usage(path: Path) -> int:
    """Bytes the files under `path` take on disk."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        pass
        except OSError:
            pass
    return total


def control_dir(workdir: Path) -> Path:
    """Where an op's request, result and log are kept: beside its working directory, not in it."""
    return workdir.parent / f".{workdir.name}.box"


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _reclaim(workdir: Path) -> None:
    """After the disk quota was hit: remove what the box wrote, so the disk is not left full."""
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)


def _exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, so its process group id cannot be reused before we kill it.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class _LineFeed:
    """Hands the lines the child appends to its log file to a callback."""

    def __init__(self, path: Path, callback: Callable[[str], None]) -> None:
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - held while following; close() closes it
        self._callback = callback
        self._partial = b""

    def pump(self, final: bool = False) -> None:
        """Pass on the complete lines written so far; on the final pump also the unterminated rest."""
        # A bounded read per pump, so a child that floods its output cannot stall the wait loop.
        while chunk := self._file.read(1 << 20):
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            if len(self._partial) > 1 << 20:  # a line without end: pass it on in pieces
                lines.append(self._partial)
                self._partial = b""
            for line in lines:
                self._callback(line.decode("utf-8", "replace"))
            if not final:
                break
        if final:
            if self._partial:
                self._callback(self._partial.decode("utf-8", "replace"))
            self._file.close()


_MAX_REPLY = 64 << 20


def _read_reply(path: Path) -> dict[str, Any] | None:
    """The child's result file, or None when it is missing, too large or not what the child writes."""
    try:
        if path.stat().st_size > _MAX_REPLY:
            return None
        reply = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(reply, dict):
        return None
    expected = "result" if reply.get("ok") is True else "error"
    return reply if isinstance(reply.get(expected), dict) else None


def _classify(
    killed_for: str | None,
    reply: dict | None,
    returncode: int,
    limits: Limits,
    *,
    oom: bool = False,
    disk_bytes: int = 0,
    file_size_bytes: int | None = None,
) -> tuple[str, str]:
    """The outcome and its one-line reason."""
    if killed_for == "disk":
        return "disk", f"model code wrote more than the {_size(disk_bytes)} disk quota and was killed"
    if killed_for == "timeout":
        return "timeout", f"model code ran longer than {limits.timeout_s:g} s and was killed"
    if killed_for == "canceled":
        return "canceled", "the job was canceled while model code was running"
    memory = f"model code exceeded the {_size(limits.memory_bytes or boundary.default_memory_bytes())} memory limit"
    file_size = f"model code tried to write a file larger than the {_size(file_size_bytes or 0)} limit"
    if oom:
        return "memory", f"{memory} (killed by the kernel)"
    if reply is not None:
        if reply.get("ok") is True:
            return "ok", "the op finished"
        error = reply["error"]
        kind, message = str(error.get("type")), str(error.get("message", ""))
        if kind == "MemoryError" or (kind == "RuntimeError" and any(m in message for m in _ALLOC_FAILURES)):
            return "memory", memory
        if error.get("errno") == errno.EFBIG:
            return "file_size", file_size
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        where = f" ({error['where']})" if isinstance(error.get("where"), str) and error["where"] else ""
        return "error", (
            f"model code raised {kind}: {first_line}" if first_line else f"model code raised {kind}"
        ) + where
    if returncode < 0:
        signum = -returncode
        if signum == signal.SIGXFSZ:
            return "file_size", file_size
        if signum == signal.SIGKILL:  # and not by us: the kernel's out-of-memory killer
            return "memory", f"{memory} (killed with SIGKILL, most likely by the out-of-memory killer)"
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return "crashed", f"the sandbox process died with signal {name}"
    return "crashed", f"the sandbox process exited with code {returncode} without a readable result"


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _size(n: float) -> str:
    """A byte count for people: 8.0 GiB, 512.0 MiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024
    return f"{n:.1f} TiB"
