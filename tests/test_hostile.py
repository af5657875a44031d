"""Hardening (docs/http-api.md "What the proxy refuses"), attack by attack, through the real proxy
(uvicorn on loopback) against the hostile upstream of tests/hostile_upstream.py, whose every byte
the test scripts and which records every request that reaches it. Each test asserts what the proxy
answers AND what reached (or did not reach) the upstream. Paths and odd headers go out on
http.client or a raw socket, so that no client library normalises them; ordinary calls use the
official anthropic SDK.

No timing assertions: what happens is polled with bounded waits (`wait_until`); the only clock
bounds are these (a client gone before the headers: its hold released within a
second; a dripped head: the request over within max_duration_seconds, give or take scheduling).
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import time
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest

from proxy import pricing
from proxy.config import parse_config
from proxy.estimate import estimate_input_tokens
from proxy.usage import Usage
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY, default_teams
from tests.harness import ProxyServer, start_proxy
from tests.hostile_upstream import (
    ORDINARY_USAGE, HostileUpstream, close_mid_body, drip_head, frame, hold, huge_head, json_answer, message_json,
    message_stream, sse, text_delta,
)

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
VERSION = ("anthropic-version", "2023-06-01")
JSON = ("content-type", "application/json")
METERED = ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps")


# --- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def up() -> Iterator[HostileUpstream]:
    u = HostileUpstream().start()
    try:
        yield u
    finally:
        u.stop()


def hostile_config(upstream_url: str, teams: dict | None = None, upstream: dict | None = None, **top: Any):
    anthropic_up = {"base_url": upstream_url, "api_key": "sk-upstream-secret", "timeout_seconds": 10}
    anthropic_up.update(upstream or {})
    data: dict[str, Any] = {"upstreams": {"anthropic": anthropic_up}, "store": "memory://",
                            "teams": teams or default_teams()}
    data.update(top)
    return parse_config(data, env={})


@pytest.fixture
def launch(up: HostileUpstream) -> Iterator[Callable[..., ProxyServer]]:
    """launch(teams=None, upstream={...overrides of upstreams.anthropic}, **top) -> a running proxy
    in front of the hostile upstream."""
    servers: list[ProxyServer] = []

    def _launch(teams: dict | None = None, upstream: dict | None = None, **top: Any) -> ProxyServer:
        server = start_proxy(hostile_config(up.url, teams, upstream, **top))
        servers.append(server)
        return server

    yield _launch
    for s in servers:
        s.stop()


def sdk(proxy: ProxyServer, key: str = ALPHA_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, timeout=20)


def raw_request(proxy: ProxyServer, method: str, target: str, headers: list[tuple[str, str]] = (),
                body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    """One request on http.client, the target and headers exactly as given (plus Host and, with a
    body, Content-Length): (status, {lower-cased name: [values]}, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        out: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            out.setdefault(k.lower(), []).append(v)
        return resp.status, out, resp.read()
    finally:
        conn.close()


def message_body(model: str = HAIKU, max_tokens: int = 20, **extra: Any) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "messages": MSG, **extra}).encode()


def post(proxy: ProxyServer, body: bytes, key: str = ALPHA_KEY, path: str = "/v1/messages",
         extra: list[tuple[str, str]] = ()) -> tuple[int, dict[str, list[str]], bytes]:
    return raw_request(proxy, "POST", path, [("x-api-key", key), VERSION, JSON, *extra], body)


def anthropic_error(status_got: int, body: bytes, status: int, etype: str) -> dict:
    """Assert an error in Anthropic's shape; return its body."""
    assert status_got == status, body[:500]
    parsed = json.loads(body)
    assert parsed["type"] == "error" and parsed["error"]["type"] == etype, parsed
    assert parsed["error"]["message"] and parsed["request_id"]
    return parsed


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """A bounded wait for a condition; never a timing assertion of its own."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def budget(proxy: ProxyServer, key: str = ALPHA_KEY) -> dict:
    r = httpx.get(proxy.url + "/budget", headers={"x-api-key": key}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def key_scope(proxy: ProxyServer, key: str = ALPHA_KEY) -> dict:
    return next(s for s in budget(proxy, key)["scopes"] if s["scope"] == "key")


def nothing_held(proxy: ProxyServer, key: str = ALPHA_KEY) -> bool:
    return all(v == 0 for s in budget(proxy, key)["scopes"] for v in s["held"].values())


def nothing_used(proxy: ProxyServer, key: str = ALPHA_KEY) -> bool:
    return all(s["used"][d] == 0 for s in budget(proxy, key)["scopes"] for d in METERED)


def metrics_text(proxy: ProxyServer, headers: dict | None = None) -> str:
    r = httpx.get(proxy.url + "/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    return r.text


# --- 1. /v1/models/{id}: one raw segment of [A-Za-z0-9._:@-]{1,128}, else 404 and nothing forwarded

BAD_MODEL_TARGETS = {
    "encoded slashes": "/v1/models/..%2Ffiles%2Ffile_abc%2Fcontent",
    "encoded dots and slashes": "/v1/models/%2e%2e%2Ffiles%2Ffile_abc%2Fcontent",
    "encoded dot-dot": "/v1/models/%2e%2e",
    "upper-case encoded dot-dot, raw slashes": "/v1/models/%2E%2E/files/file_abc/content",
    "raw dot-dot": "/v1/models/..",
    "raw dot": "/v1/models/.",
    "raw dot segments": "/v1/models/../files/file_abc/content",
    "backslashes": "/v1/models/..\\files\\file_abc\\content",
    "one backslash": "/v1/models/claude-haiku\\4-5",
    "129 characters": "/v1/models/" + "a" * 129,
    "percent-encoded letter": "/v1/models/%63laude-haiku-4-5",
    "percent-encoded hyphen": "/v1/models/claude%2Dhaiku-4-5",
    "id then encoded traversal": "/v1/models/claude-haiku-4-5%2F..%2F..%2Ffiles",
    "a second segment": "/v1/models/claude-haiku-4-5/files",
    "a trailing slash": "/v1/models/claude-haiku-4-5/",
    "an empty segment": "/v1/models//files",
    "a semicolon": "/v1/models/claude-haiku-4-5;v=1",
    "non-ASCII (UTF-8, encoded)": "/v1/models/claude-%C3%A9",
}


@pytest.mark.parametrize("target", list(BAD_MODEL_TARGETS.values()), ids=list(BAD_MODEL_TARGETS))
def test_a_model_id_that_is_not_one_plain_segment_is_a_404_and_nothing_reaches_the_upstream(launch, up, target):
    proxy = launch()
    status, headers, body = raw_request(proxy, "GET", target, [("x-api-key", ALPHA_KEY), VERSION])
    anthropic_error(status, body, 404, "not_found_error")
    assert up.requests == []


@pytest.mark.parametrize("model_id", [HAIKU, "a" * 128, "claude-haiku-4-5@20251001", "ft:claude.x_y-Z9"])
def test_a_plain_model_id_reaches_the_upstream_exactly_as_sent(launch, up, model_id):
    proxy = launch()
    status, _, body = raw_request(proxy, "GET", f"/v1/models/{model_id}", [("x-api-key", ALPHA_KEY), VERSION])
    assert status == 200, body
    assert json.loads(body)["id"] == model_id
    [seen] = up.requests
    assert seen.request_line == f"GET /v1/models/{model_id} HTTP/1.1".encode()
    assert seen.header("x-api-key") == "sk-upstream-secret"


# --- 2. client strings are validated: 400, nothing forwarded, and no harm to anyone else ----------

def _body_with(model_json: bytes, content_json: bytes = b'"hi"') -> bytes:
    return (b'{"model": ' + model_json + b', "max_tokens": 10, "messages": [{"role": "user", "content": '
            + content_json + b'}]}')


HOSTILE_BODIES = {
    "lone low surrogate in the model": _body_with(b'"claude-haiku-4-5\\udfff"'),
    "lone high surrogate in the content": _body_with(b'"claude-haiku-4-5"', b'"hi \\ud800 there"'),
    "lone surrogate in a key": _body_with(b'"claude-haiku-4-5"', b'[{"type": "text", "text": "x", "\\udc00": 1}]'),
    "reversed surrogate pair": _body_with(b'"claude-haiku-4-5\\udc00\\ud800"'),
    "invalid UTF-8 in the model": _body_with(b'"claude-haiku-4-5\xff"'),
    "invalid UTF-8 in the content": _body_with(b'"claude-haiku-4-5"', b'"caf\xc3\x28"'),
    "a surrogate as raw UTF-8 bytes": _body_with(b'"claude-haiku-4-5\xed\xbf\xbf"'),
    "overlong UTF-8": _body_with(b'"claude-haiku-4-5\xc0\xaf"'),
    "a model of 257 characters": _body_with(json.dumps("c" * 257).encode()),
    "a model holding NUL": _body_with(b'"claude-haiku-4-5\\u0000"'),
    "a model holding DEL": _body_with(b'"claude-haiku-4-5\\u007f"'),
    "a model holding NEL (C1)": _body_with(b'"claude-haiku-4-5\\u0085"'),
    "a model holding a raw DEL byte": _body_with(b'"claude-haiku-4-5\x7f"'),
    "a model holding a raw C1 character": _body_with(b'"claude-haiku-4-5\xc2\x85"'),
    "a model holding a newline": _body_with(b'"claude-haiku-4-5\\n"'),
    "model twice": (b'{"model": "claude-haiku-4-5", "max_tokens": 10, "model": "claude-opus-4-1", '
                    b'"messages": [{"role": "user", "content": "hi"}]}'),
    "model twice, once escaped": (b'{"model": "claude-haiku-4-5", "max_tokens": 10, "mod\\u0065l": "claude-opus-4-1",'
                                  b' "messages": [{"role": "user", "content": "hi"}]}'),
}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_a_hostile_body_is_a_400_and_nothing_is_forwarded(launch, up, body, path):
    proxy = launch()
    status, _, payload = post(proxy, body, path=path)
    anthropic_error(status, payload, 400, "invalid_request_error")
    assert up.requests == []
    assert nothing_held(proxy) and nothing_used(proxy)


def test_a_model_of_256_plain_characters_is_forwarded(launch, up):
    proxy = launch()
    model = "c" * 256
    status, _, payload = post(proxy, message_body(model))
    assert status == 200, payload
    [seen] = up.requests
    assert seen.json["model"] == model


def test_hostile_bodies_never_cost_another_key_its_charges_even_across_a_restart(launch, up, tmp_path):
    """40 ordinary calls of beta, each after a hostile body of alpha's: all 40 are counted, on a
    SQLite ledger they survive a restart, and /metrics keeps answering."""
    store = f"sqlite:///{tmp_path}/l.db"
    proxy = launch(store=store)
    hostile = list(HOSTILE_BODIES.values())
    beta = sdk(proxy, BETA_KEY)
    for i in range(40):
        status, _, payload = post(proxy, hostile[i % len(hostile)])
        anthropic_error(status, payload, 400, "invalid_request_error")
        msg = beta.messages.create(model=HAIKU, max_tokens=20, messages=MSG)
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == ORDINARY_USAGE
    assert len(up.requests) == 40 and all(s.json["model"] == HAIKU for s in up.requests)
    assert "budget_proxy_requests_total" in metrics_text(proxy)

    inp, out = ORDINARY_USAGE
    price = proxy.state.runtime.pricing.lookup(HAIKU)
    cost = 40 * pricing.cost_nanos(price, Usage(input_tokens=inp, output_tokens=out)) / 1e9
    expected = {"tokens": 40 * (inp + out), "input_tokens": 40 * inp, "output_tokens": 40 * out, "steps": 40}

    def check(p: ProxyServer) -> None:
        for scope in budget(p, BETA_KEY)["scopes"]:  # key beta and team research (alpha added nothing)
            used = scope["used"]
            assert {d: used[d] for d in expected} == expected, scope
            assert used["cost_usd"] == pytest.approx(cost, rel=1e-9)
            assert all(v == 0 for v in scope["held"].values())
        assert all(v == 0 for d, v in key_scope(p, ALPHA_KEY)["used"].items() if d in METERED)

    check(proxy)
    proxy.stop()
    again = launch(store=store)
    check(again)
    assert metrics_text(again)


# --- 3. metric labels never grow with what clients send -----------------------------------------

def model_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if "model=" in line and not line.startswith("#")]


def test_unknown_model_names_do_not_add_metric_series(launch, up):
    proxy = launch(admission={"unpriced_models": "allow"})
    alpha, gamma = sdk(proxy), sdk(proxy, GAMMA_KEY)
    # Every kind of series once: a priced model, an unpriced one, and a refusal (gamma's allow-list).
    alpha.messages.create(model=HAIKU, max_tokens=20, messages=MSG)
    alpha.messages.create(model="zz-first-unknown", max_tokens=20, messages=MSG)
    with pytest.raises(anthropic.PermissionDeniedError):
        gamma.messages.create(model="zz-first-refused", max_tokens=20, messages=MSG)
    before = model_series(metrics_text(proxy))
    assert any('model="other"' in line for line in before)

    for i in range(100):
        alpha.messages.create(model=f"zz-unknown-{i}-\u00e9\u2028", max_tokens=20, messages=MSG)
        with pytest.raises(anthropic.PermissionDeniedError):
            gamma.messages.create(model=f"zz-refused-{i}", max_tokens=20, messages=MSG)
    after = metrics_text(proxy)
    assert len(model_series(after)) == len(before)
    assert "zz-" not in after
    labels = {line.split('model="', 1)[1].split('"', 1)[0] for line in model_series(after)}
    assert labels <= set(proxy.state.runtime.pricing) | {"other"}, labels
    assert len(up.requests) == 102


# --- 4. headers, the head size cap, deadlines, a client that leaves early -------------------------

HOP_HEADERS = [("Set-Cookie", "session=s3cr3t; Path=/; HttpOnly"), ("set-cookie", "tenant=other"),
               ("Connection", "x-secret-hop"), ("connection", "X-Other-Hop, keep-alive"),
               ("x-secret-hop", "1"), ("X-Other-Hop", "2"), ("x-end-to-end", "kept"),
               ("request-id", "req_hostile_1")]


def _hop_answer(route: str):
    if route == "messages (stream)":
        return sse(message_stream(["a ", "b"]), headers=HOP_HEADERS)
    if route == "messages (JSON)":
        return json_answer(message_json(HAIKU), headers=HOP_HEADERS)
    if route == "count_tokens":
        return json_answer({"input_tokens": 7}, headers=HOP_HEADERS)
    return json_answer({"type": "model", "id": HAIKU}, headers=HOP_HEADERS)


def _call(proxy: ProxyServer, route: str, extra: list[tuple[str, str]] = ()):
    if route == "messages (stream)":
        return post(proxy, message_body(stream=True), extra=extra)
    if route == "messages (JSON)":
        return post(proxy, message_body(), extra=extra)
    if route == "count_tokens":
        return post(proxy, message_body(), path="/v1/messages/count_tokens", extra=extra)
    return raw_request(proxy, "GET", f"/v1/models/{HAIKU}", [("x-api-key", ALPHA_KEY), VERSION, *extra])


ROUTES = ["messages (JSON)", "messages (stream)", "count_tokens", "model detail"]


@pytest.mark.parametrize("route", ROUTES)
def test_upstream_cookies_and_headers_its_connection_header_names_never_reach_the_client(launch, up, route):
    proxy = launch()
    up.queue(_hop_answer(route))
    status, headers, body = _call(proxy, route)
    assert status == 200, body
    assert "set-cookie" not in headers and "set-cookie2" not in headers
    assert "x-secret-hop" not in headers and "x-other-hop" not in headers
    assert not any("hop" in v.lower() for v in headers.get("connection", []))
    assert headers["x-end-to-end"] == ["kept"] and headers["request-id"] == ["req_hostile_1"]
    assert len(up.requests) == 1


@pytest.mark.parametrize("route", ROUTES)
def test_request_headers_the_clients_connection_header_names_are_not_forwarded(launch, up, route):
    proxy = launch()
    status, _, body = _call(proxy, route, [("Connection", "x-client-hop"), ("x-client-hop", "secret"),
                                           ("connection", "X-Client-Hop-2"), ("X-Client-Hop-2", "secret2"),
                                           ("x-client-e2e", "kept")])
    assert status == 200, body
    [seen] = up.requests
    assert seen.header("x-client-hop") is None and seen.header("x-client-hop-2") is None
    assert "hop" not in (seen.header("connection") or "").lower()
    assert seen.header("x-client-e2e") == "kept"
    assert seen.header("x-api-key") == "sk-upstream-secret"


@pytest.mark.parametrize("route", ROUTES)
def test_an_upstream_response_head_over_64_kib_is_a_502(launch, up, route):
    proxy = launch()
    up.queue(huge_head(70 * 1024))
    status, _, body = _call(proxy, route)
    anthropic_error(status, body, 502, "api_error")
    assert len(up.requests) == 1
    wait_until(lambda: nothing_held(proxy), "the hold to be released")
    assert nothing_used(proxy)
    # Just under the cap is fine, and the proxy keeps serving.
    up.queue(huge_head(60 * 1024))
    status, _, body = raw_request(proxy, "GET", f"/v1/models/{HAIKU}", [("x-api-key", ALPHA_KEY), VERSION])
    assert status == 200 and body == b"{}", body
    assert sdk(proxy).messages.create(model=HAIKU, max_tokens=20, messages=MSG).content


@pytest.mark.parametrize("route", ROUTES)
def test_an_upstream_that_drips_its_head_forever_is_cut_off_at_the_maximum_duration(launch, up, route):
    """timeout_seconds 1 never fires (a byte comes every 0.1 s); max_duration_seconds 2 must. The
    client waits at most 2 + 8 s (its socket timeout); the upstream would drip for 30 s."""
    proxy = launch(upstream={"timeout_seconds": 1, "max_duration_seconds": 2})
    up.queue(drip_head(interval=0.1, bound=30))
    started = time.monotonic()
    status, _, body = _call(proxy, route)
    elapsed = time.monotonic() - started
    assert status in (502, 504), body
    anthropic_error(status, body, status, "api_error")
    assert elapsed < 2 + 8
    assert up.wait_closed_early(1), "the proxy did not close the dripping connection"
    wait_until(lambda: nothing_held(proxy), "the hold to be released")
    assert nothing_used(proxy)


def test_a_stream_that_drips_forever_ends_at_the_maximum_duration_and_is_charged_for_what_it_relayed(launch, up):
    """A text delta every 0.1 s (never a gap of timeout_seconds 1) for what would be 30 s: the
    response as a whole is bounded by max_duration_seconds 2; the client's body still ends cleanly."""
    proxy = launch(upstream={"timeout_seconds": 1, "max_duration_seconds": 2})
    frames = message_stream([f"tick {i:03d} " for i in range(300)])
    up.queue(sse(frames, event_delay=0.1))
    started = time.monotonic()
    received = []
    try:
        for ev in sdk(proxy).messages.create(model=HAIKU, max_tokens=4000, messages=MSG, stream=True):
            if ev.type == "content_block_delta":
                received.append(ev.delta.text)
    except anthropic.APIStatusError as exc:  # a closing `event: error` is fine; a torn body is not
        assert exc.status_code == 200 and exc.type == "api_error", exc
    assert time.monotonic() - started < 2 + 8  # (the SDK's own timeout is 20 s; the upstream's 30 s)
    assert 0 < len(received) < 300
    assert up.wait_closed_early(1), "the proxy did not close the dripping stream"
    wait_until(lambda: nothing_held(proxy), "the stream to settle")
    used = key_scope(proxy)["used"]
    assert used["steps"] == 1 and used["output_tokens"] >= len("".join(received)) // 4 > 0


def test_an_upstream_that_ends_the_body_early_charges_nothing_and_releases_the_hold(launch, up):
    proxy = launch()
    up.queue(close_mid_body())
    status, _, body = post(proxy, message_body())
    assert status in (502, 504), body
    anthropic_error(status, body, status, "api_error")
    wait_until(lambda: nothing_held(proxy), "the hold to be released")
    assert nothing_used(proxy)


def test_a_client_gone_before_the_headers_cancels_the_upstream_request_and_releases_its_hold(launch, up):
    proxy = launch(teams={"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 100000}}}}})
    up.queue(hold("never"))
    body = message_body(max_tokens=500)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nx-api-key: " + ALPHA_KEY.encode()
                     + b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert up.wait_requests(1)
        assert key_scope(proxy)["held"]["tokens"] >= 500  # the request is in flight, its hold in place
    finally:
        sock.close()
    gone = time.monotonic()
    # the upstream request is cancelled and the hold released within a second.
    wait_until(lambda: nothing_held(proxy), "the hold to be released", timeout=1.0)
    assert up.wait_closed_early(1, timeout=max(0.05, 1.0 - (time.monotonic() - gone))), \
        "the upstream never saw its connection closed"
    assert nothing_used(proxy)
    row = proxy.state.store.rows[-1]
    assert row.outcome == "client_disconnected" and row.steps == 0


# --- 5. upstream lies do not make calls free --------------------------------------------------------

def test_a_stream_without_message_start_is_charged_for_what_it_relayed(launch, up):
    chunks = [f"chunk {i:02d} of text " for i in range(30)]  # 16 ASCII bytes each
    text = "".join(chunks)
    up.queue(sse([text_delta(c) for c in chunks] + [frame("message_stop", {"type": "message_stop"})]))
    proxy = launch()
    stream = sdk(proxy).messages.create(model=HAIKU, max_tokens=1000, messages=MSG, stream=True)
    got = "".join(ev.delta.text for ev in stream if ev.type == "content_block_delta")
    assert got == text
    [seen] = up.requests
    est = estimate_input_tokens(seen.json)
    wait_until(lambda: nothing_held(proxy), "the stream to settle")
    used = key_scope(proxy)["used"]
    relayed = math.ceil(len(text.encode()) / 3)
    assert used["output_tokens"] == pytest.approx(relayed, abs=len(chunks))
    assert used["input_tokens"] >= est > 0
    assert used["tokens"] == used["input_tokens"] + used["output_tokens"]
    assert used["tokens"] == pytest.approx(relayed + est, abs=len(chunks))
    assert used["steps"] == 1 and used["cost_usd"] > 0


@pytest.mark.parametrize("with_start, prompt_words", [(True, 2), (False, 2), (True, 1500), (False, 1500)],
                         ids=["message_start without output", "no message_start",
                              "message_start without output, long prompt", "no message_start, long prompt"])
def test_an_upstream_that_ignores_max_tokens_is_cut_when_the_budget_runs_out(launch, up, with_start, prompt_words):
    """max_tokens 50 is sent; the upstream streams 20,000 characters and never reports output. The
    key's 3,000 tokens are spent at the event that passes them: the stream is cut there (an SSE
    error the SDK raises), the upstream connection closed, and used ends within one event's
    estimate (100 bytes: 34 tokens) of the limit. (The input is what message_start reports, else
    the admission estimate: either way it is known before the first output event, so it counts
    toward the cut as it counts in the settlement.)"""
    limit, per_event = 3000, math.ceil(100 / 3)
    chunks = [f"{i:04d}" + "x" * 95 + " " for i in range(200)]  # 100 ASCII bytes each, 20,000 in all
    frames = [text_delta(c) for c in chunks] + [frame("message_stop", {"type": "message_stop"})]
    if with_start:
        message = {"id": "msg_liar", "type": "message", "role": "assistant", "model": HAIKU, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 12 if prompt_words < 10 else 2400}}
        frames = [frame("message_start", {"type": "message_start", "message": message}),
                  frame("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})] + frames
    up.queue(sse(frames, event_delay=0.002))
    proxy = launch(teams={"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": limit}}}}})
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        prompt = [{"role": "user", "content": "word " * prompt_words}]
        for ev in sdk(proxy).messages.create(model=HAIKU, max_tokens=50, messages=prompt, stream=True):
            if ev.type == "content_block_delta":
                received.append(ev.delta.text)
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    assert up.requests[0].json["max_tokens"] == 50
    assert 0 < len(received) < len(chunks)
    assert up.wait_closed_early(1), "the upstream connection was not closed at the cut"
    wait_until(lambda: nothing_held(proxy), "the stream to settle")
    used = key_scope(proxy)["used"]
    assert limit - per_event <= used["tokens"] <= limit + per_event, used
    assert used["steps"] == 1


# --- 6. count_tokens applies the key's model allow-list ----------------------------------------------

def test_count_tokens_refuses_a_model_outside_the_keys_allow_list_and_forwards_nothing(launch, up):
    proxy = launch()
    gamma = sdk(proxy, GAMMA_KEY)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        gamma.messages.count_tokens(model="claude-sonnet-4-5", messages=MSG)
    assert exc.value.type == "permission_error"
    assert up.requests == []
    assert gamma.messages.count_tokens(model=HAIKU, messages=MSG).input_tokens == 7
    [seen] = up.requests
    assert seen.path == "/v1/messages/count_tokens" and seen.json["model"] == HAIKU
    assert nothing_used(proxy, GAMMA_KEY)


# --- 7. an upstream without an API key --------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES + ["model list"])
def test_an_upstream_without_an_api_key_is_a_502_and_nothing_is_forwarded(launch, up, route):
    proxy = launch(upstream={"api_key": ""})
    if route == "model list":
        status, _, body = raw_request(proxy, "GET", "/v1/models", [("x-api-key", ALPHA_KEY), VERSION])
    else:
        status, _, body = _call(proxy, route)
    err = anthropic_error(status, body, 502, "api_error")
    assert err["error"]["message"] == "no API key is configured for upstream 'anthropic'"
    assert up.requests == []
    assert nothing_held(proxy) and nothing_used(proxy)


# --- 8. metrics_key ------------------------------------------------------------------------------

def test_metrics_key_guards_metrics(launch, up):
    proxy = launch(metrics_key="metrics-secret-123")
    url = proxy.url + "/metrics"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "metrics-secret-123"},
                    {"authorization": f"Bearer {ALPHA_KEY}"}):
        r = httpx.get(url, headers=headers)
        anthropic_error(r.status_code, r.content, 401, "authentication_error")
        assert "metrics-secret-123" not in r.text
    assert "budget_proxy_" in metrics_text(proxy, {"authorization": "Bearer metrics-secret-123"})


def test_without_a_metrics_key_metrics_stay_open(launch, up):
    assert "budget_proxy_" in metrics_text(launch())
