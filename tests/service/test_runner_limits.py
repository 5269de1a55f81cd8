"""Attacks on the room an isolated runner has to write in (service/runner.py, `scratch_for`): its box
has a tmpfs on /tmp and on /dev/shm, sized for what the artifact may unpack there, and a largest-file
limit (RLIMIT_FSIZE). Served TorchScript writes far past its own size there, in one file or many, and
is stopped at the box's limits with an error that says which, while nothing reaches the host, the
runner is started again for the next request, and a tiny artifact gets no more than the floor."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from service import boundary
from service.errors import SandboxError
from tests.service.test_untrusted_artifacts import MAGIC, scripted

pytestmark = pytest.mark.skipif(not boundary.available(), reason=f"no isolation here: {boundary._probe()}")
MiB = 1 << 20
WIDTH = 8
SIGNATURE = {
    "inputs": [{"name": "x", "dtype": "int64", "shape": ["batch", WIDTH], "value_range": [0, 100]}],
    "outputs": [{"name": "y"}],
}
TMP, SHM, BOTH, CWD = 0, 1, 2, 3  # where the files go: /tmp, /dev/shm, the two in turn, the working directory

# Scripted, so that it writes whenever it runs: for the magic value the row says how many files of how
# many MiB to write and where, each mapped with torch.from_file (TorchScript's one way to write a
# file) and filled. Every file is read afterwards: TorchScript drops a mapped write nothing uses.
FILL_SOURCE = f"""
import torch

class Fill(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x[0, 0]) == {MAGIC}:
            mib = int(x[0, 1])
            where = int(x[0, 3])
            total = torch.zeros(1)
            for i in range(int(x[0, 2])):
                folder = "/tmp/"
                if where == {SHM} or (where == {BOTH} and i % 2 == 1):
                    folder = "/dev/shm/"
                if where == {CWD}:
                    folder = ""
                data = torch.from_file(folder + "NAME-" + str(i), shared=True, size=mib * {MiB}, dtype=torch.uint8)
                data.fill_(1)
                total = total + data[-1].to(torch.float32)
            return x.to(torch.float32) * 0.0 + total
        return x.to(torch.float32) * 2.0
"""


@pytest.fixture(scope="module")
def filler(tmp_path_factory) -> tuple[Path, str]:
    """A TorchScript artifact of a few KiB that writes files named NAME-<i>, and that name."""
    from service.runtimes.base import ArtifactInfo

    name = f"kiln-fill-{uuid.uuid4().hex[:12]}"
    root = tmp_path_factory.mktemp("filler")
    art = root / "artifact"
    art.mkdir()
    (art / "model.pt").write_bytes(scripted(root, FILL_SOURCE.replace("NAME", name), "Fill"))
    ArtifactInfo(runtime="torchscript", file="model.pt", signature=SIGNATURE).save(art)
    return art, name


@pytest.fixture
def memory_limit(monkeypatch):
    """Sets the boxes' memory limit for one test."""
    from service.config import get_settings

    def set_to(n: int) -> None:
        monkeypatch.setenv("KILN_SANDBOX_MEMORY_BYTES", str(n))
        get_settings.cache_clear()

    yield set_to
    monkeypatch.delenv("KILN_SANDBOX_MEMORY_BYTES", raising=False)
    get_settings.cache_clear()


def fill(mib: int, count: int, where: int) -> dict[str, np.ndarray]:
    row = [MAGIC, mib, count, where] + [0] * (WIDTH - 4)
    return {"x": np.array([row], dtype="int64")}


PLAIN = {"x": np.full((1, WIDTH), 3, dtype="int64")}


def answers_plainly(rt) -> bool:
    y = next(iter(rt.run(PLAIN).values()))
    return bool(np.array_equal(y, np.full((1, WIDTH), 6.0, dtype="float32")))


def runner_pid(rt) -> int:
    """The runner's own process (inside the box, seen from the host)."""
    boxed = rt._boxed
    assert boxed is not None and boxed.cgroups is not None, "no cgroup to find the runner by"
    for pid in boxed.cgroups.pids():  # bubblewrap's own processes name the runner's command too
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-P", b"-m", b"service.runner"]:
                return pid
        except OSError:
            pass
    raise AssertionError(f"no runner among {boxed.cgroups.pids()}")


def box_limits(pid: int) -> tuple[int, int, int]:
    """What the kernel enforces on a runner: its largest file (RLIMIT_FSIZE) and the sizes of its
    /tmp and /dev/shm, read from the host's /proc."""
    fsize = next(
        line.split()[3] for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if line.startswith("Max file")
    )
    sizes = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] in ("/tmp", "/dev/shm"):
            opts = dict(o.partition("=")[::2] for o in line.split(" - ", 1)[1].split()[2].split(","))
            sizes[fields[4]] = int(opts["size"].rstrip("k")) * 1024 if opts.get("size") else -1
    return int(fsize) if fsize.isdigit() else -1, sizes.get("/tmp", -1), sizes.get("/dev/shm", -1)


def left_on_the_host(name: str, *roots: Path) -> list[Path]:
    """Files named like the attack's in the host's /tmp (where a box's /tmp would land were it the
    host's), in /dev/shm and the process's working directory, and anywhere under `roots`."""
    found = [
        p for folder in (Path("/tmp"), Path("/dev/shm"), Path.cwd()) for p in folder.glob(f"{name}*") if p.exists()
    ]
    return found + [p for root in roots for p in root.rglob(f"{name}*")]


# --- how much room a box gets ----------------------------------------------------------------------


def test_a_tiny_artifact_gets_only_the_floor(tmp_path):
    """However much memory a box may use, an artifact of a few bytes gets the floor: a 64 MiB file
    limit and 256 MiB tmpfs."""
    from service.runner import scratch_for

    (tmp_path / "model.pt").write_bytes(b"x" * 4096)
    (tmp_path / "kiln-artifact.json").write_text("{}")
    floor = {"file_size_bytes": 64 * MiB, "tmp_bytes": 256 * MiB}
    for memory in (None, 512 * MiB, 4 << 30, 1 << 40):
        assert scratch_for(tmp_path, memory) == floor, memory


def test_a_huge_artifact_gets_no_more_than_half_the_memory_limit(tmp_path):
    """An artifact of 100 GiB (sparse: it takes no disk) gets at most half the box's memory for each
    of its two tmpfs, and no file larger than that; one that fits still gets its room."""
    from service.runner import scratch_for

    with open(tmp_path / "weights.bin", "wb") as f:
        f.truncate(100 << 30)
    for memory in (4 << 30, 64 << 30):
        room = scratch_for(tmp_path, memory)
        assert room["tmp_bytes"] == memory // 2, (memory, room)
        assert room["file_size_bytes"] == memory // 2, (memory, room)
    room = scratch_for(tmp_path)  # the default limit: half this machine's memory
    assert room["tmp_bytes"] <= boundary.default_memory_bytes() // 2
    assert room["file_size_bytes"] <= room["tmp_bytes"]
    (tmp_path / "weights.bin").unlink()
    with open(tmp_path / "weights.bin", "wb") as f:
        f.truncate(900 * MiB)
    room = scratch_for(tmp_path, 4 << 30)
    assert 900 * MiB < room["file_size_bytes"] <= room["tmp_bytes"] <= 2 << 30, room


@pytest.mark.parametrize("size", ["tiny", "huge"])
def test_the_runner_box_has_the_limits_computed_for_its_artifact(filler, tmp_path, memory_limit, size):
    """What the kernel enforces on a running runner, read from the host's /proc: the floor for the
    few KiB of TorchScript; half the 1 GiB memory limit for the same model beside 100 GiB of weights."""
    import shutil

    from service import runtimes

    art, _ = filler
    memory_limit(1 << 30)
    if size == "huge":
        art = Path(shutil.copytree(art, tmp_path / "artifact"))
        with open(art / "weights.bin", "wb") as f:
            f.truncate(100 << 30)
    rt = runtimes.load(art, threads=1)
    try:
        fsize, tmp, shm = box_limits(runner_pid(rt))
    finally:
        rt.close()
    expected = (64 * MiB, 256 * MiB) if size == "tiny" else (512 * MiB, 512 * MiB)
    assert (fsize, tmp, shm) == (expected[0], expected[1], expected[1]), (fsize, tmp, shm)


# --- writing past it ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [TMP, SHM, CWD], ids=["tmp", "dev-shm", "working-directory"])
def test_one_file_far_past_the_file_limit_is_refused_and_the_runner_goes_on(filler, tmp_path, where):
    """A 4 GiB file, 64 times the largest-file limit and 16 times the tmpfs: the kernel refuses to
    make it that large (EFBIG, SIGXFSZ being ignored), so the request fails with that error and the
    same runner answers the next one. The working directory is read-only."""
    from service import runtimes

    art, name = filler
    rt = runtimes.load(art, threads=1)
    try:
        pid = runner_pid(rt)
        with pytest.raises(SandboxError) as err:
            rt.run(fill(4096, 1, where))
        refusal = "Read-only file system" if where == CWD else "File too large"
        assert refusal in str(err.value), str(err.value)
        assert err.value.extra.get("outcome") == "error", err.value.extra  # answered, not a crash
        assert answers_plainly(rt)
        assert runner_pid(rt) == pid  # the same runner
    finally:
        rt.close()
    assert left_on_the_host(name, tmp_path, art) == []


@pytest.mark.parametrize("where", [TMP, SHM], ids=["tmp", "dev-shm"])
def test_files_that_fill_the_box_tmpfs_stop_at_its_size(filler, tmp_path, where):
    """Eight files of 48 MiB, each under the file limit, 384 MiB in all in a 256 MiB /tmp (or
    /dev/shm): the first page past its end kills the runner (SIGBUS), the error says so, nothing is
    left on the host, and the next request gets a runner started afresh."""
    from service import runtimes

    art, name = filler
    rt = runtimes.load(art, threads=1)
    try:
        pid = runner_pid(rt)
        assert next(iter(rt.run(fill(48, 2, where)).values()))[0, 0] == 2.0  # 96 MiB fit
        with pytest.raises(SandboxError) as err:
            rt.run(fill(48, 8, where))
        message = str(err.value)
        assert "SIGBUS" in message and "/dev/shm" in message and "256 MiB" in message, message
        assert "Traceback" not in message
        assert answers_plainly(rt)  # a fresh runner
        assert runner_pid(rt) != pid
    finally:
        rt.close()
    assert left_on_the_host(name, tmp_path, art) == []


def test_what_the_box_writes_to_its_tmpfs_counts_against_its_memory_limit(filler, tmp_path, memory_limit):
    """With a 448 MiB memory limit (this host gives each box a memory cgroup; cgroup v1 here), the
    pages written to /tmp are charged to the box; 240 MiB in /tmp and 192 MiB in /dev/shm, each
    within its 256 MiB tmpfs, are more than the limit with the runner's own memory: the kernel kills
    the runner, the error names the limit, and the next request gets a fresh runner."""
    from service import runtimes

    art, name = filler
    memory_limit(448 * MiB)
    rt = runtimes.load(art, threads=1)
    try:
        boxed = rt._boxed
        if boxed is None or boxed.cgroups is None or not ({"memory", "v2"} & set(boxed.cgroups.dirs)):
            pytest.skip(f"no memory cgroup for the box here: {rt.notes}")
        memory = boxed.cgroups.dirs.get("memory") or boxed.cgroups.dirs["v2"]
        usage = memory / ("memory.current" if boxed.cgroups.v2 else "memory.usage_in_bytes")
        before = int(usage.read_text())
        rt.run(fill(48, 3, TMP))
        assert int(usage.read_text()) - before >= 3 * 48 * MiB - 8 * MiB, (before, usage.read_text())
        with pytest.raises(SandboxError) as err:
            rt.run(fill(48, 8, BOTH))  # files 0 to 7 in turn: 0-2, 4 and 6 in /tmp, the odd ones in /dev/shm
        message = str(err.value)
        assert "448 MiB memory limit" in message, message
        assert answers_plainly(rt)
    finally:
        rt.close()
    assert left_on_the_host(name, tmp_path, art) == []


# --- through the API ----------------------------------------------------------------------------------


def deploy_artifact(api, art: Path, name: str) -> None:
    """A deployment of `art` as if a job had built and validated it (the rows a job leaves, without
    the minute its conversion takes here), loaded through the API."""
    from service.artifacts import get_store
    from service.db import session_scope
    from service.tables import CandidateRow, Job, Model, ModelVersion

    with session_scope() as s:
        model = Model(name=name, owner="default")
        version = ModelVersion(
            model=model, version=1, sha256="0" * 64, bundle_sha256="0" * 64, filename="m.pt", kind="torchscript",
            signature=SIGNATURE,
        )  # fmt: skip
        job = Job(owner="default", version=version, options={}, status="succeeded", report={"signature": SIGNATURE})
        s.add_all([model, version, job])
        s.flush()
        cand = CandidateRow(
            job_id=job.id, position=0, name="torchscript-fp32", target="torchscript", precision="fp32",
            status="passed", passed=True, files=get_store().put_directory(art), model_file="model.pt",
        )  # fmt: skip
        s.add(cand)
        s.flush()
        candidate = cand.id
    r = api.post("/v1/deployments", json={"name": name, "candidate": candidate, "threads": 1})
    assert r.status_code == 201 and r.json()["state"] == "ready", r.text


@pytest.mark.parametrize("kiln_env", ["sqlite"], indirect=True)
def test_a_served_model_that_writes_past_its_box_gets_an_error_and_the_service_goes_on(api, filler, kiln_env):
    """Served over /v2: a file past the file limit and files past the /tmp size each get an error
    that says which limit stopped them (the protocol's error object, no traceback, no hang), nothing
    lands in the host's /tmp or the data directory, and the next request is answered, by a runner
    started again after the one that was killed."""
    from service.config import get_settings

    art, name = filler
    deploy_artifact(api, art, "fill")

    def infer(inputs: dict[str, np.ndarray]):
        x = inputs["x"]
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "INT64", "data": x.ravel().tolist()}]}
        return api.post("/v2/models/fill/infer", json=body)

    ok = infer(PLAIN)
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"][:2] == [6.0, 6.0], ok.text
    for attack, says in ((fill(4096, 1, TMP), "File too large"), (fill(48, 8, TMP), "SIGBUS")):
        r = infer(attack)
        assert r.status_code == 500 and set(r.json()) == {"error"}, r.text
        assert says in r.json()["error"] and "Traceback" not in r.text, r.text
        again = infer(PLAIN)
        assert again.status_code == 200 and again.json()["outputs"][0]["data"][:2] == [6.0, 6.0], again.text
    assert left_on_the_host(name, get_settings().data_dir) == []
    assert api.get("/healthz").status_code == 200
