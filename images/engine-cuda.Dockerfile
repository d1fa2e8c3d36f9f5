# Engine image for NVIDIA GPUs (gpu_vendor: nvidia). Build from the repository root:
#   docker build -f images/engine-cuda.Dockerfile -t REGISTRY/finetune-engine-cuda:0.1.0 .
# Pods override the command (`finetune-engine train-job ...`, `torchrun -m finetune_engine.cli.main ...`);
# `docker run IMAGE <subcommand>` runs the engine CLI under tini.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# The PyTorch wheel index of the CUDA build of torch 2.13.0 (it also bundles the CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's packages track security updates; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv \
    && pip install --no-cache-dir setuptools==84.2.1

# Heavy, rarely changing layer first: torch from its index, then the lock.
COPY images/requirements-engine.txt /opt/requirements-engine.txt
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /opt/requirements-engine.txt

# The engine itself, constrained to the lock so nothing drifts.
COPY engine /opt/src/engine
RUN pip install --no-cache-dir --no-build-isolation -c /opt/requirements-engine.txt "/opt/src/engine[train,storage]" \
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
