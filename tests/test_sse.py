"""Tests for proxy.sse, the sans-IO SSE decoder.

The tests/protocol_streams.py streams are fed whole, byte by byte and split at every point (h11's habit)
and checked against their own event:/data: lines; generated streams are checked against the
events they were built from; arbitrary bytes are checked against their own whole-input decode.
Every run checks `joined raw + pending == bytes fed` after each call.

Hypothesis budget (the three generated tests below take ~13 s together at load average 8 on
2 cores; they took ~29 s at 600/1000/500 examples, nearly all of it Hypothesis
drawing data (--hypothesis-show-statistics), not the decoder; each run draws fresh examples, and
the parametrized tests split the protocol streams at every byte):
  * test_generated_streams_any_chunking: 300 examples. Streams of up to 12 blocks of up to
    5 lines plus an unterminated tail (observed: up to ~700 bytes), every line with its own
    ending style, values with any Unicode incl. U+2028/U+0085; split into 1-16 byte pieces
    or at up to 40 random points.
  * test_fuzz_bytes: 400 examples, each decoded with the default cap and with a 64-byte cap
    (which trips in most of them). Input: st.binary(max_size=4096) (Hypothesis keeps these
    short) or runs of SSE-ish snippets truncated to 4096 bytes (median ~700). Largest input
    generated: 4096 bytes.
  * test_runs_expand_to_exactly_the_events_a_decoder_without_runs_emits: 200 examples.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sse import SSEDecoder, SSEError, SSEEvent

DEFAULT_CAP = 8 * 1024 * 1024

from tests.protocol_streams import TEXT_ONLY, TOOL_USE, THINKING, WEB_SEARCH, MID_STREAM_ERROR, STREAMS  # noqa: F401



def decode(chunks, cap: int = DEFAULT_CAP) -> tuple[list[SSEEvent], bytes]:
    """Feed chunks then flush; check the raw invariant after every call. Returns the events
    and what is left pending."""
    decoder = SSEDecoder(cap)
    events: list[SSEEvent] = []
    fed = bytearray()
    emitted = bytearray()  # b"".join(e.raw for e in events), kept incrementally
    for chunk in chunks:
        got = decoder.feed(chunk)
        events += got
        emitted += b"".join(e.raw for e in got)
        fed += chunk
        assert emitted + decoder.pending == fed
    got = decoder.flush()
    events += got
    emitted += b"".join(e.raw for e in got)
    assert emitted + decoder.pending == fed
    return events, decoder.pending


def events_of(chunks, cap: int = DEFAULT_CAP) -> list[SSEEvent]:
    return decode(chunks, cap)[0]


def bytewise(payload: bytes) -> list[bytes]:
    return [payload[i:i + 1] for i in range(len(payload))]


def with_endings(payload: bytes, ending: bytes) -> bytes:
    return payload.replace(b"\n", ending)


# --- real Anthropic streams -------------------------------------------------------------

@pytest.mark.parametrize("name", STREAMS)
def test_anthropic_stream_whole(name):
    payload = STREAMS[name]
    decoder = SSEDecoder()
    events = decoder.feed(payload)
    assert decoder.pending == b""
    assert decoder.flush() == []
    # Oracle independent of the decoder: the fixture's own event:/data: line pairs.
    pairs = re.findall(rb"^event: (\S+)\ndata: (.*)\n\n", payload, re.M)
    assert len(pairs) == payload.count(b"event:") > 0
    assert [(e.event, e.data) for e in events] == [(n.decode(), d.decode()) for n, d in pairs]
    for e in events:
        assert json.loads(e.data)["type"] == e.event
        assert e.raw == f"event: {e.event}\ndata: {e.data}\n\n".encode()


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("name", STREAMS)
def test_anthropic_stream_any_chunking(name, ending):
    payload = with_endings(STREAMS[name], ending)
    whole = events_of([payload])
    assert [(e.event, e.data) for e in whole] == [(e.event, e.data) for e in events_of([STREAMS[name]])]
    assert [e.raw for e in whole] == [with_endings(e.raw, ending) for e in events_of([STREAMS[name]])]
    assert events_of(bytewise(payload)) == whole
    for i in range(1, len(payload)):
        assert events_of([payload[:i], payload[i:]]) == whole, i


def test_cr_only_stream_holds_last_event_until_next_byte_or_flush():
    # A final CR may be the first half of a CRLF, so it does not end the line yet.
    payload = with_endings(TEXT_ONLY, b"\r")
    decoder = SSEDecoder()
    events = decoder.feed(payload)
    assert [e.event for e in events][-1] == "message_delta"
    assert decoder.pending == b'event: message_stop\rdata: {"type":"message_stop"}\r\r'
    [last] = decoder.flush()
    assert last.event == "message_stop" and decoder.pending == b""


# --- line endings -----------------------------------------------------------------------

def test_crlf_split_across_feeds_is_one_line_ending():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: a\r") == []
    assert decoder.feed(b"\ndata: 1\r") == []
    assert decoder.feed(b"\n\r") == []  # the blank line's CR might still be followed by LF
    [event] = decoder.feed(b"\n")
    assert event == SSEEvent("a", "1", b"event: a\r\ndata: 1\r\n\r\n")
    assert decoder.pending == b""
    assert decoder.feed(b"\r") == [] and decoder.feed(b"\n") == []  # a lone blank line, no event
    assert decoder.flush() == [] and decoder.pending == b"\r\n"


def test_lone_cr_blank_line_completes_on_next_non_lf_byte():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == []
    [event] = decoder.feed(b"d")
    assert event == SSEEvent(None, "x", b"data: x\r\r")
    assert decoder.pending == b"d"


def test_mixed_line_endings_in_one_event():
    payload = b"event: e\rdata: a\r\ndata: b\ndata: c\r\r\n"
    assert events_of([payload]) == [SSEEvent("e", "a\nb\nc", payload)]
    assert events_of(bytewise(payload)) == [SSEEvent("e", "a\nb\nc", payload)]


def test_lf_then_cr_is_two_line_endings():
    # "\n\r" is LF (ends the data line) then CR (a blank line), not one ending.
    assert events_of([b"data: x\n\rdata: y\n\n"]) == [
        SSEEvent(None, "x", b"data: x\n\r"), SSEEvent(None, "y", b"data: y\n\n")]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_unicode_line_separators_are_not_line_breaks(sep):
    data = json.dumps({"type": "content_block_delta", "delta": {"text": f"a{sep}b"}}, ensure_ascii=False)
    payload = f"event: content_block_delta\ndata: {data}\n\n".encode()
    expected = [SSEEvent("content_block_delta", data, payload)]
    assert events_of([payload]) == expected
    assert events_of(bytewise(payload)) == expected
    assert json.loads(expected[0].data)["delta"]["text"] == f"a{sep}b"


def test_multibyte_character_split_across_feeds():
    payload = 'event: content_block_delta\ndata: {"text":"27 × 453 = 8°C 😀"}\n\n'.encode()
    expected = [SSEEvent("content_block_delta", '{"text":"27 × 453 = 8°C 😀"}', payload)]
    for char in ("×", "°", "😀"):
        at = payload.index(char.encode())
        for i in range(at + 1, at + len(char.encode())):  # every cut inside the character
            assert events_of([payload[:i], payload[i:]]) == expected


def test_invalid_utf8_is_replaced_not_raised():
    payload = b"event: \xff\xfe\ndata: a\xe2\x80b\xc3\n\n"
    assert events_of([payload]) == [SSEEvent("\ufffd\ufffd", "a\ufffdb\ufffd", payload)]
    assert events_of(bytewise(payload)) == events_of([payload])


# --- fields -----------------------------------------------------------------------------

def test_multi_line_data_is_joined_with_lf():
    payload = b"data: first\ndata:\ndata:  indented\ndata: last\n\n"
    assert events_of([payload]) == [SSEEvent(None, "first\n\n indented\nlast", payload)]


def test_event_without_space_and_only_one_space_stripped():
    assert events_of([b"event:ping\ndata:{}\n\n"]) == [SSEEvent("ping", "{}", b"event:ping\ndata:{}\n\n")]
    [e] = events_of([b"event:  two\ndata:   three \n\n"])
    assert (e.event, e.data) == (" two", "  three ")


def test_last_event_line_wins():
    [e] = events_of([b"event: a\nevent: b\ndata: x\n\n"])
    assert e.event == "b"


def test_comments_are_carried_into_the_next_event_raw():
    payload = b": hello\n\n:keep-alive\n\nevent: ping\n: inside\ndata: {}\n\n: trailing\n"
    decoder = SSEDecoder()
    [event] = decoder.feed(payload)
    assert event == SSEEvent("ping", "{}", b": hello\n\n:keep-alive\n\nevent: ping\n: inside\ndata: {}\n\n")
    assert decoder.pending == b": trailing\n"
    assert decoder.flush() == [] and decoder.pending == b": trailing\n"


def test_comment_only_stream_yields_no_event():
    payload = b": a\n\n: b\r\n\r\n:\r\r"
    assert decode([payload]) == ([], payload)
    assert decode(bytewise(payload)) == ([], payload)


def test_unknown_fields_are_ignored_but_kept_in_raw():
    payload = b"id: 7\nretry: 100\nfoo: bar\nData: no\nevents: no\ndata : no\nevent: e\ndata: d\n\n"
    assert events_of([payload]) == [SSEEvent("e", "d", payload)]


def test_block_with_only_id_or_retry_is_not_an_event():
    payload = b"id: 1\n\nretry: 5\n\ndata: x\n\n"
    assert events_of([payload]) == [SSEEvent(None, "x", payload)]


def test_field_name_without_colon_has_empty_value():
    assert events_of([b"data\n\n"]) == [SSEEvent(None, "", b"data\n\n")]
    assert events_of([b"event\n\n"]) == [SSEEvent("", "", b"event\n\n")]
    assert events_of([b"data\ndata\n\n"]) == [SSEEvent(None, "\n", b"data\ndata\n\n")]


def test_event_field_alone_is_an_event():
    assert events_of([b"event: message_stop\n\n"]) == [SSEEvent("message_stop", "", b"event: message_stop\n\n")]


def test_extra_blank_lines_are_carried():
    payload = b"\n\n\ndata: x\n\n\n\r\n"
    assert decode([payload]) == ([SSEEvent(None, "x", b"\n\n\ndata: x\n\n")], b"\n\r\n")


def test_empty_feeds_are_harmless():
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == [] and decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [SSEEvent(None, "x", b"data: x\n\n")]


def test_accepts_bytearray_and_memoryview():
    decoder = SSEDecoder()
    assert decoder.feed(bytearray(b"data: a\n")) == []
    assert decoder.feed(memoryview(b"\ndata: b\n\n")) == [
        SSEEvent(None, "a", b"data: a\n\n"), SSEEvent(None, "b", b"data: b\n\n")]


# --- flush ------------------------------------------------------------------------------

def test_flush_emits_event_whose_blank_line_never_came():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: message_delta\ndata: {}\n") == []
    assert decoder.flush() == [SSEEvent("message_delta", "{}", b"event: message_delta\ndata: {}\n")]
    assert decoder.pending == b""


def test_flush_counts_an_unterminated_last_line():
    assert decode([b"data: a\ndata: b"]) == ([SSEEvent(None, "a\nb", b"data: a\ndata: b")], b"")
    assert decode([b": c\nevent: e"]) == ([SSEEvent("e", "", b": c\nevent: e")], b"")


def test_flush_keeps_non_event_bytes_pending():
    assert decode([b"data: a\n\n: bye\nid: 3"]) == ([SSEEvent(None, "a", b"data: a\n\n")], b": bye\nid: 3")
    assert decode([b""]) == ([], b"")
    assert decode([]) == ([], b"")


# --- bounded memory ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 7, 100, 1024, 5000])
def test_line_that_never_ends_raises_once_pending_exceeds_cap(size):
    cap = 1024
    decoder = SSEDecoder(max_event_bytes=cap)
    stream = b"data: " + b"x" * 10_000
    fed = 0
    with pytest.raises(SSEError, match="max_event_bytes=1024"):
        for i in range(0, len(stream), size):
            chunk = stream[i:i + size]
            decoder.feed(chunk)
            fed += len(chunk)
            assert decoder.pending == stream[:fed]
            assert len(decoder.pending) <= cap
    assert fed <= cap < fed + size  # raised by the first feed that went over the cap


def test_after_an_error_every_call_raises_without_buffering():
    decoder = SSEDecoder(max_event_bytes=16)
    with pytest.raises(SSEError):
        decoder.feed(b"data: " + b"x" * 20)
    held = len(decoder.pending)
    for _ in range(3):
        with pytest.raises(SSEError):
            decoder.feed(b"\n\ndata: fine\n\n")
        with pytest.raises(SSEError):
            decoder.flush()
    assert len(decoder.pending) == held


def test_cap_is_inclusive_and_independent_of_chunking():
    event = b"data: " + b"x" * 10 + b"\n\n"  # 18 bytes
    assert events_of([event], cap=18) == [SSEEvent(None, "x" * 10, event)]
    assert events_of(bytewise(event), cap=18) == [SSEEvent(None, "x" * 10, event)]
    for chunks in ([event], bytewise(event)):
        with pytest.raises(SSEError, match="max_event_bytes=17"):
            events_of(chunks, cap=17)


def test_events_before_an_oversized_event_are_returned_first():
    small = b"event: message_delta\ndata: {}\n\n"
    big = b"data: " + b"x" * 100 + b"\n\n"
    decoder = SSEDecoder(max_event_bytes=64)
    assert decoder.feed(small + big + small) == [SSEEvent("message_delta", "{}", small)]
    with pytest.raises(SSEError, match="exceeds max_event_bytes=64"):
        decoder.feed(small)
    with pytest.raises(SSEError):
        decoder.flush()


def test_unterminated_overrun_behind_events_raises_on_next_call():
    small = b"data: {}\n\n"
    decoder = SSEDecoder(max_event_bytes=64)
    assert decoder.feed(small + b"data: " + b"x" * 100) == [SSEEvent(None, "{}", small)]
    assert decoder.pending == b"data: " + b"x" * 100  # the invariant still holds on this return
    with pytest.raises(SSEError, match="max_event_bytes=64"):
        decoder.flush()
    with pytest.raises(SSEError):
        decoder.feed(b"\n\n")


def test_comment_flood_is_bounded_too():
    # Comment-only blocks are carried into the next event's raw, so they count against the cap.
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEError):
        for _ in range(100):
            decoder.feed(b": keep-alive\n\n")
    assert len(decoder.pending) <= 100 + len(b": keep-alive\n\n")  # the cap plus the chunk that broke it


def test_cap_must_be_positive():
    with pytest.raises(ValueError):
        SSEDecoder(max_event_bytes=0)


# --- shape ------------------------------------------------------------------------------

def test_events_are_frozen_value_objects():
    event = SSEEvent("a", "b", b"c")
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


def test_module_is_pure():
    source = Path(__file__).resolve().parents[1] / "proxy" / "sse.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "re", "typing"}


# --- hypothesis: generated streams ------------------------------------------------------

_ENDINGS = ("\n", "\r\n", "\r")
_TRICKY = "\u2028\u2029\x85\x0b\x0c\x1c\x1e\x00 :é°×😀\ufeff"
_CHAR = st.one_of(st.characters(codec="utf-8", exclude_characters="\r\n"), st.sampled_from(_TRICKY))
_VALUE = st.text(_CHAR, max_size=12)


def _named(kind: str, value: str) -> tuple[str, tuple[str, str] | None]:
    return f"{kind}:{value}", (kind, value[1:] if value.startswith(" ") else value)


# A non-empty line and its effect on the event: ("data"|"event", value) or None.
_FIELD_LINE = st.one_of(
    st.tuples(st.sampled_from(["data", "data", "event"]), st.sampled_from(["", " "]), _VALUE)
    .map(lambda t: _named(t[0], t[1] + t[2])),
    st.sampled_from([("data", ("data", "")), ("event", ("event", ""))]),  # no colon: empty value
    _VALUE.map(lambda v: (":" + v, None)),  # comment
    st.tuples(st.sampled_from(["id", "retry", "foo", "Data", "EVENT", "dat", "events", "data ", "event\x00"]),
              st.sampled_from([None, ":", ": "]), _VALUE)
    .map(lambda t: (t[0] if t[1] is None else t[0] + t[1] + t[2], None)),  # ignored fields
)
_LINE = st.tuples(_FIELD_LINE, st.sampled_from(_ENDINGS))  # (line, effect), ending


@st.composite
def _stream(draw) -> tuple[bytes, list[SSEEvent], bytes]:
    """A serialised stream, the events it must decode to (feed + flush), and what must stay
    pending after flush. Blocks end with a blank line; an optional tail has none."""
    out = bytearray()
    expected: list[SSEEvent] = []
    start = 0
    prev_ending = ""

    def put(line: str, ending: str) -> None:
        nonlocal prev_ending
        if prev_ending == "\r" and line == "" and ending == "\n":
            ending = "\r\n"  # a bare "\n" here would merge with the CR before it into one CRLF
        out.extend((line + ending).encode())
        prev_ending = ending

    def close_event(fields: list[tuple[str, str]]) -> None:
        nonlocal start
        if not fields:
            return  # not an event: its bytes are carried into the next one
        names = [v for k, v in fields if k == "event"]
        datas = [v for k, v in fields if k == "data"]
        expected.append(SSEEvent(names[-1] if names else None, "\n".join(datas), bytes(out[start:])))
        start = len(out)

    blocks = draw(st.lists(st.tuples(st.lists(_LINE, max_size=5), st.sampled_from(_ENDINGS)), max_size=12))
    for lines, blank_ending in blocks:
        for (line, _), ending in lines:
            put(line, ending)
        put("", blank_ending)
        close_event([effect for (_, effect), _ in lines if effect])
    tail = draw(st.lists(_LINE, max_size=3))
    for (line, _), ending in tail:
        put(line, ending)
    effects = [effect for (_, effect), _ in tail if effect]
    last = draw(st.none() | _FIELD_LINE)
    if last is not None:
        out.extend(last[0].encode())  # unterminated: flush counts it as a line
        effects += [last[1]] if last[1] else []
    close_event(effects)
    return bytes(out), expected, bytes(out[start:])


@st.composite
def _chunks(draw, payload: bytes) -> list[bytes]:
    if draw(st.booleans()):  # fixed size pieces, down to single bytes
        size = draw(st.integers(1, 16))
        return [payload[i:i + size] for i in range(0, len(payload), size)]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=40))))
    return [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_streams_any_chunking(data):
    payload, expected, rest = data.draw(_stream())
    chunks = data.draw(_chunks(payload))
    assert b"".join(chunks) == payload
    assert decode([payload]) == (expected, rest)
    assert decode(chunks) == (expected, rest)


# --- hypothesis: arbitrary bytes --------------------------------------------------------

_TOKENS = st.sampled_from([b"data:", b"data", b"event:", b"event", b":", b" ", b"\r", b"\n", b"\r\n",
                           b"x", b"{}", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff", b"\xe2\x80", b"id: 1",
                           b"retry:", b"\x00", b"\n\n", b"\r\r", b"data: {}\n\n", b"event: e\n",
                           b"xxxxxxxx"])
# Hypothesis keeps plain binaries short, so most inputs are runs of a short SSE-ish snippet
# repeated many times: long lines, comment floods and many small events, up to 4096 bytes.
_SNIPPET = st.lists(st.one_of(_TOKENS, st.binary(max_size=8)), min_size=1, max_size=6).map(b"".join)
_RUN = st.tuples(_SNIPPET, st.integers(1, 64)).map(lambda t: t[0] * t[1])
_BYTES = st.one_of(st.binary(max_size=4096), st.lists(_RUN, max_size=8).map(lambda runs: b"".join(runs)[:4096]))


def outcome(chunks, cap: int) -> tuple[list[SSEEvent], bool]:
    """Events delivered before any SSEError, and whether one was raised. Checks the raw
    invariant and the memory bound after every call that returns."""
    decoder = SSEDecoder(cap)
    events: list[SSEEvent] = []
    fed = bytearray()
    emitted = bytearray()
    must_fail = False
    try:
        for chunk in chunks:
            got = decoder.feed(chunk)
            assert not must_fail, "an overrun deferred behind returned events must raise next"
            events += got
            emitted += b"".join(e.raw for e in got)
            fed += chunk
            assert emitted + decoder.pending == fed
            assert all(len(e.raw) <= cap for e in got)
            assert len(decoder.pending) <= cap or got  # over the cap only behind returned events
            assert len(decoder.pending) <= cap + len(chunk)
            must_fail = len(decoder.pending) > cap
        got = decoder.flush()
        assert not must_fail
        assert all(len(e.raw) <= cap for e in got)
        events += got
        emitted += b"".join(e.raw for e in got)
        assert emitted + decoder.pending == fed
    except SSEError as exc:
        assert f"max_event_bytes={cap}" in str(exc)
        return events, True
    return events, False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_bytes(data):
    payload = data.draw(_BYTES)
    chunks = data.draw(_chunks(payload))
    whole = outcome([payload], DEFAULT_CAP)
    assert whole[1] is False  # nothing this small can trip the default cap
    assert outcome(chunks, DEFAULT_CAP) == whole
    # With a small cap the error trips often; where it trips must not depend on chunking.
    assert outcome(chunks, 64) == outcome([payload], 64)


@pytest.mark.parametrize("chunk", [
    b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n",                       # all two-line blocks: one scan
    b"event: a\ndata: 1\n\n: comment\n\nevent: b\ndata: 2\n\n",          # a comment block between
    b"event: a\ndata: 1\n\nid: 7\nevent: b\ndata: 2\n\nevent: c\ndata: 3",  # an id line inside; a tail
    b"data: only\n\nevent: a\ndata: 1\ndata: 2\n\nevent: \ndata: \n\n",  # one-line, three-line, empty values
    b"event: a\ndata: \xff\xfe\n\nevent: \xe2\x82\ndata: x\n\n",           # invalid UTF-8 in value and name
])
def test_whole_chunks_decode_as_byte_by_byte_feeding_does(chunk):
    whole = SSEDecoder()
    got = whole.feed(chunk) + whole.flush()
    one = SSEDecoder()
    expected = [e for i in range(len(chunk)) for e in one.feed(chunk[i:i + 1])] + one.flush()
    assert got == expected
    assert b"".join(e.raw for e in got) + whole.pending == chunk


# --- runs: events a consumer takes in bulk --------------------------------------------------

import json as _json  # noqa: E402
import re as _re  # noqa: E402

from proxy.sse import SSERun, expand, run_reader, run_sizes, split  # noqa: E402

# Runs of deltas whose text has no escape, keyed by the first one's first letter (as TEXT_DELTA_RUNS
# keys a run by its content block's index): a run never mixes keys.
_RUNS = ("delta", run_reader(_re.compile(rb'event: delta\ndata: \{"text":"([a-z]?)[^"\\\n]*+"\}\n\n'
                                         rb'(?:event: delta\ndata: \{"text":"\1[^"\\\n]*+"\}\n\n)*+')))


def _delta_block(text: str) -> bytes:
    return b"event: delta\ndata: " + _json.dumps({"text": text}, ensure_ascii=False).replace(", ", ",").replace(
        ": ", ":").encode() + b"\n\n"


_RUN_BLOCK = st.one_of(
    st.text(max_size=8).map(_delta_block),                                   # a run member (unless escaped)
    st.text(max_size=8).map(lambda t: b"event: delta\ndata: " + _json.dumps({"text": t}).encode() + b"\n\n"),
    st.sampled_from([b"event: other\ndata: {}\n\n", b": ping\n\n", b"data: plain\n\n",
                     b"event: delta\ndata: {\"text\":1}\n\n", b"event: delta\ndata: a\ndata: b\n\n"]),
)


@given(st.lists(_RUN_BLOCK, max_size=20), st.lists(st.integers(1, 64), max_size=10), st.binary(max_size=6))
@settings(max_examples=200)
def test_runs_expand_to_exactly_the_events_a_decoder_without_runs_emits(blocks, cuts, tail):
    stream = b"".join(blocks) + tail.replace(b"\r", b"")
    chunks, at = [], 0
    for c in cuts:
        chunks.append(stream[at:at + c])
        at += c
    chunks.append(stream[at:])
    plain, grouped = SSEDecoder(), SSEDecoder(runs=_RUNS)
    want = [e for ch in chunks for e in plain.feed(ch)] + plain.flush()
    got = [e for ch in chunks for e in grouped.feed(ch)] + grouped.flush()
    flat = [e for item in got for e in (expand(item) if type(item) is SSERun else [item])]
    assert flat == want
    assert grouped.pending == plain.pending
    for item in got:
        if type(item) is SSERun:
            members = expand(item)
            assert item.event == "delta" and len(members) == item.count == len(run_sizes(item)) >= 1
            texts = [_json.loads(e.data)["text"] for e in members]
            first = texts[0].encode()[:1]
            assert item.key == (first if first.isalpha() and first.islower() else b"")
            assert all(t.encode().startswith(item.key) for t in texts)
            assert [len(e.raw) for e in members] == run_sizes(item)
            for k in range(len(members)):
                parts = split(item, k)
                assert [e for p in parts for e in (expand(p) if type(p) is SSERun else [p])] == members
                assert members[k] in parts and all(type(p) is SSERun or p == members[k] for p in parts)
    if len(chunks) == 1 and all(b.startswith(b"event: delta\ndata: {\"text\":\"") and b"\\" not in b
                                 for b in blocks) and blocks and not tail:
        keys = {b[len(b'event: delta\ndata: {"text":"'):][:1] for b in blocks}
        if len(keys) == 1 and keys <= {b'"', *(bytes([c]) for c in range(ord("a"), ord("z") + 1))}:
            assert len(got) == 1 and type(got[0]) is SSERun  # a whole chunk of one key is one run
