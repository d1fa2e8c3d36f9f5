# syntax=docker/dockerfile:1
# Engine image for NVIDIA GPUs (gpu_vendor: nvidia). Build from the repository root:
#   docker build -f images/engine-cuda.Dockerfile -t REGISTRY/finetune-engine-cuda:0.1.0 .
#   docker build -f images/engine-cuda.Dockerfile --build-arg CUDA_MAJOR=12 -t REGISTRY/finetune-engine-cuda12:0.1.0 .
# CUDA_MAJOR=13 (default): torch 2.13.0, the CUDA 13.0 build; needs an R580+ driver.
# CUDA_MAJOR=12: torch 2.10.0, the CUDA 12.8 build (the newest torch whose PyPI wheel is a CUDA 12
# build); runs on R570+ drivers, and on the R535-R565 datacenter branches through CUDA minor-version
# compatibility (the base's NVIDIA_REQUIRE_CUDA accepts those for datacenter GPUs, not GeForce).
# Pods override the command (`finetune-engine train-job ...`, `torchrun -m finetune_engine.cli.main ...`);
# `docker run IMAGE <subcommand>` runs the engine CLI under tini.
# Supply chain: the bases are pinned by digest, every package by version and sha256 hash (the locks
# beside this file, written by scripts/lock_images.py; images/README.md).
# The bases are the slim `base` flavour (the CUDA runtime, its forward-compatibility package and the
# container toolkit's environment): torch's wheels bring their own cuDNN, cuBLAS, NCCL... so a
# cudnn-runtime base would carry those libraries twice. BuildKit builds only the stage CUDA_MAJOR
# names (hadolint cannot see through the variable that it is one of the stages above).
ARG CUDA_MAJOR=13
FROM nvidia/cuda:13.0.2-base-ubuntu24.04@sha256:2ab6381d970b211fb93853796dc6707eb8a72575a375c422b17cf4d8b2641701 AS base-cuda13
FROM nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:133c78a0575303be34164d0b90137a042172bdf60696af01a3c424ab402d86e2 AS base-cuda12

# hadolint ignore=DL3006
FROM base-cuda${CUDA_MAJOR} AS engine
ARG CUDA_MAJOR

# Where each lock is installed from: one index per install step, never two (no --extra-index-url),
# so no name can be taken from the wrong one. PyPI's Linux x86_64 torch wheels are CUDA builds (2.13.0:
# CUDA 13.0, the build the cu130 PyTorch index serves as +cu130; 2.10.0: CUDA 12.8), so torch and its
# CUDA libraries come from PyPI too. Override only with a mirror of the
# same index: the hashes in the locks must still match.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's packages track security updates; the base digest pins the release. A C/C++ compiler and
# the Python headers stay in the image: Triton (liger-kernel, compiled layers) builds its kernel
# launcher with them at first use, and torch.compile's inductor needs them too.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
        gcc g++ libc6-dev ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && cc --version > /dev/null && test -f /usr/include/python3.12/Python.h \
    && python3.12 -m venv /opt/venv

# Heavy, rarely changing layer first, on its own: torch and its GPU libraries (--no-deps: torch's other
# requirements are in the second lock); then everything else in a second layer, so a change of the
# engine lock does not rebuild the torch layer. Hash-checking mode: pip refuses any file whose sha256
# is not in the lock, any unpinned requirement, and (only-binary) any source build. BuildKit's cache
# mount keeps downloaded wheels between builds, outside the image.
# The torch lock also holds liger-kernel (the fast path's fused cross-entropy): it is built on the
# Triton that this torch pins, so it is locked with it.
COPY images/requirements-torch-cuda${CUDA_MAJOR}.txt /opt/requirements-torch.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    grep -q -- "--hash=sha256:" /opt/requirements-torch.txt \
    || { echo "images/requirements-torch-cuda${CUDA_MAJOR}.txt has no hashes: run scripts/lock_images.py" >&2; exit 1; } \
    && pip install --require-hashes --only-binary :all: --no-deps \
        --index-url "${TORCH_INDEX_URL}" -r /opt/requirements-torch.txt
COPY images/requirements-engine.txt /opt/requirements-engine.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --only-binary :all: \
        --index-url "${PYPI_INDEX_URL}" -r /opt/requirements-engine.txt

# The engine itself, from the copied source and no index: every requirement of its train, storage,
# quantize and gpu extras must already be installed from the locks, or this step fails (nothing is
# fetched here).
COPY engine /opt/src/engine
RUN pip install --no-cache-dir --no-index --no-build-isolation "/opt/src/engine[train,storage,quantize,gpu]" \
    && pip check \
    && finetune-engine --help > /dev/null \
    && finetuning --help > /dev/null

# Non-root, matching the pods' securityContext (runAsUser/runAsGroup/fsGroup 1000). Ubuntu 24.04
# images ship a user "ubuntu" with uid 1000: it is replaced. The job writes only to mounted
# volumes (/workdir, /tmp, /dev/shm), so the root filesystem can be read-only.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 engine \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin engine
USER 1000:1000
WORKDIR /workdir

ENTRYPOINT ["/usr/bin/tini", "--", "finetune-engine"]
CMD ["--help"]
