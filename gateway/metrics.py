"""Prometheus metrics (`GET /metrics`), and the few functions the gateway calls to move them.

With several workers (`guardgate serve --workers N`) the supervisor sets PROMETHEUS_MULTIPROC_DIR before
it starts them: each worker then writes its values to files there, and a scrape of any worker adds up
every worker's (prometheus-client's multiprocess mode). Gauges count only live workers ("livesum"); the
supervisor marks a worker dead when it exits.

Labels stay bounded: tenants come from the policy files, routes and outcomes are fixed sets, guard
endpoints come from the config, and nothing a client chooses (a model name, a path) becomes a label.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REGISTRY = CollectorRegistry(auto_describe=True)

# What `route` may be: one name per endpoint, "other" for any other path.
ROUTES = {"/v1/chat/completions": "chat_completions", "/v1/moderations": "moderations", "/v1/models": "models",
          "/healthz": "healthz", "/readyz": "readyz", "/admin/readiness": "admin_readiness", "/metrics": "metrics"}

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUESTS = Counter("guardgate_requests", "Requests answered, by tenant, route, HTTP status and outcome.",
                   ["tenant", "route", "status", "outcome"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("guardgate_request_duration_seconds", "Time from a request's arrival to the end "
                            "of its answer (a stream's last byte).", ["tenant", "route"], buckets=_LATENCY,
                            registry=REGISTRY)
DECISIONS = Counter("guardgate_decisions", "Policy decisions on scored texts, by tenant, stage and outcome "
                    "(allow, flag, shadow, block).", ["tenant", "stage", "outcome"], registry=REGISTRY)
GUARD_CALLS = Counter("guardgate_guard_calls", "Calls to the guard, by backend, endpoint and result (ok, "
                      "timeout, unreachable, bad_status, unparsable).", ["backend", "endpoint", "result"],
                      registry=REGISTRY)
GUARD_SECONDS = Histogram("guardgate_guard_call_duration_seconds", "Time of one guard call (one batch of "
                          "texts), by backend and endpoint.", ["backend", "endpoint"], buckets=_LATENCY,
                          registry=REGISTRY)
CACHE_LOOKUPS = Counter("guardgate_cache_lookups", "Verdicts looked up, by where each came from: local, "
                        "redis, guard (a miss), coalesced (waited on another request's guard call), bypass.",
                        ["source"], registry=REGISTRY)
UPSTREAM_SECONDS = Histogram("guardgate_upstream_duration_seconds", "Time until the upstream's response "
                             "headers (a stream's start), by upstream path.", ["path"], buckets=_LATENCY,
                             registry=REGISTRY)
UPSTREAM_ERRORS = Counter("guardgate_upstream_errors", "Upstream failures, by code: upstream_timeout, "
                          "upstream_unavailable, upstream_bad_response, upstream_stream_error, or http_4xx / "
                          "http_5xx for an error the upstream answered.", ["code"], registry=REGISTRY)
STREAMS = Gauge("guardgate_streams_in_flight", "Streamed answers being sent now, by stream mode.", ["mode"],
                multiprocess_mode="livesum", registry=REGISTRY)
HELD_CHARS = Gauge("guardgate_stream_held_chars", "Characters of streamed answers received from the upstream "
                   "and held back until scored (windowed and buffered streams), summed over the streams in flight.",
                   multiprocess_mode="livesum", registry=REGISTRY)


@functools.lru_cache(maxsize=4096)  # labels are bounded; prometheus-client's own lookup locks and validates
def _child(metric: Any, *labels: str) -> Any:
    return metric.labels(*labels)


def route_of(path: str) -> str:
    if path in ROUTES:
        return ROUTES[path]
    return "model" if path.startswith("/v1/models/") else "other"


def observe_request(tenant: str, route: str, status: int, outcome: str, seconds: float) -> None:
    _child(REQUESTS, tenant, route, str(status), outcome).inc()
    _child(REQUEST_SECONDS, tenant, route).observe(seconds)


def observe_decision(tenant: str, stage: str, outcome: str) -> None:
    _child(DECISIONS, tenant, stage, outcome).inc()


def observe_guard_call(backend: str, endpoint: str, seconds: float, result: str = "ok") -> None:
    _child(GUARD_CALLS, backend, endpoint, result).inc()
    _child(GUARD_SECONDS, backend, endpoint).observe(seconds)


def observe_cache_lookup(source: str) -> None:
    _child(CACHE_LOOKUPS, source).inc()


def observe_upstream(path: str, seconds: float, status: int | None) -> None:
    _child(UPSTREAM_SECONDS, path).observe(seconds)
    if status is not None and status >= 400:
        _child(UPSTREAM_ERRORS, f"http_{status // 100}xx").inc()


def observe_upstream_error(code: str | None) -> None:
    _child(UPSTREAM_ERRORS, code or "upstream_error").inc()


def stream_started(mode: str) -> None:
    _child(STREAMS, mode).inc()


def stream_ended(mode: str) -> None:
    _child(STREAMS, mode).dec()


class HeldChars:
    """One stream's share of `guardgate_stream_held_chars`: `set` it as it changes, `close` it at the end."""

    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        if value != self.value:
            HELD_CHARS.inc(value - self.value)
            self.value = value

    def close(self) -> None:
        self.set(0)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type: this process's metrics, or every worker's."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
