# Kiln images.
#
#   docker build -t kiln:cpu .                  # CPU image (the default target): api + CPU workers
#   docker build -t kiln:gpu --target gpu .     # CUDA image: GPU workers, and serving TensorRT artifacts
#
# Needs BuildKit (the default builder since Docker 23; with docker-compose 1.29 set
# COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1) so that a build only runs the stages its target
# needs: building the CPU image never downloads the CUDA base or the GPU wheels.
#
# Both images install dependencies in a builder stage and copy only the finished virtual
# environment into the runtime stage, so compilers, pip caches and build files stay out of it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA runtime with cuDNN, not the devel image: every GPU dependency ships as a wheel, so
# nothing is compiled, but onnxruntime-gpu's CUDA provider loads the system CUDA 12 and cuDNN 9
# libraries. CUDA 12.x is the major that onnxruntime-gpu and tensorrt-cu12 on PyPI are built for.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# CPU builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# constraints.txt pins torch==2.13.0; the CPU index offers 2.13.0+cpu, which satisfies the pin
# and sorts above PyPI's 2.13.0, so pip takes the CPU wheel and the image carries no CUDA
# libraries (several GB smaller). Everything else still comes from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that editing Kiln's code reuses this
# (large) layer instead of reinstalling torch.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --upgrade pip \
    && pip install -c constraints.txt --extra-index-url "${TORCH_INDEX}" -r requirements.txt

COPY README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps . && kiln --help > /dev/null

# ---------------------------------------------------------------------------------------------
# GPU: base, builder and runtime
FROM ${CUDA_IMAGE} AS gpu-base

# Ubuntu 24.04's own Python (3.12; Kiln needs >= 3.11): the CUDA images carry no Python, and
# the distribution's build is the one that gets security updates with the base image.
# bubblewrap: the isolation boundary for uploaded code and TorchScript (service/boundary.py);
# g++: AOTInductor compiles the aotinductor target's packages with it (inside the box)
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 bubblewrap g++ \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-builder

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A CUDA 12 torch build, so torch, onnxruntime-gpu and TensorRT agree on one CUDA major with
# the base image. If this index has no build of the pinned version, pip falls back to PyPI's.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > requirements.txt \
    && pip install --upgrade pip \
    && pip install -c constraints.txt --extra-index-url "${TORCH_INDEX}" -r requirements.txt \
    # onnxruntime (a base dependency) and onnxruntime-gpu both install the `onnxruntime` Python
    # package, and whichever pip unpacked last wins; keep only the GPU build.
    && pip uninstall -y onnxruntime \
    && pip install --no-deps --force-reinstall "$(pip freeze | grep '^onnxruntime-gpu==')"

COPY README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps . && kiln --help > /dev/null

FROM gpu-base AS gpu

# A fixed uid/gid so that volumes and host directories can be granted to it ahead of time.
RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --home-dir /data --no-create-home --shell /usr/sbin/nologin kiln \
    && mkdir -p /data /artifacts \
    && chown kiln:kiln /data /artifacts

COPY --from=gpu-builder /opt/venv /opt/venv

# /artifacts exists (owned by kiln) so that a named volume mounted there starts out writable.
# NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES come from the CUDA base image.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KILN_DATA_DIR=/data
WORKDIR /data
USER kiln

EXPOSE 8000 8001
# Checks the API; a worker started from this image should override or disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Serving TensorRT artifacts needs this image too, so its default is the API like the CPU
# image's; compose runs it as `kiln worker --queues gpu`.
CMD ["kiln", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# CPU runtime. Last, so that a plain `docker build .` produces it.
FROM ${PYTHON_IMAGE} AS cpu

# bubblewrap: the isolation boundary for uploaded code and TorchScript (service/boundary.py);
# g++: AOTInductor compiles the aotinductor target's packages with it (inside the box)
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap g++ \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --home-dir /data --no-create-home --shell /usr/sbin/nologin kiln \
    && mkdir -p /data /artifacts \
    && chown kiln:kiln /data /artifacts

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KILN_DATA_DIR=/data
WORKDIR /data
USER kiln

EXPOSE 8000 8001
# Python rather than curl: the slim image has no curl, and adding it only for this is not worth it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["kiln", "api", "--host", "0.0.0.0", "--port", "8000"]
