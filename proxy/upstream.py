"""The upstream client: httpx's Request/Response types as the seam (respx and httpx.MockTransport
plug in there), the project's keep-alive pool (proxy/http1.py) doing the socket work.

httpx's stock transport, and even `httpx.AsyncClient` on httpx-aiohttp, relay far slower than a raw
pass-through (bench/RESULTS.md); most of the gap is AsyncClient's per-request machinery (request
building, cookie extraction). So the relay never uses an AsyncClient — no cookie jar (a shared jar
would leak one tenant's upstream cookies to every other), no redirects — and on the project's own
transport it skips the httpx types too: building an httpx.Request and Response is measurable on the
hot path. `open_upstream` is the one entry point: the fast path for PooledTransport,
`handle_async_request` (the httpx seam) for any other transport.

Egress proxies (docs/configuration.md `upstreams`): an upstream reached through `upstreams.*.proxy`
or HTTPS_PROXY / HTTP_PROXY goes through httpx's own transport (ProxiedTransport: httpcore does
CONNECT for https and absolute-form for http); the direct case keeps the project's pool. A proxied
call costs several times a pooled one (bench/egress.py), and nearly all of that is httpx itself,
not the extra hop. Only a proxied deployment pays it, and the pool stays free of proxy code.
"""
from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import AsyncIterator, Awaitable, Mapping, Protocol
from urllib.parse import urlsplit

import httpx

from proxy.errors import ProxyError
from proxy.http1 import OutOfDescriptors, Pool, Reply
from proxy.http2 import H2Pool


class PoolExhausted(ProxyError):
    """All of an upstream's max_connections stayed busy for its pool_timeout_seconds."""

    status = 503


def pool_failure(exc: httpx.PoolTimeout) -> tuple[str, PoolExhausted]:
    """The access-log outcome and the 503 of a request that got no upstream connection: every
    connection busy, or the proxy out of file descriptors (proxy/http1.py OutOfDescriptors)."""
    outcome = "out_of_descriptors" if isinstance(exc, OutOfDescriptors) else "upstream_pool_exhausted"
    return outcome, PoolExhausted(str(exc) or "upstream connection pool exhausted")


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Hostname-checked TLS for upstreams: the CAs in `ca_bundle`, else the system's (OpenSSL's
    default paths, which honour SSL_CERT_FILE and SSL_CERT_DIR)."""
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()


class EgressProxies:
    """HTTPS_PROXY, HTTP_PROXY and NO_PROXY, read once: either case, lowercase winning when both
    are set (as urllib and httpx do). NO_PROXY as curl and httpx read it: `*` exempts everything;
    an entry is a host name (that host and its subdomains; a leading `.` or `*.` means subdomains
    only, as httpx), an IP address or a CIDR network, optionally with `:PORT`, or a URL prefix
    `scheme://host[:port]`. Loopback is not exempt unless listed."""

    def __init__(self, https: str | None = None, http: str | None = None, no_proxy: str = "") -> None:
        self.https = _proxy_url(https)
        self.http = _proxy_url(http)
        self.no_proxy = [e.strip().lower() for e in no_proxy.split(",") if e.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EgressProxies:
        def get(name: str) -> str:
            return env.get(name.lower()) or env.get(name.upper()) or ""
        return cls(get("https_proxy"), get("http_proxy"), get("no_proxy"))

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL to reach `url` through, or None for a direct connection."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http if parts.scheme == "http" else None
        if proxy is None or self.exempt(url):
            return None
        return proxy

    def exempt(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return any(_no_proxy_matches(e, parts.scheme, host, port) for e in self.no_proxy)


def _proxy_url(value: str | None) -> str | None:
    if not value:
        return None
    return value if "://" in value else f"http://{value}"


def _no_proxy_matches(entry: str, scheme: str, host: str, port: int) -> bool:
    if entry == "*":
        return True
    if "://" in entry:
        e = urlsplit(entry)
        if e.scheme not in ("all", scheme):
            return False
        entry = e.netloc
    want_port: int | None = None
    if entry.startswith("["):  # [v6]:port
        inside, _, rest = entry[1:].partition("]")
        entry = inside
        if rest.startswith(":") and rest[1:].isdigit():
            want_port = int(rest[1:])
    elif entry.count(":") == 1:  # host:port (more than one colon: a bare IPv6 address)
        name, _, p = entry.partition(":")
        if p.isdigit():
            entry, want_port = name, int(p)
    if want_port is not None and want_port != port:
        return False
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        net = None
    if net is not None:
        try:
            return ipaddress.ip_address(host.strip("[]")) in net
        except ValueError:
            return False
    if entry.startswith("*."):
        return host.endswith(entry[1:])
    if entry.startswith("."):
        return host.endswith(entry)
    return host == entry or host.endswith("." + entry)


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

    pool_class: type[Pool] | type[H2Pool] = Pool

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0, max_duration: float = 3600.0, pool_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """`read_timeout` bounds the wait for the response head and each gap between body bytes;
        `max_duration` bounds a whole response, head and body; `pool_timeout` the wait for a
        connection when all are busy (see proxy.http1.Pool)."""
        self.pool = self.pool_class(max_connections=max_connections, connect_timeout=connect_timeout,
                                    read_timeout=read_timeout, max_duration=max_duration,
                                    pool_timeout=pool_timeout, ssl_context=ssl_context)

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


class H2Transport(PooledTransport):
    """PooledTransport speaking HTTP/2 (`upstreams.*.http2: true`): the same interface and errors,
    streams multiplexed on few connections (proxy/http2.py)."""

    pool_class = H2Pool


class _DeadlineStream(httpx.AsyncByteStream):
    """A response body that fails with ReadTimeout once the whole response has taken `deadline`."""

    def __init__(self, stream: httpx.AsyncByteStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        # Checked as chunks arrive (the read timeout bounds each gap): a timeout scope held across
        # the yields would cancel the relay wherever it happened to be.
        async for chunk in self._stream:
            if loop.time() >= self._deadline:
                raise httpx.ReadTimeout("upstream response exceeded its maximum duration")
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class ProxiedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport through an egress proxy (CONNECT for https, absolute-form for http),
    with the upstream's timeouts on every request (a bare transport has none of its own) and no
    cookie jar (a transport has none; only AsyncClient does)."""

    def __init__(self, proxy: str, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0, max_duration: float = 3600.0, pool_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(proxy=proxy, verify=ssl_context or tls_context(), retries=0,
                         limits=httpx.Limits(max_connections=max_connections,
                                             max_keepalive_connections=max_connections, keepalive_expiry=15.0))
        self.proxy_url = proxy
        self.max_duration = max_duration
        self._timeout = {"connect": connect_timeout, "read": read_timeout, "write": read_timeout,
                         "pool": pool_timeout}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["timeout"] = self._timeout
        deadline = asyncio.get_running_loop().time() + self.max_duration
        try:
            async with asyncio.timeout_at(deadline):
                response = await super().handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout("upstream response exceeded its maximum duration") from None
        response.stream = _DeadlineStream(response.stream, deadline)  # type: ignore[arg-type]
        return response


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
