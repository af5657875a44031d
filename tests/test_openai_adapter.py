"""The OpenAI Chat Completions adapter and its stream meter, as pure functions (no proxy, no
network). The wire examples are OpenAI's documented shapes; the simulator's `plan_reply` makes the rest."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.estimate import estimate_openai_input_tokens
from proxy.meter import GREW, REPORTED, UNCHANGED
from proxy.providers import Provider
from proxy.providers.openai import OpenAIAdapter, OpenAIStreamMeter, is_usage_chunk, usage_from
from proxy.sse import SSEDecoder, SSEEvent
from proxy.usage import Usage
from tests.simulator.openai import Reply, data, plan_reply

A = OpenAIAdapter()
MSG = [{"role": "user", "content": "Say hello"}]
EST = 7  # 4 per message + ceil(9 bytes / 3)


def raw(**body) -> bytes:
    return json.dumps({"model": "gpt-4.1", "messages": MSG, **body}).encode()


def facts(**body):
    return A.parse_request(raw(**body))


def events(*payloads) -> list[SSEEvent]:
    dec = SSEDecoder()
    return dec.feed(b"".join(data(p) for p in payloads)) + dec.flush()


def chunk(delta: dict | None = None, *, usage=None, finish=None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764500000, "model": "gpt-4.1",
            "choices": choices, "usage": usage, **extra}


USAGE_8_1 = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
             "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                           "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
# a streamed chat completion
STREAM_8_2 = b"""data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764500000,"model":"gpt-4.1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764500000,"model":"gpt-4.1","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764500000,"model":"gpt-4.1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764500000,"model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

"""


def test_the_adapter_is_a_provider():
    p: Provider = A
    assert (p.name, p.path, p.default_max_tokens) == ("openai", "/v1/chat/completions", 128_000)
    assert A.count_tokens_body(facts()) is None


# --- parse_request ---------------------------------------------------------------------------

def test_parse_request_facts():
    f = facts(max_completion_tokens=50, stream=True, stream_options={"include_usage": True})
    assert (f.model, f.max_tokens, f.stream, f.client_wants_usage) == ("gpt-4.1", 50, True, True)
    f = facts()
    assert (f.max_tokens, f.stream, f.client_wants_usage) == (None, False, False)
    assert facts(max_tokens=30).max_tokens == 30
    assert facts(max_tokens=30, max_completion_tokens=20).max_tokens == 20  # the current field wins
    assert facts(max_tokens=None).max_tokens is None                       # null is "not set", as upstream
    assert facts(stream=True, stream_options={"include_usage": False}).client_wants_usage is False
    assert facts(stream="true").stream is False


def test_the_output_bound_covers_every_choice():
    assert facts(max_completion_tokens=50, n=3).max_tokens == 150
    assert facts(max_completion_tokens=50, n="3").max_tokens == 50  # upstream refuses it; no hold inflation


@pytest.mark.parametrize("body,what", [
    (b"not json", "JSON"), (b"\xff\xfe", "JSON"), (b"[1, 2]", "object"), (b'"x"', "object"),
    (b'{"messages": []}', "model"), (b'{"model": "", "messages": []}', "model"),
    (b'{"model": 5, "messages": []}', "model"),
    (b'{"model": "gpt-4.1"}', "messages"), (b'{"model": "gpt-4.1", "messages": "hi"}', "messages"),
    (b'{"model": "gpt-4.1", "messages": [], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "gpt-4.1", "messages": [], "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "gpt-4.1", "messages": [], "max_tokens": 2.5}', "max_tokens"),
    (b'{"model": "gpt-4.1", "messages": [], "max_completion_tokens": true}', "max_completion_tokens"),
    (b'{"model": "gpt-4.1", "messages": [], "max_completion_tokens": -1}', "max_completion_tokens"),
    (b'{"model": "gpt-4.1", "messages": [], "max_completion_tokens": 5, "max_tokens": 0}', "max_tokens"),
])
def test_parse_request_refuses(body, what):
    with pytest.raises(InvalidRequest) as exc:
        A.parse_request(body)
    assert exc.value.status == 400 and what in exc.value.message
    assert json.loads(A.render_error(exc.value, "r")[2])["error"]["type"] == "invalid_request_error"


def test_absurdly_deep_json_is_a_400_and_never_raises_elsewhere():
    deep = b'{"model": "gpt-4.1", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidRequest):
        A.parse_request(deep)
    assert A.usage_from_response(deep) is None and not is_usage_chunk('{"choices":[],"usage":' + "[" * 100_000)
    m = new_meter()
    assert m.feed(SSEEvent(None, '{"choices":[' + "[" * 100_000, b"")) == UNCHANGED


def test_estimate_input_is_the_openai_heuristic():
    f = facts(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert A.estimate_input(f) == estimate_openai_input_tokens(f.body)
    assert A.estimate_input(facts()) == EST


# --- upstream_body ---------------------------------------------------------------------------

def body_of(r: bytes, **kw) -> bytes:
    return A.upstream_body(A.parse_request(r), r, **kw)


def test_nothing_to_change_keeps_the_bytes():
    for r in (raw(), raw(max_tokens=5), raw(stream=True, stream_options={"include_usage": True}),
              b'{ "model" : "gpt-4.1",\n "messages": [], "max_completion_tokens": 9 }'):
        assert body_of(r, max_tokens=None) is r
    r = raw(max_completion_tokens=9)
    assert body_of(r, max_tokens=9) is r and body_of(r, max_tokens=10) is r  # never raised


def test_a_stream_always_asks_upstream_for_usage():
    out = json.loads(body_of(raw(stream=True, temperature=0.5), max_tokens=None))
    assert out == {"model": "gpt-4.1", "messages": MSG, "stream": True, "temperature": 0.5,
                   "stream_options": {"include_usage": True}}
    kept = json.loads(body_of(raw(stream=True, stream_options={"include_obfuscation": False,
                                                                "include_usage": False}), max_tokens=None))
    assert kept["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert json.loads(body_of(raw(stream=True, stream_options=None), max_tokens=None))["stream_options"] \
        == {"include_usage": True}
    assert "stream_options" not in json.loads(body_of(raw(stream=False), max_tokens=7))  # upstream refuses it


def test_max_tokens_goes_into_the_field_the_client_used():
    assert json.loads(body_of(raw(max_tokens=500), max_tokens=93)) == {"model": "gpt-4.1", "messages": MSG,
                                                                        "max_tokens": 93}
    assert json.loads(body_of(raw(max_completion_tokens=500), max_tokens=93))["max_completion_tokens"] == 93
    assert json.loads(body_of(raw(), max_tokens=93)) == {"model": "gpt-4.1", "messages": MSG,
                                                         "max_completion_tokens": 93}
    both = json.loads(body_of(raw(max_tokens=300, max_completion_tokens=500), max_tokens=93))
    assert (both["max_tokens"], both["max_completion_tokens"]) == (93, 93)
    lower = json.loads(body_of(raw(max_tokens=50, max_completion_tokens=500), max_tokens=93))
    assert (lower["max_tokens"], lower["max_completion_tokens"]) == (50, 93)
    nulled = json.loads(body_of(raw(max_tokens=None), max_tokens=93))
    assert nulled["max_tokens"] is None and nulled["max_completion_tokens"] == 93


def test_max_tokens_is_shared_between_choices():
    assert json.loads(body_of(raw(max_completion_tokens=500, n=3), max_tokens=100))["max_completion_tokens"] == 33
    assert json.loads(body_of(raw(n=4), max_tokens=2))["max_completion_tokens"] == 1  # never below 1


def test_key_order_and_other_fields_survive_a_rewrite():
    r = raw(max_completion_tokens=500, stream=True, metadata={"a": "é"}, tools=[{"type": "function"}])
    out = json.loads(body_of(r, max_tokens=10))
    assert list(out) == ["model", "messages", "max_completion_tokens", "stream", "metadata", "tools",
                         "stream_options"]
    assert out["metadata"] == {"a": "é"} and out["max_completion_tokens"] == 10


limits = st.one_of(st.none(), st.integers(1, 10**6))


@given(mt=limits, mct=limits, n=st.one_of(st.none(), st.integers(1, 8)), stream=st.booleans(),
       wants=st.sampled_from([None, True, False]), frac=st.floats(0, 1))
def test_upstream_body_never_raises_a_limit_and_bounds_the_whole_request(mt, mct, n, stream, wants, frac):
    body: dict = {"model": "gpt-4.1", "messages": MSG, "stream": stream}
    for k, v in (("max_tokens", mt), ("max_completion_tokens", mct), ("n", n)):
        if v is not None:
            body[k] = v
    if wants is not None:
        body["stream_options"] = {"include_usage": wants}
    r = json.dumps(body).encode()
    f = A.parse_request(r)
    bound = f.max_tokens if f.max_tokens is not None else A.default_max_tokens
    admitted = max(1, int(bound * frac))  # what the relay may pass: at most the ask
    out = json.loads(A.upstream_body(f, r, admitted))
    choices = n or 1
    effective = out.get("max_completion_tokens") or out.get("max_tokens")
    assert effective is not None
    assert effective * choices <= max(admitted, choices)  # the hard bound, give or take 1 token a choice
    for k in ("max_tokens", "max_completion_tokens"):
        if body.get(k) is not None:
            assert 1 <= out[k] <= body[k]
    assert (out.get("stream_options") or {}).get("include_usage") is (True if stream else wants)
    assert {k: v for k, v in out.items() if k not in ("max_tokens", "max_completion_tokens", "stream_options")} \
        == {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens", "stream_options")}


# --- usage -----------------------------------------------------------------------------------

def test_usage_from_a_whole_response():
    resp = {"id": "chatcmpl-abc", "object": "chat.completion", "model": "gpt-4.1-2025-04-14",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": USAGE_8_1}
    u, bill = A.usage_from_response(json.dumps(resp).encode())
    assert u == Usage(input_tokens=176, cache_read_tokens=1024, output_tokens=40)
    assert bill.model == "gpt-4.1-2025-04-14"  # the model that served is what is priced
    assert (u.total_input_tokens, u.total_tokens) == (1200, 1240)


def test_usage_edge_cases():
    assert A.usage_from_response(b"nope") is None
    assert A.usage_from_response(b'{"error": {"message": "x"}}') is None
    assert A.usage_from_response(b'{"usage": null}') is None
    assert usage_from({"prompt_tokens": 10, "completion_tokens": 5,
                       "prompt_tokens_details": None, "completion_tokens_details": None}) == Usage(10, output_tokens=5)
    # reasoning is inside completion_tokens: not added again
    assert usage_from({"prompt_tokens": 3, "completion_tokens": 50,
                       "completion_tokens_details": {"reasoning_tokens": 45}}).output_tokens == 50
    # cache writes (newest families) are part of the prompt too
    assert usage_from({"prompt_tokens": 100, "completion_tokens": 1, "prompt_tokens_details":
                       {"cached_tokens": 60, "cache_write_tokens": 30}}) \
        == Usage(input_tokens=10, cache_write_5m_tokens=30, cache_read_tokens=60, output_tokens=1)
    # nonsense never goes negative
    assert usage_from({"prompt_tokens": 5, "completion_tokens": -3, "prompt_tokens_details":
                       {"cached_tokens": 9}}) == Usage(cache_read_tokens=5)


@given(prompt=st.integers(0, 10**7), cached=st.integers(0, 10**7), written=st.integers(0, 10**7),
       completion=st.integers(0, 10**7))
def test_usage_keeps_the_prompt_total(prompt, cached, written, completion):
    u = usage_from({"prompt_tokens": prompt, "completion_tokens": completion,
                    "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}})
    assert u.total_input_tokens == prompt and u.output_tokens == completion
    assert min(u.input_tokens, u.cache_read_tokens, u.cache_write_tokens) >= 0


# --- the stream meter ------------------------------------------------------------------------

def new_meter() -> OpenAIStreamMeter:
    f = facts(stream=True)
    return A.new_meter(f, A.estimate_input(f))  # the relay passes what admission estimated


def feed_all(meter: OpenAIStreamMeter, evs: list[SSEEvent]) -> list[int]:
    return [meter.feed(e) for e in evs]


def test_meter_on_the_protocol_example():
    dec = SSEDecoder()
    evs = dec.feed(STREAM_8_2)
    m = new_meter()
    assert not m.started
    assert feed_all(m, evs) == [UNCHANGED, GREW, UNCHANGED, REPORTED, UNCHANGED]
    assert m.started and m.finished and m.upstream_error is None and m.usage_reported
    assert m.final_usage() == m.live_usage() == Usage(input_tokens=5, output_tokens=1)


def test_meter_live_estimate_then_exact_report():
    m = new_meter()
    m.feed(events(chunk({"role": "assistant", "content": ""}))[0])
    assert m.started and not m.finished
    assert m.live_usage() == Usage(input_tokens=EST)  # input: the admission estimate until reported
    assert m.feed(events(chunk({"content": "abcdefghijkl"}))[0]) == GREW
    assert m.live_usage() == Usage(input_tokens=EST, output_tokens=4)
    # the usage chunk is the truth, lower than the estimate or not
    assert m.feed(events(chunk(usage=USAGE_8_1))[0]) == REPORTED
    assert m.finished
    assert m.live_usage() == m.final_usage() == Usage(input_tokens=176, cache_read_tokens=1024, output_tokens=40)


def test_meter_counts_every_kind_of_generated_text():
    m = new_meter()
    deltas = [{"content": "abc"}, {"refusal": "abc"}, {"reasoning_content": "abc"}, {"reasoning": "abc"},
              {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                               "function": {"name": "abc", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": "abc"}},
                              {"index": 1, "function": {"arguments": "abc"}}]},
              {"function_call": {"arguments": "abc"}}]
    assert feed_all(m, events(*[chunk(d) for d in deltas])) == [GREW] * 7
    assert m.live_usage().output_tokens == 8
    # several choices add up; empty and odd deltas do not count
    two = {**chunk({"content": "abc"}), "choices": [{"index": 0, "delta": {"content": "abc"}},
                                                   {"index": 1, "delta": {"content": "abcdef"}}]}
    assert m.feed(events(two)[0]) == GREW and m.live_usage().output_tokens == 11
    odd = [chunk({}), chunk({"content": None}), chunk({"content": 5}), {"choices": "x"}, {"choices": [1, None]}, [1]]
    assert feed_all(m, events(*odd)) == [UNCHANGED] * 6
    assert m.live_usage().output_tokens == 11


def test_meter_without_a_usage_chunk_settles_the_estimate():
    m = new_meter()
    feed_all(m, events(chunk({"role": "assistant"}), chunk({"content": "x" * 30})))
    assert not m.finished and not m.usage_reported  # cut or dropped: no [DONE], no usage
    assert m.final_usage() == Usage(input_tokens=EST, output_tokens=10)
    m.feed(events("[DONE]")[0])
    assert m.finished and m.final_usage() == Usage(input_tokens=EST, output_tokens=10)


def test_meter_upstream_error_chunk():
    m = new_meter()
    feed_all(m, events(chunk({"content": "abc"}),
                       {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, "[DONE]"))
    assert m.upstream_error == "server_error"
    assert not m.finished  # [DONE] after an error is no proper end
    assert m.final_usage() == Usage(input_tokens=EST, output_tokens=1)
    first = new_meter()
    feed_all(first, events({"error": {"code": "overloaded"}}))
    assert not first.started and first.upstream_error == "overloaded"  # no message: no step, no charge


def test_meter_running_usage_in_every_chunk_is_a_total_not_a_sum():
    m = new_meter()
    u1 = {"prompt_tokens": 10, "completion_tokens": 1}
    u2 = {"prompt_tokens": 10, "completion_tokens": 2}
    assert feed_all(m, events(chunk({"content": "a"}, usage=u1), chunk({"content": "b"}, usage=u2))) \
        == [REPORTED, REPORTED]
    assert not m.finished and m.final_usage() == Usage(input_tokens=10, output_tokens=2)


@settings(max_examples=60)
@given(text=st.text(min_size=0, max_size=200), reasoning=st.integers(0, 50), cached=st.integers(0, 25),
       limit=st.one_of(st.none(), st.integers(1, 80)), split=st.data())
def test_meter_ends_at_the_reported_usage_whatever_the_chunking(text, reasoning, cached, limit, split):
    body = {"model": "gpt-4.1", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    if limit is not None:
        body["max_completion_tokens"] = limit
    plan = plan_reply(Reply(text=text, reasoning_tokens=reasoning, cached_tokens=cached), body)
    wire = b"".join(data(c) for c in plan.chunks) + data("[DONE]")
    cuts = sorted(split.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    f = A.parse_request(json.dumps(body).encode())
    dec, m, live = SSEDecoder(), A.new_meter(f, A.estimate_input(f)), []
    for a, b in zip([0] + cuts, cuts + [len(wire)]):
        for ev in dec.feed(wire[a:b]):
            m.feed(ev)
            live.append(m.live_usage().output_tokens)
    assert dec.flush() == []
    u = plan.completion["usage"]
    assert m.finished and m.final_usage() == usage_from(u)
    assert m.final_usage().total_tokens == u["total_tokens"]
    before_report = live[:-2]  # the usage chunk and [DONE] come last
    assert before_report == sorted(before_report)  # the running estimate never falls


# --- what the client is sent -----------------------------------------------------------------

def test_the_usage_chunk_reaches_only_a_client_that_asked():
    asked, not_asked = facts(stream=True, stream_options={"include_usage": True}), facts(stream=True)
    evs = SSEDecoder().feed(STREAM_8_2)
    assert [A.forwardable(e, asked) for e in evs] == [True] * 5
    assert [A.forwardable(e, not_asked) for e in evs] == [True, True, True, False, True]
    spaced = events(json.dumps(chunk(usage={"prompt_tokens": 1}), indent=1).replace("\n", ""))[0]
    assert not A.forwardable(spaced, not_asked)
    # lookalikes are kept: an Azure-style prompt-filter chunk, text that spells the pattern, usage null
    for p in (chunk(None, prompt_filter_results=[]), chunk({"content": '"choices":[] "usage":{}'}),
              chunk(None)):
        assert A.forwardable(events(p)[0], not_asked)
    assert is_usage_chunk(json.dumps(chunk(usage=USAGE_8_1)))


def test_cut_event_is_an_error_chunk_then_done():
    wire = A.cut_event("budget exceeded mid-stream: the tokens budget of team 'research' ran out")
    assert wire.startswith(b"data: {") and wire.endswith(b"\n\ndata: [DONE]\n\n")
    dec = SSEDecoder()
    err, done = dec.feed(wire)
    assert dec.pending == b"" and err.event is None and done.data == "[DONE]"
    assert json.loads(err.data) == {"error": {
        "message": "budget exceeded mid-stream: the tokens budget of team 'research' ran out",
        "type": "insufficient_quota", "param": None, "code": "budget_exceeded"}}
    m = new_meter()  # the proxy's own meter reads it as an upstream error
    m.feed(err)
    assert m.upstream_error == "insufficient_quota"
    # the relay words other cuts (a shutdown) with its own type and code
    other = SSEDecoder().feed(A.cut_event("shutting down", error_type="api_error", error_code="proxy_shutdown"))
    assert json.loads(other[0].data)["error"] == {"message": "shutting down", "type": "api_error",
                                                   "param": None, "code": "proxy_shutdown"}


def test_the_openai_sdk_raises_on_the_cut_event():
    import httpx2
    import openai

    body = data(chunk({"role": "assistant", "content": "Hi"})) + A.cut_event("out of budget")
    client = openai.OpenAI(api_key="k", base_url="http://sdk.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(
                               lambda req: httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                                           content=body))))
    got = []
    with pytest.raises(openai.APIError) as exc:
        for c in client.chat.completions.create(model="gpt-4.1", messages=MSG, stream=True):
            got.append(c.choices[0].delta.content)
    assert got == ["Hi"]
    assert type(exc.value) is openai.APIError and exc.value.code == "budget_exceeded"
    assert exc.value.type == "insufficient_quota" and exc.value.message == "out of budget"
