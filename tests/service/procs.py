"""Real processes for the end-to-end tests: a Redis server, `kiln api` and `kiln worker`, each a
subprocess in its own session, plus small /proc helpers to find and kill whole process trees.

Nothing here is mocked: the tests drive the same commands an operator runs. Every process is
started with start_new_session=True and remembered by the `Processes` registry, whose `close()`
kills each one's process group and every descendant found under it in /proc (the sandbox runs in
a session of its own, so a process-group kill alone would not reach it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# --- small helpers ----------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length, read from a raw socket
    (for tests that need to control exactly when each byte of a request is sent)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
            length = int(next((v for k, v in fields.items() if k.strip().lower() == b"content-length"), b"0"))
            if len(body) >= length:
                return int(head.split()[1]), body[:length]
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"the server closed the connection mid-response: {data[:300]!r}")
        data += part


def metric(text: str, series: str) -> float:
    """The value of one exact series (name with its labels) in a /metrics page; 0 when absent."""
    return next((float(line[len(series) + 1 :]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own mounted on `folder` (made if missing), for full-disk and
    cross-filesystem cases; the caller skips the test unless it runs as root."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def answers(url: str) -> bool:
    """Whether a Kiln server answers its health check at `url` now."""
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.2,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy (which is returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a process that is starting may refuse connections
            last_exc = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {type(last_exc).__name__}: {last_exc})"
            if diagnose is not None:
                msg += "\n" + diagnose()
            raise AssertionError(msg)
        time.sleep(interval)


# --- /proc -------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def descendants(root: int) -> list[int]:
    """Every live process below `root` by parent links (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_matching(*needles: str) -> list[int]:
    """Live processes whose command line contains every needle."""
    out = []
    for pid in pids():
        line = " ".join(cmdline(pid))
        if line and all(n in line for n in needles) and alive(pid):
            out.append(pid)
    return out


def sandboxes(needle: str) -> list[int]:
    """Live `workers.sandbox_child` processes whose command line contains `needle` (e.g. a job id)."""
    return [p for p in processes_matching("workers.sandbox_child", needle) if p != os.getpid()]


def tcp_sockets(pid: int, remote_port: int) -> set[str]:
    """The socket inodes a process holds that are TCP connections to `remote_port` (e.g. 5432)."""
    suffix = f":{remote_port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[2].endswith(suffix):
                inodes.add(f"socket:[{fields[9]}]")
    held = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target in inodes:
            held.add(target)
    return held


def kill_tree(root: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal `root`, its process group and every descendant (found before anything is killed)."""
    tree = [root] + descendants(root)
    try:
        os.killpg(root, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return tree


# --- processes ---------------------------------------------------------------------------------------


class Proc:
    """One subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, env, log, cwd
        self.popen: subprocess.Popen | None = None
        self.tree: list[int] = []  # what the last kill() reached

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n===== {time.strftime('%H:%M:%S')} start {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        """Signal the whole tree (process group and descendants) and reap the main process."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.tree = kill_tree(self.popen.pid, sig)
        try:
            self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            self.tree = kill_tree(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"--- {self.name}: no log"
        return f"--- {self.name} ({self.log}), last {min(n, len(lines))} lines:\n" + "\n".join(lines[-n:])


class RedisServer(Proc):
    def __init__(self, port: int, log: Path) -> None:
        super().__init__(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            dict(os.environ),
            log,
        )
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def start(self) -> RedisServer:
        super().start()
        wait_for(self.ping, 10, f"redis on port {self.port}", diagnose=self.tail)
        return self


class KilnApi(Proc):
    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        env = {**env, "KILN_GRPC_PORT": env.get("KILN_GRPC_PORT") or str(free_port())}
        super().__init__("api", [sys.executable, "-m", "workers.cli", "api", "--port", str(port)], env, log)
        self.port = port
        self.grpc_port = int(env["KILN_GRPC_PORT"])
        self.url = f"http://127.0.0.1:{port}"

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200

    def start(self, wait: bool = True) -> KilnApi:
        super().start()
        if wait:
            wait_for(
                lambda: self.running() and self.healthy() or not self.running(),
                60,
                "the API to answer /healthz",
                diagnose=self.tail,
            )
            assert self.running(), f"the API exited with code {self.popen.returncode}\n{self.tail()}"
        return self


class KilnWorker(Proc):
    def __init__(self, env: dict[str, str], log: Path, queues: str = "cpu,gpu") -> None:
        super().__init__("worker", [sys.executable, "-m", "workers.cli", "worker", "--queues", queues], env, log)

    def start(self, wait: bool = True) -> KilnWorker:
        offset = self.log.stat().st_size if self.log.exists() else 0
        super().start()
        if wait:  # Celery prints "celery@host ready." once it consumes from the broker

            def ready() -> bool:
                assert self.running(), f"the worker exited with code {self.popen.returncode}"
                with open(self.log, "rb") as f:
                    f.seek(offset)
                    return b" ready." in f.read()

            wait_for(ready, 60, "the worker to be ready", diagnose=self.tail)
        return self

    def pool_children(self) -> list[int]:
        """Celery's prefork pool processes: the worker's direct children."""
        return [p for p in pids() if (st := _stat(p)) is not None and st[1] == self.pid and alive(p)]


def kiln_env(data_dir: Path, database_url: str | None, broker_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a Kiln process: this one's, without any KILN_* of its own, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({"KILN_DATA_DIR": str(data_dir), "KILN_BROKER_URL": broker_url, "PYTHONUNBUFFERED": "1"})
    if database_url:
        env["KILN_DATABASE_URL"] = database_url
    env.update({f"KILN_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Processes:
    """Remembers every process a test starts, kills them all at the end, and gathers their logs."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def logs(self, n: int = 40) -> str:
        seen, parts = set(), []
        for p in self.procs:
            if p.log not in seen:
                seen.add(p.log)
                parts.append(p.tail(n))
        return "\n".join(parts)

    def close(self, extra_needles: Iterable[str] = ()) -> None:
        for proc in reversed(self.procs):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - cleanup goes on with the next one
                pass
        # sandboxes orphaned by a killed worker die with it (PDEATHSIG); make sure
        for needle in extra_needles:
            for pid in sandboxes(needle):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user of this machine with a home of their own and no KILN_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "XDG_"))}
    env.update({"HOME": str(home), "PYTHONUNBUFFERED": "1"})
    return env


class KilnUp(Proc):
    """`kiln up` (API and worker in one command) on a free port with its data where it is told."""

    def __init__(self, data_dir: Path, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        super().__init__(
            "up",
            [sys.executable, "-m", "workers.cli", "up", "--port", str(self.port), "--data-dir", str(data_dir), *args],
            env,
            log,
        )

    def start(self, wait: bool = True) -> KilnUp:
        super().start()
        if wait:
            wait_for(
                lambda: not self.running() or (self.data_dir / "admin-token").exists() and answers(self.url),
                120,
                "kiln up to answer",
                diagnose=self.tail,
            )
            assert self.running(), f"kiln up exited with code {self.popen.returncode}\n{self.tail()}"
        return self

    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()


def kiln_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run this checkout's `kiln` command as a user would (from `cwd`, output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=timeout,
    )
