"""Prometheus metrics (SPEC §7). Label values come only from the config (team, key, dimension),
a fixed set (route, outcome, kind), or the pricing table (model; anything else is "other"),
so client input can never grow the label space. One registry per app, never global."""
from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.ledger import BY_NAME, Scope, ScopeState, remaining
from proxy.usage import Usage

TOKEN_KINDS = (("input", "input_tokens"), ("cache_write_5m", "cache_write_5m_tokens"),
               ("cache_write_1h", "cache_write_1h_tokens"), ("cache_read", "cache_read_tokens"),
               ("output", "output_tokens"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("budget_proxy_requests", "Requests by outcome",
                                ["team", "key", "model", "route", "outcome"], registry=r)
        self.tokens = Counter("budget_proxy_tokens", "Tokens charged", ["team", "key", "model", "kind"], registry=r)
        self.cost = Counter("budget_proxy_cost_usd", "Money charged (USD)", ["team", "key", "model"], registry=r)
        self.denials = Counter("budget_proxy_denials", "Requests refused with a budget 429",
                               ["team", "key", "dimension"], registry=r)
        self.cuts = Counter("budget_proxy_stream_cuts", "Streams cut mid-way by a budget",
                            ["team", "key", "dimension"], registry=r)
        self.upstream_seconds = Histogram("budget_proxy_upstream_seconds", "Time from forwarding to the end of the "
                                          "upstream response", ["route"], registry=r,
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self._upstream_children: dict[str, Any] = {}
        self._settled_children: dict[tuple[str, ...], list[Any]] = {}
        self.remaining = Gauge("budget_proxy_budget_remaining", "limit - used - held, per scope and dimension",
                               ["scope", "name", "dimension"], registry=r)

    @staticmethod
    def model_label(price: Any) -> str:
        """The pricing table's id of the price a request was charged at, else "other": never a
        string a client sent."""
        return price.model_id if price is not None and price.model_id else "other"

    def settled(self, team: str, key: str, model: str, route: str, outcome: str, usage: Usage,
                cost_nanos: int) -> None:
        # labels() validates and locks on every call (~10 us a request in all), so each child is
        # looked up once. Bounded: every label comes from the config, the pricing table or a
        # fixed set (module docstring). A series appears only once it has counted something.
        children = self._settled_children.get((team, key, model, route, outcome))
        if children is None:
            children = self._settled_children[(team, key, model, route, outcome)] = [
                self.requests.labels(team, key, model, route, outcome), [None] * len(TOKEN_KINDS), None]
        children[0].inc()
        tokens = children[1]
        for i, (kind, attr) in enumerate(TOKEN_KINDS):
            n = getattr(usage, attr)
            if n:
                counter = tokens[i]
                if counter is None:
                    counter = tokens[i] = self.tokens.labels(team, key, model, kind)
                counter.inc(n)
        if cost_nanos:
            if children[2] is None:
                children[2] = self.cost.labels(team, key, model)
            children[2].inc(cost_nanos / 1e9)

    def upstream_seconds_for(self, route: str) -> Any:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_seconds.labels(route)
        return child

    def set_remaining(self, scopes: Sequence[Scope], states: Sequence[ScopeState], now: float) -> None:
        for scope, state in zip(scopes, states):
            label = scope.name if scope.kind == "team" else scope.id.removeprefix("key:")
            for dim, value in remaining(scope, state, now).items():
                scale = BY_NAME[dim].scale  # (in the dimension's unit: cost in USD)
                self.remaining.labels(scope.kind, label, dim).set(value if scale == 1 else value / scale)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
