"""The server's Prometheus metrics (``GET /metrics``, with an API key like every route).

Each app has a ``CollectorRegistry`` of its own (never prometheus_client's global one), so
several apps in one process do not share or collide. Names and what they count:

- ``novasandbox_sandboxes{state}`` (gauge): the server's sandboxes by state, counted at
  scrape time from its registry (every ``SandboxState``, 0 included; a sandbox killed
  through the API is gone at once, one that ended on its own stays ``killed``/``crashed``
  while it is listed);
- ``novasandbox_sandbox_creates_total{outcome}`` (counter, ``ok``/``error``) and
  ``novasandbox_sandbox_create_seconds`` (histogram of the successful ones, 0.05-10 s),
  ``novasandbox_sandbox_creates_in_progress`` (gauge);
- ``novasandbox_commands_total`` (counter): commands started;
  ``novasandbox_command_errors_total{code}`` (counter): command requests that ended in an
  error, before starting (unknown sandbox, not running, command not found...) or while
  running (the sandbox was killed, expired or crashed: the stream's ``error`` event);
  a non-zero exit or a command timeout is no error;
- ``novasandbox_errors_total{code}`` (counter): every error response, by its code;
- ``novasandbox_http_requests_total{method,route,status}`` (counter): every request, with
  the route's path template (``/v1/sandboxes/{sandbox_id}``), ``unmatched`` for a path
  no route has, and methods outside the standard ones as ``other``;
- ``novasandbox_pool_size{template}`` (gauge): warm sandboxes ready per template of
  ``serve --pool`` (counted at scrape time; no sample without pools).

``novasandbox serve`` switches off prometheus_client's ``_created`` series (a switch of
the whole process, so not here).

Label values come from fixed sets (states, outcomes, error codes, route templates,
methods, statuses) or, for pools, template names: never a key or its id, a sandbox id,
an environment or a path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from ..sandbox import SandboxState
from .registry import Registry

CONTENT_TYPE = CONTENT_TYPE_LATEST
CREATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0)
"""Seconds: from a restore out of a warm snapshot to a cold boot under TCG."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class _SandboxStates(Collector):
    """``novasandbox_sandboxes{state}``, counted when scraped."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "novasandbox_sandboxes", "Sandboxes the server holds, by state.", labels=["state"]
        )
        counts = self.registry.states()
        for state in SandboxState:
            family.add_metric([state.value], counts.get(state, 0))
        yield family


class _PoolSizes(Collector):
    """``novasandbox_pool_size{template}``, counted when scraped."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "novasandbox_pool_size", "Warm sandboxes ready, by template.", labels=["template"]
        )
        for template, ready in self.registry.pools.ready().items():
            family.add_metric([template], ready)
        yield family


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route ``scope`` goes to (a route that has the path but
    not the method counts: that is a 405), or ``UNMATCHED``."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial is None:
            partial = route
    return str(getattr(partial, "path", UNMATCHED)) if partial is not None else UNMATCHED


class Metrics:
    """The metrics of one app (over the sandboxes of ``registry``)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_SandboxStates(registry))
        self.creates = Counter(
            "novasandbox_sandbox_creates",
            "Sandbox creates, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "novasandbox_sandbox_create_seconds",
            "Seconds a successful sandbox create took.",
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.creating = Gauge(
            "novasandbox_sandbox_creates_in_progress",
            "Sandbox creates under way.",
            registry=r,
        )
        self.commands = Counter(
            "novasandbox_commands", "Commands started in sandboxes.", registry=r
        )
        self.command_errors = Counter(
            "novasandbox_command_errors",
            "Command requests that ended in an error (before or while running), by code.",
            ["code"],
            registry=r,
        )
        self.errors = Counter(
            "novasandbox_errors", "Error responses, by error code.", ["code"], registry=r
        )
        self.requests = Counter(
            "novasandbox_http_requests",
            "HTTP requests, by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        r.register(_PoolSizes(registry))
        for outcome in ("ok", "error"):
            self.creates.labels(outcome)

    @contextmanager
    def creating_one(self) -> Iterator[None]:
        """Count a create (and time it if it succeeds)."""
        started = time.monotonic()
        with self.creating.track_inprogress():
            try:
                yield
            except BaseException:
                self.creates.labels("error").inc()
                raise
        self.creates.labels("ok").inc()
        self.create_seconds.observe(time.monotonic() - started)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def command_error(self, code: str) -> None:
        self.command_errors.labels(code).inc()

    def request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method if method in METHODS else "other", route, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "CREATE_BUCKETS", "Metrics", "route_template"]
