"""Code-bearing artifacts (TorchScript) run in a runner process inside the isolation boundary.

`IsolatedRuntime` is what `runtimes.load` hands out for a runtime whose artifacts can run code: it
starts ``python -m service.runner ARTIFACT_DIR`` in a box (service/boundary.py) that sees only the
artifact's directory, read-only, and talks to it over a Unix socket pair. Validation, benchmarking
and serving all go through it, so what was validated is what is served, in the same box.

The channel carries binary tensors, never pickles: each message is a 4-byte length, a small JSON
header, then the raw array bytes in the order the header lists them::

    request  {"outputs": [names] | null, "tensors": [[name, dtype, shape], ...]} + buffers
    reply    {"ok": true, "tensors": [...]} + buffers   |   {"ok": false, "type", "message"}

The runner's first message says what it loaded: ``{"ok": true, "inputs": [...], "outputs": [...]}``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from service import boundary
from service.config import get_settings
from service.errors import InvalidInput, KilnError, SandboxError
from service.runtimes.base import ArtifactInfo, Runtime
from service.runtimes.torchscript import telling_line
from service.signature import TensorSpec

_HEADER = struct.Struct("<I")
_MAX_HEADER = 16 << 20


# --- framing (both sides) ------------------------------------------------------------------------


class Channel:
    """One end of the socket pair: messages out, and messages in through a buffer, so that a small
    message costs one recv however many parts it has."""

    def __init__(self, sock: socket.socket, max_bytes: int = 1 << 40) -> None:
        self.sock = sock
        self.max_bytes = max_bytes  # the most tensor bytes one message may announce
        self._buf = bytearray(1 << 16)
        self._start = self._end = 0

    def send(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        """One message: header, then each array's bytes (C order); small messages in one write."""
        body = orjson.dumps(header)
        views = [memoryview(np.ascontiguousarray(a).data).cast("B") for a in arrays]
        if sum(len(v) for v in views) <= 1 << 16:
            self.sock.sendall(b"".join([_HEADER.pack(len(body)), body, *views]))
            return
        self.sock.sendall(_HEADER.pack(len(body)) + body)
        for v in views:
            if len(v):
                self.sock.sendall(v)

    def _fill(self, n: int) -> None:
        """Have at least n unread bytes in the buffer."""
        if self._end - self._start >= n:
            return
        if self._start:
            self._buf[: self._end - self._start] = self._buf[self._start : self._end]
            self._end -= self._start
            self._start = 0
        if n > len(self._buf):
            self._buf.extend(bytes(n - len(self._buf)))
        view = memoryview(self._buf)
        while self._end < n:
            k = self.sock.recv_into(view[self._end :])
            if k == 0:
                raise EOFError("the runner's channel closed")
            self._end += k

    def _take(self, n: int) -> memoryview:
        self._fill(n)
        out = memoryview(self._buf)[self._start : self._start + n]
        self._start += n
        return out

    def _take_copy(self, n: int) -> bytearray:
        """n bytes in a buffer of their own (an array's data must outlive the channel's buffer)."""
        out = bytearray(n)
        have = min(n, self._end - self._start)
        out[:have] = self._buf[self._start : self._start + have]
        self._start += have
        view, got = memoryview(out), have
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("the runner's channel closed")
            got += k
        return out

    def recv(self) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        """One message: its header, and the arrays its `tensors` list describes."""
        (size,) = _HEADER.unpack(self._take(_HEADER.size))
        if size > _MAX_HEADER:
            raise EOFError(f"a message header of {size} bytes")
        header = orjson.loads(self._take(size))
        if not isinstance(header, dict):
            raise ChannelError("a message header that is not an object")
        arrays, total = [], 0
        for item in header.get("tensors") or []:
            try:
                name, dtype, shape = item
                dt = np.dtype(dtype)
                ok = (
                    isinstance(name, str)
                    and dt.kind in "biufc"
                    and isinstance(shape, list)
                    and all(isinstance(d, int) and d >= 0 for d in shape)
                    and len(shape) <= 64
                )
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ChannelError(f"a tensor that is not a plain numeric array: {str(item)[:200]}")
            nbytes = math.prod(shape) * dt.itemsize
            total += nbytes
            if total > self.max_bytes:
                raise ChannelError(f"a message of more than {self.max_bytes} bytes of tensors")
            data = self._take_copy(nbytes)
            arrays.append((name, np.frombuffer(data, dtype=dt).reshape(shape)))
        return header, arrays


class ChannelError(EOFError):
    """The other end sent something that is not a message of this protocol: the channel is done."""


def _describe(arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    return [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


# --- the API / worker side -----------------------------------------------------------------------


SCRATCH_FLOOR = {"file_size_bytes": 64 << 20, "tmp_bytes": 256 << 20}


def scratch_for(directory: Path, memory_bytes: int | None = None) -> dict[str, int]:
    """The runner box's /tmp size and largest writable file, for an artifact: loading may unpack
    it there (an AOTInductor package extracts its library and weights to a temporary directory;
    a T5 encoder's weights alone are a file over the 64 MiB a runner was allowed). Both grow
    with the artifact, from SCRATCH_FLOOR up to half the box's memory limit (`memory_bytes`, or
    the default a box gets): the box has two such tmpfs (/tmp and /dev/shm), whose pages count as
    its memory where it has a memory cgroup; where it has none, their sizes alone bound them, and
    together they then stay within the limit. The largest file is never larger than the tmpfs."""
    sizes = [f.stat().st_size for f in directory.rglob("*") if f.is_file()]
    total, largest = sum(sizes), max(sizes, default=0)
    memory = memory_bytes or boundary.default_memory_bytes()
    tmp = min(max(SCRATCH_FLOOR["tmp_bytes"], total + (64 << 20)), max(SCRATCH_FLOOR["tmp_bytes"], memory // 2))
    return {
        "file_size_bytes": min(max(SCRATCH_FLOOR["file_size_bytes"], largest + (16 << 20)), tmp),
        "tmp_bytes": tmp,
    }


class IsolatedRuntime(Runtime):
    """A runtime whose artifact runs in a runner process inside the isolation boundary."""

    name = "isolated"
    library = "torch"

    def __init__(
        self, path: Path, *, info: ArtifactInfo, threads: int | None = None, device: str = "cpu", spin: bool = True
    ) -> None:
        super().__init__(path, info=info, threads=threads, device=device, spin=spin)
        self.spin = spin
        self.directory = self.path.parent
        self._lock = threading.Lock()
        self._boxed: boundary.Boxed | None = None
        self._channel: Channel | None = None
        self._errors: IO[bytes] | None = None  # the runner's output, a temporary file
        self._room: dict[str, int] = {}  # the box's memory limit, /tmp size and largest file
        self.notes: list[str] = []
        hello = self._start()
        self._inputs = [TensorSpec.model_validate(s) for s in hello["inputs"]]
        self._outputs = [TensorSpec.model_validate(s) for s in hello["outputs"]]

    def _start(self) -> dict[str, Any]:
        settings = get_settings()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = boundary.python_env(home="/tmp")
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if not self.spin:
            # Idle intra-op threads spin only briefly (about 10-20 us, libgomp's default spins about
            # 100x longer) before they sleep: long enough to catch the next parallel region of the same
            # forward pass, short enough not to take the cores the server needs between requests.
            # (OMP_WAIT_POLICY=PASSIVE made the CNN 5 % slower: every region then wakes its threads.)
            env["GOMP_SPINCOUNT"] = "20000"
        room = scratch_for(self.directory, settings.sandbox_memory_bytes)
        self._room = {**room, "memory_bytes": settings.sandbox_memory_bytes or boundary.default_memory_bytes()}
        box = boundary.Box(
            name=f"runner:{self.directory}:{id(self)}:{os.getpid()}",
            read_only=(self.directory,),
            env=env,
            memory_bytes=settings.sandbox_memory_bytes,
            processes=settings.sandbox_processes,
            cpus=settings.sandbox_cpus,
            gpu=self.device != "cpu",
            file_size_bytes=room["file_size_bytes"],
            tmp_bytes=room["tmp_bytes"],
        )
        # the runner's end of the channel keeps its descriptor number in the box
        argv = [
            sys.executable,
            "-P",
            "-m",
            "service.runner",
            str(self.directory),
            str(theirs.fileno()),
            str(self.threads or 0),
            self.device,
        ]
        # model code's output would flood the API's log: the runner's goes to a bounded file, whose
        # tail explains a runner that did not start
        self._last_words(close=True)  # a runner that died before this one
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the runner (_last_words)
        try:
            boxed = boundary.start(argv, box, stdout=errors, stderr=errors, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        # A runner answers with no more than a batch's worth of outputs, and within the sandbox timeout.
        ours.settimeout(settings.sandbox_timeout_s)
        self._boxed, self._channel, self.notes = boxed, Channel(ours, settings.max_infer_bytes * 16), boxed.notes
        self._errors = errors  # kept while the runner lives: its last line explains a crash
        try:
            header, _ = self._channel.recv()
        except Exception as exc:  # noqa: BLE001 - whatever the runner did, it is stopped
            ended = self._how_it_ended(exc)
            self._stop()
            tail = self._last_words(close=True) or str(exc)
            raise SandboxError(
                f"the isolated runner for {self.path.name} did not start: "
                + (f"{ended}; " if ended else "")
                + tail[:500],
                outcome="crashed",
            ) from None
        if not header.get("ok"):
            self._stop()
            raise _error(header)
        try:
            [TensorSpec.model_validate(x) for x in header["inputs"] + header["outputs"]]
        except Exception:  # noqa: BLE001 - a hello that is not one
            self._stop()
            raise SandboxError("the isolated runner did not say what it loaded", outcome="crashed") from None
        return header

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        with self._lock:
            if self._channel is None:  # the runner died on an earlier batch: start a fresh one
                self._start()
            channel = self._channel
            assert channel is not None
            try:
                channel.send(
                    {"outputs": list(outputs) if outputs else None, "tensors": _describe(arrays)}, list(arrays.values())
                )
                header, got = channel.recv()
            except Exception as exc:  # noqa: BLE001 - a runner that died, hung or spoke nonsense is stopped
                ended = self._how_it_ended(exc)
                self._stop()  # first: a runner that dies has written its last words once it is gone
                why = "did not answer in time" if isinstance(exc, TimeoutError) else "failed"
                last = self._last_words(close=True)
                raise SandboxError(
                    f"the isolated runner {why} while running a batch ({type(exc).__name__}: {str(exc)[:200]})"
                    + (f"; {ended}" if ended else "")
                    + (f"; its last words: {last[:500]}" if last else ""),
                    outcome="crashed",
                ) from None
            if not isinstance(header.get("ok"), bool) or (header["ok"] and not _answers(got, outputs)):
                self._stop()
                raise SandboxError(
                    "the isolated runner answered with something else than the outputs asked for", outcome="crashed"
                )
        if not header.get("ok"):
            raise _error(header)
        return dict(got)

    def _how_it_ended(self, exc: BaseException) -> str:
        """Why a runner whose channel closed is gone, when one of its limits ended it: the kernel kills
        without a word, so its own output cannot say. '' when it is still running or ended otherwise."""
        boxed = self._boxed
        if boxed is None or not isinstance(exc, (EOFError, ConnectionError)) or isinstance(exc, ChannelError):
            return ""
        try:  # its end of the channel closed as it died: what it died of comes a moment later
            code = boxed.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        room = self._room
        if boxed.oom_killed():
            return (
                f"it was killed for using more than its {_mib(room['memory_bytes'])} memory limit "
                "(what it writes to its /tmp and /dev/shm counts too)"
            )
        # bubblewrap exits with 128 + the signal that killed what it ran; unisolated, the runner is the process
        signum = -code if code < 0 else code - 128 if boxed.isolated and code > 128 else 0
        if signum == signal.SIGBUS:
            return f"it was killed by SIGBUS: a file it mapped outgrew its /tmp or /dev/shm ({_mib(room['tmp_bytes'])} each)"
        if signum == signal.SIGXFSZ:
            return f"it was killed for writing a file larger than its {_mib(room['file_size_bytes'])} limit"
        try:
            return f"it was killed by {signal.Signals(signum).name}" if signum else ""
        except ValueError:
            return f"it was killed by signal {signum}"

    def _last_words(self, close: bool = False) -> str:
        """What the runner last said on its output (a C++ abort's message, say), or ''."""
        errors = self._errors
        if errors is None:
            return ""
        try:
            errors.seek(max(0, errors.seek(0, os.SEEK_END) - 8000))
            lines = errors.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        finally:
            if close:
                errors.close()
                self._errors = None
        # a C++ exception that ended the process says what in its `what():` line, above its frames
        told = [ln.strip() for ln in lines if ln.strip().startswith("what():")]
        plain = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("frame #")]
        return (told or plain or [""])[-1]

    def _stop(self) -> None:
        channel, boxed, self._channel, self._boxed = self._channel, self._boxed, None, None
        if channel is not None:
            channel.sock.close()
        if boxed is not None:
            boxed.kill()
            boxed.proc.wait()
            boxed.release()

    def close(self) -> None:
        boxed = self._boxed
        if boxed is not None:  # a batch in flight (a runner that hangs, say) ends with an error now
            boxed.kill()
        with self._lock:
            self._stop()
            self._last_words(close=True)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _answers(got: list[tuple[str, np.ndarray]], outputs: Sequence[str] | None) -> bool:
    names = [n for n, _ in got]
    return len(set(names)) == len(names) and (not outputs or set(outputs) <= set(names))


def _error(header: dict[str, Any]) -> KilnError:
    kind, message = str(header.get("type")), str(header.get("message", ""))
    if kind == "InvalidInput":
        return InvalidInput(message)
    return SandboxError(f"{kind}: {message}".strip(": "), outcome="error")


# --- the runner, inside the box ------------------------------------------------------------------


def main(directory: Path, fd: int, threads: int, device: str) -> None:
    """Load the artifact with its real runtime class and answer batches until the channel closes."""
    from service.runtimes import get

    channel = Channel(socket.socket(fileno=fd))
    try:
        info = ArtifactInfo.load(directory)
        cls = get(info.runtime)
        rt = cls(directory / info.file, info=info, threads=threads or None, device=device)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back over the channel
        channel.send({"ok": False, "type": type(exc).__name__, "message": _message(exc)})
        return
    channel.send(
        {"ok": True, "inputs": [_spec_json(s) for s in rt.inputs], "outputs": [_spec_json(s) for s in rt.outputs]}
    )
    while True:
        try:
            header, arrays = channel.recv()
        except EOFError:
            return
        try:
            result = rt.run(dict(arrays), header.get("outputs"))
            out = {k: np.asarray(v) for k, v in result.items()}
            channel.send({"ok": True, "tensors": _describe(out)}, list(out.values()))
        except Exception as exc:  # noqa: BLE001 - a failing batch is answered, the runner goes on
            channel.send({"ok": False, "type": type(exc).__name__, "message": _message(exc)})


def _message(exc: BaseException) -> str:
    try:
        return telling_line(str(exc))[:500] or type(exc).__name__
    except Exception:  # noqa: BLE001 - model code controls __str__
        return type(exc).__name__


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    finally:
        os._exit(0)
