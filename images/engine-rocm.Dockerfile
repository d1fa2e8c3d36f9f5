# syntax=docker/dockerfile:1
# Engine image for AMD GPUs, ROCm (gpu_vendor: amd). Build from the repository root:
#   docker build -f images/engine-rocm.Dockerfile -t REGISTRY/finetune-engine-rocm:0.1.0 .
# Pods override the command (`finetune-engine train-job ...`, `torchrun -m finetune_engine.cli.main ...`);
# `docker run IMAGE <subcommand>` runs the engine CLI under tini.
# Supply chain: the base is pinned by digest, every package by version and sha256 hash (the locks
# beside this file, written by scripts/lock_images.py; images/README.md).
# The base is plain Ubuntu: the ROCm build of torch bundles its ROCm libraries (HIP, rocBLAS, MIOpen,
# RCCL...), and the GPUs need only the host's amdgpu driver (/dev/kfd, /dev/dri from the device
# plugin); a rocm/dev base would carry the ROCm stack twice, compilers included.
FROM ubuntu:24.04@sha256:c4a8d5503dfb2a3eb8ab5f807da5bc69a85730fb49b5cfca2330194ebcc41c7b

# Where each lock is installed from: one index per install step, never two (no --extra-index-url),
# so no name can be taken from the wrong one. torch and pytorch-triton-rocm come from the PyTorch ROCm
# index only (the ROCm build of torch 2.13.0, which bundles the ROCm libraries), everything else from
# PyPI only. Override only with a mirror of the same index: the hashes in the locks must still match.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/rocm7.2
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
COPY images/requirements-torch-rocm.txt /opt/requirements-torch.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    grep -q -- "--hash=sha256:" /opt/requirements-torch.txt \
    || { echo "images/requirements-torch-rocm.txt has no hashes: run scripts/lock_images.py --rocm" >&2; exit 1; } \
    && pip install --require-hashes --only-binary :all: --no-deps \
        --index-url "${TORCH_INDEX_URL}" -r /opt/requirements-torch.txt
COPY images/requirements-engine.txt /opt/requirements-engine.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --only-binary :all: \
        --index-url "${PYPI_INDEX_URL}" -r /opt/requirements-engine.txt

# The engine itself, from the copied source and no index: every requirement of its train and storage
# extras must already be installed from the locks, or this step fails (nothing is fetched here).
COPY engine /opt/src/engine
RUN pip install --no-cache-dir --no-index --no-build-isolation "/opt/src/engine[train,storage,quantize]" \
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
