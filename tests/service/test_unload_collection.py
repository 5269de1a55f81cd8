"""Unloading a version frees its runtimes at once, and what they left in reference cycles with a
full collection, which holds the GIL (and so every request in flight) while it walks every object
of the process: unloads close together share one collection instead of paying one each."""

from __future__ import annotations

import gc
import time
import weakref

from service.serving import manager


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _full_collections(seconds: float, unloads: int) -> tuple[int, list[weakref.ref]]:
    """Unload `unloads` times in a row, each leaving a frozen cycle (as a loaded version's objects
    are frozen by Manager.load); count the full collections over `seconds`."""
    full: list[float] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(time.monotonic())

    gc.callbacks.append(seen)
    refs = []
    try:
        for _ in range(unloads):
            cycle = _Cycle()
            refs.append(weakref.ref(cycle))
            gc.freeze()
            del cycle
            manager._release([], None)
        time.sleep(seconds)
    finally:
        gc.callbacks.remove(seen)
    return len(full), refs


def test_unloads_close_together_share_one_full_collection_and_their_cycles_are_freed(monkeypatch):
    monkeypatch.setattr(manager, "COLLECT_EVERY_S", 5.0, raising=False)
    monkeypatch.setattr(manager, "_collected_at", float("-inf"), raising=False)
    count, refs = _full_collections(0.5, 5)
    # the first unload is collected at once (on a loaded machine, perhaps after the window); the
    # four after it wait for the next one, 5 s later
    assert count <= 1, f"{count} full collections for 5 unloads within 0.5 s"
    deadline = time.monotonic() + 30
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(r() is None for r in refs), "an unloaded version's cycles were never collected"
