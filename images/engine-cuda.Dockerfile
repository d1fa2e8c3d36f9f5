# Engine image for NVIDIA GPUs. Build from the repository root:
#   docker build -f images/engine-cuda.Dockerfile -t REGISTRY/finetune-engine-cuda:0.1.0 .
# Entry point: the engine CLI (`finetune-engine train-job ...`, `finetuning sft ...`).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

COPY images/requirements-engine.txt /tmp/requirements-engine.txt
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu128 -r /tmp/requirements-engine.txt

COPY engine /opt/src/engine
RUN pip install --no-deps /opt/src/engine \
    && finetune-engine --help > /dev/null \
    && finetuning --help > /dev/null

# Non-root, matching the pods' securityContext (runAsUser/runAsGroup 1000). Everything the job
# writes goes to mounted volumes (/workdir, /tmp, /dev/shm); the root filesystem can be read-only.
RUN groupadd --gid 1000 engine && useradd --uid 1000 --gid 1000 --create-home engine
USER 1000:1000
WORKDIR /workdir

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["finetune-engine", "--help"]
