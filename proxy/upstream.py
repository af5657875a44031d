"""The upstream client: httpx's Request/Response types as the seam (respx and httpx.MockTransport
plug in there), the project's keep-alive pool (proxy/http1.py) doing the socket work.

Measured here (MEASUREMENTS.md, bench/RESULTS.md): httpx's stock transport relays at ~0.10x of a
raw aiohttp pass-through and `httpx.AsyncClient` on httpx-aiohttp at ~0.45x; most of the
remainder is AsyncClient's per-request machinery (request building, cookie extraction). So the
relay never uses an AsyncClient — no cookie jar (a shared jar would leak one tenant's upstream
cookies to every other), no redirects — and on the project's own transport it skips the httpx
types too: building an httpx.Request and Response costs ~50 us a call. `open_upstream` is the one
entry point: the fast path for PooledTransport, `handle_async_request` (the httpx seam) for any
other transport.
"""
from __future__ import annotations

from typing import AsyncIterator, Awaitable, Protocol

import httpx

from proxy.http1 import Pool, Reply


class UpstreamReply(Protocol):
    """What the relay reads of an upstream answer."""

    status_code: int
    headers_raw: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]
    content_type: str

    @property
    def body_complete(self) -> bool:
        """True once the chunk last taken from aiter_raw is known to be the body's last (False
        when that is not known until the iteration ends)."""

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class HttpxReply:
    """An httpx.Response (from any httpx transport: respx, MockTransport) as an UpstreamReply."""

    __slots__ = ("status_code", "headers_raw", "content_type", "_response")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers_raw = response.headers.raw
        self.content_type = response.headers.get("content-type", "")

    body_complete = False  # httpx says so only when the iteration ends

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aread(self) -> bytes:
        return await self._response.aread()

    async def aclose(self) -> None:
        await self._response.aclose()


class ReplyStream(httpx.AsyncByteStream):
    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._reply.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        await self._reply.aclose()


# What httpx.Request adds or carries that the pool writes itself.
_POOL_WRITES = frozenset({"host", "content-length", "transfer-encoding"})


class PooledTransport(httpx.AsyncBaseTransport):
    """The project's upstream transport: one keep-alive pool (proxy/http1.py) for one upstream."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0, max_duration: float = 3600.0) -> None:
        """`read_timeout` bounds the wait for the response head and each gap between body bytes;
        `max_duration` bounds a whole response, head and body (see proxy.http1.Pool)."""
        self.pool = Pool(max_connections=max_connections, connect_timeout=connect_timeout,
                         read_timeout=read_timeout, max_duration=max_duration)

    def open(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Awaitable[Reply]:
        """Send the request; done once the response headers are in (the body is not read). The
        pool's own coroutine, handed back: no frame of this method's to create and resume."""
        return self.pool.request(method, url, headers, body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _POOL_WRITES]
        reply = await self.open(request.method, str(request.url), headers, await request.aread())
        return httpx.Response(reply.status_code, headers=reply.headers_raw, stream=ReplyStream(reply),
                              request=request)

    async def aclose(self) -> None:
        await self.pool.aclose()


def open_upstream(transport: httpx.AsyncBaseTransport, url: str, headers: list[tuple[str, str]],
                  body: bytes) -> Awaitable[UpstreamReply]:
    """POST to the upstream; the response headers are in when the awaitable is done. Errors are
    httpx's. (A plain function: on the pool it hands back the pool's own coroutine.)"""
    if isinstance(transport, PooledTransport):
        return transport.open("POST", url, headers, body)
    return _open_httpx(transport, url, headers, body)


async def _open_httpx(transport: httpx.AsyncBaseTransport, url: str, headers: list[tuple[str, str]],
                      body: bytes) -> UpstreamReply:
    response = await transport.handle_async_request(httpx.Request("POST", url, headers=headers, content=body))
    return HttpxReply(response)
