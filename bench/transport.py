"""Reference pass-throughs, never part of the product: a raw ASGI app that forwards
POST /v1/messages to one upstream with no auth, budget or metering, through one of four
upstream clients. They bound what the proxy can reach, and they are the measurement
behind its choice of upstream client (proxy/upstream.py):

    aiohttp        one shared aiohttp.ClientSession, used directly (the pass-through to beat)
    transport      the project's proxy.upstream.PooledTransport, called as the relay calls it
                   (open_upstream: no httpx Request/Response on this transport)
    httpx-aiohttp  httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport())
    httpx          httpx.AsyncClient with its stock transport

    python -m bench.transport --client aiohttp --upstream http://127.0.0.1:18001 --port 18100

JSON replies are read whole and sent with a content-length; event streams are relayed
chunk by chunk as they arrive, as the proxy does."""
from __future__ import annotations

import argparse
from typing import Any, Awaitable, Callable

Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[str, str]]

DROP_UP = {b"host", b"content-length", b"connection", b"x-api-key", b"authorization", b"accept-encoding"}
DROP_DOWN = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
UPSTREAM_KEY = "bench-upstream-key"


def downstream(raw: Any) -> list[tuple[bytes, bytes]]:
    return [(lk, v) for k, v in raw if (lk := k.lower()) not in DROP_DOWN]


async def relay_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def relay_stream(send: Send, status: int, headers: list[tuple[bytes, bytes]], chunks: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class AiohttpClient:
    """One shared ClientSession, configured as the project's transport configures its own."""

    def __init__(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))

    async def relay(self, url: str, headers: Headers, body: bytes, send: Send) -> None:
        async with self.session.post(url, headers=headers, data=body, allow_redirects=False) as resp:
            out = downstream(resp.raw_headers)
            if resp.content_type == "text/event-stream":
                await relay_stream(send, resp.status, out, resp.content.iter_any())
            else:
                await relay_whole(send, resp.status, out, await resp.read())

    async def aclose(self) -> None:
        await self.session.close()


class HttpxTypesClient:
    """httpx Request/Response types; `send` is either a transport's handle_async_request
    (what the relay does) or an AsyncClient's send."""

    def __init__(self, name: str) -> None:
        import httpx

        self.httpx = httpx
        self.client: Any = None
        if name == "transport":
            from proxy.upstream import PooledTransport

            self.transport: Any = PooledTransport()
        elif name == "httpx-aiohttp":
            import httpx_aiohttp

            self.client = httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(), timeout=600)
        else:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
            self.client = httpx.AsyncClient(limits=limits, timeout=600)

    async def relay(self, url: str, headers: Headers, body: bytes, send: Send) -> None:
        if self.client is None:
            await self.relay_as_the_proxy(url, headers, body, send)
            return
        req = self.client.build_request("POST", url, headers=headers, content=body)
        resp = await self.client.send(req, stream=True)
        try:
            out = downstream(resp.headers.raw)
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                await relay_stream(send, resp.status_code, out, resp.aiter_raw())
            else:
                await relay_whole(send, resp.status_code, out, await resp.aread())
        finally:
            await resp.aclose()

    async def relay_as_the_proxy(self, url: str, headers: Headers, body: bytes, send: Send) -> None:
        """proxy.upstream.open_upstream, as the relay calls it (on PooledTransport it skips
        building httpx's Request and Response)."""
        from proxy.upstream import open_upstream

        reply = await open_upstream(self.transport, url, headers, body)
        try:
            out = downstream(reply.headers_raw)
            if reply.content_type.startswith("text/event-stream"):
                await relay_stream(send, reply.status_code, out, reply.aiter_raw())
            else:
                await relay_whole(send, reply.status_code, out, await reply.aread())
        finally:
            await reply.aclose()

    async def aclose(self) -> None:
        await (self.client or self.transport).aclose()


class PassThrough:
    """Raw ASGI: read the body, forward it with the upstream key, relay the answer."""

    def __init__(self, client_name: str, upstream: str) -> None:
        self.client_name = client_name
        self.upstream = upstream.rstrip("/")
        self.client: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        qs = scope.get("query_string", b"")
        url = self.upstream + scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in DROP_UP]
        headers.append(("x-api-key", UPSTREAM_KEY))
        await self.client.relay(url, headers, b"".join(chunks), send)

    async def lifespan(self, receive: Any, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.client = AiohttpClient() if self.client_name == "aiohttp" else HttpxTypesClient(self.client_name)
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


CLIENTS = ("aiohttp", "transport", "httpx-aiohttp", "httpx")


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", choices=CLIENTS, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    # The proxy's own server settings: uvloop + httptools (its loop="auto", http="auto"), no access log.
    uvicorn.run(PassThrough(args.client, args.upstream), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", lifespan="on", access_log=False, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
