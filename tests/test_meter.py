"""Tests for the Anthropic stream meter (proxy/providers/anthropic.py::AnthropicStreamMeter) and
the shared running output estimate (proxy/meter.py::OutputEstimate). Pure and fast.

docs/budgets.md "Metering": input and cache tokens from message_start, a running estimate of output while
content deltas flow (text, tool-input JSON, thinking; tokens = ceil(bytes / 3)), and every
message_delta usage field is a running total: the final figure is the LAST total, never a sum.
Reported usage is the final truth; without any message_delta the live estimate is settled.
The example streams of tests/protocol_streams.py are decoded with the project's SSEDecoder.
"""
from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.meter import GREW, REPORTED, UNCHANGED, OutputEstimate
from proxy.providers.anthropic import AnthropicStreamMeter, cut_event, usage_from
from proxy.sse import SSEDecoder, SSEEvent
from proxy.usage import Usage

# --- the example streams (tests/protocol_streams.py) ------------------------------------------------

from tests.protocol_streams import TEXT_ONLY, TOOL_USE, THINKING, WEB_SEARCH



# --- helpers ---------------------------------------------------------------------------------

def decode(raw: bytes) -> list[SSEEvent]:
    d = SSEDecoder()
    events = d.feed(raw)
    events += d.flush()
    return events


def ev(name: str | None, payload: object) -> SSEEvent:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return SSEEvent(name, data, b"")


def start_ev(**usage: object) -> SSEEvent:
    return ev("message_start", {"type": "message_start",
                                "message": {"id": "msg_x", "type": "message", "role": "assistant",
                                            "content": [], "usage": usage}})


def delta_ev(kind: str, value: str, index: int = 0) -> SSEEvent:
    field = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking",
             "signature_delta": "signature"}[kind]
    return ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                      "delta": {"type": kind, field: value}})


def msg_delta_ev(**usage: object) -> SSEEvent:
    return ev("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": None, "stop_sequence": None}, "usage": usage})


PING = ev("ping", {"type": "ping"})
STOP = ev("message_stop", {"type": "message_stop"})


def feed_all(events: list[SSEEvent], meter: AnthropicStreamMeter | None = None) -> tuple[AnthropicStreamMeter, list[int]]:
    m = meter or AnthropicStreamMeter()
    return m, [m.feed(e) for e in events]


def est(*texts: str) -> int:
    return math.ceil(sum(len(t.encode()) for t in texts) / 3)


# --- OutputEstimate --------------------------------------------------------------------------

@pytest.mark.parametrize("texts, tokens", [
    ([], 0), (["a"], 1), (["abc"], 1), (["abcd"], 2), (["ab", "c"], 1), (["ab", "cd"], 2),
    (["é"], 1), (["日本語"], 3), (["日本語x"], 4), (["🙂🙂🙂"], 4),
])
def test_output_estimate_is_ceil_utf8_bytes_over_3(texts, tokens):
    e = OutputEstimate()
    for t in texts:
        e.add(t)
    assert e.tokens == tokens
    assert e.bytes == sum(len(t.encode()) for t in texts)


# --- the example streams ---------------------------------------------------------

def test_text_only_example_step_by_step():
    events = decode(TEXT_ONLY)
    assert [e.event for e in events] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                         "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    m = AnthropicStreamMeter()
    assert not m.started and not m.finished and m.upstream_error is None
    assert m.feed(events[0]) == REPORTED
    assert m.started and not m.finished
    assert m.live_usage() == Usage(input_tokens=25, output_tokens=1)
    assert m.final_usage() == Usage(input_tokens=25, output_tokens=1)  # no delta yet: the live figure
    assert [m.feed(e) for e in events[1:3]] == [UNCHANGED, UNCHANGED]
    assert m.feed(events[3]) == GREW
    assert m.live_usage() == Usage(input_tokens=25, output_tokens=2)   # "Hello": ceil(5/3)
    assert m.feed(events[4]) == GREW
    assert m.live_usage() == Usage(input_tokens=25, output_tokens=est("Hello there!"))  # 4
    assert m.final_usage() == m.live_usage()
    assert m.feed(events[5]) == UNCHANGED
    assert m.feed(events[6]) == REPORTED
    assert m.final_usage() == Usage(input_tokens=25, output_tokens=15)
    assert m.live_usage() == Usage(input_tokens=25, output_tokens=15)
    assert m.finished  # the final delta (stop_reason set): the message is complete
    assert m.feed(events[7]) == UNCHANGED
    assert m.finished and m.upstream_error is None
    assert m.final_usage() == Usage(input_tokens=25, output_tokens=15)


def test_text_only_example_with_the_fuller_final_delta():
    fuller = TEXT_ONLY.replace(
        b'"usage":{"output_tokens":15}',
        b'"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":15}')
    assert fuller != TEXT_ONLY
    m, _ = feed_all(decode(fuller))
    assert m.final_usage() == Usage(input_tokens=25, output_tokens=15)


def test_tool_use_example_counts_text_and_input_json():
    m, codes = feed_all(decode(TOOL_USE))
    # The first input_json_delta is "": nothing grew.
    deltas = [c for e, c in zip(decode(TOOL_USE), codes) if e.event == "content_block_delta"]
    assert deltas == [GREW, UNCHANGED, GREW, GREW]
    assert m._estimate.tokens == est("I'll check the weather in Paris.", '{"locati', 'on": "Paris"}')
    assert m.final_usage() == Usage(input_tokens=377, output_tokens=65)
    assert m.finished


def test_thinking_example_counts_thinking_not_signature():
    events = decode(THINKING)
    m = AnthropicStreamMeter()
    for e in events[:3]:
        m.feed(e)
    thinking = "The user asks for 27*453. 27*400=10800, 27*53=1431, total 12231."
    assert m.live_usage().output_tokens == est(thinking)
    assert m.feed(events[3]) == UNCHANGED  # signature_delta
    assert m.live_usage().output_tokens == est(thinking)
    for e in events[4:7]:
        m.feed(e)
    assert m.live_usage() == Usage(input_tokens=48, output_tokens=est(thinking, "27 × 453 = 12,231"))
    for e in events[7:]:
        m.feed(e)
    assert m.final_usage() == Usage(input_tokens=48, output_tokens=211)


def test_web_search_example_input_grows_and_searches_are_counted():
    events = decode(WEB_SEARCH)
    m = AnthropicStreamMeter()
    m.feed(events[0])
    assert m.live_usage() == Usage(input_tokens=2679, output_tokens=3)
    for e in events[1:-2]:
        m.feed(e)
    # running estimate: the query JSON plus the answer text ("°" is two UTF-8 bytes)
    expected_est = est('{"query": "weather NYC today"}', "It is 8°C and cloudy.")
    assert m.live_usage() == Usage(input_tokens=2679, output_tokens=max(3, expected_est))
    assert m.feed(events[-2]) == REPORTED
    final = m.final_usage()
    assert final == Usage(input_tokens=10682, output_tokens=510, web_search_requests=1)
    assert final.input_tokens == 10682  # replaced, not 2679 + 10682
    m.feed(events[-1])
    assert m.finished and m.final_usage() == final


@pytest.mark.parametrize("example", [TEXT_ONLY, TOOL_USE, THINKING, WEB_SEARCH])
def test_examples_byte_by_byte_give_the_same_usage(example):
    whole, _ = feed_all(decode(example))
    d = SSEDecoder()
    m = AnthropicStreamMeter()
    for b in example:
        for e in d.feed(bytes([b])):
            m.feed(e)
    for e in d.flush():
        m.feed(e)
    assert m.final_usage() == whole.final_usage()
    assert m.finished


# --- message_start: input and cache tokens ---------------------------------------------------

def test_message_start_cache_split_from_breakdown():
    m, _ = feed_all([start_ev(input_tokens=10, cache_creation_input_tokens=300, cache_read_input_tokens=40,
                              cache_creation={"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
                              output_tokens=1)])
    u = m.live_usage()
    assert u == Usage(input_tokens=10, cache_write_5m_tokens=100, cache_write_1h_tokens=200, cache_read_tokens=40,
                      output_tokens=1)
    assert u.total_input_tokens == 350 and u.total_tokens == 351


def test_message_start_without_breakdown_counts_all_writes_at_5m():
    m, _ = feed_all([start_ev(input_tokens=10, cache_creation_input_tokens=300, cache_read_input_tokens=40,
                              output_tokens=1)])
    assert m.live_usage() == Usage(input_tokens=10, cache_write_5m_tokens=300, cache_write_1h_tokens=0,
                                   cache_read_tokens=40, output_tokens=1)


def test_message_start_only_1h_writes():
    m, _ = feed_all([start_ev(input_tokens=3, cache_creation_input_tokens=500,
                              cache_creation={"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 500})])
    assert m.live_usage() == Usage(input_tokens=3, cache_write_1h_tokens=500)


def test_cache_totals_growing_in_message_delta_keep_the_1h_part_rest_at_5m():
    m, _ = feed_all([
        start_ev(input_tokens=10, cache_creation_input_tokens=300, cache_read_input_tokens=40,
                 cache_creation={"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}, output_tokens=1),
        msg_delta_ev(input_tokens=12, cache_creation_input_tokens=350, cache_read_input_tokens=60, output_tokens=9),
    ])
    assert m.final_usage() == Usage(input_tokens=12, cache_write_5m_tokens=150, cache_write_1h_tokens=200,
                                    cache_read_tokens=60, output_tokens=9)


def test_delta_with_only_output_keeps_input_and_cache_from_start():
    start = start_ev(input_tokens=10, cache_creation_input_tokens=300, cache_read_input_tokens=40,
                     cache_creation={"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
                     output_tokens=1)
    m, _ = feed_all([start, msg_delta_ev(output_tokens=77)])
    assert m.final_usage() == Usage(input_tokens=10, cache_write_5m_tokens=100, cache_write_1h_tokens=200,
                                    cache_read_tokens=40, output_tokens=77)


def test_usage_from_is_a_pure_overwrite_of_running_totals():
    prev = Usage(input_tokens=5, cache_write_5m_tokens=1, cache_write_1h_tokens=2, cache_read_tokens=3,
                 output_tokens=4, web_search_requests=1)
    assert usage_from({}, previous=prev) == prev
    assert usage_from(None, previous=prev) == prev
    assert usage_from({"output_tokens": 9}, previous=prev) == Usage(5, 1, 2, 3, 9, 1)
    assert usage_from({"input_tokens": None, "output_tokens": 9}, previous=prev) == Usage(5, 1, 2, 3, 9, 1)
    assert usage_from({"server_tool_use": {"web_search_requests": 4}}, previous=prev).web_search_requests == 4


# --- running totals: never a sum -------------------------------------------------------------

def test_several_message_deltas_final_is_the_last_total():
    text = "x" * 90  # estimate 30
    events = [start_ev(input_tokens=20, output_tokens=1), delta_ev("text_delta", text)]
    events += [msg_delta_ev(output_tokens=t) for t in (10, 20, 30, 40)]
    m, codes = feed_all(events + [STOP])
    assert codes[-5:-1] == [REPORTED] * 4
    assert m.final_usage() == Usage(input_tokens=20, output_tokens=40)  # not 100
    assert m.live_usage() == Usage(input_tokens=20, output_tokens=40)


def test_reported_total_below_the_estimate_is_what_settles():
    """The estimate errs high; the provider's number is the truth at the end (not max of both)."""
    text = "word " * 60  # 300 bytes: estimate 100
    m, _ = feed_all([start_ev(input_tokens=20, output_tokens=1), delta_ev("text_delta", text),
                     msg_delta_ev(output_tokens=60), STOP])
    assert m._estimate.tokens == 100
    assert m.final_usage() == Usage(input_tokens=20, output_tokens=60)


def test_input_growing_in_message_delta_replaces_the_start_figure():
    m, _ = feed_all([start_ev(input_tokens=2679, output_tokens=3),
                     msg_delta_ev(input_tokens=5000, output_tokens=100),
                     msg_delta_ev(input_tokens=10682, output_tokens=510,
                                  server_tool_use={"web_search_requests": 2})])
    assert m.final_usage() == Usage(input_tokens=10682, output_tokens=510, web_search_requests=2)


def test_web_search_requests_are_a_running_total_too():
    m, _ = feed_all([start_ev(input_tokens=5),
                     msg_delta_ev(output_tokens=5, server_tool_use={"web_search_requests": 1}),
                     msg_delta_ev(output_tokens=6, server_tool_use={"web_search_requests": 3}),
                     msg_delta_ev(output_tokens=7)])
    assert m.final_usage().web_search_requests == 3


# --- final usage: reported vs estimated ------------------------------------------------------

def test_final_is_the_live_estimate_when_no_message_delta_came():
    texts = ["Hello, ", "world", "! How are you today?"]
    events = [start_ev(input_tokens=30, cache_read_input_tokens=7, output_tokens=1)]
    events += [delta_ev("text_delta", t) for t in texts]
    m, _ = feed_all(events)  # the stream ends here (cut, dropped, disconnect)
    assert not m.finished
    assert m.final_usage() == m.live_usage() == Usage(input_tokens=30, cache_read_tokens=7,
                                                      output_tokens=est(*texts))


def test_final_keeps_a_reported_output_above_the_estimate_without_delta():
    # message_start may already report some output; the live figure is never below it
    m, _ = feed_all([start_ev(input_tokens=5, output_tokens=3), delta_ev("text_delta", "ab")])
    assert m.final_usage().output_tokens == 3


def test_reported_delta_wins_even_when_it_is_below_the_estimate_and_before_more_deltas():
    # a message_delta was seen: final is the reported usage exactly
    m, _ = feed_all([start_ev(input_tokens=5, output_tokens=1), delta_ev("text_delta", "x" * 300),
                     msg_delta_ev(output_tokens=12)])
    assert m.final_usage() == Usage(input_tokens=5, output_tokens=12)
    assert m.live_usage().output_tokens == 100  # live stays conservative while the stream is open


def test_error_event_records_its_type_and_keeps_the_estimate():
    m, codes = feed_all([start_ev(input_tokens=9, output_tokens=1), delta_ev("text_delta", "abcdef"),
                         ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})])
    assert codes[-1] == UNCHANGED
    assert m.upstream_error == "overloaded_error" and not m.finished
    assert m.final_usage() == Usage(input_tokens=9, output_tokens=2)


def test_events_before_message_start_do_not_start_a_message():
    m, _ = feed_all([PING, ev("content_block_start", {"type": "content_block_start"})])
    assert not m.started and m.final_usage() == Usage()


# --- malformed input never raises ------------------------------------------------------------

BAD_DATA = ["", "not json", "{", '{"type":', "null", "[]", "[1, 2]", "42", '"a string"', "true",
            '{"delta": null}', '{"delta": "text"}', '{"delta": []}', '{"delta": {"type": ["x"]}}',
            '{"delta": {"type": {"a": 1}}}', '{"delta": {"type": "text_delta"}}',
            '{"delta": {"type": "text_delta", "text": 5}}', '{"delta": {"type": "text_delta", "text": null}}',
            '{"delta": {"type": "text_delta", "text": ["a"]}}', '{"delta": {"type": "bogus_delta", "text": "abc"}}',
            '{"message": null}', '{"message": []}', '{"message": {"usage": "x"}}', '{"message": {"usage": [1]}}',
            '{"message": {"usage": {"input_tokens": "12", "output_tokens": -4, "cache_creation": "x"}}}',
            '{"message": {"usage": {"cache_creation_input_tokens": 5, "cache_creation": {"ephemeral_1h_input_tokens": "x"}}}}',
            '{"usage": null}', '{"usage": [1]}', '{"usage": "x"}',
            '{"usage": {"output_tokens": 1.5, "input_tokens": true, "server_tool_use": 3}}',
            '{"usage": {"server_tool_use": {"web_search_requests": "many"}}}',
            '{"error": null}', '{"error": "x"}', '{"error": {}}', "\ufffd\ufffd"]
EVENT_NAMES = ["message_start", "content_block_delta", "message_delta", "error", "message_stop", "ping",
               "content_block_start", "unknown_future_event", None, ""]


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_malformed_data_never_raises(name):
    for data in BAD_DATA:
        for prefix in ([], [start_ev(input_tokens=10, output_tokens=1)]):
            m = AnthropicStreamMeter()
            for e in prefix:
                m.feed(e)
            code = m.feed(SSEEvent(name, data, b""))
            assert code in (UNCHANGED, GREW, REPORTED)
            live, final = m.live_usage(), m.final_usage()
            assert isinstance(live, Usage) and isinstance(final, Usage)
            assert all(v >= 0 for v in final.as_dict().values())
            if prefix and name != "message_start" and '"input_tokens"' not in data:
                assert live.input_tokens == 10  # garbage never erases what was reported


def test_malformed_message_start_still_starts_the_message():
    m = AnthropicStreamMeter()
    assert m.feed(SSEEvent("message_start", "{garbage", b"")) == REPORTED
    assert m.started and m.final_usage() == Usage()


def test_malformed_numbers_count_as_zero():
    m, _ = feed_all([ev("message_start", '{"message": {"usage": {"input_tokens": "12", "output_tokens": -4,'
                                         ' "cache_read_input_tokens": 2.5, "cache_creation_input_tokens": true}}}')])
    assert m.live_usage() == Usage()


def test_malformed_error_event_is_still_an_upstream_error():
    m, _ = feed_all([ev("error", "not json")])
    assert m.upstream_error == "error"


@pytest.mark.parametrize("name", ["content_block_delta", "message_delta", "message_start", "error"])
def test_deeply_nested_json_never_raises(name):
    # json.loads raises RecursionError (not a ValueError) on deep nesting
    m = AnthropicStreamMeter()
    m.feed(start_ev(input_tokens=10, output_tokens=1))
    assert m.feed(SSEEvent(name, "[" * 100_000, b"")) in (UNCHANGED, REPORTED)
    assert m.live_usage().input_tokens == (0 if name == "message_start" else 10)


def test_lone_surrogate_escape_in_a_text_delta_never_raises():
    # valid JSON; str.encode() would raise UnicodeEncodeError on the decoded lone surrogate
    m = AnthropicStreamMeter()
    m.feed(start_ev(input_tokens=3))
    data = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi \\ud83d"}}'
    assert m.feed(SSEEvent("content_block_delta", data, b"")) == GREW
    assert m.live_usage().output_tokens >= 2


# --- the cut event ---------------------------------------------------------------------------

def test_cut_event_is_one_complete_sse_error_event():
    raw = cut_event("budget exceeded mid-stream: the tokens budget of key 'a' ran out")
    d = SSEDecoder()
    events = d.feed(raw)
    assert len(events) == 1 and d.pending == b"" and events[0].raw == raw
    body = json.loads(events[0].data)
    assert events[0].event == "error"
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("budget exceeded mid-stream")
    assert body["error"]["details"] == {"error_code": "budget_exceeded"}


# --- properties ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(totals=st.lists(st.integers(0, 5000), min_size=1, max_size=12).map(sorted),
       inputs=st.lists(st.one_of(st.none(), st.integers(0, 20000)), min_size=12, max_size=12),
       start_input=st.integers(0, 20000),
       texts=st.lists(st.text(max_size=40), max_size=10))
def test_final_output_is_the_last_running_total(totals, inputs, start_input, texts):
    events = [start_ev(input_tokens=start_input, output_tokens=1)]
    events += [delta_ev("text_delta", t) for t in texts]
    last_input = start_input
    for total, inp in zip(totals, inputs):
        usage: dict[str, int] = {"output_tokens": total}
        if inp is not None:
            usage["input_tokens"] = inp
            last_input = inp
        events.append(msg_delta_ev(**usage))
    m, _ = feed_all(events + [STOP])
    assert m.final_usage().output_tokens == totals[-1]
    assert m.final_usage().input_tokens == last_input
    assert m.finished


def _noise() -> st.SearchStrategy[SSEEvent]:
    return st.one_of(
        st.just(PING),
        st.builds(lambda n, d: SSEEvent(n, d, b""),
                  st.sampled_from(["unknown_future_event", "content_block_start", "content_block_stop", "ping"]),
                  st.sampled_from(['{"type":"ping"}', '{"type":"x","usage":{"output_tokens":99999}}', "junk", ""])),
        st.builds(lambda d: SSEEvent(None, d, b""), st.sampled_from(['{"usage":{"output_tokens":5}}', "x"])),
    )


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(max_size=30), max_size=8),
       kinds=st.lists(st.sampled_from(["text_delta", "input_json_delta", "thinking_delta", "signature_delta"]),
                      min_size=8, max_size=8),
       totals=st.lists(st.integers(0, 3000), max_size=4).map(sorted),
       noise=st.lists(_noise(), max_size=12),
       seed=st.integers(0, 2**32 - 1))
def test_pings_and_unknown_events_anywhere_change_nothing(texts, kinds, totals, noise, seed):
    base = [start_ev(input_tokens=17, cache_read_input_tokens=4, output_tokens=1)]
    base += [delta_ev(k, t) for t, k in zip(texts, kinds)]
    base += [msg_delta_ev(output_tokens=t) for t in totals]
    clean, clean_codes = feed_all(base)
    rnd = random.Random(seed)
    noisy = list(base)
    for n in noise:
        noisy.insert(rnd.randint(0, len(noisy)), n)
    m, codes = feed_all(noisy)
    assert m.live_usage() == clean.live_usage()
    assert m.final_usage() == clean.final_usage()
    assert m.started and not m.finished and m.upstream_error is None
    # noise events never report or grow anything
    assert [c for e, c in zip(noisy, codes) if e in noise and e not in base].count(UNCHANGED) == \
        len([e for e in noisy if e in noise and e not in base])
    counted = [t for t, k in zip(texts, kinds) if k != "signature_delta"]
    expected_out = totals[-1] if totals else max(1, est(*counted))
    assert m.final_usage().output_tokens == expected_out


# --- the text-delta fast path (read without a JSON parse) ------------------------------------

from proxy.providers.anthropic import _plain_text_delta  # noqa: E402


def compact_text_delta(text: str, index: int = 0, ensure_ascii: bool = True) -> str:
    return json.dumps({"type": "content_block_delta", "index": index,
                       "delta": {"type": "text_delta", "text": text}},
                      separators=(",", ":"), ensure_ascii=ensure_ascii)


@given(st.text(max_size=80), st.integers(0, 10_000), st.booleans())
@settings(max_examples=300)
def test_fast_text_delta_is_the_parsed_text_or_declines(text, index, ensure_ascii):
    data = compact_text_delta(text, index, ensure_ascii)
    got = _plain_text_delta(data)
    if got is not None:
        assert got == json.loads(data)["delta"]["text"] == text
    # It declines only where the JSON string has escapes.
    if "\\" not in data:
        assert got == text


@given(st.text(alphabet=st.sampled_from('ab"\\}{,:x0 '), max_size=40))
@settings(max_examples=300)
def test_fast_text_delta_never_reads_a_different_text_than_the_parser(tail):
    """Any data with the canonical head: where the fast path answers and the JSON is valid,
    the parser finds the same text; where the JSON is invalid, counting it errs high, never low."""
    data = '{"type":"content_block_delta","index":' + tail
    got = _plain_text_delta(data)
    if got is None:
        return
    try:
        parsed = json.loads(data)
    except ValueError:
        return
    assert parsed["delta"]["text"] == got


def test_meter_counts_the_same_with_and_without_the_fast_path():
    texts = ["Hello", " wörld ✓", 'say "hi"', "line\nbreak", "", "x" * 50]
    compact = [SSEEvent("content_block_delta", compact_text_delta(t, ensure_ascii=False), b"") for t in texts]
    assert sum(_plain_text_delta(e.data) is not None for e in compact) == 4  # the quote and the newline decline
    fast, _ = feed_all(compact)
    parsed, _ = feed_all([delta_ev("text_delta", t) for t in texts])
    assert fast.live_output_tokens() == parsed.live_output_tokens() == est(*texts)


# --- feed_events: the batch loop the relay drives -------------------------------------------

from proxy.meter import feed_events as feed_events_one_by_one  # noqa: E402

_event_st = st.one_of(
    st.builds(lambda t: SSEEvent("content_block_delta", compact_text_delta(t, ensure_ascii=False), b""),
              st.text(max_size=30)),
    st.builds(lambda t: delta_ev("text_delta", t), st.text(max_size=30)),
    st.builds(lambda t: delta_ev("input_json_delta", t), st.text(max_size=30)),
    st.builds(lambda n: start_ev(input_tokens=10, output_tokens=n), st.integers(0, 40)),
    st.builds(lambda n: msg_delta_ev(output_tokens=n), st.integers(0, 80)),
    st.just(SSEEvent("ping", '{"type":"ping"}', b"")),
    st.just(SSEEvent("content_block_delta", "not json", b"")),
)


@given(st.lists(_event_st, max_size=25), st.lists(st.integers(-1, 60), min_size=1, max_size=25))
@settings(max_examples=250)
def test_anthropic_feed_events_stops_where_feeding_one_by_one_does(events, rooms):
    fast, slow = AnthropicStreamMeter(), AnthropicStreamMeter()
    i = j = 0
    for room in rooms * (len(events) + 1):
        if i >= len(events):
            break
        i, a = fast.feed_events(events, i, room)
        j, b = feed_events_one_by_one(slow, events, j, room)
        assert (i, a) == (j, b)
        assert fast.live_usage() == slow.live_usage()
        if a == GREW:
            assert fast.live_output_tokens() > room
    assert fast.final_usage() == slow.final_usage() and fast.finished == slow.finished


# --- the usage of a whole (non-streamed) reply ----------------------------------------------

from proxy.providers.anthropic import usage_from_response  # noqa: E402

_json_leaf = st.one_of(st.integers(0, 10**6), st.text(max_size=12), st.none(), st.booleans())
_json_value = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["usage", "text", "input_tokens", "output_tokens", "a"]), inner, max_size=4)),
    max_leaves=12)
_usage_obj = st.fixed_dictionaries({}, optional={"input_tokens": st.integers(0, 10**6),
                                                 "output_tokens": st.integers(0, 10**6),
                                                 "cache_read_input_tokens": st.integers(0, 10**6)})


@given(st.dictionaries(st.sampled_from(["id", "content", "usage", "model", "stop_reason", "x"]), _json_value,
                       max_size=5),
       st.one_of(st.none(), _usage_obj), st.booleans(), st.sampled_from([(",", ":"), (", ", ": ")]))
@settings(max_examples=300)
def test_reply_usage_is_what_a_full_parse_finds(members, usage, usage_last, separators):
    body = dict(members)
    if usage is not None:
        body.pop("usage", None)
        body = {**body, "usage": usage} if usage_last else {"usage": usage, **body}
    raw = json.dumps(body, separators=separators, ensure_ascii=False).encode()
    full = body.get("usage")
    expected = usage_from(full) if isinstance(full, dict) else None
    got = usage_from_response(raw)
    assert (None if got is None else got[0]) == expected


# --- runs of text deltas (SSEDecoder(runs=TEXT_DELTA_RUNS)) ----------------------------------

from proxy.providers.anthropic import TEXT_DELTA_RUNS  # noqa: E402
from proxy.sse import SSERun  # noqa: E402


def drive(events: list, rooms: list[int]) -> list[tuple[int, int, int]]:
    """The relay's loop: meter until a decision (the meter splits runs where one passes the room).
    Returns each stop as (events metered so far, counted one by one; signal; live output)."""
    meter, events, done, stops, k = AnthropicStreamMeter(), list(events), 0, [], 0
    while done < len(events):
        done, grew = meter.feed_events(events, done, rooms[k % len(rooms)])
        k += 1
        metered = sum(e.count if type(e) is SSERun else 1 for e in events[:done])
        stops.append((metered, grew, meter.live_output_tokens()))
    return stops


def sse_block(ev: SSEEvent) -> bytes:
    return f"event: {ev.event}\ndata: {ev.data}\n\n".encode()


@given(st.lists(st.one_of(
    st.builds(lambda t: SSEEvent("content_block_delta", compact_text_delta(t, ensure_ascii=False), b""),
              st.text(max_size=30)),
    st.builds(lambda t: SSEEvent("content_block_delta", compact_text_delta(t, ensure_ascii=False), b""),
              st.text(alphabet="abc ", max_size=30)),
    st.builds(lambda t, i: SSEEvent("content_block_delta", compact_text_delta(t, i), b""),  # (a run is one index)
              st.text(alphabet="abc ", max_size=30), st.sampled_from([1, 9, 10, 12345])),
    st.builds(lambda n: start_ev(input_tokens=10, output_tokens=n), st.integers(0, 40)),
    st.builds(lambda n: msg_delta_ev(output_tokens=n), st.integers(0, 80)),
    st.just(SSEEvent("ping", '{"type":"ping"}', b"")),
), max_size=40), st.lists(st.integers(-1, 120), min_size=1, max_size=8))
@settings(max_examples=200)
def test_runs_of_text_deltas_meter_and_stop_as_single_events_do(events, rooms):
    stream = b"".join(sse_block(e) for e in events)
    singles = SSEDecoder().feed(stream)
    grouped = SSEDecoder(runs=TEXT_DELTA_RUNS).feed(stream)
    assert drive(grouped, rooms) == drive(singles, rooms)


@given(st.lists(st.one_of(
    st.builds(lambda t, i: SSEEvent("content_block_delta", compact_text_delta(t, i, ensure_ascii=False), b""),
              st.text(max_size=12), st.sampled_from([0, 1, 10])),
    st.builds(lambda t: SSEEvent("content_block_delta", compact_text_delta(t), b""), st.text(alphabet="ab ", max_size=9)),
    st.builds(lambda t: SSEEvent("content_block_delta", compact_text_delta(t).replace(',"delta"', ', "delta"'), b""),
              st.text(alphabet="ab", max_size=3)),
    st.builds(lambda n: start_ev(input_tokens=10, output_tokens=n), st.integers(0, 40)),
    st.just(SSEEvent("content_block_start", '{"type":"content_block_start","index":0,'
                                            '"content_block":{"type":"text","text":""}}', b"")),
    st.just(SSEEvent("ping", '{"type":"ping"}', b"")),
), max_size=30), st.integers(0, 3))
@settings(max_examples=250)
def test_the_fast_run_reader_reads_what_the_run_pattern_reads(events, trailing):
    """read_text_delta_run answers from counts; wherever a run could start, its answer must be the
    possessive pattern's, run end and key."""
    from proxy.providers.anthropic import _read_run_exactly, read_text_delta_run

    stream = b"".join(sse_block(e) for e in events) + b"event: content_block_delta\ndata: {"[:trailing * 9]
    end = stream.rfind(b"\n\n") + 2
    pos = 0
    for e in events:
        assert read_text_delta_run(stream, pos, end) == _read_run_exactly(stream, pos, end)
        pos += len(sse_block(e))


def test_the_fast_run_reader_answers_a_clean_run_without_the_pattern(monkeypatch):
    import proxy.providers.anthropic as anthropic

    def pattern(*args):
        raise AssertionError("the pattern was asked")

    monkeypatch.setattr(anthropic, "_read_run_exactly", pattern)
    deltas = b"".join(sse_block(SSEEvent("content_block_delta", compact_text_delta(f"word {i} "), b""))
                      for i in range(50))
    stream = sse_block(start_ev(input_tokens=3, output_tokens=1)) + deltas + b"event: content_block_stop\ndata: {}\n\n"
    pos = len(stream) - len(deltas) - len(b"event: content_block_stop\ndata: {}\n\n")
    assert anthropic.read_text_delta_run(stream, pos, len(stream)) == (pos + len(deltas), b"0", 50)
    assert anthropic.read_text_delta_run(stream, 0, len(stream)) is None  # (not a delta: no pattern needed)


def test_a_run_with_bytes_that_are_not_utf8_is_counted_event_by_event():
    """The decoder replaces each invalid byte with U+FFFD (3 bytes): a run's raw byte count would
    count it as 1. Split multi-byte characters across events likewise."""
    head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
    stream = head + b'ab\xffcd"}}\n\n' + head + b'\xe2\x82"}}\n\n' + head + b'\xac ok"}}\n\n'
    singles = SSEDecoder().feed(stream)
    grouped = SSEDecoder(runs=TEXT_DELTA_RUNS).feed(stream)
    assert len(grouped) == 1 and type(grouped[0]) is SSERun
    for rooms in ([1000], [0], [2, 3]):
        assert drive(grouped, rooms) == drive(singles, rooms)
    texts = [json.loads(e.data)["delta"]["text"] for e in singles]
    raw_text_bytes = 5 + 2 + 4  # what counting the run's bytes would give: ceil(11 / 3) = 4 tokens
    assert drive(singles, [1000])[-1][2] == est(*texts) == 6 > -(-raw_text_bytes // 3)
