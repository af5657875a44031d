"""The operational routes (docs/http-api.md): GET /healthz, /readyz, /budget (a key's own budget
state) and /metrics."""
from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.auth import bearer_matches
from proxy.errors import AuthenticationError, ProxyError, StoreUnavailable
from proxy.logs import note
from proxy.routes import RouteSet
from proxy.runs import RUN_HEADER
from proxy.views import scope_view

log = logging.getLogger("budget_proxy")


class OpsRoutes(RouteSet):
    """The four routes; a ProxyError is answered by `error_response` (which counts a store failure)."""

    ROUTES = (("/healthz", "GET", "healthz"), ("/readyz", "GET", "readyz"), ("/budget", "GET", "budget"),
              ("/metrics", "GET", "metrics"))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.state.store.ping()
        except Exception:
            return JSONResponse({"status": "store unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def budget(self, request: Request) -> Response:
        state = self.state
        try:
            headers = dict(request.scope["headers"])
            caller = await state.authenticate(headers)
            note(request.scope, team=caller.team, key=caller.key)
            scopes = state.runtime.budgets.scopes_for(caller)
            if RUN_HEADER in headers:  # the run's scope first (no header: the key's and team's only)
                scopes = state.runtime.runs.with_run(caller, headers, scopes)
            now = state.clock()
            try:
                states = await state.store.states(scopes, now)
            except StoreUnavailable:
                raise
            except Exception:
                raise StoreUnavailable("The budget ledger is unavailable.") from None
        except ProxyError as err:
            note(request.scope, error=err.kind)
            return self.error_response(err)
        return JSONResponse({"key": caller.key, "team": caller.team,
                             "scopes": [scope_view(s, st, now) for s, st in zip(scopes, states)]})

    async def metrics(self, request: Request) -> Response:
        metrics_key = self.state.runtime.config.metrics_key.get_secret_value()
        if metrics_key and not bearer_matches(dict(request.scope["headers"]), metrics_key):
            note(request.scope, error=AuthenticationError.kind)
            return self.error_response(AuthenticationError("/metrics needs Authorization: Bearer <metrics_key>."))
        await self.refresh_budget_gauges()
        self.state.metrics.streams_in_flight.set(len(self.state.active_streams))
        return Response(self.state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def refresh_budget_gauges(self) -> None:
        """The budget gauges: config teams and keys only (runtime keys and runs never make a series)."""
        state = self.state
        budgets = state.runtime.budgets
        owners = [(t, "") for t in budgets.teams] + list(budgets.keys)
        scopes = list(budgets.teams.values()) + list(budgets.keys.values())
        now = state.clock()
        try:
            states = await state.store.states(scopes, now)
        except Exception:
            state.observe_store_error()
            log.warning("metrics: store unavailable; the budget gauges are not refreshed")
        else:
            state.metrics.set_budgets(owners, scopes, states, now)
