"""The cost of an egress proxy: N sequential metered JSON calls through the app (raw ASGI, no
client socket) to a loopback upstream, four ways: direct on the project's pool; direct on httpx's
stock transport (what ProxiedTransport is, minus the proxy); through an HTTP_PROXY in absolute form
(the test's forward proxy, tests/test_egress.py); through a CONNECT tunnel to an https upstream vs
that https upstream direct.

    .venv/bin/python -m bench.egress [N]
"""
from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time

import httpx
from aiohttp import web

from proxy.app import create_app
from tests.test_egress import BODY, MESSAGE, Call, ForwardProxy, _config, _serve, make_certs


async def main(n: int) -> None:
    import tempfile
    from pathlib import Path

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(MESSAGE)

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    plain_runner, plain_port = await _serve(app, None)
    d = Path(tempfile.mkdtemp())
    certs = make_certs(d)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    tls_runner, tls_port = await _serve(app, ctx)
    egress = ForwardProxy()
    await egress.start()
    plain, tls = f"http://127.0.0.1:{plain_port}", f"https://localhost:{tls_port}"
    ca = str(certs["ca"])

    async def run(label: str, cfg, transport=None, env: dict[str, str] | None = None) -> None:
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            proxy_app = create_app(cfg, transport=transport)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            for _ in range(50):  # warm: connections open, caches filled
                assert (await Call(proxy_app, BODY).done())[0] == 200
            t0 = time.perf_counter()
            for _ in range(n):
                await Call(proxy_app, BODY).done()
            us = (time.perf_counter() - t0) / n * 1e6
            tunnels = len(egress.seen)
            egress.seen.clear()
            print(f"{label:<46} {us:8.0f} us/request {1e6 / us:8.0f} req/s "
                  f"({type(proxy_app.state.transport_for('anthropic')).__name__}; {tunnels} proxy connections)")
        finally:
            await proxy_app.state.close_transports()

    await run("http direct, project pool", _config(plain))
    await run("http direct, httpx AsyncHTTPTransport", _config(plain), transport=httpx.AsyncHTTPTransport())
    await run("http via HTTP_PROXY (absolute form)", _config(plain), env={"HTTP_PROXY": egress.url})
    await run("https direct, project pool", _config(tls, ca_bundle=ca))
    await run("https via HTTPS_PROXY (CONNECT tunnel)", _config(tls, ca_bundle=ca), env={"HTTPS_PROXY": egress.url})
    egress.server.close()  # type: ignore[union-attr]
    await plain_runner.cleanup()
    await tls_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
