"""Deployments held in memory by this process: loading, warm-up, the batching check, and keeping
in step with the database (which says what should be served)."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from sqlalchemy import func, select

from service import metrics, runtimes
from service import samples as sample_io
from service.artifacts import ArtifactStore
from service.config import get_settings
from service.db import session_scope
from service.errors import InvalidInput, NotFound, Unavailable
from service.runtimes.base import Runtime
from service.serving import protocol
from service.serving.batcher import Batcher
from service.signature import Signature, TensorSpec
from service.states import DeploymentState, move_deployment
from service.tables import Deployment

logger = logging.getLogger("kiln.serving")
DEFAULT_OPTIONS = {
    "max_batch_size": None,
    "max_queue_delay_ms": 0.0,
    "max_queue_size": 512,
    "instances": 1,
    "threads": None,
}


PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torchscript": "pytorch_torchscript", "tensorrt": "tensorrt_plan"}


@dataclass
class Served:
    """One deployment version in this process."""

    owner: str
    name: str
    version: int
    deployment_id: str
    candidate_id: str
    candidate_name: str
    runtime: str
    signature: Signature
    options: dict[str, Any]
    state: DeploymentState = DeploymentState.LOADING
    error: str | None = None
    batching: bool = False
    batching_note: str = ""
    threads: int = 1  # intra-op threads per runtime instance
    max_batch: int = 1
    batcher: Batcher | None = None
    instances: list[Runtime] = field(default_factory=list)
    updated: float = 0.0

    @cached_property
    def input_dtypes(self) -> dict[str, str]:
        # a signature is refused when an input has no dtype, so every input is here
        return {s.name: s.dtype for s in self.signature.inputs if s.dtype is not None}

    @cached_property
    def output_dtypes(self) -> dict[str, str | None]:
        """Every output; None where the signature leaves its dtype to the runtime."""
        return {s.name: s.dtype for s in self.signature.outputs}

    def metadata(self, versions: list[int]) -> dict[str, Any]:
        """The protocol's model metadata (dynamic sizes as -1), for HTTP and gRPC alike."""

        def shape(spec: TensorSpec) -> list[int]:
            return [d if isinstance(d, int) else -1 for d in spec.shape or []]

        return {
            "name": self.name,
            "versions": [str(v) for v in versions],
            "platform": PLATFORMS.get(self.runtime, self.runtime),
            "inputs": [
                {"name": s.name, "datatype": protocol.DTYPE_TO_V2[self.input_dtypes[s.name]], "shape": shape(s)}
                for s in self.signature.inputs
            ],
            "outputs": [
                {"name": s.name, "datatype": protocol.DTYPE_TO_V2.get(s.dtype or "float32", "FP32"), "shape": shape(s)}
                for s in self.signature.outputs
            ],
        }

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Every input present, with the signature's rank, static sizes and dynamic ranges."""
        missing = [s.name for s in self.signature.inputs if s.name not in inputs]
        if missing:
            raise InvalidInput(f"missing input(s) {', '.join(missing)}")
        sizes: dict[str, int] = {}
        for spec in self.signature.inputs:
            arr, shape = inputs[spec.name], spec.shape or []
            if arr.ndim != len(shape):
                raise InvalidInput(
                    f"input {spec.name!r} has shape {list(arr.shape)}; the model takes rank {len(shape)} {_show(shape)}"
                )
            for axis, (want, got) in enumerate(zip(shape, arr.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InvalidInput(
                            f"input {spec.name!r} axis {axis} is {got}; the model takes {want} {_show(shape)}"
                        )
                    continue
                r = self.signature.dims[want]
                if not r.min <= got <= r.max:
                    raise InvalidInput(
                        f"input {spec.name!r} axis {axis} ({want}) is {got}, outside this "
                        f"deployment's range {r.min}..{r.max}"
                    )
                if sizes.setdefault(want, got) != got:
                    raise InvalidInput(
                        f"dimension {want!r} is {sizes[want]} in one input and {got} in {spec.name!r}; they must agree"
                    )

    def close(self) -> None:
        """Unload: the batcher answers what it accepted; the runtimes go once that has run."""
        if self.batcher is not None:
            self.batcher.close()
        instances, self.instances = self.instances, []
        threading.Thread(target=_release, args=(instances, self.batcher), daemon=True).start()


def _release(instances: list[Runtime], batcher: Batcher | None) -> None:
    """Free an unloaded version's runtimes after its last run, and hand the memory back to the
    system (glibc keeps freed heap otherwise, and RSS would grow with every deployment change);
    what they left in reference cycles goes with the next full collection (`_collect_soon`)."""
    if batcher is not None:
        batcher.wait_idle(timeout=60)
    for rt in instances:
        rt.close()
    del instances
    _trim()
    _collect_soon()


# A full collection walks every object of the process (about 170k after start-up): 150-180 ms of
# CPU with the GIL held, which every request in flight on every deployment waits out. Unloads that
# come close together (a deploy storm, a rollout) share one: at most one per COLLECT_EVERY_S.
COLLECT_EVERY_S = 30.0
_collect_lock = threading.Lock()
_collect_due: threading.Timer | None = None
_collected_at = float("-inf")


def _collect_soon() -> None:
    """Collect what unloaded versions left in cycles: now, or, when a collection ran less than
    COLLECT_EVERY_S ago, once that much time has passed: one collection for every unload meanwhile."""
    global _collect_due
    with _collect_lock:
        if _collect_due is not None:
            return  # one is due already, and it will take this unload's garbage too
        wait = max(0.0, _collected_at + COLLECT_EVERY_S - time.monotonic())
        _collect_due = threading.Timer(wait, _collect)
        _collect_due.daemon = True
        _collect_due.start()


def _collect() -> None:
    global _collect_due, _collected_at
    with _collect_lock:
        _collect_due = None
        _collected_at = time.monotonic()
    gc.unfreeze()  # what Manager.load froze: the cycles of unloaded versions can be collected now
    gc.collect()
    gc.freeze()
    _trim()


def _trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _runs_under(run: Callable[[sample_io.Sample], Any], sample: sample_io.Sample, seconds: float) -> bool:
    """Whether a (warm) run of the sample takes less than `seconds`, the fastest of three."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(sample)
        best = min(best, time.perf_counter() - start)
    return best < seconds


def _one_thread_is_faster(many: Runtime, one: Runtime, sample: sample_io.Sample) -> bool:
    """Whether a model runs a lone row faster on one thread than on several: so small a model
    that waking the other threads costs more than they save (an MLP: 20 us of work, and each run
    would hand parts of it to threads that sleep between runs). Asked only of models that run in
    under a millisecond (_runs_under); the two take turns, so that both see the same machine."""
    times: dict[int, list[float]] = {0: [], 1: []}
    one.run(sample)  # warm-up
    for _ in range(40):
        for i, rt in enumerate((many, one)):
            start = time.perf_counter()
            rt.run(sample)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[1])) < 0.9 * float(np.median(times[0]))


def _show(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def batching_check(run: Callable[[sample_io.Sample], dict[str, np.ndarray]], signature: Signature) -> tuple[bool, str]:
    """Whether each row's output is independent of the other rows: rows run alone against rows
    run together, on the validation samples. Returns (safe, why)."""
    bd = signature.batch_dim
    if bd is None:
        return False, "the signature has no batch dimension first in every input"
    if any(not o.shape or o.shape[0] != bd for o in signature.outputs):
        return False, "not every output has the batch dimension first"
    worst = 0.0
    for label, sample in sample_io.generate(signature):
        rows = next(iter(sample.values())).shape[0]
        if rows < 2 or label not in ("opt", "max"):
            continue
        together = run(sample)
        for i in range(rows):
            alone = run({n: a[i : i + 1] for n, a in sample.items()})
            for name, value in alone.items():
                ref = together[name][i : i + 1].astype(np.float64)
                diff = float(np.max(np.abs(value.astype(np.float64) - ref))) if value.size else 0.0
                scale = float(np.max(np.abs(ref))) if ref.size else 0.0
                worst = max(worst, diff)
                if diff > 1e-4 + 1e-3 * scale:
                    return False, (
                        f"rows are not independent: output {name!r} of row {i} differs by {diff:.3g} "
                        "when run together with other rows; serving unbatched"
                    )
    return True, f"rows run alone match rows run together (max diff {worst:.2g})"


class Manager:
    """What this process serves: {(owner, name): {version: Served}} and each name's default version."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.served: dict[tuple[str, str], dict[int, Served]] = {}
        self.defaults: dict[tuple[str, str], int] = {}
        # when this process last set each default itself: a sync that read the database before that
        # must not put the older default back
        self._default_set_at: dict[tuple[str, str], float] = {}
        self.lock = threading.RLock()
        self.synced = False
        self._synced_mark: tuple | None = None  # the deployment rows' fingerprint at the last full sync

    # --- lookup ---------------------------------------------------------------------------------
    def resolve(self, owner: str, name: str, version: int | None = None) -> Served:
        with self.lock:
            versions = self.served.get((owner, name))
            if not versions:
                raise NotFound(f"model {name!r} is not deployed")
            if version is None:
                version = self.defaults.get((owner, name))
                if version is None or version not in versions:
                    raise Unavailable(f"model {name!r} has no ready default version")
            served = versions.get(version)
            if served is None:
                raise NotFound(f"model {name!r} has no version {version}")
            return served

    def all(self) -> list[Served]:
        with self.lock:
            return [s for versions in self.served.values() for s in versions.values()]

    def ready(self) -> bool:
        """Loaded what the database says, and every default version is ready."""
        with self.lock:
            return self.synced and all(
                self.served.get(k, {}).get(v) is not None and self.served[k][v].state == DeploymentState.READY
                for k, v in self.defaults.items()
            )

    # --- loading ----------------------------------------------------------------------------------
    def load(self, row: dict[str, Any], *, replace: bool = True) -> Served:
        """Load one deployment version (blocking): artifact, runtime instances, warm-up, batching check.

        With replace=False (the sync loop) a version already loaded or loading with the same options
        is left alone: a request that is loading it right now must not see its work thrown away."""
        opts = {**DEFAULT_OPTIONS, **(row.get("options") or {})}
        sig = Signature.parse(row["signature"])
        served = Served(
            owner=row["owner"],
            name=row["name"],
            version=row["version"],
            deployment_id=row["id"],
            candidate_id=row["candidate_id"],
            candidate_name=row["candidate_name"],
            runtime=row["runtime"],
            signature=sig,
            options=opts,
            updated=row["updated"],
        )
        with self.lock:
            old = self.served.setdefault((served.owner, served.name), {}).get(served.version)
            if (
                not replace
                and old is not None
                and old.options == opts
                and not (old.state == DeploymentState.FAILED and row["updated"] > old.updated)
            ):
                return old
            self.served[(served.owner, served.name)][served.version] = served
        if old is not None:
            old.close()
        try:
            files = row["files"]
            digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:24]
            directory = self.store.materialize(files, get_settings().data_dir.resolve() / "cache" / digest)
            n = max(1, int(opts["instances"] or 1))
            threads = opts["threads"] or max(1, (os.cpu_count() or 1) // n)
            spin = get_settings().serving_spin_wait
            served.instances = [runtimes.load(directory, threads=threads, spin=spin) for _ in range(n)]
            run = served.instances[0].run
            sizes = sig.sizes_at("opt", **({sig.batch_dim: 1} if sig.batch_dim else {}))
            run(sample_io.at_batch(sig, sizes.get(sig.batch_dim, 1) if sig.batch_dim else 1))  # warm-up
            if opts["threads"] is None and threads > 1 and _runs_under(run, sample_io.at_batch(sig, 1), 1e-3):
                one = runtimes.load(directory, threads=1, spin=spin)
                if _one_thread_is_faster(served.instances[0], one, sample_io.at_batch(sig, 1)):
                    for rt in served.instances:
                        rt.close()
                    served.instances = [one] + [runtimes.load(directory, threads=1, spin=spin) for _ in range(n - 1)]
                    threads = 1
                else:
                    one.close()
                run = served.instances[0].run
            served.threads = threads
            for rt in served.instances[1:]:
                rt.run(sample_io.at_batch(sig, 1))
            served.batching, served.batching_note = batching_check(run, sig)
            bd_max = sig.dims[sig.batch_dim].max if sig.batch_dim else 1
            served.max_batch = min(int(opts["max_batch_size"] or bd_max), bd_max)
            if opts["max_batch_size"] and int(opts["max_batch_size"]) > bd_max:
                served.batching_note += (
                    f"; max_batch_size {opts['max_batch_size']} is above the signature's "
                    f"{sig.batch_dim} max, so batches stop at {bd_max}"
                )
            if served.max_batch <= 1:
                served.batching = False
            served.batcher = Batcher(
                [rt.run for rt in served.instances],
                max_batch=served.max_batch,
                max_delay_s=float(opts["max_queue_delay_ms"] or 0) / 1e3,
                max_queue=int(opts["max_queue_size"] or 0),
                batching=served.batching,
                labels=(served.name, str(served.version)),
            )
            move_deployment(served, DeploymentState.READY)
            # What loading made (the runtime's objects, the modules it imported) lives as long as
            # the version: out of the collector's sight, so that its full passes, which would
            # walk all of it while every request in flight waits, stay short.
            gc.freeze()
            logger.info(
                "deployment %s v%d ready (%s, %d instance(s) of %d thread(s), batching %s: %s)",
                served.name,
                served.version,
                served.candidate_name,
                len(served.instances),
                served.threads,
                "on" if served.batching else "off",
                served.batching_note,
            )
        except Exception as exc:  # noqa: BLE001 - a load that fails is reported, never raised into serving
            move_deployment(
                served,
                DeploymentState.FAILED,
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}",
            )
            served.close()
            logger.warning("deployment %s v%d failed to load: %s", served.name, served.version, served.error)
        self._count()
        return served

    def unload(self, owner: str, name: str, version: int | None = None) -> None:
        with self.lock:
            versions = self.served.get((owner, name), {})
            targets = list(versions) if version is None else [version]
            dropped = [versions.pop(v) for v in targets if v in versions]
            if not versions:
                self.served.pop((owner, name), None)
                self.defaults.pop((owner, name), None)
        for s in dropped:
            s.close()
        self._count()

    def set_default(self, owner: str, name: str, version: int) -> None:
        with self.lock:
            self.defaults[(owner, name)] = version
            self._default_set_at[(owner, name)] = time.monotonic()

    def _count(self) -> None:
        metrics.DEPLOYMENTS.set(sum(1 for s in self.all() if s.state == DeploymentState.READY))

    # --- keeping in step with the database ------------------------------------------------------
    def sync(self) -> None:
        """Load what the database says to serve and this process lacks (or has with other options);
        drop what it deleted, and versions no longer worth holding in memory (see `kept`)."""
        # Nothing changed in the rows since the last full pass: nothing to do. (A full pass reads
        # every version's job report, tens of milliseconds of Python that would hold up the
        # requests being served every few seconds.) The mark is read first: a change made while a
        # pass runs is seen by the next.
        mark = deployments_mark()
        if self.synced and mark == self._synced_mark:
            return
        # What is loaded is noted before reading the database, so a version a request loads
        # meanwhile is never unloaded on the strength of an older read.
        with self.lock:
            have = {(s.owner, s.name, s.version): s for s in self.all()}
        rows = kept(desired_rows())
        want = {(r["owner"], r["name"], r["version"]): r for r in rows}
        for key in have:
            if key not in want:
                self.unload(key[0], key[1], key[2])
        for key, row in want.items():
            served = have.get(key)
            if (
                served is None
                or served.options != {**DEFAULT_OPTIONS, **row["options"]}
                or (served.state == DeploymentState.FAILED and row["updated"] > served.updated)
            ):
                self.load(row, replace=False)
        # Loads can take seconds: the defaults come from a fresh read, not the one before them.
        read_at = time.monotonic()
        fresh = desired_rows()
        with self.lock:
            defaults = {(r["owner"], r["name"]): r["version"] for r in fresh if r["is_default"]}
            for name_key, at in self._default_set_at.items():
                if at >= read_at and name_key in self.defaults:  # set by a request after this read
                    defaults[name_key] = self.defaults[name_key]
            self.defaults = defaults
        self.synced = True
        self._synced_mark = mark

    def close(self) -> None:
        for s in self.all():
            s.close()


def kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions each replica keeps loaded: the default, the one before it (an instant
    rollback) and the newest (being rolled out). Older versions stay in the database and are
    loaded again when one becomes the default; memory does not grow with every deployment."""
    by_name: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault((r["owner"], r["name"]), []).append(r)
    keep = []
    for versions in by_name.values():
        numbers = sorted(r["version"] for r in versions)
        default = next((r["version"] for r in versions if r["is_default"]), numbers[-1])
        chosen = {default, numbers[-1]} | {max((n for n in numbers if n < default), default=default)}
        keep += [r for r in versions if r["version"] in chosen]
    return keep


def deployments_mark() -> tuple:
    """A fingerprint of the deployment rows, deleted ones included, that changes with any of them
    (a version added, deleted, made the default or given other options bumps its `updated_at`)."""
    with session_scope() as s:
        return tuple(s.execute(select(func.count(), func.max(Deployment.updated_at))).one())


def desired_rows() -> list[dict[str, Any]]:
    """Every deployment version the database says should be served, as plain dicts."""
    with session_scope() as s:
        rows = s.scalars(select(Deployment).where(Deployment.deleted.is_(False))).all()
        return [row_dict(r) for r in rows]


def row_dict(r: Deployment) -> dict[str, Any]:
    c = r.candidate
    return {
        "id": r.id,
        "owner": r.owner,
        "name": r.name,
        "version": r.version,
        "candidate_id": r.candidate_id,
        "candidate_name": c.name,
        "runtime": c.target,
        "files": c.files,
        "signature": _signature_of(r),
        "options": r.options or {},
        "is_default": r.is_default,
        "updated": r.updated_at.timestamp(),
    }


def _signature_of(r: Deployment) -> dict:
    """The signature the candidate was validated with (outputs filled in by the job)."""
    from sqlalchemy.orm import object_session

    from service.tables import Job

    session = object_session(r)
    job = session.get(Job, r.candidate.job_id) if session is not None else None
    if job is None:  # a deployment row is read in a session, and its candidate's job outlives it
        raise LookupError(f"deployment {r.id}: the job of candidate {r.candidate_id} is not at hand")
    return (job.report or {}).get("signature") or job.version.signature


class SyncLoop:
    """Checks the database every `interval` seconds, and at once when another replica announces a
    change (service/notify.py), so that changes made through any replica take effect here too."""

    def __init__(self, manager: Manager, interval: float | None = None) -> None:
        from service.notify import Listener

        self.manager, self.interval = manager, interval or get_settings().sync_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-deployment-sync", daemon=True)
        self._listener = Listener(self.wake)

    def start(self) -> None:
        self._thread.start()
        self._listener.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._listener.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.manager.sync()
            except Exception:  # the database may be down for a moment
                logger.exception("deployment sync failed")
            self._wake.wait(self.interval)
            self._wake.clear()


def _ready_batcher(served: Served) -> Batcher:
    if served.state != DeploymentState.READY or served.batcher is None:
        raise Unavailable(
            f"model {served.name!r} version {served.version} is not ready"
            + (f": {served.error}" if served.error else "")
        )
    return served.batcher


async def infer(served: Served, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a checked request through the deployment's batcher (from an event loop)."""
    batcher = _ready_batcher(served)
    start = time.perf_counter()
    batcher.m_in_flight.inc()
    try:
        return await batcher.infer(inputs)
    finally:
        batcher.m_in_flight.dec()
        batcher.m_request.observe(time.perf_counter() - start)


def infer_blocking(served: Served, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a checked request through the deployment's batcher, from a thread that may block."""
    batcher = _ready_batcher(served)
    start = time.perf_counter()
    batcher.m_in_flight.inc()
    try:
        return batcher.infer_blocking(inputs)
    finally:
        batcher.m_in_flight.dec()
        batcher.m_request.observe(time.perf_counter() - start)
