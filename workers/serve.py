"""Process management for `kiln api`, `kiln worker` and `kiln up`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger("kiln")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_api(host: str, port: int) -> None:
    """The FastAPI service under uvicorn (blocks)."""
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10)


def run_worker(queues: list[str], concurrency: int, name: str | None = None) -> None:
    """A Celery worker on the given queues (blocks)."""
    from service.db import migrate
    from workers.celery_app import app

    migrate()
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", "prefork",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if name:
        argv += ["--hostname", name]
    app.worker_main(argv)


class Supervisor:
    """Keeps a worker subprocess alive beside the API of `kiln up`; stops it on exit."""

    def __init__(self, queues: list[str], concurrency: int) -> None:
        self.cmd = [sys.executable, "-m", "workers.cli", "worker", "--queues", ",".join(queues),
                    "--concurrency", str(concurrency)]
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, start_new_session=True)
            code = self.proc.wait()
            if self._stop.is_set():
                return
            logger.warning("worker exited with code %s; restarting", code)
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30)
            self._stop.wait(backoff)

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            # Cold shutdown: a running job is picked up again (and resumed) after the next start.
            for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    self.proc.wait(wait)
                    return
                except subprocess.TimeoutExpired:
                    continue
