"""Prometheus metrics of one node, per tenant, with a cap on tenant label values.

A hosting provider may have tens of thousands of tenants; one time series per tenant
per counter would swamp Prometheus. The first `tenant_label_limit` tenants seen get
their own label value, the rest are counted under `other` (and "-" stands for mail
with no tenant yet, e.g. refused before a recipient was known).

Each node process owns its own registry, so tests can run several nodes in one
process and read each node's counters separately.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"
NO_TENANT = "-"


class TenantLabels:
    """Maps tenant ids to label values, keeping at most `limit` distinct ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str | None) -> str:
        if not tenant:
            return NO_TENANT
        if tenant in self._known:
            return tenant
        with self._lock:
            if len(self._known) < self.limit:
                self._known.add(tenant)
                return tenant
        return OTHER


class Metrics:
    def __init__(self, tenant_label_limit: int = 200) -> None:
        self.registry = CollectorRegistry()
        self.tenant = TenantLabels(tenant_label_limit)
        r = self.registry
        self.connections = Counter("mailedge_connections", "SMTP connections accepted",
                                   registry=r)
        self.active_sessions = Gauge("mailedge_active_sessions", "Open SMTP sessions",
                                     registry=r)
        self._session_counts: list[Callable[[], int]] = []
        self.active_sessions.set_function(lambda: sum(c() for c in self._session_counts))
        self.accepted = Counter("mailedge_messages_accepted",
                                "Message copies accepted (250) per tenant", ["tenant"],
                                registry=r)
        self.recipients_accepted = Counter("mailedge_recipients_accepted",
                                           "Recipients accepted at RCPT", ["tenant"],
                                           registry=r)
        self.rejected = Counter("mailedge_rejected",
                                "Refusals by stage and reason (permanent and temporary)",
                                ["tenant", "stage", "reason"], registry=r)
        self.quarantined = Counter("mailedge_messages_quarantined",
                                   "Message copies held in a tenant's quarantine", ["tenant"],
                                   registry=r)
        self.delivered = Counter("mailedge_recipients_delivered",
                                 "Recipients delivered to storage", ["tenant"], registry=r)
        self.deferred = Counter("mailedge_recipients_deferred",
                                "Delivery attempts that ended in a temporary failure",
                                ["tenant"], registry=r)
        self.bounced = Counter("mailedge_recipients_bounced",
                               "Recipients failed permanently after acceptance (DSN due)",
                               ["tenant"], registry=r)
        self.dsn_sent = Counter("mailedge_dsn_generated", "DSNs queued", registry=r)
        self.queue_depth = Gauge("mailedge_queue_messages", "Messages in the queue", ["state"],
                                 registry=r)
        self.filter_seconds = Histogram("mailedge_filter_seconds", "Time spent per filter",
                                        ["filter", "stage", "action"], registry=r,
                                        buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10))
        self.spool_commit_seconds = Histogram(
            "mailedge_spool_commit_seconds", "Time from end of data to durable spool",
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))

    def count_sessions(self, count: Callable[[], int]) -> None:
        """Add a source of open sessions to mailedge_active_sessions, which sums them
        when scraped (nothing to update per connection)."""
        self._session_counts.append(count)

    def reject(self, tenant: str | None, stage: str, reason: str) -> None:
        self.rejected.labels(self.tenant(tenant), stage, reason).inc()

    def observe_filter(self) -> Callable[[str, object, object, float], None]:
        # One labelled series per (filter, stage, action), looked up once: `.labels()`
        # on every filter run was a measurable part of the per-message CPU.
        series: dict[tuple[str, object, object], Any] = {}

        def observe(name: str, stage: object, action: object, seconds: float) -> None:
            key = (name, stage, action)
            child = series.get(key)
            if child is None:
                child = series[key] = self.filter_seconds.labels(
                    name, getattr(stage, "value", str(stage)),
                    getattr(action, "value", str(action)))
            child.observe(seconds)
        return observe

    def watch_cache(self, snapshot: Callable[[], dict[str, dict[str, int]]],
                    breaker_state: Callable[[], str]) -> None:
        """Export the tenant API cache's counters (hits, misses, stale serves, errors...)."""
        self.registry.register(_CacheCollector(snapshot, breaker_state))

    def watch_state(self, snapshot: Callable[[], dict[str, int]]) -> None:
        """Export the shared-state store's fallback counters (Redis outages)."""
        self.registry.register(_StateCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """Reads the tenant API cache counters at scrape time (they live in the cache)."""

    def __init__(self, snapshot: Callable[[], dict[str, dict[str, int]]],
                 breaker_state: Callable[[], str]) -> None:
        self._snapshot = snapshot
        self._breaker_state = breaker_state

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily("mailedge_tenant_api_cache_events",
                                     "Tenant API cache events per call type",
                                     labels=["cache", "event"])
        for cache, counters in sorted(self._snapshot().items()):
            for event, value in sorted(counters.items()):
                events.add_metric([cache, event], value)
        yield events
        state = GaugeMetricFamily("mailedge_tenant_api_circuit_open",
                                  "1 while the tenant API circuit breaker is open")
        state.add_metric([], 1.0 if self._breaker_state() == "open" else 0.0)
        yield state


class _StateCollector(Collector):
    """Reads the shared-state fallback counters at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, int]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        values = self._snapshot()
        degraded = GaugeMetricFamily("mailedge_state_degraded",
                                     "1 while Redis is unreachable and state is node-local")
        degraded.add_metric([], float(values.get("degraded", 0)))
        yield degraded
        events = CounterMetricFamily("mailedge_state_events",
                                     "Shared-state store events (Redis errors, local answers)",
                                     labels=["event"])
        for event, value in sorted(values.items()):
            if event != "degraded":
                events.add_metric([event], value)
        yield events
