"""What the service adds to a conversion: the zoo's CNN (ResNet-18-sized, 224x224) converted with
`kiln convert` on this machine, then through the service (`kiln up`: the API and a worker on the
file broker, in a temporary data directory), with the same targets, precisions and benchmark time.
Prints both wall-clock times and the difference.

    .venv/bin/python bench/service_overhead.py [--seconds 1] [--repeat 1] [--keep DIR]

The local time is the whole `kiln convert` command. The service time runs from the start of the
upload to the moment the API reports the job `succeeded` (the worker is started and ready before
the clock starts), so it holds the upload, the queue, the job's database writes, storing the
artifacts and the polling, besides the conversion itself. Both share the machine with whatever
else runs on it: on a busy machine use --repeat and look at the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import zoo_signature  # noqa: E402 - after the sys.path set-up above

BUNDLE = ROOT / "tests" / "zoo" / "cnn.py"
ENTRY = "cnn.py:build_model"
TARGETS = "onnxruntime,torchscript"
PRECISIONS = "fp32,int8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(extra)
    return env


def run_local(base: Path, sig_file: Path, seconds: float) -> tuple[float, dict]:
    out = base / "local"
    cmd = [
        sys.executable,
        "-m",
        "workers.cli",
        "convert",
        str(BUNDLE),
        "--entry",
        ENTRY,
        "--signature",
        str(sig_file),
        "--target",
        TARGETS,
        "--precision",
        PRECISIONS,
        "--bench-seconds",
        str(seconds),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(KILN_DATA_DIR=str(base / "local-data")), capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kiln convert failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, json.loads((out / "report.json").read_text())


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


class Service:
    """`kiln up` in a temporary data directory (the API and a worker, SQLite, the file broker)."""

    def __init__(self, base: Path) -> None:
        self.data = base / "service-data"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = base / "kiln-up.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Service:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.cli",
                    "up",
                    "--port",
                    self.url.rsplit(":", 1)[1],
                    "--data-dir",
                    str(self.data),
                ],
                cwd=ROOT,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait(
                lambda: self.proc.poll() is None and httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200,
                120,
                "the API",
            )
            wait(lambda: b" ready." in self.log_path.read_bytes(), 120, "the worker")  # "celery@host ready."
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # kiln up stops its worker on the way out
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def convert(self, seconds: float) -> tuple[float, dict]:
        """Upload, create the job, poll until it ends: (seconds from upload start to `succeeded`, job)."""
        token_file = self.data / "admin-token"
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            t0 = time.perf_counter()
            r = client.post(
                "/v1/models",
                data={"name": "cnn", "entry": ENTRY, "signature": json.dumps(zoo_signature("cnn"))},
                files={"file": (BUNDLE.name, BUNDLE.read_bytes())},
            )
            r.raise_for_status()
            r = client.post(
                "/v1/jobs",
                json={
                    "model": "cnn",
                    "version": r.json()["version"],
                    "targets": TARGETS.split(","),
                    "precisions": PRECISIONS.split(","),
                    "bench_seconds": seconds,
                },
            )
            r.raise_for_status()
            job_id = r.json()["id"]
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
        if job["status"] != "succeeded":
            sys.exit(f"the service job ended {job['status']}: {job.get('error')} (log: {self.log_path})")
        return elapsed, job


def step_times(steps: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s.get('duration_s') or 0:.1f}" for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per benchmark point (bench_seconds)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (local, then service); medians at the end")
    ap.add_argument("--keep", type=Path, help="keep outputs and logs here")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kiln-overhead-"))
    base.mkdir(parents=True, exist_ok=True)
    local_times, service_times, job_times = [], [], []
    try:
        sig_file = base / "signature.json"
        sig_file.write_text(json.dumps(zoo_signature("cnn")))
        print(
            f"zoo CNN ({ENTRY}, 224x224), targets {TARGETS}, precisions {PRECISIONS}, "
            f"bench_seconds {args.seconds:g}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        with Service(base) as service:
            for i in range(args.repeat):
                shutil.rmtree(base / "local", ignore_errors=True)
                local_s, report = run_local(base, sig_file, args.seconds)
                local_times.append(local_s)
                print(
                    f"[{i + 1}] kiln convert (local):  {local_s:7.1f} s  selected {report['selection']['candidate']}",
                    flush=True,
                )
                print(f"    steps (s): {step_times(report['steps'])}", flush=True)
                service_s, job = service.convert(args.seconds)
                service_times.append(service_s)
                job_times.append(job["duration_s"])
                selected = next(c["name"] for c in job["candidates"] if c["id"] == job["selected_candidate"])
                print(
                    f"[{i + 1}] through the service:   {service_s:7.1f} s  selected {selected}; the job itself "
                    f"ran {job['duration_s']:.1f} s, the rest ({service_s - job['duration_s']:.1f} s) is upload, "
                    f"queue and polling",
                    flush=True,
                )
                print(f"    steps (s): {step_times(job['steps'])}", flush=True)
        local_s, service_s = statistics.median(local_times), statistics.median(service_times)
        diff = service_s - local_s
        label = "median of " + str(args.repeat) if args.repeat > 1 else "one run"
        print(
            f"local {local_s:.1f} s, service {service_s:.1f} s ({label}): difference {diff:+.1f} s "
            f"({diff / local_s:+.0%} of the local time); load average at the end {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
