"""[pure] Budget alerts (docs/budgets.md "Alerts"): which thresholds a scope's used amount
has reached, the event each crossing or denial makes, the key that makes it once per scope,
dimension, threshold and period, and the retry schedule of a delivery.

Nothing here does I/O or reads a clock: `now` is passed in. proxy/alerting.py watches the scopes and
sends the events; proxy/cli_alerts.py sends a test event."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

from proxy.ledger import Scope, ScopeState, in_unit
from proxy.periods import iso, period_bounds

THRESHOLD = "budget.threshold"
EXCEEDED = "budget.exceeded"
TEST = "budget.test"
DEFAULT_THRESHOLDS = (0.8, 0.95)

# A claim lasts until its period has ended, plus this margin (replicas' clocks differ a little; the
# next period's events have keys of their own anyway). A scope without a period (`none`, every run
# scope) keeps its claims this long.
CLAIM_MARGIN_S = 3600.0
NO_PERIOD_CLAIM_S = 366 * 86400.0

# Delivery: a POST times out after TIMEOUT_S; a failed one is tried again after 1, 2, 4, 8 ... s
# (at most MAX_DELAY_S apart) until GIVE_UP_S after the first attempt, then dropped.
TIMEOUT_S = 5.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
GIVE_UP_S = 600.0


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose scope it is, as an event names it: a team scope has no key, only a run scope has a run."""

    team: str
    key: str | None
    run: str | None


def owner_of(scope: Scope, team: str, key: str) -> Owner:
    """The owner of `scope`, one of the scopes a request of key `key` of team `team` was charged to."""
    if scope.kind == "team":
        return Owner(scope.name, None, None)
    if scope.kind == "run":
        return Owner(team, key, scope.name)
    return Owner(team, scope.name, None)


def crossed(thresholds: Sequence[float], used: int | float, limit: int | float) -> list[float]:
    """The thresholds (fractions of `limit`) that `used` has reached, ascending; exact arithmetic
    (0.95 of 1000 is 950, not 949.9999...). A limit of 0 or less has no thresholds: everything is
    denied there, and the denial makes the event."""
    if limit is None or limit <= 0:
        return []
    u, lim = Fraction(used), Fraction(limit)
    return sorted(t for t in set(thresholds) if u >= Fraction(str(t)) * lim)


def measured(scope: Scope, state: ScopeState, now: float) -> list[tuple[str, int | float, int | float]]:
    """(dimension, used, limit) of every limited dimension of `scope`, in stored units (nanos for
    cost); wall_clock in seconds since the period's first request."""
    out: list[tuple[str, int | float, int | float]] = [(dim, state.used.get(dim), limit)
                                                      for dim, limit in scope.limits.metered()]
    if scope.limits.wall_clock is not None:
        out.append(("wall_clock", state.wall_clock_used(now), scope.limits.wall_clock))
    return out


def event_key(type: str, scope_id: str, dimension: str, period_start: float, threshold: float | None = None) -> str:
    """What makes an event once per scope, dimension, threshold and period (across replicas: the
    store's claim_alert)."""
    t = "" if threshold is None else repr(float(threshold))
    return f"{type}|{t}|{dimension}|{int(period_start)}|{scope_id}"


def claim_ttl(period: str, now: float) -> float:
    """How long a claim made at `now` is kept: until the period ends (plus a margin), or
    NO_PERIOD_CLAIM_S for a scope without one."""
    end = period_bounds(period, now)[1]
    return NO_PERIOD_CLAIM_S if end is None else max(1.0, end - now) + CLAIM_MARGIN_S


def body(type: str, threshold: float | None, scope: Scope, owner: Owner, dimension: str, used: int | float,
         limit: int | float, now: float) -> dict[str, Any]:
    """The JSON an event is POSTed as. used and limit are in the dimension's unit (USD for cost,
    seconds for wall_clock); `threshold` is null on budget.exceeded."""
    if dimension == "wall_clock":
        used_u, limit_u = round(float(used), 3), float(limit)
    else:
        used_u, limit_u = in_unit(dimension, used), in_unit(dimension, limit)
    return {"type": type, "threshold": threshold, "scope": scope.kind, "team": owner.team, "key": owner.key,
            "run": owner.run, "dimension": dimension, "used": used_u, "limit": limit_u, "period": scope.period,
            "resets_at": iso(period_bounds(scope.period, now)[1]), "at": iso_ms(now)}


def sample_body(now: float) -> dict[str, Any]:
    """`budget-proxy alerts test`'s event: a threshold event's fields, marked as a test."""
    return {"type": TEST, "test": True, "threshold": 0.8, "scope": "key", "team": "example-team",
            "key": "example-key", "run": None, "dimension": "cost_usd", "used": 8.0, "limit": 10.0,
            "period": "day", "resets_at": iso(period_bounds("day", now)[1]), "at": iso_ms(now)}


def iso_ms(ts: float) -> str:
    """ISO-8601 UTC with milliseconds."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def retry_delay(failures: int) -> float:
    """The wait before the next attempt after `failures` failed ones (1 -> 1 s, 2 -> 2 s, 3 -> 4 s ...,
    never more than MAX_DELAY_S)."""
    if failures >= 8:  # (2**7 = 128 > 60 already; no huge powers)
        return MAX_DELAY_S
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (failures - 1))


def next_attempt(failures: int, first_at: float, now: float) -> float | None:
    """After `failures` failed attempts (the first made at `first_at`, the last ended at `now`): the
    wait before the next one, or None to give up (it would start more than GIVE_UP_S after the first)."""
    delay = retry_delay(failures)
    return None if now + delay - first_at > GIVE_UP_S else delay


def schedule() -> list[float]:
    """Every wait of a delivery that fails every time and takes no time to fail (the docs quote it)."""
    waits: list[float] = []
    elapsed = 0.0
    while (d := next_attempt(len(waits) + 1, 0.0, elapsed)) is not None:
        waits.append(d)
        elapsed += d
    return waits


def is_success(status: int) -> bool:
    return 200 <= status < 300


def url_label(url: str) -> str:
    """A webhook as the log names it: scheme, host and port only (a path or query may carry a token,
    as Slack's do; the headers are never logged)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
