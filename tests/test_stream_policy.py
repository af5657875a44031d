"""The stream relay's policy without sockets or a store (proxy/stream_policy.py): recorded
Anthropic and OpenAI streams fed whole, byte by byte and split at every point; where a cut
lands; when the running charge is pushed, on an injected clock; how a stream ends; and a
hypothesis search over event sequences for the invariants the relay rests on."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxy import pricing as pricing_mod
from proxy.auth import Caller
from proxy.ledger import Admitted, Amounts, Denied, Limits, Scope
from proxy.providers import RequestFacts
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.openai import OpenAIAdapter
from proxy.relay import Call
from proxy.sse import SSEDecoder
from proxy.store.base import Reservation
from proxy.stream_policy import (CUT, ESTIMATE_TOLERANCE, PUSH, PUSH_INTERVAL_SECONDS, RECHECK, RELAY,
                                 StreamPolicy, capped, hold_room, stream_usage)
from proxy.usage import Usage
from tests import protocol_streams

REPLAY = Path(__file__).parent / "replay"
A, O = AnthropicAdapter(), OpenAIAdapter()
KEY_SCOPE = Scope("key", "alpha", "key:research/alpha", Limits(tokens=10**9, wall_clock=60.0), "day")
BIG = Amounts(10**9, 10**9, 10**9, 10**15, 1)
UNAVAILABLE = object()  # an answer: the store could not be reached


class Env:
    """What the policy reads of the app: an injected clock and the config generation."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.generation = 0

    def clock(self) -> float:
        return self.now


def no_cost(call: Any, u: Usage) -> int:
    return 0


def make_call(hold: Amounts = BIG, output_cap: int | None = None, deadline: float | None = None,
              input_estimate: int = 10, pushed_at: float = 100.0) -> Call:
    admitted = Admitted(hold._replace(input_tokens=input_estimate), hold.output_tokens, False)
    res = Reservation("r1", (KEY_SCOPE,), (0.0,), admitted, hold, deadline=deadline)
    return Call("req_1", Caller("research", "alpha", None), "claude-x", "/v1/messages", 0.0, None, res, None,
                pushed_at=pushed_at, output_cap=output_cap)


def make_policy(adapter: Any = A, call: Call | None = None, env: Env | None = None,
                wants_usage: bool = True, cost: Callable[[Any, Usage], int] = no_cost) -> StreamPolicy:
    call = call or make_call()
    facts = RequestFacts({}, "claude-x", call.output_cap, True, wants_usage)
    meter = adapter.new_meter(facts, call.res.admitted.hold.input_tokens, 3000)
    return StreamPolicy(call, meter, adapter, facts, env or Env(), cost)


def denial(dim: str = "output_tokens") -> Denied:
    return Denied(KEY_SCOPE, dim, 100, 100, 0, 1)


def grown(policy: StreamPolicy) -> Reservation:
    """The reservation as a store's charge leaves it: the hold grown to cover the push."""
    res = policy.call.res
    return res.with_charge(res.hold.max(policy.amounts), policy.amounts)


def store_like(limit: Amounts) -> Callable[[StreamPolicy, int], Any]:
    """A store's charge: the hold grows while the amounts stay within `limit`, else a denial."""
    def answer(policy: StreamPolicy, step: int) -> Any:
        if step == RECHECK:
            policy.call.generation = policy.state.generation  # (as Relay.recheck_limits does)
            return None
        if not policy.amounts.within(limit):
            return denial()
        return grown(policy)
    return answer


def drive(policy: StreamPolicy, chunks: list[bytes], answer: Callable[[StreamPolicy, int], Any] | None = None,
          last_known: bool = False, between: Callable[[int], None] | None = None) -> tuple[bytes, list]:
    """Relay.pump's IO loop, the IO left out: the client's body and the policy's decisions."""
    answer = answer or store_like(BIG)
    body: list[bytes] = []
    steps: list[tuple[int, Any]] = []
    for i, chunk in enumerate(chunks):
        if between is not None:
            between(i)
        step = policy.feed(chunk, last_known and i == len(chunks) - 1)
        while step in (PUSH, RECHECK):
            steps.append((step, policy.amounts if step == PUSH else None))
            got = answer(policy, step)
            if got is UNAVAILABLE:
                step = policy.store_unavailable()
            else:
                step = policy.charged(got) if step == PUSH else policy.rechecked(got)
        if step == CUT:
            steps.append((CUT, policy.denied))
            return b"".join(body) + policy.out, steps
        assert step == RELAY
        body.append(policy.out)
    policy.flush()
    return b"".join(body) + policy.end(), steps


def chunkings(data: bytes, every_split: bool = True):
    yield "whole", [data]
    yield "bytes", [data[i:i + 1] for i in range(len(data))]
    if every_split:
        for k in range(1, len(data)):
            yield f"split@{k}", [data[:k], data[k:]]


def boundaries(data: bytes) -> list[int]:
    """Where each event of `data` ends."""
    ends, at = [], 0
    for ev in SSEDecoder().feed(data):
        at += len(ev.raw)
        ends.append(at)
    return ends


ANTHROPIC_STREAMS = {name: protocol_streams.STREAMS[name] for name in ("text_only", "tool_use", "thinking")}
ANTHROPIC_STREAMS.update({p.name: p.read_bytes() for p in sorted(REPLAY.glob("a_*.sse"))})
OPENAI_STREAMS = {p.name: p.read_bytes() for p in sorted(REPLAY.glob("o_*.sse"))}


# --- a complete stream goes through byte for byte ---------------------------------------------

@pytest.mark.parametrize("provider,name", [("anthropic", n) for n in sorted(ANTHROPIC_STREAMS)]
                         + [("openai", n) for n in sorted(OPENAI_STREAMS)])
def test_a_complete_stream_is_relayed_byte_for_byte(provider, name):
    adapter, streams = {"anthropic": (A, ANTHROPIC_STREAMS), "openai": (O, OPENAI_STREAMS)}[provider]
    data = streams[name]
    small = len(data) < 4000
    for how, chunks in chunkings(data, every_split=small):
        if how == "bytes" and not small:
            continue
        policy = make_policy(adapter)
        body, steps = drive(policy, chunks)
        assert body == data, how
        assert steps == [] and policy.call.outcome == "completed", how


def test_the_usage_chunk_the_proxy_asked_for_is_not_relayed_to_a_client_that_did_not():
    data = OPENAI_STREAMS["o_stream_tool_call.sse"]
    usage_chunks = [ev.raw for ev in SSEDecoder().feed(data) if '"choices":[]' in ev.data]
    assert len(usage_chunks) == 1
    for how, chunks in chunkings(data):
        policy = make_policy(O, wants_usage=False)
        body, _ = drive(policy, chunks)
        assert body == data.replace(usage_chunks[0], b""), how
        assert policy.meter.usage_reported  # (metered all the same)


def test_the_last_chunk_waits_for_the_end_of_the_body():
    """A stream that arrives whole is settled before any of it is sent: the last chunk's bytes
    go out with the end of the body."""
    data = protocol_streams.TEXT_ONLY
    policy = make_policy(A)
    assert policy.feed(data[:100]) == RELAY and policy.out == b""  # (no event complete yet)
    assert policy.feed(data[100:], last=True) == RELAY and policy.out == b""
    policy.flush()
    assert policy.end() == data == policy.ending


# --- where a cut lands -----------------------------------------------------------------------

def deltas_stream(n: int, text: str = "abcdefghijk ") -> tuple[bytes, list[bytes]]:
    """message_start, n text deltas of `text`, message_delta, message_stop; and each event."""
    events = [protocol_streams.TEXT_ONLY.split(b"\n\n")[0] + b"\n\n"]
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    events += [b"event: content_block_delta\ndata: " + json.dumps(delta, separators=(",", ":")).encode() + b"\n\n"] * n
    events.append(b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
                  b'"usage":{"output_tokens":' + str(4 * n).encode() + b'}}\n\n')
    events.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    return b"".join(events), events


def test_the_cut_takes_the_place_of_the_event_that_ran_the_budget_out():
    """Each delta is 12 bytes, 4 estimated tokens: a store that admits 30 output tokens refuses
    the 8th delta (32 tokens), which is charged but never relayed."""
    data, events = deltas_stream(20)
    limit = BIG._replace(output_tokens=30)
    expected = b"".join(events[:8]) + A.cut_event(
        "budget exceeded mid-stream: the output_tokens budget of key 'alpha' of team 'research' ran out")
    for how, chunks in chunkings(data):
        policy = make_policy(A, make_call(hold=BIG._replace(output_tokens=10)))
        body, steps = drive(policy, chunks, store_like(limit))
        assert body == expected, how
        assert steps[-1] == (CUT, denial()) and policy.call.outcome == "cut"
        assert [s for s, _ in steps[:-1]] == [PUSH] * (len(steps) - 1)
        assert steps[-2][1].output_tokens == 32  # the refused push counts the 8th delta
        assert policy.meter.live_output_tokens() == 32  # and so does what settles


def test_a_denial_after_the_message_finished_does_not_cut_it():
    """The final message_delta reports more than the hold: there is nothing left to stop, and
    its reported usage settles as reported."""
    data, events = deltas_stream(3)
    data = data.replace(b'"output_tokens":12}', b'"output_tokens":5000}')
    env = Env()
    policy = make_policy(A, make_call(hold=BIG._replace(output_tokens=100)), env)
    stop = data.index(b"event: message_stop")

    def later(i: int) -> None:
        env.now += 2 * i  # (the push due at the end of the last chunk is refused)

    body, steps = drive(policy, [data[:stop], data[stop:]], lambda p, step: denial(), between=later)
    assert body == data and [s for s, _ in steps] == [PUSH] and policy.call.outcome == "completed"


def test_a_store_that_cannot_be_reached_cuts_the_stream():
    data, events = deltas_stream(5)
    policy = make_policy(A, make_call(hold=BIG._replace(output_tokens=5)))
    body, steps = drive(policy, [data], lambda p, step: UNAVAILABLE)
    assert policy.call.outcome == "store_unavailable" and steps[-1] == (CUT, None)
    cut = A.cut_event("the budget ledger is unavailable; the stream was cut", error_type="api_error",
                      error_code="store_unavailable")
    assert body == b"".join(events[:2]) + cut  # the 2nd delta (8 tokens) passed the room of 5


def test_the_wall_clock_is_decided_at_a_chunk_first_event_without_the_store():
    data, events = deltas_stream(6)
    env = Env()
    call = make_call(deadline=env.now + 1)
    call.pushed_at = env.now + 0.5  # (no push is due)
    policy = make_policy(A, call, env)
    first = b"".join(events[:3])
    assert policy.feed(first) == RELAY and policy.out == first
    env.now += 1  # the deadline passes between chunks: the next chunk's first event is cut
    step = policy.feed(b"".join(events[3:]))  # (a run of text deltas: split at its first)
    assert step == CUT and policy.denied.dimension == "wall_clock"
    assert policy.out == A.cut_event("budget exceeded mid-stream: the wall_clock budget of key 'alpha' of "
                                     "team 'research' ran out")
    assert policy.meter.output_bytes == 3 * 12  # the event cut in its place is charged


def test_a_reload_is_rechecked_at_a_chunk_first_event():
    data, events = deltas_stream(4)
    env = Env()
    policy = make_policy(A, env=env)
    reloads = []

    def answer(p: StreamPolicy, step: int) -> Any:
        reloads.append(step)
        p.call.generation = env.generation
        return denial("tokens") if len(reloads) == 2 else None

    def between(i: int) -> None:
        env.generation += 1

    body, steps = drive(policy, [events[0], events[1], b"".join(events[2:])], answer, between=between)
    assert reloads == [RECHECK, RECHECK]  # (the first chunk's was answered: the limits still fit)
    assert body == events[0] + A.cut_event(
        "budget exceeded mid-stream: the tokens budget of key 'alpha' of team 'research' ran out")


# --- pushes ----------------------------------------------------------------------------------

def test_the_running_charge_is_pushed_at_most_once_a_second():
    """Inside its hold a stream is pushed at the end of the first chunk a second after the last
    push, and only when it grew since."""
    data, events = deltas_stream(12)
    env = Env()
    policy = make_policy(A, make_call(pushed_at=env.now), env)
    pushes: list[float] = []

    def answer(p: StreamPolicy, step: int) -> Any:
        assert p.now == env.now and p.amounts.output_tokens == p.meter.live_output_tokens()
        pushes.append(p.now)
        return grown(p)

    def tick(i: int) -> None:
        env.now = 100.0 + 0.3 * i

    body, steps = drive(policy, events, answer, between=tick)
    assert body == data
    # pushes at chunk ends: 100.0 + 0.3 x {4, 8, 12}; the last chunk (message_stop) added nothing
    assert pushes == pytest.approx([101.2, 102.4, 103.6])
    assert all(b - a >= PUSH_INTERVAL_SECONDS for a, b in zip(pushes, pushes[1:]))
    assert policy.call.pushed_at == pushes[-1]


def test_a_chunk_that_completes_no_event_decides_nothing():
    data, events = deltas_stream(3)
    env = Env()
    policy = make_policy(A, make_call(pushed_at=env.now), env)
    assert policy.feed(b"".join(events[:3])) == RELAY
    env.now += 5  # a push is due, but not at a chunk without an event
    assert policy.feed(events[3][:10]) == RELAY and policy.out == b""
    assert policy.feed(events[3][10:]) == PUSH


def test_a_push_the_hold_covers_waits_and_one_past_it_goes_at_once():
    data, events = deltas_stream(6)
    env = Env()
    call = make_call(hold=BIG._replace(output_tokens=10), pushed_at=env.now)
    policy = make_policy(A, call, env)
    assert policy.feed(events[0] + events[1]) == RELAY  # 4 tokens: inside the hold, no store call
    assert call.hold_room == 10
    assert policy.feed(events[2] + events[3]) == PUSH  # 12 > 10 at the 3rd delta: at that event
    assert policy.amounts.output_tokens == 12 and policy.now == env.now
    assert policy.charged(grown(policy)) == RELAY and policy.out == events[2] + events[3]
    assert call.pushed_output == 12 and call.hold_room == 12  # (the hold grown to 12, not past)


# --- how a stream ends -----------------------------------------------------------------------

DROPPED = A.cut_event("the upstream connection ended mid-stream", error_type="api_error",
                      error_code="upstream_dropped")


def test_a_truncated_stream_ends_with_an_error_event_never_an_unfinished_one():
    data, events = deltas_stream(4)
    policy = make_policy(A)
    body, _ = drive(policy, [b"".join(events[:-1])])
    assert body == b"".join(events[:-1]) + DROPPED and policy.call.outcome == "upstream_dropped"


@pytest.mark.parametrize("outcome", ["upstream_dropped", "proxy_error"])
def test_a_failed_relay_ends_with_an_error_event(outcome):
    data, events = deltas_stream(4)
    policy = make_policy(A)
    assert policy.feed(data[:50], last=False) == RELAY
    policy.fail(outcome)
    assert policy.end() == DROPPED and policy.call.outcome == outcome


def test_a_client_gone_gets_nothing_more_and_a_shutdown_cuts_what_is_unfinished():
    data, events = deltas_stream(4)
    gone = make_policy(A)
    gone.feed(b"".join(events[:3]))
    gone.call.client_gone = True
    gone.flush()
    assert gone.end() == b"" and gone.call.outcome == "client_disconnected"
    down = make_policy(A)
    down.feed(b"".join(events[:3]), last=True)
    down.call.shutting_down = True
    down.fail("upstream_dropped")
    assert down.end() == b"".join(events[:3]) + A.cut_event(
        "the proxy is shutting down; the stream was cut and charged for what was generated",
        error_type="api_error", error_code="proxy_shutdown")
    assert down.call.outcome == "shutdown"


def test_an_upstream_error_event_ends_the_stream_as_it_came():
    data = protocol_streams.MID_STREAM_ERROR
    policy = make_policy(A)
    body, _ = drive(policy, [data])
    assert body == data and policy.call.outcome == "upstream_error"


# --- the figures -----------------------------------------------------------------------------

def test_an_estimate_within_the_tolerance_counts_as_the_cap():
    call = make_call(output_cap=100)
    assert capped(call, Usage(output_tokens=100)).output_tokens == 100
    assert capped(call, Usage(output_tokens=150)).output_tokens == 100
    assert capped(call, Usage(output_tokens=151)).output_tokens == 151
    assert hold_room(make_call(hold=BIG._replace(output_tokens=100), output_cap=100), Usage()) == \
        int(100 * ESTIMATE_TOLERANCE)
    assert hold_room(make_call(hold=BIG._replace(output_tokens=60), output_cap=100), Usage()) == 60


def test_a_stream_without_message_start_is_charged_its_input_estimate_and_output():
    policy = make_policy(A, make_call(input_estimate=77))
    drive(policy, [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"text_delta","text":"abcdef"}}\n\n'])
    assert stream_usage(policy.call, policy.meter) == Usage(input_tokens=77, output_tokens=2)
    assert stream_usage(make_call(), make_policy(A).meter) is None


def test_the_room_is_what_the_held_cost_can_pay_for():
    """$3 / $15 per Mtok: input 25 (message_start) costs 75,000 nanos, an output token 15,000; a
    hold of 375,000 nanos pays for 20 output tokens, so the 6th delta (24 tokens) is pushed."""
    rates = pricing_mod.Rates(Decimal(3), Decimal(15), Decimal("3.75"), Decimal(6), Decimal("0.3"))
    price = pricing_mod.ModelPrice(rates)
    call = make_call(hold=BIG._replace(cost_nanos=375_000))
    call.price = price
    assert hold_room(call, Usage(input_tokens=25)) == 20
    data, events = deltas_stream(10)
    policy = make_policy(A, call, cost=lambda c, u: pricing_mod.cost_nanos(c.price, u))
    assert policy.feed(b"".join(events[:9])) == PUSH
    assert policy.amounts.output_tokens == 24 and policy.amounts.cost_nanos == 75_000 + 24 * 15_000
    assert policy.charged(denial("cost_usd")) == CUT and policy.out == b"".join(events[:6]) + A.cut_event(
        "budget exceeded mid-stream: the cost_usd budget of key 'alpha' of team 'research' ran out")


# --- hypothesis: invariants over event sequences -----------------------------------------------

def _block(name: str, body: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)
_body_event = st.one_of(
    st.tuples(st.just("text"), st.one_of(_text, st.text(alphabet="ab ", max_size=16)), st.sampled_from([0, 1, 12])),
    st.tuples(st.just("delta"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("stop"), st.none(), st.none()),
    st.tuples(st.just("error"), st.none(), st.none()),
    st.tuples(st.just("ping"), st.none(), st.none()),
)


def build_stream(start: int | None, body: list[tuple]) -> bytes:
    """Anthropic events; message_delta output figures are running totals (they never go down)."""
    out = []
    if start is not None:
        out.append(_block("message_start", {"type": "message_start", "message": {
            "model": "claude-x", "usage": {"input_tokens": start, "output_tokens": 1}}}))
    total = 1
    for kind, a, b in body:
        if kind == "text":
            out.append(_block("content_block_delta", {"type": "content_block_delta", "index": b,
                                                      "delta": {"type": "text_delta", "text": a}}))
        elif kind == "delta":
            total += a
            delta = {"stop_reason": "end_turn" if b else None}
            out.append(_block("message_delta", {"type": "message_delta", "delta": delta,
                                                "usage": {"output_tokens": total}}))
        elif kind == "stop":
            out.append(_block("message_stop", {"type": "message_stop"}))
        elif kind == "error":
            out.append(_block("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}))
        else:
            out.append(_block("ping", {"type": "ping"}))
    return b"".join(out)


@given(st.one_of(st.none(), st.integers(0, 50)), st.lists(_body_event, max_size=30),
       st.integers(0, 120), st.one_of(st.none(), st.integers(1, 80)), st.sets(st.integers(1, 2000), max_size=6),
       st.data())
@settings(max_examples=400, deadline=None)
def test_invariants_over_event_sequences(start, body, room, cap, cuts, data):
    """Whatever the events, holds, chunking, clock and store answers: the client gets a prefix of
    the upstream's bytes, ending at an event, plus at most one error event; a cut comes only
    from a denial the policy was told of; the output estimate and the pushed output never go
    down; a stream nobody cut arrives whole."""
    stream = build_stream(start, body)
    env = Env()
    call = make_call(hold=BIG._replace(output_tokens=room, tokens=room + 60), output_cap=cap)
    policy = make_policy(A, call, env)
    points = sorted(k for k in cuts if k < len(stream))
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    told: list[tuple[bool, bool]] = []  # (denied, the message had finished)
    outputs: list[int] = []
    pushed: list[int] = []

    def answer(p: StreamPolicy, step: int) -> Any:
        outputs.append(p.meter.output_bytes)
        pushed.append(p.amounts.output_tokens)
        told.append((data.draw(st.sampled_from([False, False, True]), label="deny"), p.meter.finished))
        return denial() if told[-1][0] else grown(p)

    def tick(i: int) -> None:
        outputs.append(policy.meter.output_bytes)
        env.now += data.draw(st.sampled_from([0.0, 0.4, 1.0]), label="tick")

    out, steps = drive(policy, chunks, answer, last_known=data.draw(st.booleans(), label="last"), between=tick)
    outputs.append(policy.meter.output_bytes)
    assert outputs == sorted(outputs) and pushed == sorted(pushed)
    was_cut = bool(steps) and steps[-1][0] == CUT
    event(f"cut={was_cut} pushes={min(len(pushed), 3)} outcome={policy.call.outcome}")
    # A cut follows a denial at once, and every denial cuts but one the finished message ran past.
    assert [d and not f for d, f in told] == [False] * (len(told) - was_cut) + [True] * was_cut
    assert not was_cut or policy.denied == denial()
    if out != stream:
        ends = [0] + boundaries(stream)
        k = max(e for e in ends if out.startswith(stream[:e]))
        extra = SSEDecoder().feed(out[k:])
        assert len(extra) == 1 and extra[0].event == "error" and b"".join(e.raw for e in extra) == out[k:]
        assert was_cut or policy.call.outcome == "upstream_dropped"
    else:
        assert not was_cut
