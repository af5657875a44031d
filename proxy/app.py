"""create_app(config, store=, transport=, clock=): the ASGI app, its routes and lifespan.

Each provider's metered route (/v1/messages, /v1/chat/completions) is dispatched before
Starlette's router and middleware, by a dict lookup on the path; every other route goes through
Starlette. The app names no provider: the registry (proxy/providers/registry.py) lists them and
each says what its routes and errors are. State lives on the app object, never in module globals."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin import build_admin_routes
from proxy.dashboard import build_dashboard_routes
from proxy.auth import Caller, KeyRing, bearer_matches, presented_secret
from proxy.budgets import Budgets
from proxy.config import ConfigError, LoadedConfig, ProxyConfig, load_config
from proxy.logs import log_request
from proxy.metrics import Metrics
from proxy.errors import (AuthenticationError, NotFound, ProxyError, StoreUnavailable, UpstreamUnavailable,
                          new_request_id)
from proxy.passthrough import Passthrough
from proxy.pricing import PriceTable, PricingError, parse_price_table
from proxy.providers.registry import PROVIDERS, provider_for_path, provider_named
from proxy.ratio import OutputRatios
from proxy.runs import RUN_HEADER, RunBudgets
from proxy.relay import Relay
from proxy.runtime_keys import RuntimeKeys
from proxy.store import LedgerStore, open_store
from proxy.upstream import PooledTransport
from proxy.views import scope_view

log = logging.getLogger("budget_proxy")
access_log = logging.getLogger("budget_proxy.access")
def shipped_pricing_path() -> Path:
    """config/pricing.yaml of a source checkout, else the copy an installed package carries."""
    candidates = [Path(__file__).resolve().parent.parent / "config" / "pricing.yaml",
                  Path(sys.prefix) / "share" / "budget-proxy" / "pricing.yaml"]
    return next((p for p in candidates if p.exists()), candidates[0])


@dataclass(frozen=True)
class UpstreamTarget:
    base_url: str
    api_key: str


@dataclass(frozen=True)
class Runtime:
    """Everything derived from one config file; replaced whole on reload."""

    config: ProxyConfig
    keyring: KeyRing
    budgets: Budgets
    pricing: PriceTable
    upstreams: dict[str, UpstreamTarget]
    runs: RunBudgets


def load_pricing(loaded: LoadedConfig) -> PriceTable:
    """The user's pricing file or the shipped one; problems are reported as config problems."""
    path = loaded.resolve(loaded.proxy.pricing) if loaded.proxy.pricing else shipped_pricing_path()
    try:
        return parse_price_table(yaml.safe_load(path.read_text()))
    except OSError as exc:
        raise ConfigError([("pricing", f"cannot read {path}: {exc.strerror}")]) from None
    except yaml.YAMLError:
        raise ConfigError([("pricing", f"{path} is not valid YAML")]) from None
    except PricingError as err:
        raise ConfigError([(f"pricing: {p}", m) for p, m in err.problems]) from None


def build_runtime(loaded: LoadedConfig, pricing: PriceTable | None = None) -> Runtime:
    cfg = loaded.proxy
    ups = {name: UpstreamTarget(u.base_url, u.api_key.get_secret_value()) for name, u in cfg.upstreams.items()}
    return Runtime(cfg, KeyRing(cfg), Budgets(cfg), pricing if pricing is not None else load_pricing(loaded), ups,
                   RunBudgets(cfg))


class AppState:
    def __init__(self, runtime: Runtime, store: LedgerStore, transport: httpx.AsyncBaseTransport | None,
                 clock: Callable[[], float]) -> None:
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self._injected_transport = transport
        self.transports: dict[str, httpx.AsyncBaseTransport] = {}
        self.metrics = Metrics()
        self.output_ratios = OutputRatios()  # bytes per output token, learned (proxy/ratio.py)
        self.generation = 0                 # bumped by every reload that took effect
        self.active_streams: set[Any] = set()
        # One relay per known provider, by its metered path; one serves only while its provider
        # is configured (a reload may add or remove it).
        self.relays: dict[str, Relay] = {p.path: Relay(self, p) for p in PROVIDERS.values()}
        self.runtime_keys = RuntimeKeys(store)  # keys minted through /admin/keys, cached briefly

    async def authenticate(self, headers: dict[bytes, bytes]) -> Caller:
        """A config key at once, without awaiting; any other key through the store (401 if none)."""
        secret = presented_secret(headers)
        return self.runtime.keyring.lookup(secret) or await self.runtime_caller(secret)

    async def runtime_caller(self, secret: str) -> Caller:
        """The runtime key `secret` names, or a 401 saying why not (unknown, revoked, expired)."""
        return await self.runtime_keys.caller(secret, self.runtime, self.clock())

    def upstream_for(self, provider: str) -> UpstreamTarget:
        """The upstream to forward to; 502 without forwarding when no API key is configured for it
        (the provider's 401 would make the client blame its own key)."""
        up = self.runtime.upstreams[provider]
        if not up.api_key:
            raise UpstreamUnavailable(f"no API key is configured for upstream '{provider}'")
        return up

    def transport_for(self, provider: str) -> httpx.AsyncBaseTransport:
        t = self.transports.get(provider)
        if t is None:
            if self._injected_transport is not None:
                t = self._injected_transport
            else:
                u = self.runtime.config.upstreams[provider]  # type: ignore[index]
                t = PooledTransport(max_connections=u.max_connections, connect_timeout=u.connect_timeout_seconds,
                                     read_timeout=u.timeout_seconds, max_duration=u.max_duration_seconds)
            self.transports[provider] = t
        return t

    def reload(self, path: str) -> bool:
        """Load `path` and swap it in whole; an invalid file is refused and the old config stays.
        Used amounts live in the store by scope id, so they survive changed budgets."""
        try:
            runtime = build_runtime(load_config(path))
        except ConfigError as err:
            log.error("reload refused: config is invalid; keeping the old one",
                      extra={"fields": {"problems": [f"{p or '<root>'}: {m}" for p, m in err.problems]}})
            return False
        if runtime.config.store != self.runtime.config.store:
            log.warning("reload: a new store URL takes effect only after a restart")
        self.runtime = runtime
        self.generation += 1
        log.info("config reloaded", extra={"fields": {"generation": self.generation}})
        return True

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Streams still running when the grace period ends are cut, charged and closed."""
        def cut_all() -> None:
            for call in list(self.active_streams):
                call.shutting_down = True
                if call.upstream is not None:
                    asyncio.ensure_future(call.upstream.aclose())
        asyncio.get_running_loop().call_later(grace_seconds, cut_all)

    async def close_transports(self) -> None:
        for t in self.transports.values():
            if t is not self._injected_transport:
                await t.aclose()
        self.transports.clear()

    # Observation hooks: metrics and the access log.
    def observe_rejection(self, err: ProxyError, caller: Caller | None, model: str | None, route: str) -> None:
        if caller is not None:
            label = self.metrics.model_label(self.runtime.pricing.lookup(model) if model else None)
            outcome = "denied" if err.status == 429 else f"rejected_{err.status}"
            self.metrics.requests.labels(caller.team, caller.key, label, route, outcome).inc()
        log_request(access_log, {
            "team": caller.team if caller else None, "key": caller.key if caller else None, "model": model,
            "route": route, "status": err.status, "outcome": "rejected", "error": err.kind})

    def observe_denial(self, caller: Caller, dimension: str) -> None:
        self.metrics.denials.labels(caller.team, caller.key, dimension).inc()

    def observe_cut(self, caller: Caller, dimension: str) -> None:
        self.metrics.cuts.labels(caller.team, caller.key, dimension).inc()

    def observe_settled(self, call: Any, usage: Any, cost_nanos: int, steps: int) -> None:
        model = self.metrics.model_label(call.price)
        self.metrics.settled(call.caller.team, call.caller.key, model, call.route, call.outcome, usage, cost_nanos)
        log_request(access_log, {
            "request_id": call.request_id, "team": call.caller.team, "key": call.caller.key, "model": call.model,
            "route": call.route, "status": call.status, "outcome": call.outcome,
            "input_tokens": usage.total_input_tokens, "output_tokens": usage.output_tokens,
            "cost_usd": cost_nanos / 1e9, "steps": steps,
            "duration_ms": round((self.clock() - call.started) * 1000, 1)})

    def observe_upstream_seconds(self, route: str, seconds: float) -> None:
        self.metrics.upstream_seconds_for(route).observe(seconds)


def error_response(err: ProxyError, provider: str | None = None) -> Response:
    """`err` in the shape of the provider named `provider` (the default provider's when None)."""
    status, headers, payload = provider_named(provider).render_error(err, new_request_id())
    return Response(payload, status_code=status,
                    headers={k.decode(): v.decode() for k, v in headers if k != b"content-length"})


def build_routes(state: AppState) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await state.store.ping()
        except Exception:
            return JSONResponse({"status": "store unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def budget(request: Request) -> Response:
        try:
            headers = dict(request.scope["headers"])
            caller = await state.authenticate(headers)
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
            return error_response(err)
        return JSONResponse({"key": caller.key, "team": caller.team,
                             "scopes": [scope_view(s, st, now) for s, st in zip(scopes, states)]})

    async def metrics(request: Request) -> Response:
        rt = state.runtime
        metrics_key = rt.config.metrics_key.get_secret_value()
        if metrics_key and not bearer_matches(dict(request.scope["headers"]), metrics_key):
            return error_response(AuthenticationError("/metrics needs Authorization: Bearer <metrics_key>."))
        scopes = list(rt.budgets.teams.values()) + list(rt.budgets.keys.values())
        now = state.clock()
        try:
            state.metrics.set_remaining(scopes, await state.store.states(scopes, now), now)
        except Exception:
            log.warning("metrics: store unavailable; budget_remaining not refreshed")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/budget", budget, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *passthrough_routes(state),
        *build_admin_routes(state, error_response),
        *build_dashboard_routes(state, error_response),
    ]


def passthrough_routes(state: AppState) -> list[Route]:
    """Every provider's unmetered routes (count_tokens, models), each in its provider's shape."""
    return [Route(r.template, Passthrough(state, p.name, r), methods=[r.method])
            for p in PROVIDERS.values() for r in p.passthrough_routes]


class BudgetProxyApp:
    """The ASGI app. `state` is reachable for reload, admin and tests."""

    def __init__(self, state: AppState) -> None:
        self.state = state

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            for name, up in state.runtime.upstreams.items():
                if not up.api_key:
                    log.warning("upstream '%s' has no api_key: its requests answer 502 until one is configured", name)
            await state.store.open()
            try:
                yield
            finally:
                await state.close_transports()
                await state.store.close()

        async def not_found(request: Request, exc: Exception) -> Response:
            path = request.url.path
            provider = provider_for_path(path).name
            return error_response(NotFound(f"No route for {request.method} {path}."), provider)

        self.router = Starlette(routes=build_routes(state), lifespan=lifespan,
                                exception_handlers={404: not_found, 405: not_found})
        # A path with a trailing slash is not a route: a 404, never a redirect built from the
        # client's Host header.
        self.router.router.redirect_slashes = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            relay = self.state.relays.get(scope["path"])
            if relay is not None and relay.provider in self.state.runtime.upstreams:
                return await relay(scope, receive, send)
        await self.router(scope, receive, send)


def create_app(loaded: LoadedConfig, *, store: LedgerStore | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               clock: Callable[[], float] = time.time) -> BudgetProxyApp:
    runtime = build_runtime(loaded)
    if store is None:
        store = open_store(runtime.config.store)
    return BudgetProxyApp(AppState(runtime, store, transport, clock))
