"""The admin API: every team's and key's budget state, resets, and the runtime-key routes
(proxy/admin_keys.py). Admin key only: compared in constant time; a proxy key (config or runtime)
is refused with 403; with no admin key configured, /admin is 404."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin_history import build_history_routes
from proxy.admin_keys import build_key_routes
from proxy.admin_runs import build_run_routes
from proxy.auth import presented_secret
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.ledger import Scope
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


def build_admin_routes(state: Any, error_response: Any) -> list[Route]:
    async def check_admin(request: Request) -> None:
        rt = state.runtime
        if not rt.config.admin_key.get_secret_value():
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        secret = presented_secret(dict(request.scope["headers"]))
        if rt.keyring.is_admin(secret):
            return
        if rt.keyring.lookup(secret) is not None or await state.runtime_keys.is_key(secret):
            raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
        raise AuthenticationError("Invalid admin key.")

    def team_or_404(team: str) -> str:
        if team not in state.runtime.budgets.teams:
            raise NotFound(f"No team named '{team}'.")
        return team

    async def guarded(request: Request, action: Any) -> Response:
        try:
            await check_admin(request)
            result = await action()
            return result if isinstance(result, Response) else JSONResponse(result)
        except ProxyError as err:
            return error_response(err)

    async def usage(request: Request) -> Response:
        return await guarded(request, lambda: usage_document(state))

    async def team(request: Request) -> Response:
        async def action() -> dict[str, Any]:
            name = team_or_404(request.path_params["team"])
            return (await usage_document(state, [name]))["teams"][0]
        return await guarded(request, action)

    async def reset_team(request: Request) -> Response:
        async def action() -> dict[str, Any]:
            name = team_or_404(request.path_params["team"])
            await state.store.reset(state.runtime.budgets.teams[name], state.clock())
            return {"reset": {"scope": "team", "name": name}}
        return await guarded(request, action)

    async def reset_key(request: Request) -> Response:
        async def action() -> dict[str, Any]:
            name = team_or_404(request.path_params["team"])
            scope = state.runtime.budgets.keys.get((name, request.path_params["key"]))
            if scope is None:  # a runtime key's, while it works
                scope = next((s for t, s in await live_runtime_scopes(state, state.clock())
                              if t == name and s.name == request.path_params["key"]), None)
            if scope is None:
                raise NotFound(f"Team '{name}' has no key named '{request.path_params['key']}'.")
            await state.store.reset(scope, state.clock())
            return {"reset": {"scope": "key", "team": name, "name": scope.name}}
        return await guarded(request, action)

    return [
        Route("/admin/usage", usage, methods=["GET"]),
        Route("/admin/teams/{team}", team, methods=["GET"]),
        Route("/admin/teams/{team}/reset", reset_team, methods=["POST"]),
        Route("/admin/teams/{team}/keys/{key}/reset", reset_key, methods=["POST"]),
        *build_key_routes(state, guarded),
        *build_history_routes(state, guarded),
        *build_run_routes(state, guarded),
    ]
