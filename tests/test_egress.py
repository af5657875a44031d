"""Egress proxies (docs/configuration.md `upstreams`), CAs and pool exhaustion, with real parts on loopback:
a TLS upstream whose certificate a throwaway CA signed (openssl), and a small forward proxy of the test's own
(CONNECT for https targets, absolute-form for http) that records what went through it."""
from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import ConfigError, parse_config
from proxy.ledger import ZERO
from proxy.upstream import EgressProxies, PooledTransport, ProxiedTransport
from tests.conftest import ALPHA_KEY, default_teams

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 3}}
BODY = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
HEAD_EVENTS = [("message_start", {"type": "message_start", "message": {**MESSAGE, "content": [], "usage": {
                    "input_tokens": 10, "output_tokens": 1}}}),
               ("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
               ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": "hi"}})]
TAIL_EVENTS = [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": 3}}),
               ("message_stop", {"type": "message_stop"})]


def sse(events) -> bytes:
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# --- a CA and a server certificate for localhost / 127.0.0.1 ------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def make_certs(d: Path) -> dict[str, Path]:
    """A CA (ca.pem) and a certificate it signed for localhost and 127.0.0.1, in `d`."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=budget-proxy test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                               "authorityKeyIdentifier=keyid,issuer\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


# --- the upstream: a minimal Messages API, over TLS or not ---------------------------------------

class Upstream:
    def __init__(self) -> None:
        self.requests = 0
        self.park = False               # the next request waits for `release`
        self.parked = asyncio.Event()   # a request is waiting
        self.release = asyncio.Event()
        self.base = ""

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        if self.park:
            self.park = False
            self.parked.set()
            await self.release.wait()
        if not body.get("stream"):
            return web.json_response(MESSAGE)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(HEAD_EVENTS))
        await self.release.wait()  # the rest only once the client has had the first events
        await resp.write(sse(TAIL_EVENTS))
        await resp.write_eof()
        return resp


async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None):
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture(params=["https"])
async def upstream(request, certs):
    up = Upstream()
    app = web.Application()
    app.router.add_post("/v1/messages", up.messages)
    ctx = None
    if request.param == "https":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs["cert"], certs["key"])
    runner, port = await _serve(app, ctx)
    up.base = f"{request.param}://localhost:{port}" if ctx else f"http://127.0.0.1:{port}"
    yield up
    up.release.set()
    await runner.cleanup()


# --- the egress proxy -----------------------------------------------------------------------------

class ForwardProxy:
    """CONNECT host:port -> a tunnel; an absolute-form request -> forwarded to its origin (the
    connection then piped both ways). `seen` holds each connection's first request line."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.server: asyncio.base_events.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.seen.append((method, target))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_r, up_w = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = httpx.URL(target)
                up_r, up_w = await asyncio.open_connection(parts.host, parts.port or 80)
                up_w.write(head)  # (aiohttp takes the absolute form as it is)
            await asyncio.gather(self.pipe(reader, up_w), self.pipe(up_r, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()

    @staticmethod
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()


@pytest.fixture
async def egress():
    p = ForwardProxy()
    await p.start()
    yield p
    p.server.close()  # type: ignore[union-attr]


# --- driving the app ------------------------------------------------------------------------------

def _config(base: str, **upstream):
    return parse_config({"upstreams": {"anthropic": {"base_url": base, "api_key": "sk-upstream-secret",
                                                     "timeout_seconds": 30, **upstream}},
                         "store": "memory://", "teams": default_teams()}, env={})


class Call:
    """One request to the app over raw ASGI: what it sent, as it sent it."""

    def __init__(self, app, body: dict) -> None:
        self.raw = json.dumps(body).encode()
        self.sent: list[dict] = []
        self.got = asyncio.Event()
        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "query_string": b"",
                 "headers": [(b"x-api-key", ALPHA_KEY.encode()), (b"content-type", b"application/json"),
                             (b"content-length", str(len(self.raw)).encode())]}
        self.task = asyncio.ensure_future(app(scope, self.receive, self.send))
        self._read = False

    async def receive(self):
        if not self._read:
            self._read = True
            return {"type": "http.request", "body": self.raw, "more_body": False}
        await asyncio.Event().wait()

    async def send(self, msg) -> None:
        self.sent.append(msg)
        self.got.set()

    async def done(self) -> tuple[int, bytes]:
        await asyncio.wait_for(self.task, 20)
        return self.status, self.body

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)


async def _post(app, body: dict | None = None) -> tuple[int, bytes]:
    return await Call(app, body or BODY).done()


async def _key_state(app):
    caller = app.state.runtime.keyring.lookup(ALPHA_KEY)
    key_state, *_ = await app.state.store.states(app.state.runtime.budgets.scopes_for(caller), app.state.clock())
    return key_state


async def _metered(app) -> None:
    rows = app.state.store.rows
    assert [r.outcome for r in rows] == ["completed"] and rows[0].output_tokens == 3
    assert (await _key_state(app)).held == ZERO


# --- CAs ------------------------------------------------------------------------------------------

async def test_an_https_upstream_is_trusted_through_its_ca_bundle_and_refused_without(upstream, certs):
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"])))
    try:
        assert isinstance(app.state.transport_for("anthropic"), PooledTransport)
        status, body = await _post(app)
        assert status == 200 and json.loads(body)["usage"]["output_tokens"] == 3
        await _metered(app)
    finally:
        await app.state.close_transports()
    app = create_app(_config(upstream.base))
    try:
        status, body = await _post(app)
        assert status == 502 and json.loads(body)["error"]["type"] == "api_error"
        assert (await _key_state(app)).held == ZERO
    finally:
        await app.state.close_transports()


async def test_ssl_cert_file_is_honoured(upstream, certs, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    app = create_app(_config(upstream.base))
    try:
        status, _ = await _post(app)
        assert status == 200
    finally:
        await app.state.close_transports()


# --- egress proxies -------------------------------------------------------------------------------

async def test_https_proxy_from_the_environment_tunnels_with_connect(upstream, certs, egress, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"])))
    try:
        assert isinstance(app.state.transport_for("anthropic"), ProxiedTransport)
        status, _ = await _post(app)
        assert status == 200
        await _metered(app)
        assert egress.seen == [("CONNECT", upstream.base.removeprefix("https://"))]
    finally:
        await app.state.close_transports()


async def test_a_stream_through_the_proxy_reaches_the_client_as_it_arrives(upstream, certs, egress, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"])))
    try:
        call = Call(app, {**BODY, "stream": True})
        # The upstream holds back the end of the stream until the client has had its first events.
        while b"content_block_delta" not in call.body:
            call.got.clear()
            await asyncio.wait_for(call.got.wait(), 20)
        assert not call.task.done()
        upstream.release.set()
        status, body = await call.done()
        assert status == 200 and body.endswith(sse(TAIL_EVENTS))
        await _metered(app)
        assert [m for m, _ in egress.seen] == ["CONNECT"]
    finally:
        await app.state.close_transports()


async def test_the_config_s_proxy_wins_over_the_environment(upstream, certs, egress, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "localhost")
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"]), proxy=egress.url))
    try:
        status, _ = await _post(app)
        assert status == 200
        assert [m for m, _ in egress.seen] == ["CONNECT"]
    finally:
        await app.state.close_transports()


async def test_no_proxy_exempts_the_upstream_host(upstream, certs, egress, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    monkeypatch.setenv("NO_PROXY", "example.com, localhost:" + upstream.base.rsplit(":", 1)[1])
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"])))
    try:
        assert isinstance(app.state.transport_for("anthropic"), PooledTransport)
        status, _ = await _post(app)
        assert status == 200 and egress.seen == []
    finally:
        await app.state.close_transports()


async def test_lowercase_wins_over_uppercase(upstream, certs, egress, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("https_proxy", egress.url)
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"])))
    try:
        status, _ = await _post(app)
        assert status == 200 and [m for m, _ in egress.seen] == ["CONNECT"]
    finally:
        await app.state.close_transports()


@pytest.mark.parametrize("upstream", ["http"], indirect=True)
async def test_an_http_upstream_goes_through_http_proxy_in_absolute_form(upstream, egress, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", egress.url)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # (for https upstreams only)
    app = create_app(_config(upstream.base))
    try:
        status, _ = await _post(app)
        assert status == 200
        await _metered(app)
        assert egress.seen == [("POST", upstream.base + "/v1/messages")]
    finally:
        await app.state.close_transports()


# --- pool exhaustion ------------------------------------------------------------------------------

@pytest.mark.parametrize("via_proxy", [False, True], ids=["pool", "proxied"])
async def test_an_exhausted_pool_answers_503_and_releases_the_hold(upstream, certs, egress, via_proxy):
    extra = {"proxy": egress.url} if via_proxy else {}
    app = create_app(_config(upstream.base, ca_bundle=str(certs["ca"]), max_connections=1,
                             pool_timeout_seconds=0.5, **extra))
    try:
        upstream.park = True
        first = Call(app, BODY)
        await asyncio.wait_for(upstream.parked.wait(), 20)  # the one connection is busy
        held = (await _key_state(app)).held
        assert held != ZERO
        status, body = await _post(app)
        assert status == 503
        err = json.loads(body)["error"]
        assert err["type"] == "api_error" and err["message"] == "upstream connection pool exhausted"
        assert (await _key_state(app)).held == held  # the second request's hold went back
        upstream.release.set()
        status, _ = await first.done()
        assert status == 200
        state = await _key_state(app)
        assert state.held == ZERO and state.used.output_tokens == 3
    finally:
        await app.state.close_transports()


# --- configuration and the NO_PROXY matcher ------------------------------------------------------

def test_upstream_egress_settings_are_validated(certs):
    assert _config("https://x").proxy.upstreams["anthropic"].pool_timeout_seconds == 10
    for bad in ({"pool_timeout_seconds": 0}, {"proxy": "https://p:3128"}, {"proxy": "socks5://p:1080"},
                {"proxy": "http://p:3128/path"}, {"ca_bundle": "/nonexistent/ca.pem"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            _config("https://x", **bad)
    up = _config("https://x", proxy="http://p:3128", ca_bundle=str(certs["ca"])).proxy.upstreams["anthropic"]
    assert up.proxy == "http://p:3128"


def test_environment_proxies_either_case_lowercase_wins():
    e = EgressProxies.from_env({"HTTPS_PROXY": "http://upper:1", "https_proxy": "lower:2", "HTTP_PROXY": "http://h:3"})
    assert (e.https, e.http) == ("http://lower:2", "http://h:3")
    assert e.proxy_for("https://api.anthropic.com") == "http://lower:2"
    assert e.proxy_for("http://api.anthropic.com") == "http://h:3"
    assert EgressProxies.from_env({"NO_PROXY": "*", "HTTPS_PROXY": "http://p:1"}).proxy_for("https://a") is None
    assert EgressProxies.from_env({}).proxy_for("https://a") is None


@pytest.mark.parametrize("no_proxy,url,exempt", [
    ("anthropic.com", "https://api.anthropic.com", True),
    ("anthropic.com", "https://anthropic.com", True),
    ("anthropic.com", "https://notanthropic.com", False),
    (".anthropic.com", "https://api.anthropic.com", True),
    (".anthropic.com", "https://anthropic.com", False),
    ("*.anthropic.com", "https://api.anthropic.com", True),
    ("API.Anthropic.com", "https://api.anthropic.com/v1", True),
    ("api.anthropic.com:443", "https://api.anthropic.com", True),
    ("api.anthropic.com:8443", "https://api.anthropic.com", False),
    ("10.0.0.0/8", "http://10.1.2.3:8080", True),
    ("10.0.0.0/8", "http://11.1.2.3", False),
    ("10.1.2.3", "http://10.1.2.3", True),
    ("::1", "http://[::1]:80", True),
    ("[::1]:80", "http://[::1]:80", True),
    ("fd00::/8", "http://[fd00::5]", True),
    ("https://a.example", "https://a.example", True),
    ("http://a.example", "https://a.example", False),
    ("example.com", "http://127.0.0.1:80", False),  # loopback is not exempt unless listed
    ("localhost", "http://127.0.0.1", False),
    ("localhost", "http://localhost:9", True),
])
def test_no_proxy_matching(no_proxy, url, exempt):
    assert EgressProxies(https="http://p:1", http="http://p:1", no_proxy=no_proxy).exempt(url) is exempt


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_pool_timeout_maps_to_503_on_metered_and_passthrough_routes(path):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("upstream connection pool exhausted")

    app = create_app(_config("https://upstream.invalid"), transport=httpx.MockTransport(refuse))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
        resp = await c.post(path, json=BODY, headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01"})
    assert resp.status_code == 503
    assert resp.json()["error"] == {"type": "api_error", "message": "upstream connection pool exhausted"}
    assert (await _key_state(app)).held == ZERO
