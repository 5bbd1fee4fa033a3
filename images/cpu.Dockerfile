# syntax=docker/dockerfile:1
# onereward CPU image: the pipeline CLI (`onereward stage ...`, `onereward run ...`), the MLflow
# tracking server and CPU model serving. Build from the repository root:
#   docker build -f images/cpu.Dockerfile -t onereward:cpu --build-arg ONEREWARD_GIT_COMMIT="$(git rev-parse HEAD)" .
# `make image-test` builds it with podman and runs stages in it as KFP and Airflow would (images/README.md).
FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="onereward" \
      org.opencontainers.image.description="OneReward training pipeline (CPU)" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_ENABLE_ASYNC_LOGGING=false \
    GX_ANALYTICS_ENABLED=false \
    ONEREWARD_HOME=/home/onereward/.onereward \
    ONEREWARD_CONFIG_DIR=/app/configs

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The Debian packages of scripts/system-deps.sh: a CJK font for the Chinese text-rendering rows, and FriBiDi,
# without which Pillow's wheel falls back from Raqm to its basic text layout and some text rows come out
# different from those of a machine that has it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-wqy-microhei=0.2.0-beta-3.1 libfribidi0=1.0.8-2.1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 onereward \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin onereward

WORKDIR /app

# Where torch's CPU build comes from: its wheel index by default, or a mirror of it; an offline build names any
# index and a wheel folder mounted into the build as PIP_FIND_LINKS. Pinning the +cpu build keeps the
# multi-GB CUDA wheels out whichever index answers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""

# Dependencies first (cached while only the source changes): torch, then what the project needs at run time
# (pyproject's dependencies and orchestration extra) at the lock's exact versions. The lock also holds the dev
# tools (pytest, moto, ruff, the Helm SDK: ~0.5 GB) that no stage uses; as constraints they stay out.
# psycopg2-binary is the Postgres driver the MLflow tracking server needs
# (`mlflow server --backend-store-uri postgresql://...`); it is not in the lock.
COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0+cpu \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"]["orchestration"], sep="\n")' > /tmp/runtime.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/runtime.txt psycopg2-binary==2.9.10 \
    && rm /tmp/runtime.txt

# The commit the image is built from: the image holds no .git, so the MLflow runs' git_commit tag reads it
# here (tracking.git_commit). Declared after the dependencies so a new commit rebuilds only the layers below.
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
