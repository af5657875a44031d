"""The upstream client: the project's keep-alive pool (proxy/http1.py) behind httpx types, and the relay's
use of it through the httpx seam (respx)."""
from __future__ import annotations

import asyncio
import resource
import json
import socket
from typing import Awaitable, Callable

import httpx
import pytest
import respx
from aiohttp import web

from proxy.app import create_app
from proxy.http1 import OutOfDescriptors
from proxy.ledger import ZERO
from proxy.upstream import PooledTransport
from tests.conftest import ALPHA_KEY, default_teams
from tests.harness import make_config


@pytest.fixture
async def local_server():
    """An aiohttp server whose handlers the test defines; yields (add_route, base_url, runner)."""
    app = web.Application()
    routes: dict[str, object] = {}

    async def dispatch(request: web.Request):
        return await routes[request.path](request)  # type: ignore[operator]

    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield routes, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def streamed(write: Callable[[web.StreamResponse], Awaitable[None]], headers: dict[str, str] | None = None):
    """A local_server handler that starts a streamed response and lets `write` go on with it."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        await write(resp)
        return resp

    return handler


async def test_stream_chunks_arrive_as_written(local_server):
    routes, base = local_server
    gate = asyncio.Event()

    async def stream(resp):
        await resp.write(b"event: a\ndata: 1\n\n")
        await gate.wait()  # the second event is written only after the client saw the first
        await resp.write(b"event: b\ndata: 2\n\n")
        await resp.write_eof()

    routes["/s"] = streamed(stream, {"content-type": "text/event-stream"})
    t = PooledTransport()
    resp = await t.handle_async_request(httpx.Request("GET", base + "/s"))
    got = b""
    async for chunk in resp.aiter_raw():
        got += chunk
        if got == b"event: a\ndata: 1\n\n":
            gate.set()
    assert got == b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"
    await resp.aclose()
    await t.aclose()


async def test_refused_connection_is_connect_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = PooledTransport(connect_timeout=2)
    with pytest.raises(httpx.ConnectError):
        await t.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
    await t.aclose()


async def test_slow_headers_are_a_timeout(local_server):
    routes, base = local_server
    never = asyncio.Event()

    async def stall(request):
        await never.wait()
        return web.Response()

    routes["/stall"] = stall
    t = PooledTransport(read_timeout=0.2)
    with pytest.raises(httpx.TimeoutException):
        await t.handle_async_request(httpx.Request("GET", base + "/stall"))
    await t.aclose()


async def test_stalled_body_is_a_read_timeout(local_server):
    routes, base = local_server
    never = asyncio.Event()

    async def half(resp):
        await resp.write(b"part")
        await never.wait()

    routes["/half"] = streamed(half)
    t = PooledTransport(read_timeout=0.2)
    resp = await t.handle_async_request(httpx.Request("GET", base + "/half"))
    with pytest.raises(httpx.ReadTimeout):
        async for _ in resp.aiter_raw():
            pass
    await resp.aclose()
    await t.aclose()


async def test_no_cookie_jar_across_requests(local_server):
    routes, base = local_server
    seen: list[str | None] = []

    async def cookie(request):
        seen.append(request.headers.get("cookie"))
        return web.Response(text="ok", headers={"set-cookie": "tenant=alpha; Path=/"})

    routes["/c"] = cookie
    t = PooledTransport()
    for _ in range(2):
        resp = await t.handle_async_request(httpx.Request("GET", base + "/c"))
        await resp.aread()
        await resp.aclose()
    assert seen == [None, None]
    await t.aclose()


async def test_closing_early_closes_the_upstream_connection(local_server):
    routes, base = local_server
    closed = asyncio.Event()

    async def endless(resp):
        try:
            while True:
                await resp.write(b"x" * 1024)
                await asyncio.sleep(0)
        except (ConnectionError, asyncio.CancelledError):
            closed.set()
            raise

    routes["/e"] = streamed(endless)
    t = PooledTransport()
    resp = await t.handle_async_request(httpx.Request("GET", base + "/e"))
    async for _ in resp.aiter_raw():
        break
    await resp.aclose()
    await asyncio.wait_for(closed.wait(), 5)
    await t.aclose()


# --- the relay through the httpx seam, mocked with respx -------------------------------------

UPSTREAM = "http://upstream.invalid"


def _app(router: respx.MockRouter):
    loaded = make_config(UPSTREAM, default_teams())
    return create_app(loaded, transport=httpx.MockTransport(router.async_handler))


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 3}}
BODY = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


async def _post(app, headers: dict[str, str] | None = None, path: str = "/v1/messages"):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
        return await c.post(path, json=BODY, headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01",
                                                     **(headers or {})})


async def test_upstream_gets_upstream_key_and_clean_headers():
    with respx.MockRouter(assert_all_called=True) as router:
        route = router.post(UPSTREAM + "/v1/messages").mock(
            return_value=httpx.Response(200, json=MESSAGE, headers={"request-id": "req_up_1", "connection": "close"}))
        resp = await _post(_app(router), {"connection": "keep-alive", "keep-alive": "timeout=5",
                                          "accept-encoding": "gzip", "anthropic-beta": "x-2026"})
    assert resp.status_code == 200
    assert resp.headers["request-id"] == "req_up_1"
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == "sk-upstream-secret"
    assert ALPHA_KEY not in str(sent.headers)
    assert "authorization" not in sent.headers
    assert "keep-alive" not in sent.headers
    assert sent.headers["accept-encoding"] == "identity"
    assert sent.headers["anthropic-beta"] == "x-2026"
    assert json.loads(sent.content) == BODY


@pytest.mark.parametrize("exc,status", [(httpx.ConnectError("refused"), 502), (httpx.ConnectTimeout("slow"), 504),
                                        (httpx.ReadTimeout("slow"), 504), (httpx.PoolTimeout("busy"), 503),
                                        (OutOfDescriptors("the proxy is at its open-file limit; retry shortly"), 503)])
async def test_transport_errors_map_to_statuses(exc, status):
    with respx.MockRouter() as router:
        router.post(UPSTREAM + "/v1/messages").mock(side_effect=exc)
        app = _app(router)
        resp = await _post(app)
    assert resp.status_code == status
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "api_error"
    states = await app.state.store.states(app.state.runtime.budgets.scopes_for(
        app.state.runtime.keyring.lookup(ALPHA_KEY)), app.state.clock())
    assert all(s.held == ZERO and s.used == ZERO for s in states)  # nothing held, nothing charged
    if isinstance(exc, OutOfDescriptors):  # the proxy's own limit says so, not "upstream unreachable"
        assert resp.json()["error"]["message"] == "the proxy is at its open-file limit; retry shortly"


async def test_a_message_without_usage_is_charged_its_hold_not_nothing():
    """A 200 whose body says nothing of its usage must not slip through uncharged."""
    with respx.MockRouter() as router:
        router.post(UPSTREAM + "/v1/messages").mock(
            return_value=httpx.Response(200, json={k: v for k, v in MESSAGE.items() if k != "usage"}))
        app = _app(router)
        resp = await _post(app)
    assert resp.status_code == 200
    caller = app.state.runtime.keyring.lookup(ALPHA_KEY)
    key_state, _ = await app.state.store.states(app.state.runtime.budgets.scopes_for(caller), app.state.clock())
    # the hold: the input estimate plus max_tokens (50)
    assert key_state.used.output_tokens == 50 and key_state.used.input_tokens > 0 and key_state.used.steps == 1
    assert key_state.held == ZERO
    assert app.state.store.rows[-1].outcome == "usage_unknown"


async def test_a_stream_whose_task_is_cancelled_while_it_settles_is_settled_and_counted_once():
    """The relay settles without asyncio.shield: LedgerStore.settle takes effect when called, so a
    cancellation that lands while the store is still writing loses neither the charge nor its
    metrics and access-log line."""
    from proxy.store.memory import MemoryStore

    class SlowWriteStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.writing = asyncio.Event()

        async def settle(self, res, actual, row):
            await super().settle(res, actual, row)
            self.writing.set()
            await asyncio.Event().wait()  # a write that is still going when the task is cancelled

    events = [("message_start", {"type": "message_start", "message": {**MESSAGE, "content": [], "usage": {
                  "input_tokens": 10, "output_tokens": 1}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 0}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 3}}),
              ("message_stop", {"type": "message_stop"})]
    sse = b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)
    store = SlowWriteStore()

    async def chunks():
        yield sse

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())

    app = create_app(make_config(UPSTREAM, default_teams()), store=store, transport=httpx.MockTransport(upstream))
    body = json.dumps({**BODY, "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "query_string": b"",
             "headers": [(b"x-api-key", ALPHA_KEY.encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []
    received = False

    async def receive():
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(msg):
        sent.append(msg)

    task = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.wait_for(store.writing.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b"".join(m.get("body", b"") for m in sent) == sse  # the client had the whole stream
    assert [r.outcome for r in store.rows] == ["completed"] and store.rows[0].output_tokens == 3
    caller = app.state.runtime.keyring.lookup(ALPHA_KEY)
    key_state, _ = await store.states(app.state.runtime.budgets.scopes_for(caller), app.state.clock())
    assert key_state.used.output_tokens == 3 and key_state.held == ZERO
    requests = [line for line in app.state.metrics.exposition().decode().splitlines()
                if line.startswith("budget_proxy_requests_total{")]
    assert len(requests) == 1 and 'outcome="completed"' in requests[0] and requests[0].endswith(" 1.0")


async def test_a_stream_that_arrives_whole_goes_out_in_one_body_write_after_its_settlement(local_server):
    """On the project's pool the relay knows when the upstream body has ended: the last chunk and
    the end of the body go out as one ASGI message, right after the head (one socket write, see
    test_server.py), once the charge is settled."""
    routes, base = local_server
    events = [("message_start", {"type": "message_start", "message": {**MESSAGE, "content": [], "usage": {
                  "input_tokens": 10, "output_tokens": 1}}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 3}}),
              ("message_stop", {"type": "message_stop"})]
    sse = b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)

    async def whole(request):
        return web.Response(body=sse, content_type="text/event-stream")

    routes["/v1/messages"] = whole
    app = create_app(make_config(base, default_teams()))
    body = json.dumps({**BODY, "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "query_string": b"",
             "headers": [(b"x-api-key", ALPHA_KEY.encode()), (b"content-type", b"application/json")]}
    sent: list[tuple[str, bool, int]] = []  # (type, more_body, rows in the usage log when sent)
    chunks: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append((msg["type"], msg.get("more_body", False), len(app.state.store.rows)))
        chunks.append(msg.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        await app.state.close_transports()
    assert [(t, more) for t, more, _ in sent] == [("http.response.start", False), ("http.response.body", False)]
    assert sent[0][2] == sent[1][2] == 1  # settled (its usage row logged) before the head and the body left
    assert b"".join(chunks) == sse
    assert app.state.store.rows[0].outcome == "completed" and app.state.store.rows[0].output_tokens == 3


# --- hardening (docs/http-api.md "What the proxy refuses") through the pool and the app: a hostile upstream ---

def _hardened_config(base: str, **upstream):
    from proxy.config import parse_config

    return parse_config({"upstreams": {"anthropic": {"base_url": base, "api_key": "sk-upstream-secret", **upstream}},
                         "store": "memory://", "teams": default_teams()}, env={})


def test_max_duration_seconds_defaults_to_an_hour_and_must_be_positive():
    from proxy.config import ConfigError, UpstreamConfig

    assert UpstreamConfig().max_duration_seconds == 3600
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_duration_seconds"):
            _hardened_config("http://127.0.0.1:1", max_duration_seconds=bad)


async def test_the_config_s_deadlines_reach_the_pool():
    app = create_app(_hardened_config("http://127.0.0.1:1", timeout_seconds=7, max_duration_seconds=90))
    try:
        pool = app.state.transport_for("anthropic").pool
        assert (pool.read_timeout, pool.max_duration) == (7, 90)
    finally:
        await app.state.close_transports()
    assert PooledTransport().pool.max_duration == 3600


async def test_pooled_transport_bounds_a_dripped_body_by_its_maximum_duration(local_server):
    routes, base = local_server

    async def drip(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(200):  # a byte every 50 ms: 10 s if nothing stopped it
            await resp.write(b"x")
            await asyncio.sleep(0.05)
        return resp

    routes["/drip"] = drip
    t = PooledTransport(read_timeout=0.3, max_duration=0.5)
    resp = await t.handle_async_request(httpx.Request("GET", base + "/drip"))
    with pytest.raises(httpx.ReadTimeout, match="maximum duration"):
        async for _ in resp.aiter_raw():
            pass
    await resp.aclose()
    await t.aclose()


async def _through_the_app(handler, headers: dict[str, str] | None = None, **upstream):
    """POST /v1/messages through the app and its own pool to a raw loopback upstream."""
    from tests.test_http1 import RawServer

    async with RawServer(handler) as base:
        app = create_app(_hardened_config(base, **upstream))
        try:
            return await _post(app, headers)
        finally:
            await app.state.close_transports()


async def test_hop_by_hop_headers_and_cookies_are_dropped_both_ways():
    from tests.test_http1 import read_request

    seen: list[bytes] = []

    async def handler(reader, writer):
        head, _ = await read_request(reader)
        seen.append(head.lower())
        body = json.dumps(MESSAGE).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_up_1\r\n"
                     b"Set-Cookie: tenant=alpha; Path=/\r\nset-cookie2: old=1\r\n"
                     b"Connection: keep-alive, X-Upstream-Hop\r\nx-upstream-hop: internal\r\nx-upstream-kept: 1\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        await reader.read()

    resp = await _through_the_app(handler, {"connection": "x-client-hop, keep-alive", "x-client-hop": "secret",
                                            "x-client-kept": "1"})
    assert resp.status_code == 200 and resp.json()["id"] == "msg_1"
    assert resp.headers["request-id"] == "req_up_1" and resp.headers["x-upstream-kept"] == "1"
    for dropped in ("set-cookie", "set-cookie2", "x-upstream-hop"):
        assert dropped not in resp.headers
    [head] = seen
    assert b"\r\nx-client-kept: 1\r\n" in head
    assert b"x-client-hop" not in head and b": secret\r\n" not in head


async def test_an_upstream_head_over_64_kib_is_a_502():
    from tests.test_http1 import head_of, read_request

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(head_of(70 * 1024)[:-2] + b"content-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read()

    resp = await _through_the_app(handler)
    assert resp.status_code == 502
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "api_error"


async def test_an_upstream_dripping_its_head_past_the_maximum_duration_is_a_504():
    from tests.test_http1 import read_request

    async def handler(reader, writer):
        await read_request(reader)
        for i in range(200):  # a byte every 50 ms, never a whole head
            if reader.at_eof():  # (the proxy gave up on it)
                break
            writer.write(b"HTTP/1.1 200 OK\r\n"[i:i + 1] or b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    resp = await asyncio.wait_for(_through_the_app(handler, timeout_seconds=30, max_duration_seconds=0.5), 10)
    assert resp.status_code == 504
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "api_error"


@pytest.mark.parametrize("soft,warned", [(1024, True), (2 * 2000 + 64, False), (resource.RLIM_INFINITY, False)])
def test_startup_warns_when_the_open_file_limit_is_below_what_max_connections_can_use(monkeypatch, caplog,
                                                                                  soft, warned):
    """Two upstreams at 1,000 connections each want 2 x 2,000 + 64 descriptors."""
    from proxy import app as app_module

    config = make_config(UPSTREAM, default_teams(), upstreams={
        "anthropic": {"base_url": UPSTREAM, "api_key": "k"}, "openai": {"base_url": UPSTREAM, "api_key": "k"}}).proxy
    monkeypatch.setattr(app_module.resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    app_module.warn_if_few_descriptors(config)
    lines = [r.getMessage() for r in caplog.records if "open-file limit" in r.getMessage()]
    assert lines == ([f"the open-file limit (RLIMIT_NOFILE 1024) is below the 4064 that max_connections can use: "
                      f"past about 480 streams at once, new ones answer 503 (docs/configuration.md)"] if warned else [])
