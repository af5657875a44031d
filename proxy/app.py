"""create_app(config, store=, transport=, clock=): the ASGI app, its routes and lifespan.

Each provider's metered route (/v1/messages, /v1/chat/completions) is dispatched before
Starlette's router and middleware, by a dict lookup on the path; every other route goes through
Starlette. The app names no provider: the registry (proxy/providers/registry.py) lists them and
each says what its routes and errors are. State lives on the app object, never in module globals."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminRoutes
from proxy.alerting import Alerts
from proxy.dashboard import DashboardRoutes
from proxy.auth import Caller, KeyRing, presented_secret
from proxy.budgets import Budgets
from proxy.config import ConfigError, LoadedConfig, ProxyConfig, load_config
from proxy.logs import ACCESS_NOTE, client_field, log_request, note, path_field
from proxy.metrics import Metrics, key_label
from proxy.errors import (BudgetExceeded, InvalidRequest, NotFound, ProxyError, StoreUnavailable, UpstreamUnavailable,
                          new_request_id)
from proxy.passthrough import Passthrough
from proxy.pricing import PriceTable, PricingError, parse_price_table
from proxy.providers.registry import PROVIDERS, provider_for_path, provider_named
from proxy.ratio import OutputRatios
from proxy.retention import Retention
from proxy.routes_ops import OpsRoutes
from proxy.runs import RUN_HEADER, RunBudgets, run_id_of
from proxy.relay import Relay
from proxy.runtime_keys import RuntimeKeys
from proxy.store import LedgerStore, open_store
from proxy.upstream import EgressProxies, H2Transport, PooledTransport, ProxiedTransport, tls_context

log = logging.getLogger("budget_proxy")
access_log = logging.getLogger("budget_proxy.access")
# Probes answered 200 are not logged (a kubelet or compose healthcheck every few seconds would flood
# the log); a failing probe is.
QUIET_PROBES = frozenset({"/healthz", "/readyz"})


def run_field(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's x-budget-run when it is a valid run id (docs/budgets.md "Runs"), else None."""
    for k, v in headers:
        if k == RUN_HEADER:
            try:
                return run_id_of({RUN_HEADER: v}, False)
            except InvalidRequest:
                return None
    return None


def descriptors_wanted(config: ProxyConfig) -> int:
    """Two descriptors a stream (client and upstream) at every upstream's max_connections, and room
    for the listener, the store and the logs. (An http2 upstream's streams share its connections and
    are not bounded by max_connections: counted alike, the figure is a floor.)"""
    return 2 * sum(u.max_connections for u in config.upstreams.values()) + 64


def warn_if_few_descriptors(config: ProxyConfig) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = descriptors_wanted(config)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("the open-file limit (RLIMIT_NOFILE %d) is below the %d that max_connections can use: "
                    "past about %d streams at once, new ones answer 503 (docs/configuration.md)",
                    soft, wanted, max(0, (soft - 64) // 2))


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
        self.egress = EgressProxies.from_env(os.environ)  # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read once
        self.metrics = Metrics()
        self.output_ratios = OutputRatios()  # bytes per output token, learned (proxy/ratio.py)
        self.generation = 0                 # bumped by every reload that took effect
        self.active_streams: set[Any] = set()
        # One relay per known provider, by its metered path; one serves only while its provider
        # is configured (a reload may add or remove it).
        self.relays: dict[str, Relay] = {p.path: Relay(self, p) for p in PROVIDERS.values()}
        self.runtime_keys = RuntimeKeys(store)  # keys minted through /admin/keys, cached briefly
        self.alerts = Alerts(self)  # budget alert webhooks, noticed and sent in the background (proxy/alerting.py)
        self.retention = Retention(self)  # prunes the usage log after store_retention_days (proxy/retention.py)

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
                # An upstream behind an egress proxy goes through httpx's transport; a direct one
                # through the project's pool (proxy/upstream.py says why), HTTP/2's if asked for.
                via = u.proxy or self.egress.proxy_for(u.base_url)
                kw = dict(max_connections=u.max_connections, connect_timeout=u.connect_timeout_seconds,
                          read_timeout=u.timeout_seconds, max_duration=u.max_duration_seconds,
                          pool_timeout=u.pool_timeout_seconds,
                          ssl_context=tls_context(u.ca_bundle) if u.ca_bundle else None)
                if via and u.http2:
                    log.warning("upstream %s: http2 is not used through the egress proxy from the environment; "
                                "HTTP/1.1 through it", provider)
                t = (ProxiedTransport(via, **kw) if via else H2Transport(**kw) if u.http2  # type: ignore[arg-type]
                     else PooledTransport(**kw))  # type: ignore[arg-type]
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

    # Observation hooks: metrics and the access log (docs/http-api.md, "Metrics" and "Access log").
    # The metered routes log themselves (observe_rejection, observe_done); every other route is
    # logged by BudgetProxyApp.answer (observe_answered).
    def observe_rejection(self, err: ProxyError | None, caller: Caller | None, model: str | None, route: str,
                          scope: dict[str, Any] | None = None, request_id: str | None = None,
                          started: float | None = None) -> None:
        """A metered request refused before anything was forwarded (`err`), or whose client left
        while it was read (`err` None), once its answer is sent."""
        if err is not None:
            if caller is not None:
                label = self.metrics.model_label(self.runtime.pricing.lookup(model) if model else None)
                outcome = "denied" if err.status == 429 else f"rejected_{err.status}"
                self.metrics.refused(caller.team, key_label(caller), label, route, outcome)
            if isinstance(err, StoreUnavailable):
                self.metrics.store_error()
        budget = err.budget if isinstance(err, BudgetExceeded) else None
        log_request(access_log, {
            "request_id": request_id, "upstream_request_id": None,
            "client": client_field(scope) if scope is not None else None, "method": "POST", "path": route,
            "status": err.status if err is not None else None,
            "team": caller.team if caller else None, "key": caller.key if caller else None,
            "run": run_field(scope["headers"]) if scope is not None else None, "model": model,
            "outcome": "client_disconnected" if err is None else "denied" if budget is not None else "rejected",
            "error": err.kind if err is not None else None,
            "denied_scope": budget["scope"] if budget else None,
            "denied_dimension": budget["dimension"] if budget else None,
            "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "steps": 0,
            "duration_ms": round((self.clock() - started) * 1000, 1) if started is not None else None})

    def observe_denial(self, caller: Caller, dimension: str, denied: Any = None) -> None:
        """A 429 for a budget; `denied` (a ledger Denied) names its scope when one ran out."""
        self.metrics.denials.labels(caller.team, key_label(caller), dimension).inc()
        if denied is not None:
            self.alerts.exceeded(caller, denied)  # (O(1): the event is claimed and sent in the background)
        self.store.log_denial(caller.team, caller.key, self.clock())  # history's `denied` (never raises, never waits)

    def observe_cut(self, call: Any, denied: Any) -> None:
        """A stream cut by the budget `denied` (a ledger Denied) names."""
        call.denied = denied
        self.metrics.cuts.labels(call.caller.team, key_label(call.caller), denied.dimension).inc()
        self.alerts.exceeded(call.caller, denied)  # (O(1): the event is claimed and sent in the background)

    def observe_store_error(self) -> None:
        """A store call failed and the proxy caught it (fail closed, or a charge not persisted)."""
        self.metrics.store_error()

    def observe_alert(self, type: str, outcome: str) -> None:
        """An alert delivery attempt (Metrics.alert_sent says which values count)."""
        self.metrics.alert_sent(type, outcome)

    def observe_settled(self, call: Any, usage: Any, cost_nanos: int, steps: int) -> None:
        """Metrics at settlement; the log line waits for the response's last byte (observe_done)."""
        self.retention.tick()  # (a clock comparison; at most hourly a background prune)
        model = self.metrics.model_label(call.price)
        self.metrics.settled(call.caller.team, key_label(call.caller), model, call.route, call.outcome, usage,
                             cost_nanos)
        call.charged = (usage.total_input_tokens, usage.output_tokens, cost_nanos, steps)
        self.alerts.touched(call.caller, call.res.scopes)  # (O(1): thresholds are looked at in the background)

    def observe_done(self, call: Any, scope: dict[str, Any]) -> None:
        """The access-log line of a metered request, after the last byte of its response."""
        denied, charged = call.denied, call.charged or (0, 0, 0, 0)
        client = scope.get("client")
        log_request(access_log, {
            "request_id": call.request_id, "upstream_request_id": call.upstream_request_id,
            "client": client[0] if client else None, "method": "POST", "path": call.route,
            "status": call.status or None, "team": call.caller.team, "key": call.caller.key,
            "run": run_field(scope["headers"]), "model": call.model, "outcome": call.outcome, "error": None,
            "denied_scope": denied.scope.kind if denied is not None else None,
            "denied_dimension": denied.dimension if denied is not None else None,
            "input_tokens": charged[0], "output_tokens": charged[1], "cost_usd": charged[2] / 1e9,
            "steps": charged[3], "duration_ms": round((self.clock() - call.started) * 1000, 1)})

    def observe_answered(self, scope: dict[str, Any], noted: dict[str, Any], status: int | None,
                         seconds: float) -> None:
        """The access-log line of a request answered through Starlette (every route but the
        metered ones), after the last byte of its response."""
        outcome = noted.get("outcome") or ("client_disconnected" if status is None else
                                           "completed" if status < 400 else "rejected")
        log_request(access_log, {
            "request_id": noted.get("request_id") or new_request_id(),
            "upstream_request_id": noted.get("upstream_request_id"),
            "client": client_field(scope), "method": scope["method"][:32], "path": path_field(scope),
            "status": status, "team": noted.get("team"), "key": noted.get("key"),
            "run": run_field(scope["headers"]), "model": noted.get("model"), "outcome": outcome,
            "error": noted.get("error"), "denied_scope": None, "denied_dimension": None,
            "input_tokens": None, "output_tokens": None, "cost_usd": None, "steps": None,
            "duration_ms": round(seconds * 1000, 1)})

    def observe_upstream_seconds(self, route: str, seconds: float) -> None:
        self.metrics.observe_upstream_seconds(route, seconds)


def error_response(err: ProxyError, provider: str | None = None) -> Response:
    """`err` in the shape of the provider named `provider` (the default provider's when None)."""
    status, headers, payload = provider_named(provider).render_error(err, new_request_id())
    return Response(payload, status_code=status,
                    headers={k.decode(): v.decode() for k, v in headers if k != b"content-length"})


def build_routes(state: AppState) -> list[Route]:
    def counted_error_response(err: ProxyError, provider: str | None = None) -> Response:
        """error_response, counting a store failure (budget_proxy_store_errors_total)."""
        if isinstance(err, StoreUnavailable):
            state.observe_store_error()
        return error_response(err, provider)

    return [
        *OpsRoutes(state, counted_error_response).routes(),
        *passthrough_routes(state),
        *AdminRoutes(state, counted_error_response).routes(),
        *DashboardRoutes(state, counted_error_response).routes(),
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
            warn_if_few_descriptors(state.runtime.config)
            await state.store.open()
            await state.alerts.start()
            try:
                yield
            finally:
                await state.alerts.stop()  # (before the store closes: its last look reads the store)
                await state.close_transports()
                await state.store.close()

        async def not_found(request: Request, exc: Exception) -> Response:
            path = request.url.path
            provider = provider_for_path(path).name
            note(request.scope, error=NotFound.kind)
            return error_response(NotFound(f"No route for {request.method} {path}."), provider)

        self.router = Starlette(routes=build_routes(state), lifespan=lifespan,
                                exception_handlers={404: not_found, 405: not_found})
        # A path with a trailing slash is not a route: a 404, never a redirect built from the
        # client's Host header.
        self.router.router.redirect_slashes = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                relay = self.state.relays.get(scope["path"])
                if relay is not None and relay.provider in self.state.runtime.upstreams:
                    return await relay(scope, receive, send)  # (logs itself: Relay.__call__)
            return await self.answer(scope, receive, send)
        await self.router(scope, receive, send)

    async def answer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Starlette's answer to `scope`, and its access-log line once the last byte is sent: the
        status from the response's start, the request id from the route's note (ACCESS_NOTE) or
        the proxy's own error response (a new one when it has none)."""
        started = time.perf_counter()
        noted: dict[str, Any] = {}
        scope[ACCESS_NOTE] = noted
        status: int | None = None

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if "request_id" not in noted:  # (a passthrough notes its own: the header is the upstream's)
                    for k, v in message.get("headers", ()):
                        if k == b"request-id" or k == b"x-request-id":
                            noted["request_id"] = v.decode("latin-1")
                            break
            await send(message)

        try:
            await self.router(scope, receive, watched)
        finally:
            if not (status == 200 and scope["path"] in QUIET_PROBES):
                self.state.observe_answered(scope, noted, status, time.perf_counter() - started)


def create_app(loaded: LoadedConfig, *, store: LedgerStore | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               clock: Callable[[], float] = time.time) -> BudgetProxyApp:
    runtime = build_runtime(loaded)
    if store is None:
        store = open_store(runtime.config.store)
    return BudgetProxyApp(AppState(runtime, store, transport, clock))
