"""Prometheus metrics (docs/http-api.md "Metrics"). Label values come only from the config (team, key, dimension),
a fixed set (route, outcome, kind, alert type and outcome), or the pricing table (model; anything
else is "other"), so client input can never grow the label space: runtime keys share
key="(runtime)" (RUNTIME_KEY), and runs are never a label. One registry per app, never global."""
from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from proxy.counters import COST, FIRST_TOKEN, REQUESTS, RouteSeconds, SettledCounts
from proxy.ledger import BY_NAME, METERED, Scope, ScopeState, remaining
from proxy.usage import Usage

UPSTREAM_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RUNTIME_KEY = "(runtime)"  # the `key` label of every runtime key: series never grow with them
# budget_proxy_alerts_total's labels: anything else is counted as "other".
ALERT_TYPES = ("budget.threshold", "budget.exceeded")
ALERT_OUTCOMES = ("sent", "failed", "dropped")  # delivered; one attempt failed (retried); given up


def key_label(caller: Any) -> str:
    """A caller's `key` label: its config name, or RUNTIME_KEY for a runtime key (which carries its
    own scope, proxy/auth.py Caller)."""
    return caller.key if caller.scope is None else RUNTIME_KEY


def _unit(dim: str, value: int | float) -> float:
    scale = BY_NAME[dim].scale  # (in the dimension's unit: cost in USD)
    return value if scale == 1 else value / scale


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # requests, tokens and cost by (team, key, model, route, outcome); upstream seconds by route
        self.settled_counts = SettledCounts(r)
        self.upstream_seconds = RouteSeconds("budget_proxy_upstream_seconds", "Time from forwarding to the end of "
                                             "the upstream response", UPSTREAM_SECONDS_BUCKETS, r)
        self.denials = Counter("budget_proxy_denials", "Requests refused with a budget 429",
                               ["team", "key", "dimension"], registry=r)
        self.cuts = Counter("budget_proxy_stream_cuts", "Streams cut mid-way by a budget",
                            ["team", "key", "dimension"], registry=r)
        self.remaining = Gauge("budget_proxy_budget_remaining", "limit - used - held, per scope and dimension",
                               ["scope", "name", "dimension"], registry=r)
        # config keys and teams, refreshed from the store at each scrape; a team's key label is ""
        self.used = Gauge("budget_proxy_budget_used", "Used in the current period, per scope and dimension "
                          "(streams in flight included)", ["scope", "team", "key", "dimension"], registry=r)
        self.limit = Gauge("budget_proxy_budget_limit", "The configured limit, per scope and dimension",
                           ["scope", "team", "key", "dimension"], registry=r)
        self.held = Gauge("budget_proxy_budget_held", "Reserved by requests in flight and not yet charged",
                          ["scope", "team", "key", "dimension"], registry=r)
        self.streams_in_flight = Gauge("budget_proxy_streams_in_flight", "Metered streams being relayed now",
                                       registry=r)
        self.store_errors = Counter("budget_proxy_store_errors", "Store calls that failed (reserve, charge, "
                                    "settle, states, key lookups)", registry=r)
        self.alerts = Counter("budget_proxy_alerts", "Alert webhook deliveries by event type and outcome",
                              ["type", "outcome"], registry=r)
        for t in ALERT_TYPES:  # (every series from the start: rate() sees the first one)
            for o in ALERT_OUTCOMES:
                self.alerts.labels(t, o)

    def store_error(self) -> None:
        self.store_errors.inc()

    def alert_sent(self, type: str, outcome: str) -> None:
        """One alert delivery attempt of event `type` ("budget.threshold", "budget.exceeded") that
        ended `outcome`: "sent", "failed" (retried later) or "dropped" (given up). Other values
        count as "other"."""
        self.alerts.labels(type if type in ALERT_TYPES else "other",
                           outcome if outcome in ALERT_OUTCOMES else "other").inc()

    @staticmethod
    def model_label(price: Any) -> str:
        """The pricing table's id of the price a request was charged at, else "other": never a
        string a client sent."""
        return price.model_id if price is not None and price.model_id else "other"

    def settled(self, team: str, key: str, model: str, route: str, outcome: str, usage: Usage,
                cost_nanos: int) -> None:
        """A request settled: counted by outcome, with its tokens by kind and its cost. Bounded:
        every label comes from the config, the pricing table or a fixed set (module docstring)."""
        row = self.settled_counts.row((team, key, model, route, outcome))
        row[REQUESTS] += 1
        row[FIRST_TOKEN] += usage.input_tokens
        row[FIRST_TOKEN + 1] += usage.cache_write_5m_tokens
        row[FIRST_TOKEN + 2] += usage.cache_write_1h_tokens
        row[FIRST_TOKEN + 3] += usage.cache_read_tokens
        row[FIRST_TOKEN + 4] += usage.output_tokens
        row[COST] += cost_nanos

    def refused(self, team: str, key: str, model: str, route: str, outcome: str) -> None:
        """A metered request refused before anything was forwarded ("denied", "rejected_<status>")."""
        self.settled_counts.row((team, key, model, route, outcome))[REQUESTS] += 1

    def observe_upstream_seconds(self, route: str, seconds: float) -> None:
        self.upstream_seconds.observe(route, seconds)

    def set_budgets(self, owners: Sequence[tuple[str, str]], scopes: Sequence[Scope],
                    states: Sequence[ScopeState], now: float) -> None:
        """The budget gauges (remaining, used, limit, held) from the store's states of the config's
        scopes; `owners` is each scope's (team, key) ("" for a team's own scope). Series of scopes
        no longer in the config (a reload) are dropped."""
        for gauge in (self.remaining, self.used, self.limit, self.held):
            gauge.clear()
        for (team, key), scope, state in zip(owners, scopes, states):
            kind = scope.kind
            name = team if kind == "team" else f"{team}/{key}"
            for dim, value in remaining(scope, state, now).items():
                self.remaining.labels(kind, name, dim).set(_unit(dim, value))
            used, held = state.used, state.held
            for dim in METERED:
                self.used.labels(kind, team, key, dim).set(_unit(dim, used.get(dim)))
                self.held.labels(kind, team, key, dim).set(_unit(dim, held.get(dim)))
            self.used.labels(kind, team, key, "wall_clock").set(state.wall_clock_used(now))
            for dim, limit in scope.limits.metered():
                self.limit.labels(kind, team, key, dim).set(_unit(dim, limit))
            if scope.limits.wall_clock is not None:
                self.limit.labels(kind, team, key, "wall_clock").set(scope.limits.wall_clock)

    def set_remaining(self, scopes: Sequence[Scope], states: Sequence[ScopeState], now: float) -> None:
        """set_budgets with each scope's owner read from its id ("team:T", "key:T/K")."""
        owners = [(s.name, "") if s.kind == "team" else tuple(s.id.removeprefix("key:").split("/", 1))
                  for s in scopes]
        self.set_budgets(owners, scopes, states, now)  # type: ignore[arg-type]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
