"""The request path's metrics kept as plain numbers, turned into Prometheus samples only when /metrics
is scraped. prometheus_client's own children take a lock and check their type on every inc and
observe, several per request; here a settled request costs one dict lookup and a few additions.
Everything runs on the event loop's thread (the /metrics route too), so nothing locks."""
from __future__ import annotations

import bisect
import time
from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# What one SettledCounts row counts, after its creation time: requests, the token kinds, cost.
TOKEN_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")
REQUESTS, FIRST_TOKEN, COST = 1, 2, 2 + len(TOKEN_KINDS)


class SettledCounts(Collector):
    """budget_proxy_requests_total (team, key, model, route, outcome), budget_proxy_tokens_total
    (team, key, model, kind) and budget_proxy_cost_usd_total (team, key, model), from one row per
    (team, key, model, route, outcome): [created, requests, tokens of each kind..., cost in
    nanodollars]. A series appears once it has counted something, as a prometheus_client child
    would; cost stays exact in integer nanodollars until the scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows: dict[tuple[str, str, str, str, str], list[float]] = {}
        registry.register(self)

    def row(self, labels: tuple[str, str, str, str, str]) -> list[float]:
        row = self.rows.get(labels)
        if row is None:
            row = self.rows[labels] = [time.time(), 0, *(0,) * len(TOKEN_KINDS), 0]
        return row

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        requests, tokens, cost = self._families()
        by_model: dict[tuple[str, str, str], list[float]] = {}  # (team, key, model): summed over route, outcome
        for labels, row in list(self.rows.items()):
            if row[REQUESTS]:
                requests.add_metric(labels, row[REQUESTS], created=row[0])
            summed = by_model.get(labels[:3])
            if summed is None:
                by_model[labels[:3]] = [row[0], *row[FIRST_TOKEN:]]
            else:
                summed[0] = min(summed[0], row[0])
                for i, n in enumerate(row[FIRST_TOKEN:], 1):
                    summed[i] += n
        for owner, summed in by_model.items():
            for kind, n in zip(TOKEN_KINDS, summed[1:]):
                if n:
                    tokens.add_metric([*owner, kind], n, created=summed[0])
            if summed[-1]:
                cost.add_metric(list(owner), summed[-1] / 1e9, created=summed[0])
        yield from (requests, tokens, cost)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (CounterMetricFamily("budget_proxy_requests", "Requests by outcome",
                                    labels=("team", "key", "model", "route", "outcome")),
                CounterMetricFamily("budget_proxy_tokens", "Tokens charged", labels=("team", "key", "model", "kind")),
                CounterMetricFamily("budget_proxy_cost_usd", "Money charged (USD)", labels=("team", "key", "model")))


class RouteSeconds(Collector):
    """A histogram by route (the only label): per route, a count per bucket, the sum and a
    creation time, made cumulative at the scrape."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.routes: dict[str, list[float]] = {}  # route -> [created, sum, count per bound..., count above]
        registry.register(self)

    def observe(self, route: str, seconds: float) -> None:
        counts = self.routes.get(route)
        if counts is None:
            counts = self.routes[route] = [time.time(), 0.0, *(0,) * (len(self.bounds) + 1)]
        counts[1] += seconds
        counts[2 + bisect.bisect_left(self.bounds, seconds)] += 1  # (a bucket counts values ≤ its bound)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=("route",))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=("route",))
        for route, counts in list(self.routes.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts[2:]):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([route], buckets, counts[1])
            # (add_metric takes no creation time; a prometheus_client Histogram writes one)
            family.samples.append(Sample(f"{self.name}_created", {"route": route}, counts[0]))
        yield family
