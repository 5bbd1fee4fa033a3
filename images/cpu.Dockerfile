# syntax=docker/dockerfile:1
# onereward CPU image: the pipeline CLI (`onereward stage ...`, `onereward run ...`), the MLflow
# tracking server and CPU model serving. Build from the repository root:
#   docker build -f images/cpu.Dockerfile -t onereward:cpu .
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

# CJK font for the Chinese text-rendering rows (same package as scripts/system-deps.sh).
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-wqy-microhei=0.2.0-beta-3.1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 onereward \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin onereward

WORKDIR /app

# Dependencies first (cached while only the source changes): torch from the CPU wheel index, then
# the full lock with no resolution surprises. psycopg2-binary is the Postgres driver the MLflow
# tracking server needs (`mlflow server --backend-store-uri postgresql://...`); it is not in the lock.
COPY requirements.lock ./
RUN pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir -r requirements.lock \
    && pip install --no-cache-dir psycopg2-binary==2.9.10

# The project last, without dependencies (they all come from the lock above).
COPY pyproject.toml README.md ./
COPY src/ src/
COPY configs/ configs/
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && rm -rf build src/*.egg-info

USER 10001:10001

ENTRYPOINT ["onereward"]
CMD ["--help"]
