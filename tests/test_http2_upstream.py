"""HTTP/2 to the upstream (`upstreams.anthropic.http2: true`, proxy/http2.py) through the real proxy
(uvicorn on loopback), driven by the official anthropic SDK and raw httpx, against the h2 server
of tests/h2_upstream.py (h2c with prior knowledge; TLS with ALPN "h2" for https), which records
every stream as it arrived, every RST_STREAM the proxy sent, and how many streams it opened at once.

Every test also fails if the proxy broke an HTTP/2 rule on the way (the upstream's `violations`:
more streams than SETTINGS_MAX_CONCURRENT_STREAMS, overrun flow-control windows, a malformed frame).
No timing assertions: waits are bounded polls or barriers in the upstream.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest

from proxy.config import ConfigError, parse_config
from tests.conftest import ALPHA_KEY
from tests.h2_upstream import (
    ErrorCodes, H2Upstream, barrier, goaway, message_json, message_stream, never, respond, rst_after, sse,
)
from tests.harness import ProxyServer, ended_after, start_proxy

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
TEXT = "Hello from the hostile upstream."  # what the upstream's ordinary stream says
USAGE = (25, 7)  # and what it reports, streamed or not
TEAMS = {"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 10**8}}}}}
HEADERS = {"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
METERED = ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps")


@pytest.fixture(autouse=True)
def no_egress_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def make_up() -> Iterator[Callable[..., H2Upstream]]:
    """make_up(max_concurrent_streams=..., initial_window_size=...) -> a running h2 upstream; after
    the test, it must have seen no protocol violation."""
    yield from ended_after(lambda **kw: H2Upstream(**kw).start(), stopped_without_violations)


def stopped_without_violations(up: H2Upstream) -> None:
    up.stop()
    assert up.violations == [], f"the upstream saw the proxy break a rule: {up.violations} (notes: {up.notes})"


@pytest.fixture
def up(make_up) -> H2Upstream:
    return make_up()


def config(base_url: str, **upstream: Any):
    return parse_config({"upstreams": {"anthropic": {"base_url": base_url, "api_key": "sk-upstream-secret",
                                                     "timeout_seconds": 10, "http2": True, **upstream}},
                         "store": "memory://", "teams": TEAMS}, env={})


@pytest.fixture
def launch() -> Iterator[Callable[..., ProxyServer]]:
    """launch(up, **overrides of upstreams.anthropic) -> a running proxy speaking HTTP/2 to `up`."""
    yield from ended_after(lambda up, **kw: start_proxy(config(up.url, **kw)), ProxyServer.stop)


def sdk(proxy: ProxyServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=ALPHA_KEY, max_retries=0, timeout=20)


def body_of(content: str = "Say hello", **extra: Any) -> bytes:
    return json.dumps({"model": HAIKU, "max_tokens": 100, "messages": [{"role": "user", "content": content}],
                       **extra}).encode()


def post(proxy: ProxyServer, body: bytes, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    return httpx.post(proxy.url + path, content=body, headers={**HEADERS, **headers}, timeout=20)


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def key_scope(proxy: ProxyServer) -> dict:
    r = httpx.get(proxy.url + "/budget", headers={"x-api-key": ALPHA_KEY}, timeout=10)
    assert r.status_code == 200, r.text
    return next(s for s in r.json()["scopes"] if s["scope"] == "key")


def settled(proxy: ProxyServer, n: int) -> tuple[list, dict]:
    """The usage log once it holds `n` rows and nothing is held any more; and the key's `used`."""
    wait_until(lambda: len(proxy.state.store.rows) >= n, f"{n} usage-log rows")
    wait_until(lambda: all(v == 0 for v in key_scope(proxy)["held"].values()), "the holds to be released")
    return list(proxy.state.store.rows), key_scope(proxy)["used"]


def anthropic_error(resp: httpx.Response, status: int | None = None) -> dict:
    if status is not None:
        assert resp.status_code == status, resp.content[:500]
    parsed = resp.json()
    assert parsed["type"] == "error" and parsed["error"]["type"] == "api_error", parsed
    assert parsed["error"]["message"] and parsed["request_id"]
    return parsed


# --- relaying and metering --------------------------------------------------------------------------

def test_a_json_reply_is_relayed_byte_exact_and_metered(up, launch):
    proxy = launch(up)
    payload = json.dumps(message_json(HAIKU, 31, 9, "h2 says hi"), indent=1).encode()  # (odd spacing: bytes kept)
    up.queue(respond(200, payload, headers=[("request-id", "req_h2_1")]))
    r = post(proxy, body_of())
    assert r.status_code == 200 and r.content == payload
    assert r.headers["content-type"] == "application/json" and r.headers["request-id"] == "req_h2_1"
    assert int(r.headers["x-budget-remaining-tokens"]) > 0
    reply = sdk(proxy).messages.create(model=HAIKU, max_tokens=100, messages=MSG)  # the ordinary answer
    assert reply.content[0].text == "Hello." and (reply.usage.input_tokens, reply.usage.output_tokens) == USAGE
    rows, used = settled(proxy, 2)
    assert [(r.outcome, r.input_tokens, r.output_tokens, r.steps) for r in rows] == [
        ("completed", 31, 9, 1), ("completed", 25, 7, 1)]
    assert (used["input_tokens"], used["output_tokens"], used["steps"]) == (56, 16, 2)
    assert up.connections == 1  # (both requests on one connection)


def test_a_connection_idle_past_the_keepalive_is_not_used_again(up, launch, monkeypatch):
    monkeypatch.setattr("proxy.http2.KEEPALIVE_SECONDS", 0.0)  # (every idle connection is stale at once)
    proxy = launch(up)
    for _ in range(2):
        assert post(proxy, body_of()).status_code == 200
    assert up.connections == 2 and [s.conn for s in up.requests] == [1, 2]


def test_the_upstream_gets_an_http2_request_with_its_own_key(up, launch):
    proxy = launch(up)
    body = body_of()
    r = post(proxy, body, "/v1/messages?beta=true", **{"anthropic-beta": "x-2026", "connection": "keep-alive"})
    assert r.status_code == 200, r.content
    [seen] = up.requests
    pseudo = [(k, v) for k, v in seen.headers if k.startswith(":")]
    assert sorted(pseudo) == sorted([(":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{up.port}"),
                                     (":path", "/v1/messages?beta=true")])
    assert seen.headers[:4] == pseudo  # pseudo-headers first, each once
    assert all(k == k.lower() for k in seen.names)
    assert seen.header("x-api-key") == "sk-upstream-secret"
    assert ALPHA_KEY not in str(seen.headers) and seen.header("authorization") is None
    for name in ("host", "connection", "transfer-encoding", "keep-alive", "upgrade", "proxy-connection"):
        assert seen.header(name) is None, name
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("anthropic-version") == "2023-06-01" and seen.header("anthropic-beta") == "x-2026"
    assert seen.header("content-length") == str(len(body))  # (as proxy/http1.py sends it)
    assert seen.body == body


def test_a_stream_is_relayed_byte_exact_and_metered_from_its_message_delta(up, launch):
    proxy = launch(up)
    frames = message_stream(["one ", "two ", "three"], HAIKU, input_tokens=40, output_tokens=11)
    up.queue(sse(frames, event_delay=0.002), sse(frames))
    with sdk(proxy).messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "one two three" and final.usage.output_tokens == 11
    with httpx.stream("POST", proxy.url + "/v1/messages", content=body_of(stream=True), headers=HEADERS,
                      timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert int(r.headers["x-budget-remaining-tokens"]) > 0
        got = b"".join(r.iter_raw())
    assert got == b"".join(frames)
    rows, used = settled(proxy, 2)
    assert [(r.outcome, r.input_tokens, r.output_tokens, r.steps) for r in rows] == [("completed", 40, 11, 1)] * 2
    assert (used["input_tokens"], used["output_tokens"], used["steps"]) == (80, 22, 2)


def test_https_upstreams_speak_http2_by_alpn(make_up, launch, tmp_path):
    from tests.test_egress import make_certs

    certs = make_certs(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    up = make_up(ssl_context=ctx)
    proxy = launch(up, ca_bundle=str(certs["ca"]))
    with sdk(proxy).messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
        assert "".join(s.text_stream) == TEXT
    assert up.alpn == ["h2"]
    [seen] = up.requests
    assert (seen.header(":scheme"), seen.header(":authority")) == ("https", f"localhost:{up.port}")


# --- many streams, few connections ----------------------------------------------------------------------

async def test_fifty_streams_share_connections_within_the_servers_stream_limit(make_up, launch):
    """No stream is answered until all 50 are open at once: at 10 a connection, that takes 5."""
    up = make_up(max_concurrent_streams=10)
    proxy = launch(up, max_connections=10)
    gate = barrier(50)
    up.queue(*[gate] * 50)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALPHA_KEY, max_retries=0, timeout=20)

    async def one() -> str:
        async with client.messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
            return "".join([t async for t in s.text_stream])

    assert await asyncio.gather(*[one() for _ in range(50)]) == [TEXT] * 50
    await client.close()
    peaks = up.peak_open_streams
    assert 5 <= up.connections <= 10 and max(peaks.values()) <= 10, peaks
    rows, used = settled(proxy, 50)
    assert {r.outcome for r in rows} == {"completed"} and (used["output_tokens"], used["steps"]) == (50 * 7, 50)


async def test_on_one_connection_requests_wait_for_a_free_stream(make_up, launch):
    up = make_up(max_concurrent_streams=10)
    proxy = launch(up, max_connections=1, pool_timeout_seconds=10)
    gate = barrier(10)  # the first ten are answered only once all ten are open
    up.queue(*[gate] * 10)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALPHA_KEY, max_retries=0, timeout=20)
    replies = await asyncio.gather(*[client.messages.create(model=HAIKU, max_tokens=100, messages=MSG)
                                     for _ in range(30)])
    await client.close()
    assert [(m.usage.input_tokens, m.usage.output_tokens) for m in replies] == [USAGE] * 30
    assert up.connections == 1 and up.peak_open_streams == {1: 10} and len(up.requests) == 30
    rows, used = settled(proxy, 30)
    assert used["steps"] == 30


# --- what the upstream does wrong ------------------------------------------------------------------------

def test_a_reset_mid_stream_ends_with_an_error_event_and_charges_what_was_metered(up, launch):
    proxy = launch(up)
    frames = message_stream(["alpha ", "beta ", "gamma ", "delta"], HAIKU, input_tokens=25)
    up.queue(rst_after(frames, 4, ErrorCodes.INTERNAL_ERROR))  # message_start, the block, "alpha ", "beta "
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with sdk(proxy).messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
            for piece in s.text_stream:
                got.append(piece)
    assert err.value.type == "api_error" and err.value.body["error"]["details"]["error_code"] == "upstream_dropped"
    assert "".join(got) == "alpha beta "
    [row], used = settled(proxy, 1)
    assert row.outcome == "upstream_dropped" and row.steps == 1 and row.input_tokens == 25 and row.output_tokens > 0
    assert (used["input_tokens"], used["output_tokens"], used["steps"]) == (25, row.output_tokens, 1)


def test_a_stream_above_a_goaways_last_stream_id_is_sent_again_on_a_new_connection(up, launch):
    proxy = launch(up)
    up.queue(goaway())  # GOAWAY naming stream 0: this request was never processed
    r = post(proxy, body_of("again"))
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 7, r.content
    first, again = up.requests
    assert up.goaways == [(1, 0)] and (first.conn, again.conn) == (1, 2) and again.body == first.body
    [row], used = settled(proxy, 1)
    assert row.outcome == "completed" and used["steps"] == 1


def test_a_stream_at_or_below_a_goaways_last_stream_id_still_completes(up, launch):
    """A server shutting down gracefully: the first request's stream is under way
    when the second, on the same connection, gets GOAWAY naming the first as the last stream the
    server will process. The first must still be relayed whole from that connection; the second
    is sent again on another."""
    proxy = launch(up, max_connections=1)
    frames = message_stream(["one ", "two ", "three"], HAIKU)
    up.queue(sse(frames, hold_after=3, until="first"), goaway())
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, proxy, body_of("first", stream=True))
        assert up.wait_requests(1)
        second = pool.submit(post, proxy, body_of("second"))
        assert up.wait_for(lambda u: u.goaways), "the second request never reached the upstream"
        up.release("first")
        a_reply, b_reply = first.result(20), second.result(20)
    outcome = (a_reply.status_code, a_reply.content == b"".join(frames), b_reply.status_code)
    assert outcome == (200, True, 200), (a_reply.content[-200:], b_reply.content[-200:])
    assert b_reply.json()["usage"]["output_tokens"] == 7
    a, b, b_again = up.requests
    assert [(s.conn, s.json["messages"][0]["content"]) for s in (a, b, b_again)] == [
        (1, "first"), (1, "second"), (2, "second")]
    assert up.goaways == [(1, a.stream_id)] and b.stream_id > a.stream_id
    rows, used = settled(proxy, 2)
    assert [r.outcome for r in rows] == ["completed"] * 2 and used["steps"] == 2


def test_a_request_refused_by_goaway_twice_is_sent_only_twice(up, launch):
    proxy = launch(up)
    up.queue(goaway(), goaway())
    r = post(proxy, body_of())
    assert r.status_code >= 500
    anthropic_error(r)
    assert [s.conn for s in up.requests] == [1, 2]
    rows, used = settled(proxy, 1)
    assert all(used[d] == 0 for d in METERED)


def test_an_upstream_that_never_answers_is_a_504_and_its_stream_is_let_go(up, launch):
    proxy = launch(up, timeout_seconds=0.5)
    up.queue(never())
    r = post(proxy, body_of())
    anthropic_error(r, 504)
    [seen] = up.requests
    assert up.wait_let_go(seen), "the proxy neither reset the stream nor closed its connection"
    [row], used = settled(proxy, 1)
    assert row.outcome == "upstream_timeout" and all(used[d] == 0 for d in METERED)


def test_an_upstream_error_is_relayed_with_its_status_and_charges_nothing(up, launch):
    proxy = launch(up)
    payload = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}).encode()
    up.queue(respond(529, payload))
    r = post(proxy, body_of())
    assert r.status_code == 529 and r.content == payload
    [row], used = settled(proxy, 1)
    assert row.outcome.startswith("upstream_5") and row.steps == 0 and all(used[d] == 0 for d in METERED)


# --- what the client does ---------------------------------------------------------------------------------

def test_a_client_gone_mid_stream_resets_the_upstream_stream_with_cancel(up, launch):
    proxy = launch(up)
    frames = message_stream(["one ", "two ", "three ", "four"], HAIKU, input_tokens=25)
    up.queue(sse(frames, hold_after=4))  # message_start, the block, "one ", "two ", then nothing
    with sdk(proxy).messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
        it = iter(s.text_stream)
        assert next(it) + next(it) == "one two "
    # leaving the block hung up mid-stream
    assert up.wait_resets(1), f"no RST_STREAM reached the upstream (let go: {up.abandoned})"
    [seen] = up.requests
    assert [(r.stream_id, r.error_code) for r in up.resets] == [(seen.stream_id, ErrorCodes.CANCEL)]
    [row], used = settled(proxy, 1)
    assert row.outcome == "client_disconnected" and row.steps == 1 and row.input_tokens == 25
    assert row.output_tokens > 0 and (used["input_tokens"], used["output_tokens"]) == (25, row.output_tokens)


def test_a_body_larger_than_the_servers_flow_control_window_arrives_byte_exact(make_up, launch):
    up = make_up(initial_window_size=16384)
    proxy = launch(up)
    big = "".join(f"{i:06d} " for i in range(30000))  # 210 KB of content
    bodies = [body_of(big), body_of(big[::-1])]  # (the second on a connection whose settings are in force)
    for body in bodies:
        r = post(proxy, body)
        assert r.status_code == 200, r.content
    assert [s.body for s in up.requests] == bodies
    settled(proxy, 2)


# --- configuration ----------------------------------------------------------------------------------------

def test_http2_through_an_egress_proxy_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="http2"):
        config("http://127.0.0.1:1", proxy="http://127.0.0.1:1")
    assert config("https://api.example.com").proxy.upstreams["anthropic"].http2 is True
