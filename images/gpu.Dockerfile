# syntax=docker/dockerfile:1
# onereward GPU trainer image: the same CLI as the CPU image, with the default (CUDA) torch build,
# for the GPU stages (generate_candidates, train_reward, rl_finetune, distill) and GPU serving.
# Build from the repository root:
#   docker build -f images/gpu.Dockerfile -t onereward:gpu --build-arg ONEREWARD_GIT_COMMIT="$(git rev-parse HEAD)" .
# torch's CUDA wheels bundle their own CUDA/cuDNN libraries; the host needs an NVIDIA driver recent
# enough for them (see the torch 2.13 release notes) and the NVIDIA container toolkit / device plugin.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

LABEL org.opencontainers.image.title="onereward-gpu" \
      org.opencontainers.image.description="OneReward training pipeline (CUDA)" \
      org.opencontainers.image.version="0.1.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_ENABLE_ASYNC_LOGGING=false \
    GX_ANALYTICS_ENABLED=false \
    ONEREWARD_HOME=/home/onereward/.onereward \
    ONEREWARD_CONFIG_DIR=/app/configs \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from Ubuntu 22.04 (universe) into a virtualenv at /opt/venv, the Debian packages of
# scripts/system-deps.sh (the CJK font for the Chinese text-rendering rows; FriBiDi, without which Pillow
# lays text out with its basic engine instead of Raqm, as in the CPU image), and the non-root user.
# DL3008 is ignored for this one instruction: python3.11, python3.11-venv, ca-certificates and libfribidi0
# come from jammy-updates/jammy-security, which keep only the newest build of a package, so an exact
# `=version` pin stops resolving at the next security update. The pinned base image tag fixes the release;
# the font, which does not change within a release, is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3.11 \
        python3.11-venv \
        fonts-wqy-microhei=0.2.0-beta-3.1 \
        libfribidi0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 onereward \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin onereward

WORKDIR /app

# Dependencies first: the default (CUDA) torch build from PyPI, then what the project needs at run time at
# the lock's exact versions (the lock's dev tools stay out) with the Postgres driver for `mlflow server`
# (not in the lock), as in the CPU image.
COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir torch==2.13.0 \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"]["orchestration"], sep="\n")' > /tmp/runtime.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/runtime.txt psycopg2-binary==2.9.10 \
    && rm /tmp/runtime.txt

# The commit the image is built from (tracking.git_commit reads it: the image holds no .git).
ARG ONEREWARD_GIT_COMMIT=""
LABEL org.opencontainers.image.revision="${ONEREWARD_GIT_COMMIT}"
ENV ONEREWARD_GIT_COMMIT="${ONEREWARD_GIT_COMMIT}"

# The project last, without dependencies (they all come from the lock above).
COPY README.md ./
COPY src/ src/
COPY configs/ configs/
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && rm -rf build src/*.egg-info

USER 10001:10001

ENTRYPOINT ["onereward"]
CMD ["--help"]
