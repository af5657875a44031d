"""[pure] How a denial is worded: the budget 429 (message, `budget` object, headers) and the
mid-stream cut message. Messages say what ran out, for whom, by how much and when it resets;
they name keys by their config name, never by their secret."""
from __future__ import annotations

from proxy.auth import Caller
from proxy.errors import BudgetExceeded
from proxy.ledger import BY_NAME, Denied, in_unit
from proxy.periods import iso, period_bounds

RETRY_AFTER_MAX_SECONDS = 60  # SDKs sleep for whatever retry-after says: only send it for a near reset


def whose(denied: Denied, caller: Caller) -> str:
    if denied.scope.kind == "key":
        return f"key '{caller.key}' of team '{caller.team}'"
    if denied.scope.kind == "run":  # (docs/budgets.md, "Runs")
        return f"run '{denied.scope.name}' of key '{caller.key}' of team '{caller.team}'"
    return f"team '{caller.team}' (called with key '{caller.key}')"


def budget_error(denied: Denied, caller: Caller, now: float) -> BudgetExceeded:
    scope, dim = denied.scope, denied.dimension
    _, resets = period_bounds(scope.period, now)
    who = whose(denied, caller)
    limit, used, held, needed = (in_unit(dim, v) for v in (denied.limit, denied.used, denied.held, denied.needed))
    d = BY_NAME.get(dim)
    unit = f" {d.unit}" if d is not None and d.unit else ""
    if dim == "wall_clock":
        what = f"wall-clock budget of {who} is spent: {used:.1f}{unit} of {limit}{unit} elapsed"
    elif d is not None and d.noun:  # a count spent whole (steps)
        what = (f"{d.noun} budget of {who} is spent: {used} of {limit} {d.noun}s used"
                + (f", {held} in flight" if held else ""))
    else:
        left = max(0, limit - used - held)
        what = (f"{dim} budget of {who} cannot cover this request: used {used} of {limit}{unit}"
                + (f" (+{held} held by requests in flight)" if held else "")
                + f", {left:g}{unit} left, at least {needed}{unit} needed")
    when = f"; it resets at {iso(resets)}" if resets is not None else "; it has no reset period"
    headers = {"x-should-retry": "false", "x-budget-exceeded": dim}
    if resets is not None:
        headers["x-budget-resets-at"] = iso(resets) or ""
        wait = resets - now
        if wait <= RETRY_AFTER_MAX_SECONDS:
            headers["retry-after"] = str(max(1, int(wait + 0.999)))
    budget = {"scope": scope.kind, "name": scope.name, "dimension": dim, "limit": limit, "used": used,
              "resets_at": iso(resets)}
    return BudgetExceeded(f"Budget exceeded: {what}{when}.", budget=budget, headers=headers)


def cut_message(denied: Denied, caller: Caller) -> str:
    return f"budget exceeded mid-stream: the {denied.dimension} budget of {whose(denied, caller)} ran out"
