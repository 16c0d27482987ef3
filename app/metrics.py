"""Prometheus metrics: request counts and latencies per route, and what ingest stored."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


class ServiceMetrics:
    """One registry per app, so several apps in one process (tests) don't share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "eidetic_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "eidetic_http_request_seconds", "Time to answer a request", ["method", "route"], registry=self.registry
        )
        self.ingested_rows = Counter("eidetic_ingested_rows", "Activation rows stored", registry=self.registry)
        self.ingested_batches = Counter(
            "eidetic_ingested_batches", "Ingest batches acknowledged", ["duplicate"], registry=self.registry
        )

    def record_ingest(self, rows: int, duplicate: bool) -> None:
        self.ingested_batches.labels(duplicate=str(duplicate).lower()).inc()
        if not duplicate:
            self.ingested_rows.inc(rows)


def install_metrics(app: FastAPI) -> ServiceMetrics:
    metrics = ServiceMetrics()
    app.state.metrics = metrics

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, template, str(response.status_code)).inc()
        metrics.latency.labels(request.method, template).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
