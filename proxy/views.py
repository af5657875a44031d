"""[pure] The scope object (docs/http-api.md "GET /budget") shown by /budget, /admin and `budget-proxy usage`."""
from __future__ import annotations

from typing import Any

from proxy.ledger import METERED, Scope, ScopeState, in_unit, remaining
from proxy.periods import iso, period_bounds


def scope_view(scope: Scope, state: ScopeState, now: float) -> dict[str, Any]:
    lim = scope.limits
    limit = {d: in_unit(d, v) for d, v in lim.metered()}
    if lim.wall_clock is not None:
        limit["wall_clock"] = lim.wall_clock
    used: dict[str, Any] = {d: in_unit(d, state.used.get(d)) for d in METERED}
    used["wall_clock"] = round(state.wall_clock_used(now), 3)
    return {
        "scope": scope.kind,
        "name": scope.name,
        "period": scope.period,
        "resets_at": iso(period_bounds(scope.period, now)[1]),
        "limit": limit,
        "used": used,
        "held": {d: in_unit(d, state.held.get(d)) for d in METERED},
        "remaining": {d: in_unit(d, v) for d, v in remaining(scope, state, now).items()},
    }
