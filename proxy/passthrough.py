"""Unmetered routes: count_tokens and models are forwarded as they are and never charged."""
from __future__ import annotations

import time
from typing import Any

import httpx

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable, new_request_id
from proxy.headers import downstream_headers, upstream_headers
from proxy.asgi import ClientGone, Receive, Send, read_body, send_error


class Passthrough:
    def __init__(self, state: Any, provider: str = "anthropic") -> None:
        self.state = state
        self.provider = provider

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        rt = self.state.runtime
        try:
            headers = dict(scope["headers"])
            self.state.relay.authenticate(headers)
            body = b""
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await read_body(receive, rt.config.limits.max_body_bytes, headers)
        except ClientGone:
            return
        except ProxyError as err:
            await send_error(send, err, request_id, self.provider)
            return
        up = rt.upstreams[self.provider]
        qs = scope.get("query_string", b"")
        url = up.base_url + scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        req = httpx.Request(scope["method"], url, headers=upstream_headers(scope["headers"], self.provider,
                                                                           up.api_key), content=body)
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
            self.state.observe_upstream_seconds(scope["path"], time.perf_counter() - t0)
