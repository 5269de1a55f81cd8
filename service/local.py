"""Where the `kiln up` servers of this user listen and keep their data, so that the `kiln` CLI on the
same machine finds the server and its admin token whatever `--port` and `--data-dir` it was given.

`kiln up` records itself in `$XDG_STATE_HOME/kiln/servers.json` (`~/.local/state/kiln/` by default),
a file private to the user; an entry whose process is gone is ignored. Only the data directory is
recorded, never a token: the token stays in that directory's `admin-token`, readable only by its owner.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class LocalServer:
    url: str
    data_dir: Path
    pid: int


def registry_path() -> Path:
    """The user's record of running `kiln up` servers."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kiln" / "servers.json"


def _alive(pid: int) -> bool:
    """Whether `pid` is still a running `kiln up` (not a process that reused its number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: the signal check is all there is
    return b"up" in cmdline


def _read() -> list[dict]:
    try:
        entries = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return []
    return (
        [e for e in entries if isinstance(e, dict) and {"url", "data_dir", "pid"} <= e.keys()]
        if isinstance(entries, list)
        else []
    )


def _write(entries: list[dict]) -> None:
    path = registry_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server listening on host:port."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def record(url: str, data_dir: Path, pid: int | None = None) -> None:
    """Remember that this process serves `url` with its data in `data_dir` (newest first)."""
    pid = pid or os.getpid()
    entries = [e for e in _read() if e["url"] != url and _alive(e["pid"])]
    entries.insert(0, {"url": url, "data_dir": str(Path(data_dir).resolve()), "pid": pid, "started": time.time()})
    try:
        _write(entries)
    except OSError:
        pass  # a read-only home: the CLI then needs --server and --token, as on another machine


def forget(url: str, pid: int | None = None) -> None:
    pid = pid or os.getpid()
    entries = _read()
    kept = [e for e in entries if not (e["url"] == url and e["pid"] == pid)]
    if len(kept) != len(entries):
        try:
            _write(kept)
        except OSError:
            pass


def running(url: str | None = None) -> LocalServer | None:
    """The newest running `kiln up` of this user (the one at `url` when given), if any."""
    wanted = url.rstrip("/") if url else None
    for e in _read():
        if (wanted is None or _same(e["url"], wanted)) and _alive(int(e["pid"])):
            return LocalServer(e["url"], Path(e["data_dir"]), int(e["pid"]))
    return None


def _same(a: str, b: str) -> bool:
    loopback = ("127.0.0.1", "localhost", "[::1]")
    for name in loopback:
        a, b = a.replace(f"//{name}:", "//127.0.0.1:"), b.replace(f"//{name}:", "//127.0.0.1:")
    return a.rstrip("/") == b.rstrip("/")


def default_server() -> str:
    """KILN_SERVER, else the newest running `kiln up` of this user, else http://127.0.0.1:8000."""
    if os.environ.get("KILN_SERVER"):
        return os.environ["KILN_SERVER"]
    found = running()
    return found.url if found else DEFAULT_SERVER
