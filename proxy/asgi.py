"""Raw-ASGI helpers shared by the proxied routes."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from proxy.errors import ProxyError, RequestTooLarge
from proxy.providers.registry import provider_named

ASGIScope = dict[str, Any]  # the ASGI connection scope; not proxy.ledger.Scope, a budget scope
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    pass


async def read_body(receive: Receive, limit: int, headers: dict[bytes, bytes]) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    more = True
    chunks: list[bytes] = []
    size = 0
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        part = msg.get("body", b"")
        size += len(part)
        if size > limit:
            raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(part)
        more = msg.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_error(send: Send, err: ProxyError, request_id: str, provider: str | None = None) -> None:
    """`err` in the shape of the provider named `provider` (the default provider's when None)."""
    status, headers, payload = provider_named(provider).render_error(err, request_id)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
