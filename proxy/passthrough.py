"""Unmetered routes (a provider's passthrough_routes, such as count_tokens and models): forwarded
and never charged.

Each route has a fixed upstream path: the URL is the configured base URL plus what the route
builds (for a model's details, one validated id), never the client's raw path (docs/http-api.md)."""
from __future__ import annotations

import time
from typing import Any

import httpx

from proxy.asgi import ASGIScope, ClientGone, Receive, Send, read_body, send_error
from proxy.errors import (NotFound, PermissionDenied, ProxyError, StoreUnavailable, UpstreamTimeout,
                          UpstreamUnavailable, new_request_id)
from proxy.headers import downstream_headers, upstream_headers
from proxy.logs import ACCESS_NOTE, upstream_request_id
from proxy.providers import PassRoute
from proxy.upstream import pool_failure
from proxy.validate import check_model, parse_body


class Passthrough:
    """One passthrough route of the provider named `provider`, answering in its error shape."""

    def __init__(self, state: Any, provider: str, route: PassRoute) -> None:
        self.state = state
        self.provider = provider
        self.route = route.label
        self.upstream_path = route.upstream_path
        self.checks_model = route.checks_model

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        # (what the access log says of it: BudgetProxyApp.answer gives the scope a note)
        noted = scope.get(ACCESS_NOTE)
        if noted is None:
            noted = {}
        noted["request_id"] = request_id
        rt = self.state.runtime
        try:
            if self.provider not in rt.upstreams:  # (the provider's routes exist only when it is configured)
                raise NotFound(f"No route for {scope['method']} {scope['path']}.")
            path = self.upstream_path(scope)
            headers = dict(scope["headers"])
            caller = await self.state.authenticate(headers)
            noted["team"], noted["key"] = caller.team, caller.key
            body = b""
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await read_body(receive, rt.config.limits.max_body_bytes, headers)
            if self.checks_model:
                model = noted["model"] = check_model(parse_body(body).get("model"))
                if not caller.may_use(model):
                    raise PermissionDenied(f"Key '{caller.key}' may not use model '{model}'.")
            up = self.state.upstream_for(self.provider)
        except ClientGone:
            return
        except ProxyError as err:
            if isinstance(err, StoreUnavailable):
                self.state.observe_store_error()
            noted["error"] = err.kind
            await send_error(send, err, request_id, self.provider)
            return
        qs = scope.get("query_string", b"")
        url = up.base_url + path + ("?" + qs.decode("latin-1") if qs else "")
        req = httpx.Request(scope["method"], url, headers=upstream_headers(scope["headers"], self.provider,
                                                                           up.api_key), content=body)
        await self.relay(req, request_id, send, noted)

    async def relay(self, req: httpx.Request, request_id: str, send: Send, noted: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            resp = await self.state.transport_for(self.provider).handle_async_request(req)
        except httpx.PoolTimeout as exc:  # (a TimeoutException: before it) no connection came free
            noted["outcome"], err = pool_failure(exc)
            await send_error(send, err, request_id, self.provider)
            return
        except httpx.TimeoutException:
            noted["outcome"] = "upstream_timeout"
            await send_error(send, UpstreamTimeout("The upstream API timed out."), request_id, self.provider)
            return
        except httpx.HTTPError:
            noted["outcome"] = "upstream_unreachable"
            await send_error(send, UpstreamUnavailable("The upstream API is unreachable."), request_id, self.provider)
            return
        try:
            headers = downstream_headers(resp.headers.raw)
            noted["upstream_request_id"] = upstream_request_id(headers)
            if resp.status_code >= 400:
                noted["outcome"] = f"upstream_{resp.status_code // 100}xx"
            await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError:  # headers are out; end the body cleanly
                noted["outcome"] = "upstream_dropped"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()
            self.state.observe_upstream_seconds(self.route, time.perf_counter() - t0)
