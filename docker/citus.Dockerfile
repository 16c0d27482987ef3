# A Citus node with pgvector: the official Citus image (PostgreSQL 17) plus the PGDG
# pgvector package, for the compose `citus` profile (a coordinator and its workers).
#
#   docker build -f docker/citus.Dockerfile -t eidetic-citus:local docker
#
# The image's own init script creates the citus extension in $POSTGRES_DB; the one added
# here creates vector beside it, on every node. The tests build Citus 14.0.1 from source
# instead (tests/citus_kit.py); any Citus >= 12 with pgvector serves the same layout.

ARG CITUS_IMAGE=citusdata/citus:13.0.3
FROM ${CITUS_IMAGE}

# PG_MAJOR comes from the postgres base image the Citus image is built on.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}-pgvector" \
    && rm -rf /var/lib/apt/lists/*

RUN echo "CREATE EXTENSION IF NOT EXISTS vector;" > /docker-entrypoint-initdb.d/002-create-vector-extension.sql
