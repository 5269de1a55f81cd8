"""Run untrusted model code in a separate, limited child process.

``run_op`` writes ``WORKDIR/.sandbox/request.json``, starts ``python -m workers.sandbox_child WORKDIR``
in its own session with resource limits, a scrubbed environment and (as root) its own network
namespace, waits while enforcing the wall-clock limit and polling for cancellation, kills the
whole process group afterwards, and turns ``.sandbox/result.json`` and the exit status into a
``SandboxResult``. Requests and results are JSON files; nothing is ever unpickled here.

As root on Linux the child is also isolated (workers/isolation.py): network, mount and PID
namespaces, a read-only filesystem in which `Limits.hide` folders (the data directory: database,
tokens, other models) are empty except for `Limits.readable` paths, only the working directory
writable, no capabilities, and a pids cgroup. Elsewhere each missing piece is named in `notes`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from service import errors
from workers import isolation

# The smallest memory limit accepted. RLIMIT_AS counts address space, not resident memory, and
# torch reserves a lot of it: with torch 2.13 (CPU, x86-64 Linux) ``import torch`` plus a forward
# pass of nn.Linear(4, 4) needs about 640 MiB, whatever OMP_NUM_THREADS is (1 to 64 measured).
# 1 GiB leaves room for a small model; anything lower would fail every model as "memory".
MIN_MEMORY_BYTES = 1 << 30
LOG_TAIL_BYTES = 64 << 10
_POLL_S = 0.2
_CLONE_NEWNET = 0x40000000
# How torch's CPU allocator words an allocation it could not make (it raises a plain RuntimeError).
_ALLOC_FAILURES = ("can't allocate memory", "not enough memory")
# The directory holding the `workers` package, so the child can import it even when kiln is not installed.
_IMPORT_ROOT = Path(__file__).resolve().parent.parent
# Loaded here, not in the forked child, where loading a library is not safe.
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Limits:
    """Limits for one sandboxed op."""

    timeout_s: float = 900.0  # wall clock, enforced by the parent
    memory_bytes: int = 8 << 30  # RLIMIT_AS of the child, at least MIN_MEMORY_BYTES
    file_size_bytes: int = 8 << 30  # RLIMIT_FSIZE: the largest file the child may write, its log included
    # RLIMIT_NPROC counts every process and thread of the child's user, and the kernel does not
    # enforce it for root.
    processes: int = 256
    threads: int | None = None  # OMP_NUM_THREADS / MKL_NUM_THREADS in the child; None keeps torch's default
    hide: tuple[Path, ...] = ()  # folders that look empty to the child (secrets, other jobs)
    readable: tuple[Path, ...] = ()  # paths inside hidden folders the child may still read

    def __post_init__(self) -> None:
        if self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(
                f"memory_bytes must be at least {_size(MIN_MEMORY_BYTES)} (importing torch needs about 640 MiB), "
                f"got {_size(self.memory_bytes)}"
            )


@dataclass
class SandboxResult:
    """What happened to one sandboxed op."""

    outcome: str  # "ok" | "error" | "timeout" | "memory" | "file_size" | "crashed" | "canceled"
    reason: str  # one human-readable line
    result: dict | None  # what the op returned, when ok
    error: dict | None  # {"type", "message", "traceback", "errno", "kiln_error"} when the op raised
    returncode: int | None
    log: str  # the last LOG_TAIL_BYTES of the child's combined stdout and stderr
    duration_s: float
    notes: list[str] = field(default_factory=list)  # e.g. a missing network isolation

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
            raise kiln_error(str(self.error.get("message", "")))
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
    """Run ``workers.sandbox_ops.OPS[op](args, workdir)`` in a limited child process.

    ``workdir`` becomes the child's cwd, HOME and (under ``tmp/``) TMPDIR; the child's output goes
    to ``workdir/.sandbox/output.log``. ``cancel`` is polled about every 0.2 s and kills the child
    when it returns True. ``on_output`` receives the child's output line by line as it is written.
    Never raises for anything the child does: the outcome says what happened.
    """
    workdir = Path(workdir).resolve()
    box = workdir / ".sandbox"
    box.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    (box / "result.json").unlink(missing_ok=True)  # a result left by an earlier op in this workdir
    (box / "request.json").write_text(json.dumps({"op": op, "args": args}))
    log_path = box / "output.log"
    notes = [] if isolation.available() else ["isolation unavailable: not running as root"]
    cgroup = isolation.PidsCgroup(limits.processes) if isolation.available() else None
    if cgroup is not None and cgroup.note:
        notes.append(cgroup.note)
    plan = (isolation.Plan(workdir, tuple(Path(p).resolve() for p in limits.hide),
                           tuple(Path(p).resolve() for p in limits.readable) + (workdir,),
                           cgroup.procs_path()) if cgroup is not None else None)

    started = time.monotonic()
    killed_for = None
    # The child's output goes straight into the log file, so RLIMIT_FSIZE bounds the log too.
    with open(log_path, "wb") as log:
        # The child reports a failed unshare() through this pipe; exec closes the child's end.
        report_r, report_w = os.pipe()
        with os.fdopen(report_r, "rb") as report:
            try:
                proc = subprocess.Popen(
                    # -P: the workdir (which holds the upload) must not shadow the modules the child imports
                    [sys.executable, "-P", "-m", "workers.sandbox_child", str(workdir)],
                    cwd=workdir,
                    env=_child_env(workdir, limits),
                    # /dev/null rather than a closed fd 0, which the next file the child opens would take
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so one killpg reaches the grandchildren
                    preexec_fn=_confine(limits, report_w, plan),
                )
            finally:
                os.close(report_w)
            notes += [line for line in report.read().decode().splitlines() if line]

        feed = _LineFeed(log_path, on_output) if on_output else None
        try:
            delay = 0.01
            while not _exited(proc.pid):
                if feed:
                    feed.pump()
                if cancel is not None and cancel():
                    killed_for = "canceled"
                    break
                if time.monotonic() - started >= limits.timeout_s:
                    killed_for = "timeout"
                    break
                time.sleep(delay)
                delay = min(delay * 2, _POLL_S)  # quick ops return quickly, long ones cost little
        finally:
            # Also after a normal exit: background processes left by model code must not outlive it.
            _kill_group(proc.pid)
            returncode = proc.wait()
            if feed:
                feed.pump(final=True)
            if cgroup is not None:
                cgroup.remove()
    duration_s = time.monotonic() - started

    reply = _read_reply(box / "result.json")
    outcome, reason = _classify(killed_for, reply, returncode, limits)
    return SandboxResult(
        outcome=outcome,
        reason=reason,
        result=reply["result"] if reply and outcome == "ok" else None,
        error=reply.get("error") if reply and outcome != "ok" else None,
        returncode=returncode,
        log=_tail(log_path),
        duration_s=duration_s,
        notes=notes,
    )


def _child_env(workdir: Path, limits: Limits) -> dict[str, str]:
    """Only what the child needs: nothing else from os.environ (no KILN_* secrets, no database URLs)."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(workdir),
        "TMPDIR": str(workdir / "tmp"),
        "PYTHONPATH": str(_IMPORT_ROOT),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({name: os.environ[name] for name in ("LANG", "LC_ALL") if name in os.environ})
    if limits.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(limits.threads)
    return env


_PR_SET_PDEATHSIG = 1


def _confine(limits: Limits, report_fd: int, plan: "isolation.Plan | None") -> Callable[[], None]:
    """The preexec_fn: runs in the forked child before exec, so the limits cover all of the child.

    Keep it short: in the forked child of a threaded parent, anything that takes a lock may deadlock.
    With isolation, this process enters new namespaces and forks twice: the process that execs the
    sandbox is PID 2 of its own PID namespace, and the two above it only relay its exit status.
    """

    def report(message: str) -> None:
        os.write(report_fd, (message + "\n").encode())

    def confine() -> None:
        # Die with the worker: a sandbox must not outlive the process that supervises it.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        pid_namespace = isolation.enter(plan, report) if plan is not None else False
        for rlimit, value in (
            (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.file_size_bytes),
            (resource.RLIMIT_NPROC, limits.processes),
            (resource.RLIMIT_CORE, 0),
        ):
            hard = resource.getrlimit(rlimit)[1]
            # Without privileges a hard limit can only go down; never ask for more than the worker has.
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(rlimit, (value, value))
        if plan is not None:
            if pid_namespace:
                # The first child in a PID namespace is its init, which ignores signals it sends
                # itself (os.kill(os.getpid(), ...) in model code): it only relays, and the sandbox
                # runs as PID 2 like any other process.
                for inside in (False, True):
                    child = os.fork()
                    if child > 0:
                        isolation.relay(child, inside_namespace=inside)  # never returns
            isolation.finish_in_child(pid_namespace, report)

    return confine


def _exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, so its process group id cannot be reused before we kill it.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the child exited and left nothing behind
        pass


class _LineFeed:
    """Hands the lines the child appends to its log file to a callback."""

    def __init__(self, path: Path, callback: Callable[[str], None]) -> None:
        self._file: BinaryIO = open(path, "rb")
        self._callback = callback
        self._partial = b""

    def pump(self, final: bool = False) -> None:
        """Pass on the complete lines written so far; on the final pump also the unterminated rest."""
        # A bounded read per pump, so a child that floods its output cannot stall the wait loop.
        while chunk := self._file.read(1 << 20):
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                self._callback(line.decode("utf-8", "replace"))
            if not final:
                break
        if final:
            if self._partial:
                self._callback(self._partial.decode("utf-8", "replace"))
            self._file.close()


def _read_reply(path: Path) -> dict[str, Any] | None:
    """The child's result file, or None when it is missing or not what the child writes."""
    try:
        reply = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(reply, dict):
        return None
    expected = "result" if reply.get("ok") is True else "error"
    return reply if isinstance(reply.get(expected), dict) else None


def _classify(killed_for: str | None, reply: dict | None, returncode: int, limits: Limits) -> tuple[str, str]:
    """The outcome and its one-line reason."""
    if killed_for == "timeout":
        return "timeout", f"model code ran longer than {limits.timeout_s:g} s and was killed"
    if killed_for == "canceled":
        return "canceled", "the job was canceled while model code was running"
    memory = f"model code exceeded the {_size(limits.memory_bytes)} memory limit"
    file_size = f"model code tried to write a file larger than the {_size(limits.file_size_bytes)} limit"
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
        return "error", f"model code raised {kind}: {first_line}" if first_line else f"model code raised {kind}"
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
