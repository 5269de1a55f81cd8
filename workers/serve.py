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


def configure_logging(role: str, level: str = "INFO") -> None:
    """Logs that say which host and role wrote them; the same labels go on this process's metrics."""
    import socket

    from service import metrics

    host = socket.gethostname()
    logging.basicConfig(level=level, format=f"%(asctime)s {host} {role} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up is not news
    # "Task kiln.convert[...] succeeded in 3.80s: 'failed'": the task ran, the job failed; the job's
    # own log lines say what happened, so Celery's per-task line is only confusing.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    os.environ["KILN_ROLE"] = role
    metrics.identify(role)


class Presence:
    """Tells the database every few seconds that this worker is alive and which queues it takes,
    so the API can say when a queued job has no worker to go to."""

    def __init__(self, queues: list[str], interval: float = 10.0) -> None:
        import socket

        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.host, self.queues, self.interval = socket.gethostname(), queues, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-worker-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        from service import jobs
        from service.db import session_scope

        self._stop.set()
        try:
            with session_scope() as s:
                jobs.worker_gone(s, self.name)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

    def _run(self) -> None:
        from service import jobs
        from service.db import session_scope

        while not self._stop.is_set():
            try:
                with session_scope() as s:
                    jobs.worker_seen(s, self.name, self.host, self.queues)
            except Exception:
                logger.warning("could not record worker presence", exc_info=True)
            self._stop.wait(self.interval)


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str) -> None:
    """Without authentication Kiln listens only on loopback, unless KILN_OPEN_NETWORK says so."""
    from service.config import get_settings
    from service.errors import InvalidOptions

    settings = get_settings()
    if not settings.auth and not settings.open_network and not is_loopback(host):
        raise InvalidOptions(
            f"authentication is off, so Kiln listens only on a loopback address, not {host}; "
            "turn authentication on, or set KILN_OPEN_NETWORK=true if something in front of "
            "Kiln authenticates every request"
        )


def run_api(host: str, port: int) -> None:
    """The FastAPI service under uvicorn (blocks), with bounds for slow and many clients: a request's
    headers must arrive within KILN_HEADER_TIMEOUT_S, an idle keep-alive connection closes after
    KILN_KEEP_ALIVE_TIMEOUT_S, and past KILN_MAX_CONNECTIONS connections new requests get a 503."""
    import uvicorn

    from service.app import create_app
    from service.config import get_settings

    check_exposure(host)
    # gRPC beside HTTP: the next port on the same address unless KILN_GRPC_PORT says otherwise (0: off)
    if "KILN_GRPC_PORT" not in os.environ:
        os.environ["KILN_GRPC_PORT"] = str(port + 1)
        os.environ.setdefault("KILN_GRPC_HOST", host)
        get_settings.cache_clear()
    settings = get_settings()
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_keep_alive=int(max(1, settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_connections,
    )


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request headers take longer than `seconds`
    to arrive (uvicorn times out idle keep-alive connections, but not a client that trickles its
    headers a byte at a time)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        # One timer per connection, moved only when it fires: arming and cancelling a timer for
        # every request on a keep-alive connection was a visible share of a small /v2 request's
        # time on the event loop. `_waiting_since` is when the headers now awaited began to
        # arrive (None: none are awaited); the timer closes the connection once that is `seconds`
        # ago, and otherwise sets itself for the moment it will be.
        _header_timer = None
        _waiting_since: float | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._waiting_since = self.loop.time()
            self._header_timer = self.loop.call_at(self._waiting_since + seconds, self._check)

        def _check(self) -> None:
            self._header_timer = None
            since = self._waiting_since
            if since is None or self.transport.is_closing():
                return  # the next request's first bytes set the timer again
            if self.cycle is not None and not self.cycle.response_complete:
                self._waiting_since = None  # a request is being answered: its headers are in
                return
            deadline = since + seconds
            if self.loop.time() >= deadline:
                self.transport.close()
            else:
                self._header_timer = self.loop.call_at(deadline, self._check)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._waiting_since is None and (before is None or before.response_complete):
                # bytes of a new request: its headers must complete in time
                self._waiting_since = self.loop.time()
                if self._header_timer is None:
                    self._header_timer = self.loop.call_at(self._waiting_since + seconds, self._check)
            super().data_received(data)
            if self.cycle is not before:  # the headers are in: a new request started
                self._waiting_since = None

        def connection_lost(self, exc) -> None:
            self._waiting_since = None
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeout


def run_worker(queues: list[str], concurrency: int, name: str | None = None) -> None:
    """A Celery worker on the given queues (blocks)."""
    import warnings

    from service.db import migrate
    from workers.celery_app import app

    # Celery warns against running as root because pickled messages could run code in the worker;
    # Kiln's queues accept JSON only, and model code runs as the sandbox's unprivileged user.
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    migrate()
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if name:
        argv += ["--hostname", name]
    presence = Presence(queues)
    presence.start()
    try:
        app.worker_main(argv)
    finally:
        presence.stop()


def _die_with_parent() -> None:
    """In the worker child: die if `kiln up` does (even by SIGKILL); a stray worker would go on
    taking jobs with nobody supervising it."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Supervisor:
    """Keeps a worker subprocess alive beside the API of `kiln up`; stops it on exit."""

    def __init__(self, queues: list[str], concurrency: int) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "workers.cli",
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
        ]
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, preexec_fn=_die_with_parent)
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
