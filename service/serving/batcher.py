"""Dynamic batching: requests that arrive together are joined along the batch axis, run once
off the event loop, and split back so each caller gets exactly its own rows."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import Unloaded

Arrays = dict[str, np.ndarray]


@dataclass
class _Item:
    inputs: Arrays
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Per deployment version. `runners` are one callable per runtime instance, each used by one
    thread at a time. With batching off (max_batch 1, or a model whose rows depend on each other)
    every request runs alone, still off the event loop."""

    def __init__(
        self,
        runners: list[Callable[[Arrays], Arrays]],
        *,
        max_batch: int,
        max_delay_s: float,
        batching: bool,
        labels: tuple[str, str],
    ) -> None:
        self.runners = runners
        self.max_batch = max(1, max_batch) if batching else 1
        self.max_delay_s = max_delay_s
        self.batching = batching and self.max_batch > 1
        self.labels = labels
        # an asyncio.Queue binds to the loop that first uses it, the one _start runs on
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix=f"infer-{labels[0]}")
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None
        self._running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        # `close` may come from another thread: under this lock a request either starts the loop and
        # queues ahead of the end marker, or sees the batcher closed; never a loop on a shut-down pool
        self._lock = threading.Lock()
        self._closed = False

    def _start(self) -> None:
        for i in range(len(self.runners)):
            self._free.put_nowait(i)
        self._loop_ref = asyncio.get_running_loop()
        self._task = self._loop_ref.create_task(self._loop())

    async def infer(self, inputs: Arrays) -> Arrays:
        """Run one request (its first axis is the batch axis when batching is on)."""
        rows = next(iter(inputs.values())).shape[0] if self.batching else 1
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(inputs.items())) if self.batching else ()
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise Unloaded(f"model {self.labels[0]!r} version {self.labels[1]} was just unloaded; send again")
            if self._task is None:
                self._start()
            self._queue.put_nowait(_Item(inputs, rows, key, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            first = self._carry or await self._queue.get()
            self._carry = None
            if first is _CLOSE:
                # Nothing is queued behind the marker: `close` sets _closed (under the lock that
                # queueing takes) before it sends the marker. Runs still going finish before the
                # loop ends, so that wait_idle covers them.
                await asyncio.gather(*self._running, return_exceptions=True)
                break
            batch = [first]
            rows = first.rows
            instance: int | None = None
            if self.batching:
                rows = self._join_queued(batch, rows)
                if rows < self.max_batch and self._carry is None and self._free.empty():
                    # The runtime is busy: join what arrives until an instance is free (a batch stays
                    # open at most max_queue_delay after its first request). A request that finds an
                    # instance free and nothing queued runs at once: batching costs a lone client nothing.
                    instance, rows = await self._join_while_busy(batch, rows, first.enqueued + self.max_delay_s)
            batch = [b for b in batch if not b.future.cancelled()]  # callers that went away
            if not batch:
                if instance is not None:
                    self._free.put_nowait(instance)
                continue
            if instance is None:
                instance = await self._free.get()
            task = asyncio.get_running_loop().create_task(self._run(instance, batch, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _fits(self, item: _Item, first: _Item, rows: int) -> bool:
        return item is not _CLOSE and item.key == first.key and rows + item.rows <= self.max_batch

    def _join_queued(self, batch: list[_Item], rows: int) -> int:
        """Join what is already queued (same shapes, up to max_batch rows); the first that does not
        fit waits for the next batch."""
        while rows < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if not self._fits(item, batch[0], rows):
                self._carry = item  # the end marker too waits for the next round
                break
            batch.append(item)
            rows += item.rows
        return rows

    async def _join_while_busy(self, batch: list[_Item], rows: int, deadline: float) -> tuple[int | None, int]:
        """Join arrivals until an instance is free, the batch is full or the deadline passes; return
        the instance if one was taken."""
        free = asyncio.ensure_future(self._free.get())
        try:
            while rows < self.max_batch and self._carry is None:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                arrival = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({free, arrival}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not arrival.done():
                    arrival.cancel()
                    try:
                        await arrival
                    except asyncio.CancelledError:
                        pass
                if arrival.done() and not arrival.cancelled():
                    item = arrival.result()
                    if self._fits(item, batch[0], rows):
                        batch.append(item)
                        rows += item.rows
                    else:
                        self._carry = item
                if free.done():
                    break
        finally:
            if not free.done():
                free.cancel()
                try:
                    await free
                except asyncio.CancelledError:
                    pass
        if free.done() and not free.cancelled():
            return free.result(), rows
        return None, rows

    async def _run(self, instance: int, batch: list[_Item], rows: int) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for item in batch:
            metrics.QUEUE.labels(*self.labels).observe(start - item.enqueued)
        try:
            if len(batch) == 1:
                joined = batch[0].inputs
            else:
                joined = {n: np.concatenate([b.inputs[n] for b in batch]) for n in batch[0].inputs}
            outputs = await loop.run_in_executor(self._pool, self.runners[instance], joined)
        except Exception as exc:  # noqa: BLE001 - passed on to the callers
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # One bad request must not fail the others it was batched with: run each alone.
            for item in batch:
                try:
                    result = await loop.run_in_executor(self._pool, self.runners[instance], item.inputs)
                except Exception as alone:  # noqa: BLE001 - whatever it was is this request's answer
                    if not item.future.done():
                        item.future.set_exception(alone)
                    continue
                if not item.future.done():
                    item.future.set_result(result)
            return
        finally:
            self._free.put_nowait(instance)
            metrics.COMPUTE.labels(*self.labels).observe(time.perf_counter() - start)
            metrics.BATCH.labels(*self.labels).observe(sum(b.rows for b in batch))
        offset = 0
        for item in batch:
            if not item.future.done():
                if len(batch) == 1:
                    item.future.set_result(outputs)
                else:
                    item.future.set_result({n: v[offset : offset + item.rows] for n, v in outputs.items()})
            offset += item.rows

    def wait_idle(self, timeout: float) -> None:
        """Block (in another thread than the event loop's) until the loop has ended and runs are done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._task is not None and not self._task.done():
            time.sleep(0.05)
        self._pool.shutdown(wait=True)

    def close(self) -> None:
        """Stop taking requests; those already queued run first (callable from any thread): a
        version being replaced answers everything it accepted, and refuses the rest with Unloaded."""
        with self._lock:
            self._closed = True
            started = self._task is not None
        if started and not self._loop_ref.is_closed():
            self._loop_ref.call_soon_threadsafe(self._queue.put_nowait, _CLOSE)


_CLOSE: _Item = object()  # type: ignore[assignment]  # the queue's end marker
