# The Eidetic API image: the service needs no torch, so the default build installs
# the base package only. `--build-arg EXTRAS=train` adds the training side (torch,
# torchvision, ...) for the compose `trainer` profile; the image is then much larger.
#
#   docker build -t eidetic .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB eidetic
#   docker run --rm -e DATABASE_URL=... eidetic keys create --project demo --scope write

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: a virtualenv with the package
FROM ${PYTHON_IMAGE} AS build

# Empty: the API only. A comma-separated list of extras from pyproject.toml otherwise (e.g. "train").
ARG EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# pyproject.toml names README.md as the long description, so the build needs it.
COPY pyproject.toml README.md ./
COPY eidetic ./eidetic
COPY app ./app
COPY migrations ./migrations
COPY model ./model

RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && if [ -n "${EXTRAS}" ]; then \
           /opt/venv/bin/pip install ".[${EXTRAS}]"; \
       else \
           /opt/venv/bin/pip install .; \
       fi

# ---------------------------------------------------------------- runtime: the virtualenv, a non-root user
FROM ${PYTHON_IMAGE}

ARG EXTRAS=""
LABEL org.opencontainers.image.title="eidetic" \
      org.opencontainers.image.description="Postgres+pgvector activation store and REST service for PyTorch training" \
      org.opencontainers.image.licenses="Apache-2.0" \
      eidetic.extras="${EXTRAS}"

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 eidetic \
    && useradd --system --uid 10001 --gid eidetic --home-dir /app --shell /usr/sbin/nologin eidetic \
    && mkdir -p /app/data /app/outputs \
    && chown -R eidetic:eidetic /app

COPY --from=build /opt/venv /opt/venv

USER eidetic
WORKDIR /app

EXPOSE 8000

# Liveness only (the process answers); /readyz also checks the database and the schema.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

# `eidetic serve` needs DATABASE_URL; it applies the migrations, then serves.
ENTRYPOINT ["eidetic"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
