"""The container files: docker-compose.yml as `docker-compose config` validates and normalizes it,
and the shape of the Dockerfile.

No Docker engine is needed: `docker-compose config` (Debian's docker-compose 1.29) checks a
compose file against the Compose Spec and prints it normalized without talking to one.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

BACKENDS = ("redis", "postgres")
KILN_SERVICES = ("api", "worker", "worker-gpu")
GPU_PROFILE = ("--profile", "gpu")


@functools.cache
def compose_config(*options: str) -> dict:
    """docker-compose.yml as `docker-compose config` normalizes it (fails the test if it is invalid).

    A plain cached function rather than a fixture, so that a missing binary fails each test
    instead of erroring in setup.
    """
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed; these tests validate docker-compose.yml with it. "
            "Install Debian's package: apt-get install -y --no-install-recommends docker-compose",
            pytrace=False,
        )
    # COMPOSE_FILE, COMPOSE_PROFILES and friends in the caller's environment would change what
    # is checked; the file and the options alone decide here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    proc = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), *options, "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE.name}:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def named_volume_mounts(service: dict) -> dict[str, str]:
    """{volume name: mount path} for the named volumes a normalized service mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "volume" and volume.get("source"):
                mounts[volume["source"]] = volume["target"]
        else:
            source, _, rest = volume.partition(":")
            if rest and not source.startswith(("/", ".", "~")):
                mounts[source] = rest.split(":")[0]
    return mounts


def healthcheck_command(service: dict) -> str:
    test = service.get("healthcheck", {}).get("test", [])
    return " ".join(test) if isinstance(test, list) else test


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_has_the_core_services():
    services = compose_config()["services"]
    assert {"redis", "postgres", "api", "worker"} <= set(services)


def test_gpu_worker_runs_only_under_the_gpu_profile():
    services, gpu_services = compose_config()["services"], compose_config(*GPU_PROFILE)["services"]
    # compose 1.29's `config` lists profiled services either way; the `profiles` key is what
    # keeps `docker compose up` from starting one unless its profile is enabled.
    assert services["worker-gpu"].get("profiles") == ["gpu"]
    default = [name for name, service in services.items() if not service.get("profiles")]
    assert set(default) == set(services) - {"worker-gpu"}

    worker_gpu = gpu_services["worker-gpu"]
    assert worker_gpu["build"]["target"] == "gpu"
    assert worker_gpu["command"] == ["kiln", "worker", "--queues", "gpu"]
    devices = worker_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == "all" for d in devices
    ), devices


def test_worker_runs_the_cpu_queue_and_can_be_scaled():
    services = compose_config()["services"]
    worker = services["worker"]
    assert worker["command"] == ["kiln", "worker", "--queues", "cpu"]
    # Replicas from `--scale worker=N` would collide on a fixed name or a published port.
    assert "container_name" not in worker
    assert not worker.get("ports")


def test_only_the_api_publishes_a_port():
    gpu_services = compose_config(*GPU_PROFILE)["services"]
    publishing = sorted(name for name, service in gpu_services.items() if service.get("ports"))
    assert publishing == ["api"]
    # HTTP, and the KServe v2 gRPC endpoint beside it
    published = []
    for port in gpu_services["api"]["ports"]:
        if isinstance(port, dict):
            published.append((int(port["published"]), int(port["target"])))
        else:
            published.append(tuple(int(p) for p in str(port).split(":")[-2:]))
    assert sorted(published) == [(8000, 8000), (8001, 8001)]


@pytest.mark.parametrize("name", KILN_SERVICES)
def test_kiln_services_wait_for_healthy_backends(name):
    gpu_services = compose_config(*GPU_PROFILE)["services"]
    depends_on = gpu_services[name]["depends_on"]
    for backend in BACKENDS:
        assert depends_on[backend]["condition"] == "service_healthy", (name, backend)


def test_backends_and_api_have_healthchecks():
    services = compose_config()["services"]
    assert "redis-cli ping" in healthcheck_command(services["redis"])
    assert "pg_isready" in healthcheck_command(services["postgres"])
    assert "/healthz" in healthcheck_command(services["api"])
    for name in ("redis", "postgres", "api"):
        assert services[name]["healthcheck"].get("test") not in (["NONE"], "NONE"), name


def test_backends_persist_to_named_volumes():
    gpu_config = compose_config(*GPU_PROFILE)
    services, volumes = gpu_config["services"], gpu_config["volumes"]
    redis_command = services["redis"]["command"]
    redis_command = redis_command if isinstance(redis_command, str) else " ".join(redis_command)
    assert "--appendonly yes" in redis_command
    assert "/data" in named_volume_mounts(services["redis"]).values()
    assert "/var/lib/postgresql/data" in named_volume_mounts(services["postgres"]).values()
    for name in ("redis", "postgres"):
        assert set(named_volume_mounts(services[name])) <= set(volumes), name
    env = services["postgres"]["environment"]
    assert (env["POSTGRES_DB"], env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("kiln", "kiln", "kiln")


def test_api_and_workers_share_one_artifact_volume():
    gpu_config = compose_config(*GPU_PROFILE)
    services, volumes = gpu_config["services"], gpu_config["volumes"]
    artifact_mounts = set()
    for name in KILN_SERVICES:
        artifact_dir = services[name]["environment"]["KILN_ARTIFACT_DIR"]
        mounted = {path: volume for volume, path in named_volume_mounts(services[name]).items()}
        assert artifact_dir in mounted, f"{name}: KILN_ARTIFACT_DIR={artifact_dir} is not a named volume"
        artifact_mounts.add((mounted[artifact_dir], artifact_dir))
    assert len(artifact_mounts) == 1, artifact_mounts
    ((volume, _),) = artifact_mounts
    assert volume in volumes


@pytest.mark.parametrize("name", KILN_SERVICES)
def test_kiln_settings_point_at_the_compose_backends(name):
    gpu_services = compose_config(*GPU_PROFILE)["services"]
    env = gpu_services[name]["environment"]
    database = urlsplit(env["KILN_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert (database.hostname, database.port, database.path) == ("postgres", 5432, "/kiln")
    broker = urlsplit(env["KILN_BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)


def test_compose_build_targets_are_dockerfile_stages():
    gpu_services = compose_config(*GPU_PROFILE)["services"]
    stages = {stage for stage, _ in dockerfile_stages()}
    for name in KILN_SERVICES:
        build = gpu_services[name]["build"]
        assert Path(build["context"]).resolve() == ROOT
        assert build.get("target") in stages, (name, build.get("target"), stages)


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continued lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerfile_stages() -> list[tuple[str | None, list[tuple[str, str]]]]:
    """(stage name or None, its instructions) per FROM, in order."""
    stages: list[tuple[str | None, list[tuple[str, str]]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            words = args.split()
            name = words[-1] if len(words) >= 3 and words[-2].lower() == "as" else None
            stages.append((name, []))
        elif stages:
            stages[-1][1].append((keyword, args))
    return stages


def runtime_stage(which: str) -> list[tuple[str, str]]:
    """The instructions of an image's final stage: `gpu` (the GPU target) or `default` (the last stage)."""
    stages = dockerfile_stages()
    return dict(stages)["gpu"] if which == "gpu" else stages[-1][1]


def test_dockerfile_is_multi_stage_with_a_gpu_target():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert "gpu" in {name for name, _ in stages}
    # A builder stage hands its environment to the runtime stages.
    assert any(keyword == "COPY" and "--from=" in args for _, instructions in stages for keyword, args in instructions)


def test_cpu_image_takes_torch_from_the_cpu_index():
    assert "https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


@pytest.mark.parametrize("stage", ["gpu", "default"])
def test_runtime_images_run_as_a_non_root_user(stage):
    users = [args for keyword, args in runtime_stage(stage) if keyword == "USER"]
    assert users, f"{stage} stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


@pytest.mark.parametrize("stage", ["gpu", "default"])
def test_runtime_images_serve_the_api_with_a_healthcheck(stage):
    instructions = dict(runtime_stage(stage))
    assert "/healthz" in instructions.get("HEALTHCHECK", "")
    assert "8000" in instructions.get("EXPOSE", "").split()
    assert yaml.safe_load(instructions["CMD"]) == ["kiln", "api", "--host", "0.0.0.0", "--port", "8000"]


def test_kiln_containers_can_build_the_isolation_boundary():
    """bubblewrap is installed in both runtime images, and the Kiln services may create namespaces."""
    services = compose_config(*GPU_PROFILE)["services"]
    for name in ("api", "worker", "worker-gpu"):
        opts = set(services[name].get("security_opt", []))
        assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= opts, (name, opts)
        assert not services[name].get("privileged") and not services[name].get("cap_add"), name
    assert "security_opt" not in services["postgres"] and "security_opt" not in services["redis"]
    text = DOCKERFILE.read_text()
    for stage in ("gpu-base", "cpu"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "bubblewrap" in body, stage
