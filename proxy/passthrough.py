"""Unmetered routes: count_tokens and models are forwarded and never charged.

Each route has a fixed upstream path: the URL is the configured base URL plus that path (and, for
a model's details, one validated id), never the client's raw path (docs/http-api.md)."""
from __future__ import annotations

import re
import time
from typing import Any, Callable

import httpx

from proxy.asgi import ClientGone, Receive, Scope, Send, read_body, send_error
from proxy.errors import NotFound, PermissionDenied, ProxyError, UpstreamTimeout, UpstreamUnavailable, new_request_id
from proxy.headers import downstream_headers, upstream_headers
from proxy.validate import check_model, parse_body

# One raw path segment: no percent-encoding, slash, backslash or dot segment can pass.
_MODEL_ID = re.compile(rb"[A-Za-z0-9._:@-]{1,128}")
_MODELS_PREFIX = b"/v1/models/"


def fixed_path(path: str) -> Callable[[Scope], str]:
    return lambda scope: path


def model_detail_path(scope: Scope) -> str:
    """/v1/models/{id} for a raw id of the allowed grammar; NotFound for anything else."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    raw = raw.split(b"?", 1)[0]
    model_id = raw[len(_MODELS_PREFIX):] if raw.startswith(_MODELS_PREFIX) else b""
    if _MODEL_ID.fullmatch(model_id) is None or model_id in (b".", b".."):
        raise NotFound("No such model id: it must be one path segment of letters, digits and ._:@-")
    return "/v1/models/" + model_id.decode("ascii")


class Passthrough:
    def __init__(self, state: Any, route: str, upstream_path: Callable[[Scope], str], *,
                 provider: str = "anthropic", checks_model: bool = False) -> None:
        self.state = state
        self.route = route  # the metric label: the route's template, never the client's path
        self.provider = provider
        self.upstream_path = upstream_path
        self.checks_model = checks_model  # the body names a model: validate it, apply the allow-list

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        rt = self.state.runtime
        try:
            path = self.upstream_path(scope)
            headers = dict(scope["headers"])
            caller = self.state.relay.authenticate(headers)
            body = b""
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await read_body(receive, rt.config.limits.max_body_bytes, headers)
            if self.checks_model:
                model = check_model(parse_body(body).get("model"))
                if not caller.may_use(model):
                    raise PermissionDenied(f"Key '{caller.key}' may not use model '{model}'.")
            up = self.state.upstream_for(self.provider)
        except ClientGone:
            return
        except ProxyError as err:
            await send_error(send, err, request_id, self.provider)
            return
        qs = scope.get("query_string", b"")
        url = up.base_url + path + ("?" + qs.decode("latin-1") if qs else "")
        req = httpx.Request(scope["method"], url, headers=upstream_headers(scope["headers"], self.provider,
                                                                           up.api_key), content=body)
        await self.relay(req, request_id, send)

    async def relay(self, req: httpx.Request, request_id: str, send: Send) -> None:
        t0 = time.perf_counter()
        try:
            resp = await self.state.transport_for(self.provider).handle_async_request(req)
        except httpx.TimeoutException:
            await send_error(send, UpstreamTimeout("The upstream API timed out."), request_id, self.provider)
            return
        except httpx.HTTPError:
            await send_error(send, UpstreamUnavailable("The upstream API is unreachable."), request_id, self.provider)
            return
        try:
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": downstream_headers(resp.headers.raw)})
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError:
                pass  # headers are out; end the body cleanly
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()
            self.state.observe_upstream_seconds(self.route, time.perf_counter() - t0)
