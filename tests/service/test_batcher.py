"""The batcher when its version is unloaded: what it accepted is answered, what comes after is
refused with Unloaded (a 503 that says to send again), never run on a shut-down thread pool."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.errors import Unloaded
from service.serving.batcher import Batcher


def double(inputs):
    time.sleep(0.02)
    return {"y": inputs["x"] * 2}


def batcher(**kw) -> Batcher:
    return Batcher([double], max_batch=kw.pop("max_batch", 8), max_delay_s=kw.pop("max_delay_s", 0.005),
                   batching=kw.pop("batching", True), labels=("m", "1"))


def test_closed_before_its_first_request_it_refuses_instead_of_running_on_a_dead_pool():
    b = batcher()
    b.close()
    done = threading.Thread(target=b.wait_idle, args=(5,))
    done.start()
    done.join(5)
    assert not done.is_alive()  # nothing was running: the pool went at once
    with pytest.raises(Unloaded, match="version 1 was just unloaded; send again"):
        asyncio.run(b.infer({"x": np.ones((1, 3), np.float32)}))


@pytest.mark.parametrize("batching", [True, False])
def test_close_answers_what_was_accepted_then_refuses(batching):
    b = batcher(batching=batching)
    idle = threading.Event()

    async def scenario():
        loop = asyncio.get_running_loop()
        xs = [np.full((1, 3), i, np.float32) for i in range(12)]
        accepted = [asyncio.ensure_future(b.infer({"x": x})) for x in xs]
        await asyncio.sleep(0)  # they are queued
        await loop.run_in_executor(None, b.close)  # from another thread, as the sync loop does
        await asyncio.sleep(0.01)  # the close reaches the loop
        with pytest.raises(Unloaded):
            await b.infer({"x": xs[0]})
        waiter = loop.run_in_executor(None, lambda: (b.wait_idle(30), idle.set()))
        results = await asyncio.gather(*accepted)
        await waiter
        return xs, results

    xs, results = asyncio.run(scenario())
    assert [r["y"].tolist() for r in results] == [(x * 2).tolist() for x in xs]
    assert idle.is_set()
    with pytest.raises(RuntimeError, match="after shutdown"):  # the pool is gone, after the last run
        b._pool.submit(print)
