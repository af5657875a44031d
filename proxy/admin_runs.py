"""GET /admin/runs?team=T&key=K[&limit=N]: one key's runs that the store has not forgotten yet, the
latest first (docs/http-api.md, "GET /admin/runs"; docs/budgets.md, "Runs").

What an operator with thousands of runs a day needs is the runs of one key, the latest (or the one
that is misbehaving now) first, and how many there are: so /admin/usage stays as it is (teams and
keys), and this route answers the number of the key's active runs and the `limit` latest of them
(default 50, at most 1000), each as the scope object of /budget plus `expires_at`, when the store
forgets it if no request comes. One run's state is also GET /budget with its x-budget-run header."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import InvalidRequest, NotFound, StoreUnavailable
from proxy.ledger import Limits, Scope
from proxy.periods import iso
from proxy.runs import run_scope_id
from proxy.views import scope_view

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}.")
    return int(raw)


async def run_limits(state: Any, team: str, key: str) -> Limits | None:
    """The key's run budget (None: none); 404 when the team has no such key, config or runtime."""
    rt = state.runtime
    if team not in rt.budgets.teams:
        raise NotFound(f"No team named '{team}'.")
    if (team, key) in rt.budgets.keys:
        return rt.runs.limits_for(team, key)
    from proxy.runtime_keys import caller_of  # (a runtime key's: its record says)

    rec = next((r for r in await state.store.list_keys(team) if r.name == key), None)
    if rec is None:
        raise NotFound(f"Team '{team}' has no key named '{key}'.")
    return caller_of(rec).run_limits


async def runs_document(state: Any, team: str, key: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """{"team", "key", "run_ttl", "active", "runs": [<scope object> + "expires_at", ...]}, latest first."""
    prefix = run_scope_id(team, key, "")
    try:
        limits = await run_limits(state, team, key)
        now = state.clock()
        active, entries = await state.store.list_runs(prefix, now, limit)
    except (StoreUnavailable, NotFound):
        raise
    except Exception:
        raise StoreUnavailable("The budget ledger is unavailable.") from None
    limits = limits if limits is not None else Limits()  # (a run budget since removed: used and held only)
    runs = []
    for scope_id, st, expires_at in entries:
        run = scope_id[len(prefix):]
        view = scope_view(Scope("run", run, scope_id, limits, "none"), st, now)
        view["expires_at"] = iso(expires_at)
        runs.append(view)
    return {"team": team, "key": key, "run_ttl": state.runtime.config.admission.run_ttl, "active": active,
            "runs": runs}


class RunRoutes:
    """The route's handler, mixed into the admin API's routes: under its `guarded` (the admin key;
    errors in the Anthropic shape)."""

    ROUTES = (("/admin/runs", "GET", "runs"),)
    state: Any
    guarded: Any

    async def runs(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            q = request.query_params
            team, key = q.get("team"), q.get("key")
            if not team or not key:
                raise InvalidRequest("GET /admin/runs needs ?team=TEAM&key=KEY (and optionally &limit=N).")
            return await runs_document(self.state, team, key, _limit(q.get("limit")))
        return await self.guarded(request, action)
