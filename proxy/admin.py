"""The admin API (docs/http-api.md): every team's and key's budget state and resets, with the
runtime-key, history and run routes behind the same guard. Admin key only: compared in constant
time; a proxy key (config or runtime) is refused with 403; with no admin key configured, /admin is
404."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.admin_history import HistoryRoutes
from proxy.admin_keys import KeyRoutes
from proxy.admin_runs import RunRoutes
from proxy.auth import presented_secret
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.ledger import Scope
from proxy.routes import RouteSet
from proxy.runtime_keys import key_scope, refusal
from proxy.views import scope_view


async def usage_document(state: Any, teams: list[str] | None = None) -> dict[str, Any]:
    """{"teams": [{"name", "budget", "keys": [{"name", "budget"}]}]} from the store, now: config keys,
    then the runtime keys that still work (docs/http-api.md, "Runtime keys")."""
    budgets = state.runtime.budgets
    names = teams if teams is not None else list(budgets.teams)
    now = state.clock()
    keys: dict[str, list[Scope]] = {team: [s for (t, _), s in budgets.keys.items() if t == team] for team in names}
    try:
        for team, scope in await live_runtime_scopes(state, now):
            if team in keys:
                keys[team].append(scope)
        scopes = [budgets.teams[t] for t in names] + [s for ks in keys.values() for s in ks]
        states = dict(zip((s.id for s in scopes), await state.store.states(scopes, now)))
    except StoreUnavailable:
        raise
    except Exception:
        raise StoreUnavailable("The budget ledger is unavailable.") from None
    out = []
    for team in names:
        t = budgets.teams[team]
        out.append({"name": team, "budget": scope_view(t, states[t.id], now),
                    "keys": [{"name": s.name, "budget": scope_view(s, states[s.id], now)} for s in keys[team]]})
    return {"teams": out}


async def live_runtime_scopes(state: Any, now: float) -> list[tuple[str, Scope]]:
    """(team, key scope) of every runtime key that may call now (not revoked, expired or shadowed)."""
    return [(r.team, key_scope(r)) for r in await state.store.list_keys()
            if refusal(r, state.runtime, now) is None]


class AdminRoutes(RouteSet, KeyRoutes, HistoryRoutes, RunRoutes):
    """The admin API's routes, each behind `guarded` (the admin key; a ProxyError is answered by
    `error_response`)."""

    ROUTES = (("/admin/usage", "GET", "usage"), ("/admin/teams/{team}", "GET", "team"),
              ("/admin/teams/{team}/reset", "POST", "reset_team"),
              ("/admin/teams/{team}/keys/{key}/reset", "POST", "reset_key"),
              *KeyRoutes.ROUTES, *HistoryRoutes.ROUTES, *RunRoutes.ROUTES)

    async def check_admin(self, request: Request) -> None:
        rt = self.state.runtime
        if not rt.config.admin_key.get_secret_value():
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        secret = presented_secret(dict(request.scope["headers"]))
        if rt.keyring.is_admin(secret):
            return
        if rt.keyring.lookup(secret) is not None or await self.state.runtime_keys.is_key(secret):
            raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
        raise AuthenticationError("Invalid admin key.")

    async def guarded(self, request: Request, action: Any) -> Response:
        """`action()`'s answer (a dict as JSON) once the admin key is checked; a ProxyError as the error."""
        try:
            await self.check_admin(request)
            result = await action()
            return result if isinstance(result, Response) else JSONResponse(result)
        except ProxyError as err:
            return self.error_response(err)

    def team_or_404(self, team: str) -> str:
        if team not in self.state.runtime.budgets.teams:
            raise NotFound(f"No team named '{team}'.")
        return team

    async def usage(self, request: Request) -> Response:
        return await self.guarded(request, lambda: usage_document(self.state))

    async def team(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            name = self.team_or_404(request.path_params["team"])
            return (await usage_document(self.state, [name]))["teams"][0]
        return await self.guarded(request, action)

    async def reset_team(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            name = self.team_or_404(request.path_params["team"])
            await self.state.store.reset(self.state.runtime.budgets.teams[name], self.state.clock())
            return {"reset": {"scope": "team", "name": name}}
        return await self.guarded(request, action)

    async def reset_key(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            team, key = self.team_or_404(request.path_params["team"]), request.path_params["key"]
            scope = await self.key_scope(team, key)
            await self.state.store.reset(scope, self.state.clock())
            return {"reset": {"scope": "key", "team": team, "name": scope.name}}
        return await self.guarded(request, action)

    async def key_scope(self, team: str, key: str) -> Scope:
        """The scope of a config key, else of a runtime key that still works; 404 when neither."""
        scope = self.state.runtime.budgets.keys.get((team, key))
        if scope is None:
            scope = next((s for t, s in await live_runtime_scopes(self.state, self.state.clock())
                          if t == team and s.name == key), None)
        if scope is None:
            raise NotFound(f"Team '{team}' has no key named '{key}'.")
        return scope
