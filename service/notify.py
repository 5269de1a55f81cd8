"""Telling every API replica that deployments changed: a Redis pub/sub message where Redis is
configured (the replicas then re-read the database at once), with a periodic check of the
database as the fallback everywhere."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.config import get_settings

logger = logging.getLogger("kiln.notify")
CHANNEL = "kiln:deployments"


def url() -> str | None:
    s = get_settings()
    return s.notify_url or (s.broker_url if s.broker_url.startswith(("redis://", "rediss://")) else None)


def publish() -> None:
    """Best effort: a replica that misses it catches up at its next periodic check."""
    target = url()
    if not target:
        return
    try:
        import redis

        client = redis.Redis.from_url(target, socket_timeout=2, socket_connect_timeout=2)
        client.publish(CHANNEL, b"changed")
        client.close()
    except Exception as exc:  # noqa: BLE001 - redis raises many types
        logger.warning("could not announce a deployment change: %s", exc)


class Listener:
    """Calls `on_change` whenever any replica announces a change; reconnects after errors."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-notify", daemon=True)

    def start(self) -> None:
        if url():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import redis

        while not self._stop.is_set():
            target = url()
            if not target:  # start() does not start the thread then
                return
            try:
                client = redis.Redis.from_url(target, socket_timeout=5, socket_connect_timeout=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.on_change()
            except Exception as exc:  # noqa: BLE001 - Redis restarting: try again shortly
                logger.info("deployment notifications paused: %s", exc)
                self._stop.wait(2)
