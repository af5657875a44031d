"""The upstream client: httpx's Request/Response types as the seam (respx and httpx.MockTransport
plug in there), aiohttp doing the socket work.

Measured here (MEASUREMENTS.md, bench/RESULTS.md): httpx's stock transport relays at ~0.10x of a
raw aiohttp pass-through and `httpx.AsyncClient` on httpx-aiohttp at ~0.45x; most of the
remainder is AsyncClient's per-request machinery (request building, cookie extraction). So the
relay never uses an AsyncClient — no cookie jar (a shared jar would leak one tenant's upstream
cookies to every other), no redirects — and on the project's own transport it skips the httpx
types too: building an httpx.Request and Response costs ~50 us a call, about a tenth of what the
whole relay may spend. `open_upstream` is the one entry point: the fast path for
AiohttpTransport, `handle_async_request` (the httpx seam) for any other transport.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Iterator, Protocol

import aiohttp
import httpx
from yarl import URL


class UpstreamReply(Protocol):
    """What the relay reads of an upstream answer."""

    status_code: int
    headers_raw: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]
    content_type: str

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


@contextlib.contextmanager
def _body_errors_as_httpx() -> Iterator[None]:
    """aiohttp's errors while reading a body, as the httpx errors the relay handles."""
    try:
        yield
    except asyncio.TimeoutError as exc:
        raise httpx.ReadTimeout("upstream read timed out") from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.RemoteProtocolError("upstream ended the body early") from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError("upstream connection failed") from exc


class AiohttpReply:
    """An aiohttp response behind the UpstreamReply interface, its errors mapped to httpx's."""

    __slots__ = ("status_code", "headers_raw", "content_type", "_response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers_raw = response.raw_headers
        self.content_type = response.headers.get("Content-Type", "")

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        with _body_errors_as_httpx():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aread(self) -> bytes:
        with _body_errors_as_httpx():
            return await self._response.read()

    async def aclose(self) -> None:
        # close(), not release(): a body we stop reading early must not go back to the pool,
        # and closing the socket is what makes the provider stop generating. A body read to
        # its end has already released the connection to the pool.
        if not self._response.closed:
            self._response.close()


class HttpxReply:
    """An httpx.Response (from any httpx transport: respx, MockTransport) as an UpstreamReply."""

    __slots__ = ("status_code", "headers_raw", "content_type", "_response")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers_raw = response.headers.raw
        self.content_type = response.headers.get("content-type", "")

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aread(self) -> bytes:
        return await self._response.aread()

    async def aclose(self) -> None:
        await self._response.aclose()


class AiohttpResponseStream(httpx.AsyncByteStream):
    def __init__(self, reply: AiohttpReply) -> None:
        self._reply = reply

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._reply.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        await self._reply.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled aiohttp session for one upstream, created in the running loop on first use."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0) -> None:
        self._limits = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}  # the few upstream URLs, parsed once (yarl parses in ~10 us)

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limits, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self._session

    async def open(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> AiohttpReply:
        """Send the request; return once the response headers are in (the body is not read)."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= 64:  # bounded: the query string comes from the client
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        try:
            response = await self._session_now().request(method, parsed, headers=headers, data=body,
                                                         allow_redirects=False, compress=None)
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError, asyncio.TimeoutError) as exc:
            raise httpx.ConnectTimeout("upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ConnectError("upstream unreachable") from exc
        return AiohttpReply(response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        reply = await self.open(request.method, str(request.url), request.headers.multi_items(), request.content)
        return httpx.Response(
            reply.status_code,
            headers=[(k.lower(), v) for k, v in reply.headers_raw],
            stream=AiohttpResponseStream(reply),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def open_upstream(transport: httpx.AsyncBaseTransport, url: str, headers: list[tuple[str, str]],
                        body: bytes) -> UpstreamReply:
    """POST to the upstream; the response headers are in when this returns. Errors are httpx's."""
    if isinstance(transport, AiohttpTransport):
        return await transport.open("POST", url, headers, body)
    response = await transport.handle_async_request(httpx.Request("POST", url, headers=headers, content=body))
    return HttpxReply(response)
