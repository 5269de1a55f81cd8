"""Dynamic batching: requests that arrive together are joined along the batch axis, run once
off the event loop, and split back so each caller gets exactly its own rows.

One thread per runtime instance takes requests from one first-in-first-out queue (fair: the
oldest request is always the next batch's first) and runs them. A caller on an event loop (HTTP)
is answered through its loop; a caller on a thread of its own (the gRPC server's) waits on a plain
future; neither costs an extra hop through an executor or a scheduling task."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import Overloaded, Unloaded

Arrays = dict[str, np.ndarray]
logger = logging.getLogger("kiln.serving")
# A lone request of a model whose runs take at most this long runs on the caller's event loop.
INLINE_MAX_S = 0.0005


def _never() -> bool:
    return False


@dataclass
class _Item:
    inputs: Arrays
    rows: int
    key: tuple
    # settles the caller's future with (result, error), from the runner thread
    answer: Callable[[Arrays | None, BaseException | None], None]
    gone: Callable[[], bool]  # whether the caller went away (cancelled) before its run
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Per deployment version. `runners` are one callable per runtime instance, each used by one
    thread at a time. With batching off (max_batch 1, or a model whose rows depend on each other)
    every request runs alone, still off the event loop.

    A request that finds an instance free runs at once: batching costs a lone client nothing.
    Requests that arrive while every instance is busy wait in the queue; when an instance frees,
    the oldest waiting request is the first of its batch and the others that fit (same shapes, up
    to max_batch rows) join it, unless they came more than max_queue_delay after it: a batch stays
    open no longer than the delay (with a delay of 0, whatever is waiting joins)."""

    def __init__(
        self,
        runners: list[Callable[[Arrays], Arrays]],
        *,
        max_batch: int,
        max_delay_s: float,
        batching: bool,
        labels: tuple[str, str],
        max_queue: int = 0,
    ) -> None:
        self.runners = runners
        self.max_queue = max_queue  # requests that may wait; 0: no bound
        self.max_batch = max(1, max_batch) if batching else 1
        self.max_delay_s = max_delay_s
        self.batching = batching and self.max_batch > 1
        self.labels = labels
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition(threading.Lock())
        # The runner threads, started on first use. Daemon threads: a batcher nobody closed must
        # not hold the process at exit (concurrent.futures joins its workers there, forever).
        self._threads: list[threading.Thread] = []
        self._free = list(range(len(runners)))  # instances no thread is running now
        self._closed = False
        # how long a run takes, a moving average (unknown at first: the first runs take the threads)
        self._compute_s = float("inf")
        # label lookups done once, not per request
        self.m_requests = metrics.REQUESTS.labels(*labels)
        self.m_in_flight = metrics.IN_FLIGHT.labels(*labels)
        self.m_request = metrics.REQUEST.labels(*labels)
        self._m_queue = metrics.QUEUE.labels(*labels)
        self._m_compute = metrics.COMPUTE.labels(*labels)
        self._m_batch = metrics.BATCH.labels(*labels)

    # --- callers --------------------------------------------------------------------------------------
    async def infer(self, inputs: Arrays) -> Arrays:
        """Run one request from an event loop (its first axis is the batch axis when batching is on).

        A lone request (nothing queued, every instance free) of a model that computes in well under
        a millisecond runs right here on the loop's thread: handing it to a runner thread and back
        would cost more than the run. Anything slower, or anything that finds company, goes
        through the runner threads, where it can be batched and keeps the loop free."""
        if self._compute_s <= INLINE_MAX_S:
            with self._cond:
                self._check_open()
                instance = self._free.pop() if not self._queue and len(self._free) == len(self.runners) else None
            if instance is not None:
                done: list = []
                item = self._item(inputs, lambda r, e: done.append((r, e)), _never)
                self._run_on(instance, [item], item.rows)
                result, error = done[0]
                if error is not None:
                    raise error
                return result
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result: Arrays | None, error: BaseException | None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

        def answer(result: Arrays | None, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the caller's loop has closed: nobody is waiting
                pass

        self._put(inputs, answer, fut.cancelled)
        return await fut

    def infer_blocking(self, inputs: Arrays, timeout: float | None = None) -> Arrays:
        """Run one request from a thread that may block (not an event loop's)."""
        fut: Future[Arrays] = Future()

        def answer(result: Arrays | None, error: BaseException | None) -> None:
            if fut.set_running_or_notify_cancel():  # False: the caller cancelled it
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)  # type: ignore[arg-type]

        item = self._item(inputs, answer, fut.cancelled)
        with self._cond:
            self._check_open()
            # Nothing waiting and an instance free: this thread runs the request itself, sparing
            # two thread switches; otherwise it joins the queue like any other request.
            instance = self._free.pop() if not self._queue and self._free else None
            if instance is None:
                self._enqueue(item)
        if instance is not None:
            self._run_on(instance, [item], item.rows)
        return fut.result(timeout)

    def _item(self, inputs: Arrays, answer, gone) -> _Item:
        rows = next(iter(inputs.values())).shape[0] if self.batching else 1
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(inputs.items())) if self.batching else ()
        return _Item(inputs, rows, key, answer, gone)

    def _check_open(self) -> None:
        if self._closed:
            raise Unloaded(f"model {self.labels[0]!r} version {self.labels[1]} was just unloaded; send again")

    def _put(self, inputs: Arrays, answer, gone) -> None:
        item = self._item(inputs, answer, gone)
        with self._cond:
            self._check_open()
            self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        """Queue a request (under the lock), starting the runner threads on first use; refused
        when the queue is full: a request that would wait behind that many is better sent again
        later (or elsewhere) than left to time out, and the tail of those queued stays short."""
        if self.max_queue and len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"model {self.labels[0]!r} version {self.labels[1]} is overloaded: {len(self._queue)} requests "
                "are waiting already (its max_queue_size); send again shortly"
            )
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._serve, name=f"infer-{self.labels[0]}-{i}", daemon=True)
                for i in range(len(self.runners))
            ]
            for thread in self._threads:
                thread.start()
        self._queue.append(item)
        self._cond.notify()

    # --- the runner threads -------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._queue and self._free) and not (self._closed and not self._queue):
                    self._cond.wait()
                if not self._queue:  # closed, and everything accepted has been taken
                    return
                instance = self._free.pop()
                batch, rows = self._take()
            self._run_on(instance, batch, rows)

    def _run_on(self, instance: int, batch: list[_Item], rows: int) -> None:
        """Run a batch on an instance taken from the free list, give the instance back, then
        answer: a caller that sends its next request at once finds the instance free."""
        answers: list[tuple[_Item, Arrays | None, BaseException | None]] = []
        try:
            if batch:
                answers = self._run(self.runners[instance], batch, rows)
        except Exception as exc:  # a bug here must not stop the thread that serves the queue
            logger.exception("batch of %d request(s) for %s v%s failed", len(batch), *self.labels)
            answers = [(item, None, exc) for item in batch]
        finally:
            with self._cond:
                self._free.append(instance)
                # Wake the runner threads only when one has work (or the batcher is closing, for
                # wait_idle): after a lone request run inline, waking them for nothing made each one
                # take the GIL from the event loop (about 30 us a request under a profiler).
                if self._queue or self._closed:
                    self._cond.notify_all()
        for item, result, error in answers:
            item.answer(result, error)

    def _take(self) -> tuple[list[_Item], int]:
        """The next batch (under the lock): the oldest request, and those queued behind it that fit."""
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        if self.batching and self._queue:
            until = first.enqueued + self.max_delay_s if self.max_delay_s > 0 else float("inf")
            kept: list[_Item] = []
            while self._queue and rows < self.max_batch:
                item = self._queue[0]
                if item.enqueued > until:
                    break  # later arrivals: the next batch
                self._queue.popleft()
                if item.key == first.key and rows + item.rows <= self.max_batch:
                    batch.append(item)
                    rows += item.rows
                else:
                    kept.append(item)  # another shape, or too many rows: keeps its place
            self._queue.extendleft(reversed(kept))
        live = [b for b in batch if not b.gone()]  # callers that went away
        return live, sum(b.rows for b in live)

    def _run(
        self, run: Callable[[Arrays], Arrays], batch: list[_Item], rows: int
    ) -> list[tuple[_Item, Arrays | None, BaseException | None]]:
        """Run a batch; each request's answer: its own rows of the outputs, or its error."""
        start = time.perf_counter()
        for item in batch:
            self._m_queue.observe(start - item.enqueued)
        try:
            if len(batch) == 1:
                joined = batch[0].inputs
            else:
                joined = {n: np.concatenate([b.inputs[n] for b in batch]) for n in batch[0].inputs}
            outputs = run(joined)
        except Exception as exc:  # noqa: BLE001 - passed on to the callers
            if len(batch) == 1:
                return [(batch[0], None, exc)]
            # One bad request must not fail the others it was batched with: run each alone.
            answers: list[tuple[_Item, Arrays | None, BaseException | None]] = []
            for item in batch:
                try:
                    answers.append((item, run(item.inputs), None))
                except Exception as alone:  # noqa: BLE001 - whatever it was is this request's answer
                    answers.append((item, None, alone))
            return answers
        finally:
            took = time.perf_counter() - start
            self._m_compute.observe(took)
            self._m_batch.observe(rows)
            self._compute_s = took if self._compute_s == float("inf") else 0.8 * self._compute_s + 0.2 * took
        if len(batch) == 1:
            return [(batch[0], outputs, None)]
        answers = []
        offset = 0
        for item in batch:
            answers.append((item, {n: v[offset : offset + item.rows] for n, v in outputs.items()}, None))
            offset += item.rows
        return answers

    # --- unloading ------------------------------------------------------------------------------------
    def wait_idle(self, timeout: float) -> None:
        """Block until the runner threads have ended (after `close`) and every run is done."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._free) < len(self.runners) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop taking requests; those already queued run first (callable from any thread): a
        version being replaced answers everything it accepted, and refuses the rest with Unloaded."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
