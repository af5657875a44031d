"""The upstream client: httpx's Request/Response types as the seam (respx and httpx.MockTransport
plug in there), aiohttp doing the socket work.

Measured here (MEASUREMENTS.md): httpx's stock transport relays at ~0.10x of a raw aiohttp
pass-through and `httpx.AsyncClient` on httpx-aiohttp at ~0.45x; most of the remainder is
AsyncClient's per-request machinery (request building, cookie extraction). So the relay calls
`transport.handle_async_request` directly — no AsyncClient, no cookie jar (a shared jar would
leak one tenant's upstream cookies to every other), no redirects. bench/transport.py measures it.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
import httpx


class AiohttpResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except asyncio.TimeoutError as exc:
            raise httpx.ReadTimeout("upstream read timed out") from exc
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError("upstream ended the body early") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError("upstream connection failed") from exc

    async def aclose(self) -> None:
        # close(), not release(): a body we stop reading early must not go back to the pool,
        # and closing the socket is what makes the provider stop generating.
        if not self._response.closed:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled aiohttp session for one upstream, created in the running loop on first use."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0) -> None:
        self._limits = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limits, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session_now()
        try:
            response = await session.request(
                request.method, str(request.url), headers=request.headers.multi_items(),
                data=request.content, allow_redirects=False, compress=None)
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError, asyncio.TimeoutError) as exc:
            raise httpx.ConnectTimeout("upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ConnectError("upstream unreachable") from exc
        return httpx.Response(
            response.status,
            headers=[(k.lower(), v) for k, v in response.raw_headers],
            stream=AiohttpResponseStream(response),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
