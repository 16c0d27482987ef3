"""Prometheus metrics: request counts and latencies per route, and what ingest stored."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.banks import GrowingCache


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

    def watch_growing_cache(self, cache: GrowingCache) -> None:
        """How the service's held growing items serve searches (read at each scrape)."""
        self.registry.register(_GrowingCacheCollector(cache))

    def record_ingest(self, rows: int, duplicate: bool) -> None:
        self.ingested_batches.labels(duplicate=str(duplicate).lower()).inc()
        if not duplicate:
            self.ingested_rows.inc(rows)


class _GrowingCacheCollector(Collector):
    def __init__(self, cache: GrowingCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "eidetic_growing_cache_reads",
            "Searches that read a segmented bank's growing items whole (none held for their snapshot)",
            value=self.cache.reads,
        )
        yield CounterMetricFamily(
            "eidetic_growing_cache_catch_ups",
            "Searches that brought held growing items up to their snapshot by reading the changes since",
            value=self.cache.catch_ups,
        )
        yield GaugeMetricFamily(
            "eidetic_growing_cache_bytes",
            "Memory holding growing items between searches",
            value=self.cache.held_bytes(),
        )


class _MeasureRequests:
    """ASGI middleware counting answers and their latency per route template.

    Pure ASGI, not BaseHTTPMiddleware: that one would end a failed stream's body cleanly.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before answering

        async def send_watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(scope["method"], template).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI) -> ServiceMetrics:
    metrics = ServiceMetrics()
    app.state.metrics = metrics

    app.add_middleware(_MeasureRequests, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
