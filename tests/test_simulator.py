"""The Anthropic upstream simulator, driven directly by the official SDK (2.14) and by raw HTTP.

If these pass, the simulator's wire format is one the real SDK accepts.
"""
from __future__ import annotations

import json
import threading

import anthropic
import httpx
import httpx2
import pytest

from tests.simulator import AnthropicSimulator, Reply, plan_reply
from tests.simulator.anthropic import split_words

MODEL = "claude-sonnet-5-5"
HI = [{"role": "user", "content": "hi"}]
HEADERS = {"x-api-key": "sk-sim", "anthropic-version": "2023-06-01", "content-type": "application/json"}


@pytest.fixture(scope="module")
def server():
    with AnthropicSimulator() as sim:
        yield sim


@pytest.fixture
def sim(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(sim):
    with anthropic.Anthropic(base_url=sim.url, api_key="sk-sim", max_retries=0) as c:
        yield c


def usage_tuple(u) -> tuple[int, int, int, int]:
    return (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens)


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    """Split an SSE body into (event name, data JSON); every event must have both lines."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


# -- non-streaming ------------------------------------------------------------------------------

def test_create_returns_text_and_usage(sim, client):
    sim.queue(Reply(text="Hi there, friend.", input_tokens=40, cache_write_5m=11, cache_write_1h=7,
                    cache_read=300, output_tokens=9))
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=HI)
    msg = raw.parse()
    assert msg.content[0].text == "Hi there, friend."
    assert msg.model == MODEL and msg.stop_reason == "end_turn" and msg.id.startswith("msg_sim_")
    u = msg.usage
    assert usage_tuple(u) == (40, 18, 300, 9)
    assert (u.cache_creation.ephemeral_5m_input_tokens, u.cache_creation.ephemeral_1h_input_tokens) == (11, 7)
    assert msg._request_id.startswith("req_sim_") and raw.headers["request-id"] == msg._request_id
    assert int(raw.headers["anthropic-ratelimit-requests-remaining"]) > 0


def test_default_output_tokens_and_model_override(sim, client):
    sim.default = Reply(text="x" * 41, model="claude-opus-5-5")
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=HI)
    assert msg.usage.output_tokens == 11  # ceil(41 / 4)
    assert msg.model == "claude-opus-5-5"
    assert msg.usage.server_tool_use is None


async def test_create_async(sim):
    sim.queue(Reply(text="async hello", input_tokens=3, cache_read=5, output_tokens=2, web_search_requests=2,
                    final_input_tokens=30))
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-sim", max_retries=0) as c:
        msg = await c.messages.create(model=MODEL, max_tokens=100, messages=HI)
    assert msg.content[0].text == "async hello"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (30, 5, 2)
    assert msg.usage.server_tool_use.web_search_requests == 2


def test_tool_use_json_reply_uses_the_requests_tool_name(sim, client):
    sim.queue(Reply(text="Checking.", tool_use={"city": "Paris"}))
    tools = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}]
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=HI, tools=tools)
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[1].name == "lookup" and msg.content[1].input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"


# -- streaming ----------------------------------------------------------------------------------

def test_stream_yields_text_and_final_usage(sim, client):
    reply = Reply(text="one two three four five six seven eight nine ten", input_tokens=12, cache_write_5m=100,
                  cache_write_1h=50, cache_read=7, output_tokens=30, message_delta_count=3)
    sim.queue(reply)
    with client.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == reply.text and len(pieces) == 8
    u = final.usage
    assert usage_tuple(u) == (12, 150, 7, 30)
    assert (u.cache_creation.ephemeral_5m_input_tokens, u.cache_creation.ephemeral_1h_input_tokens) == (100, 50)
    assert final.stop_reason == "end_turn"
    assert sim.streams_started == sim.streams_completed == 1 and sim.streams_aborted == 0


def test_message_deltas_carry_running_totals(sim, client):
    sim.queue(Reply(output_tokens=30, message_delta_count=3))
    events = list(client.messages.create(model=MODEL, max_tokens=100, messages=HI, stream=True))
    deltas = [e for e in events if e.type == "message_delta"]
    assert [d.usage.output_tokens for d in deltas] == [10, 20, 30]
    assert [d.delta.stop_reason for d in deltas] == [None, None, "end_turn"]


async def test_stream_async_with_growing_input(sim):
    sim.queue(Reply(chunks=["It is ", "8°C", " and cloudy."], input_tokens=2679, final_input_tokens=10682,
                    output_tokens=510, web_search_requests=1))
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-sim", max_retries=0) as c:
        async with c.messages.stream(model=MODEL, max_tokens=1000, messages=HI) as stream:
            pieces = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
    assert pieces == ["It is ", "8°C", " and cloudy."]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10682, 510)
    assert final.usage.server_tool_use.web_search_requests == 1


def test_stream_thinking_then_text_then_tool_use(sim, client):
    sim.queue(Reply(thinking="27*453 is 12231.", text="Let me look.", tool_use={"q": "weather", "n": 3}))
    with client.messages.stream(model=MODEL, max_tokens=500, messages=HI) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "27*453 is 12231." and final.content[0].signature.startswith("sig_")
    assert final.content[2].input == {"q": "weather", "n": 3} and final.content[2].name == "get_weather"
    assert final.stop_reason == "tool_use"


def test_error_event_raises_api_status_error(sim, client):
    sim.queue(Reply(chunks=["a ", "b ", "c ", "d"], error_event_after=2))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
            seen.extend(stream.text_stream)
    assert seen == ["a ", "b "]
    err = info.value
    assert type(err) is anthropic.APIStatusError and err.status_code == 200 and err.type == "overloaded_error"
    assert err.request_id.startswith("req_sim_")
    assert sim.wait_idle() and sim.streams_errored == 1 and sim.streams_completed == 0


def test_drop_after_cuts_the_connection(sim, client):
    sim.queue(Reply(chunks=["a ", "b ", "c ", "d"], drop_after=1))
    seen = []
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)):
        with client.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
            seen.extend(stream.text_stream)
    assert seen == ["a "]
    assert sim.wait_idle() and sim.streams_dropped == 1
    assert sim.last_stream_events_sent() == 4  # message_start, ping, content_block_start, one delta


def test_drop_after_without_stream_closes_before_answering(sim, client):
    sim.queue(Reply(drop_after=0))
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert sim.wait_idle() and sim.streams_started == 0


async def test_async_drop_and_error_event(sim):
    sim.queue(Reply(drop_after=0), Reply(error_event_after=0, error_type="api_error"))
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-sim", max_retries=0) as c:
        with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)):
            async for _ in await c.messages.create(model=MODEL, max_tokens=10, messages=HI, stream=True):
                pass
        with pytest.raises(anthropic.APIStatusError) as info:
            async for _ in await c.messages.create(model=MODEL, max_tokens=10, messages=HI, stream=True):
                pass
    assert info.value.type == "api_error"


@pytest.mark.parametrize("status, exc, error_type", [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (529, anthropic.OverloadedError, "overloaded_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_error_status(sim, client, status, exc, error_type, stream):
    sim.queue(Reply(status=status, extra_headers={"x-should-retry": "false"}))
    with pytest.raises(exc) as info:
        client.messages.create(model=MODEL, max_tokens=10, messages=HI, stream=stream)
    assert info.value.status_code == status and info.value.type == error_type
    assert info.value.request_id.startswith("req_sim_")
    assert sim.streams_started == 0  # an error status is not a stream


def test_sdk_retries_take_the_next_queued_reply(sim):
    fast_retry = {"retry-after-ms": "1"}
    sim.queue(Reply(status=529, extra_headers=fast_retry), Reply(status=500, extra_headers=fast_retry),
              Reply(text="ok"))
    with anthropic.Anthropic(base_url=sim.url, api_key="sk-sim", max_retries=2) as c:
        assert c.messages.create(model=MODEL, max_tokens=10, messages=HI).content[0].text == "ok"
    assert [r.headers["x-stainless-retry-count"] for r in sim.messages_requests()] == ["0", "1", "2"]


def test_error_code_reaches_the_sdk(sim, client):
    sim.queue(Reply(status=429, error_code="enforced_spend_limit_reached", error_message="cap"))
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert info.value.error_code == "enforced_spend_limit_reached"


# -- max_tokens ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_truncates(sim, client, stream):
    text = "one two three four five six seven eight nine ten eleven twelve"  # 62 bytes -> 16 tokens
    sim.queue(Reply(text=text, tool_use={"x": 1}))
    if stream:
        with client.messages.stream(model=MODEL, max_tokens=5, messages=HI) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(model=MODEL, max_tokens=5, messages=HI)
    assert msg.usage.output_tokens == 5 and msg.stop_reason == "max_tokens"
    assert [b.type for b in msg.content] == ["text"]
    assert text.startswith(msg.content[0].text) and 0 < len(msg.content[0].text) < len(text)


def test_max_tokens_zero_gives_no_content(sim, client):
    msg = client.messages.create(model=MODEL, max_tokens=0, messages=HI)
    assert msg.content == [] and msg.usage.output_tokens == 0 and msg.stop_reason == "max_tokens"


def test_output_within_max_tokens_is_untouched(sim, client):
    sim.queue(Reply(output_tokens=5))
    msg = client.messages.create(model=MODEL, max_tokens=5, messages=HI)
    assert msg.usage.output_tokens == 5 and msg.stop_reason == "end_turn"


# -- models, count_tokens, auth, routing -------------------------------------------------------

def test_models_list_and_get(sim, client):
    page = client.models.list(limit=2)
    assert [m.id for m in page.data] == ["claude-opus-5-5", "claude-sonnet-5-5"] and page.has_more
    all_ids = [m.id for m in client.models.list(limit=2)]  # auto-pagination via after_id
    assert len(all_ids) == len(set(all_ids)) >= 4 and all_ids[:2] == ["claude-opus-5-5", "claude-sonnet-5-5"]
    model = client.models.retrieve("claude-haiku-5-5")
    assert model.display_name == "Claude Haiku 5.5" and model.type == "model"
    with pytest.raises(anthropic.NotFoundError) as info:
        client.models.retrieve("claude-nonexistent")
    assert info.value.type == "not_found_error"


def test_count_tokens(sim, client):
    counted = client.messages.count_tokens(model=MODEL, messages=HI)
    assert counted.input_tokens == -(-len(sim.requests[-1].body) // 4)
    sim.count_tokens_reply = 2095
    assert client.messages.count_tokens(model=MODEL, messages=HI).input_tokens == 2095
    assert sim.messages_requests() == []  # count_tokens is not a /v1/messages call
    assert [r.path for r in sim.requests] == ["/v1/messages/count_tokens"] * 2


def test_missing_key_is_401_and_missing_version_is_400(sim):
    body = {"model": MODEL, "max_tokens": 5, "messages": HI}
    no_key = {k: v for k, v in HEADERS.items() if k != "x-api-key"}
    no_version = {k: v for k, v in HEADERS.items() if k != "anthropic-version"}
    with httpx.Client(base_url=sim.url) as http:
        r401 = http.post("/v1/messages", json=body, headers=no_key)
        r400 = http.post("/v1/messages", json=body, headers=no_version)
        ok = http.post("/v1/messages", json=body, headers=HEADERS)  # x-api-key style, 2023-06-01
    assert r401.status_code == 401 and r401.json()["error"]["type"] == "authentication_error"
    assert r400.status_code == 400 and r400.json()["error"]["type"] == "invalid_request_error"
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    for r in (r401, r400, ok):
        assert r.headers["request-id"].startswith("req_sim_") and "anthropic-ratelimit-requests-remaining" in r.headers
    assert r401.json()["request_id"] == r401.headers["request-id"]
    assert len(sim.messages_requests()) == 3


def test_api_keys_restricts_credentials(sim, client):
    sim.api_keys = {"sk-upstream"}
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    with anthropic.Anthropic(base_url=sim.url, api_key="sk-upstream", max_retries=0) as ok:
        assert ok.messages.create(model=MODEL, max_tokens=10, messages=HI).type == "message"


def test_unknown_routes_and_bad_bodies(sim):
    with httpx.Client(base_url=sim.url, headers=HEADERS) as http:
        missing = http.post("/v1/nope", json={})
        wrong_method = http.get("/v1/messages")
        no_max_tokens = http.post("/v1/messages", json={"model": MODEL, "messages": HI})
        not_json = http.post("/v1/messages", content=b"{")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert missing.json()["type"] == "error" and missing.headers["request-id"].startswith("req_sim_")
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
    assert no_max_tokens.status_code == 400 and not_json.status_code == 400
    assert sim.requests[0].path == "/v1/nope"  # every request is recorded, whatever the answer


# -- raw wire format ----------------------------------------------------------------------------

def test_raw_sse_event_order_and_types(sim):
    sim.queue(Reply(chunks=["Hel", "lo\u2028"], thinking="hm", tool_use={"a": 1}, output_tokens=20,
                    message_delta_count=2, extra_headers={"x-sim-extra": "1"}))
    body = {"model": MODEL, "max_tokens": 50, "messages": HI, "stream": True}
    with httpx.Client(base_url=sim.url) as http:
        r = http.post("/v1/messages", params={"beta": "true"}, json=body, headers=HEADERS)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream" and r.headers["cache-control"] == "no-cache"
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    assert r.headers["x-sim-extra"] == "1" and r.headers["request-id"].startswith("req_sim_")
    assert "lo\u2028".encode() in r.content  # non-ASCII stays raw: SSE lines end only at CR/LF
    events = parse_sse(r.content)
    assert all(payload["type"] == name for name, payload in events)
    names = [name if name != "content_block_delta" else payload["delta"]["type"] for name, payload in events]
    assert names == [
        "message_start", "ping",
        "content_block_start", "thinking_delta", "signature_delta", "content_block_stop",
        "content_block_start", "text_delta", "text_delta", "content_block_stop",
        "content_block_start", *["input_json_delta"] * 4, "content_block_stop",
        "message_delta", "message_delta", "message_stop",
    ]
    indexes = [p["index"] for n, p in events if n.startswith("content_block")]
    assert indexes == [0] * 4 + [1] * 4 + [2] * 6
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert set(start["usage"]) >= {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                                   "cache_creation", "output_tokens"}
    assert start["usage"]["output_tokens"] == 1
    assert [p["usage"]["output_tokens"] for n, p in events if n == "message_delta"] == [10, 20]
    tool_json = "".join(p["delta"].get("partial_json", "") for n, p in events if n == "content_block_delta")
    assert json.loads(tool_json) == {"a": 1}
    rec = sim.messages_requests()[0]
    assert rec.query == "beta=true" and rec.json == body and rec.headers["x-api-key"] == "sk-sim"
    assert rec.reply.chunks == ["Hel", "lo\u2028"]


def test_raw_error_event_ends_the_body_cleanly(sim):
    sim.queue(Reply(chunks=["a", "b"], error_event_after=1))
    body = {"model": MODEL, "max_tokens": 50, "messages": HI, "stream": True}
    with httpx.Client(base_url=sim.url) as http:
        r = http.post("/v1/messages", json=body, headers=HEADERS)  # a clean chunked end, or httpx raises
    events = parse_sse(r.content)
    assert [n for n, _ in events][-2:] == ["content_block_delta", "error"]
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert events[-1][1]["request_id"] == r.headers["request-id"]


# -- client going away, gates, bookkeeping --------------------------------------------------------

def test_client_leaving_mid_stream_is_counted(sim, client):
    sim.queue(Reply(chunks=["a ", "b ", "c "], gate="hold", gate_after=1))
    with client.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
        assert next(iter(stream.text_stream)) == "a "
        assert sim.wait_at_gate("hold")
    assert sim.wait_idle()  # the held handler is cancelled when the connection closes
    assert sim.streams_aborted == 1 and sim.streams_completed == 0
    assert sim.last_stream_events_sent() == 4
    assert sim.streams[0].text_deltas_sent == 1 and sim.streams[0].planned_events == 9


def test_client_leaving_during_event_delay_is_counted(sim, client):
    sim.queue(Reply(chunks=["w "] * 30, event_delay=0.05))  # the client leaves long before the end
    with client.messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
        next(iter(stream.text_stream))
    assert sim.wait_idle() and sim.streams_aborted == 1
    assert sim.last_stream_events_sent() < sim.streams[0].planned_events


def test_gate_before_headers_and_request_timeout(sim, client):
    sim.queue(Reply(gate="g"))
    with pytest.raises(anthropic.APITimeoutError):
        client.with_options(timeout=0.2).messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert sim.wait_idle()
    sim.queue(Reply(gate="g"), Reply(gate="g"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        client.messages.create(model=MODEL, max_tokens=10, messages=HI).content[0].text)) for _ in range(2)]
    for t in threads:
        t.start()
    assert sim.wait_at_gate("g", count=2)
    sim.open_gate("g")
    for t in threads:
        t.join()
    assert results == ["Hello from the simulator."] * 2


def test_queue_order_responder_and_default(sim, client):
    sim.queue(Reply(text="first"), Reply(text="second"))
    sim.responder = lambda rec: Reply(text=f"echo {rec.json['max_tokens']}")
    texts = [client.messages.create(model=MODEL, max_tokens=n, messages=HI).content[0].text for n in (10, 11, 12)]
    assert texts == ["first", "second", "echo 12"]
    sim.responder = None
    assert client.messages.create(model=MODEL, max_tokens=10, messages=HI).content[0].text == sim.default.text
    recs = sim.messages_requests()
    assert [r.json["max_tokens"] for r in recs] == [10, 11, 12, 10]
    assert recs[0].headers["authorization"] == "Bearer sk-sim" and recs[0].headers["anthropic-version"]


def test_start_stop_lifecycle():
    sim = AnthropicSimulator()
    sim.start()
    with pytest.raises(RuntimeError):
        sim.start()
    assert sim.port != 0 and sim.url == f"http://127.0.0.1:{sim.port}"
    with httpx.Client() as http:
        assert http.get(sim.url + "/v1/models", headers=HEADERS).status_code == 200
    sim.stop()
    sim.stop()  # idempotent
    with pytest.raises(httpx.ConnectError), httpx.Client() as http:
        http.get(sim.url + "/v1/models", headers=HEADERS)


# -- the pure planner ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "one", "  lead and trail  ", "a b c d e f g h i j k l m n o p q r"])
def test_split_words_round_trips(text):
    parts = split_words(text)
    assert "".join(parts) == text and len(parts) <= 8 and all(parts)


def test_plan_cut_points_and_running_totals():
    plan = plan_reply(Reply(chunks=["a", "b", "c"], output_tokens=7, message_delta_count=3), {"max_tokens": 100})
    assert plan.cut_index(0) == plan.text_delta_at[0] and plan.cut_index(2) == plan.text_delta_at[2]
    assert plan.cut_index(9) == plan.text_delta_at[-1] + 1
    assert [p["usage"]["output_tokens"] for n, p in plan.events if n == "message_delta"] == [3, 5, 7]
    assert plan.message["usage"]["output_tokens"] == 7 and plan.message["content"] == [{"type": "text", "text": "abc"}]
