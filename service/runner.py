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

import json
import os
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from service import boundary
from service.errors import InvalidInput, KilnError, SandboxError
from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import TensorSpec

_HEADER = struct.Struct("<I")
_MAX_HEADER = 16 << 20


# --- framing (both sides) ------------------------------------------------------------------------

def send(sock: socket.socket, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """One message: header, then each array's bytes (C order); small messages in one write."""
    body = json.dumps(header).encode()
    views = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays]
    if sum(len(v) for v in views) <= 1 << 16:
        sock.sendall(b"".join([_HEADER.pack(len(body)), body, *views]))
        return
    sock.sendall(_HEADER.pack(len(body)) + body)
    for v in views:
        if len(v):
            sock.sendall(v)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the runner's channel closed")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """One message: its header, and the arrays its `tensors` list describes."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > _MAX_HEADER:
        raise EOFError(f"a message header of {size} bytes")
    header = json.loads(_recv_exact(sock, size))
    arrays = []
    for name, dtype, shape in header.get("tensors") or []:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        data = _recv_exact(sock, count * dt.itemsize)
        arrays.append((name, np.frombuffer(data, dtype=dt).reshape(shape)))
    return header, arrays


def _describe(arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    return [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


# --- the API / worker side -----------------------------------------------------------------------

class IsolatedRuntime(Runtime):
    """A runtime whose artifact runs in a runner process inside the isolation boundary."""

    name = "isolated"
    library = "torch"

    def __init__(self, path: Path, *, info: ArtifactInfo, threads: int | None = None, device: str = "cpu",
                 spin: bool = True) -> None:
        super().__init__(path, info=info, threads=threads, device=device, spin=spin)
        self.directory = self.path.parent
        self._lock = threading.Lock()
        self._boxed: boundary.Boxed | None = None
        self._sock: socket.socket | None = None
        self.notes: list[str] = []
        hello = self._start()
        self._inputs = [TensorSpec.model_validate(s) for s in hello["inputs"]]
        self._outputs = [TensorSpec.model_validate(s) for s in hello["outputs"]]

    def _start(self) -> dict[str, Any]:
        settings = boundary._settings()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = boundary.python_env(home="/tmp")
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        box = boundary.Box(
            name=f"runner:{self.directory}:{id(self)}:{os.getpid()}", read_only=(self.directory,), env=env,
            memory_bytes=settings.sandbox_memory_bytes, processes=settings.sandbox_processes,
            cpus=settings.sandbox_cpus, gpu=self.device != "cpu", file_size_bytes=64 << 20)
        # the runner's end of the channel keeps its descriptor number in the box
        argv = [sys.executable, "-P", "-m", "service.runner", str(self.directory), str(theirs.fileno()),
                str(self.threads or 0), self.device]
        # model code's output would flood the API's log: the runner's goes to a bounded file, whose
        # tail explains a runner that did not start
        errors = tempfile.TemporaryFile()
        try:
            boxed = boundary.start(argv, box, stdout=errors, stderr=errors, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self._boxed, self._sock, self.notes = boxed, ours, boxed.notes
        try:
            header, _ = recv(ours)
        except (EOFError, OSError) as exc:
            self._stop()
            errors.seek(max(0, errors.seek(0, os.SEEK_END) - 2000))
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
            raise SandboxError(f"the isolated runner for {self.path.name} did not start: {tail[0][:500]}",
                               outcome="crashed") from None
        finally:
            errors.close()
        if not header.get("ok"):
            self._stop()
            raise _error(header)
        return header

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        with self._lock:
            if self._sock is None:  # the runner died on an earlier batch: start a fresh one
                self._start()
            sock = self._sock
            assert sock is not None
            try:
                send(sock, {"outputs": list(outputs) if outputs else None, "tensors": _describe(arrays)},
                     list(arrays.values()))
                header, got = recv(sock)
            except (EOFError, OSError) as exc:
                self._stop()
                why = "ran out of memory" if self._boxed is None else "died"
                raise SandboxError(f"the isolated runner {why} while running a batch ({exc})",
                                   outcome="crashed") from None
        if not header.get("ok"):
            raise _error(header)
        return dict(got)

    def _stop(self) -> None:
        sock, boxed, self._sock, self._boxed = self._sock, self._boxed, None, None
        if sock is not None:
            sock.close()
        if boxed is not None:
            boxed.kill()
            boxed.proc.wait()
            boxed.release()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _error(header: dict[str, Any]) -> KilnError:
    kind, message = str(header.get("type")), str(header.get("message", ""))
    if kind == "InvalidInput":
        return InvalidInput(message)
    return SandboxError(f"{kind}: {message}".strip(": "), outcome="error")


# --- the runner, inside the box ------------------------------------------------------------------

def main(directory: Path, fd: int, threads: int, device: str) -> None:
    """Load the artifact with its real runtime class and answer batches until the channel closes."""
    from service.runtimes import get

    sock = socket.socket(fileno=fd)
    try:
        info = ArtifactInfo.load(directory)
        cls = get(info.runtime)
        rt = cls(directory / info.file, info=info, threads=threads or None, device=device)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back over the channel
        send(sock, {"ok": False, "type": type(exc).__name__, "message": _message(exc)})
        return
    send(sock, {"ok": True, "inputs": [_spec_json(s) for s in rt.inputs],
                "outputs": [_spec_json(s) for s in rt.outputs]})
    while True:
        try:
            header, arrays = recv(sock)
        except EOFError:
            return
        try:
            result = rt.run(dict(arrays), header.get("outputs"))
            out = {k: np.asarray(v) for k, v in result.items()}
            send(sock, {"ok": True, "tensors": _describe(out)}, list(out.values()))
        except Exception as exc:  # noqa: BLE001 - a failing batch is answered, the runner goes on
            send(sock, {"ok": False, "type": type(exc).__name__, "message": _message(exc)})


def _message(exc: BaseException) -> str:
    try:
        return str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    except Exception:  # noqa: BLE001 - model code controls __str__
        return type(exc).__name__


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    finally:
        os._exit(0)
