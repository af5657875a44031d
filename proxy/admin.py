"""The admin API: every team's and key's budget state, and resets. Admin key only: compared in
constant time; a proxy key is refused with 403; with no admin key configured, /admin is 404."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.auth import presented_secret
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.views import scope_view


async def usage_document(state: Any, teams: list[str] | None = None) -> dict[str, Any]:
    """{"teams": [{"name", "budget", "keys": [{"name", "budget"}]}]} from the store, now."""
    budgets = state.runtime.budgets
    names = teams if teams is not None else list(budgets.teams)
    scopes = []
    for team in names:
        scopes.append(budgets.teams[team])
        scopes += [s for (t, _), s in budgets.keys.items() if t == team]
    now = state.clock()
    try:
        states = dict(zip((s.id for s in scopes), await state.store.states(scopes, now)))
    except StoreUnavailable:
        raise
    except Exception:
        raise StoreUnavailable("The budget ledger is unavailable.") from None
    out = []
    for team in names:
        t = budgets.teams[team]
        keys = [{"name": s.name, "budget": scope_view(s, states[s.id], now)}
                for (tn, _), s in budgets.keys.items() if tn == team]
        out.append({"name": team, "budget": scope_view(t, states[t.id], now), "keys": keys})
    return {"teams": out}


def build_admin_routes(state: Any, error_response: Any) -> list[Route]:
    def check_admin(request: Request) -> None:
        rt = state.runtime
        if not rt.config.admin_key.get_secret_value():
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        secret = presented_secret(dict(request.scope["headers"]))
        if rt.keyring.is_admin(secret):
            return
        if rt.keyring.lookup(secret) is not None:
            raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
        raise AuthenticationError("Invalid admin key.")

    def team_or_404(team: str) -> str:
        if team not in state.runtime.budgets.teams:
            raise NotFound(f"No team named '{team}'.")
        return team

    async def guarded(request: Request, action: Any) -> Response:
        try:
            check_admin(request)
            return JSONResponse(await action())
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
    ]
