"""[pure] One stream's relay policy, sans-IO: what each upstream chunk sends on, when the running
charge is pushed to the store, where the stream is cut and what ends it.

One object owns every transition (h11's shape: events in, decisions out), so that the relay's IO
loop (Relay.pump, proxy/relay.py) only moves bytes and makes the store calls the policy asks for,
and every decision can be tested without a socket or a store (tests/test_stream_policy.py):

    step = policy.feed(chunk, last)   # last: the upstream says its body ends with this chunk
    PUSH     -> step = policy.charged(await store.charge(call.res, policy.amounts, policy.now))
                (the reservation the charge left, which the policy keeps on the call, or a Denied)
    RECHECK  -> step = policy.rechecked(await relay.recheck_limits(call))   # a reload took effect
                (either store call failing: step = policy.store_unavailable())
    RELAY    -> write policy.out (b"": nothing now), take the next chunk
    CUT      -> write policy.out and end the body (policy.denied: why; None when the store failed)
    at the upstream's end: policy.flush() (or policy.fail(outcome) when it broke), then
    policy.end(); policy.ending ends the body once the charge is settled.

Decisions are made only where the meter stops (StreamMeter.feed_events, proxy/meter.py: at an
event that reported usage or took the live output past call.hold_room, or at the end of a
chunk), so the per-event cost is the meter's loop alone: everything here runs once a chunk or
once a decision. What a client sees of it: docs/budgets.md ("Mid-stream enforcement"); where it
sits in a request: docs/architecture.md. The state the decisions share with the rest of the
relay lives on the Call (hold_room, pushed_at, pushed_output, generation, outcome, and res,
which a push replaces); the clock and the config generation come from `state` (the AppState, or
anything with clock() and generation).
"""
from __future__ import annotations

from itertools import compress, repeat
from typing import TYPE_CHECKING, Any, Callable

from proxy import pricing as pricing_mod
from proxy.denials import cut_message
from proxy.ledger import Amounts, Denied
from proxy.meter import GREW, REPORTED, UNCHANGED
from proxy.sse import SSEDecoder, SSERun, split
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.store.base import Reservation

# What feed() and the answers to a store call ask of the IO loop next.
RELAY, PUSH, RECHECK, CUT = 0, 1, 2, 3

# A stream's running charge is pushed to the store at the end of a chunk once a second has passed
# since the last push, so /budget shows streams in flight. This only bounds how stale that view
# is: the hold already covers the stream, growth past the hold is checked at the very event, and
# reported usage that outgrows the hold is pushed when it comes. Each push prices the usage and
# updates every scope (on Redis, a round trip), so pushing per event would cost a large share of the
# SSE relay, and so would stopping the meter inside a chunk only to look at the clock (bench/RESULTS.md).
PUSH_INTERVAL_SECONDS = 1.0
# The live estimate runs ahead of the real count (bytes / 3 against ~4 bytes a token of English), so
# up to this multiple of the forwarded max_tokens it is charged as max_tokens (the provider cannot
# generate more). Past it the upstream is generating past the limit it was sent: every estimated
# token counts, and the stream is cut once it passes its hold, as with clamping off.
ESTIMATE_TOLERANCE = 1.5


class StreamPolicy:
    """The decisions of one metered stream; see the module docstring for the protocol."""

    __slots__ = ("call", "meter", "state", "cost", "decoder", "forwardable", "facts", "filters", "cut_event",
                 "deadline", "events", "done", "grew", "at_event", "last", "carry", "tail", "out", "ending",
                 "usage", "amounts", "now", "denied")

    def __init__(self, call: Any, meter: Any, adapter: Any, facts: Any, state: Any,
                 cost: Callable[[Any, Usage], int]) -> None:
        """`cost(call, usage)`: the running charge in nanos, at the rates admission reserved at."""
        self.call, self.meter, self.state, self.cost, self.facts = call, meter, state, cost, facts
        self.decoder = SSEDecoder(runs=adapter.event_runs)
        self.forwardable = adapter.forwardable
        self.filters = adapter.filters_events
        self.cut_event = adapter.cut_event
        self.deadline = call.res.deadline
        self.events: list[Any] = []
        self.done = 0                # events[:done] are metered and may be relayed
        self.grew = UNCHANGED        # what the meter stopped at
        self.at_event = False        # it stopped at an event (a cut takes that event's place)
        self.last = False
        self.carry = b""             # the last chunk's bytes, held back to go out with the end of the body
        self.tail = b""              # what the decoder held when the upstream ended
        self.out = b""               # what to write now (RELAY), or the body's last bytes (CUT)
        self.ending: bytes | None = None  # what ends the body, once the charge is settled (end())
        self.usage: Usage | None = None   # PUSH: the running usage, and what is pushed of it, when
        self.amounts: Amounts | None = None
        self.now = 0.0
        self.denied: Denied | None = None  # the denial a cut was made for

    # --- chunks ------------------------------------------------------------------------------
    def feed(self, chunk: bytes | None, last: bool = False) -> int:
        """Take the next upstream chunk (`last`: the upstream's body is known to end with it) and
        meter its events up to the first decision the IO must act on; RELAY once all of them may
        go on. (None: go on after a decision, from the event it was made at.) The usual chunk
        takes one call and no loop: this is the relay's per-chunk cost."""
        if chunk is None:
            step = self._run()
        else:
            events = self.events = self.decoder.feed(chunk)
            self.last, call = last, self.call
            if self.deadline is not None or call.generation != self.state.generation:
                self.done = 0
                step = self._run()
            else:  # the meter runs through the chunk; nothing is decided unless it stops at an event
                self.done, grew = self.meter.feed_events(events, 0, call.hold_room)
                if grew == UNCHANGED and not (events and self.push_due()):  # (no event, no decision)
                    step = None
                else:
                    self.grew, self.at_event = grew, grew != UNCHANGED
                    step = self._check()
                    if step is None:
                        step = self._run()
        if step is not None:
            return step
        events = self.events
        if self.filters:  # (no closure in the comprehension: in Python 3.11 its cells cost a chunk)
            events = compress(events, map(self.forwardable, events, repeat(self.facts)))
        out = b"".join([ev.raw for ev in events])
        if self.carry:
            out, self.carry = self.carry + out, b""
        if self.last:  # held back to go out with the end of the body, after settlement
            out, self.carry = b"", out
        self.out = out
        return RELAY

    def _run(self) -> int | None:
        """Meter on from events[done] to the next decision the IO must act on, or to the chunk's
        end (None)."""
        events, meter, call, state, deadline = self.events, self.meter, self.call, self.state, self.deadline
        while self.done < len(events):
            if self.done == 0 and ((deadline is not None and state.clock() >= deadline)
                                   or call.generation != state.generation):
                # A wall-clock or reload decision is due at this chunk's first event.
                if type(events[0]) is SSERun:
                    events[0:1] = split(events[0], 0)
                self.done, self.grew = meter.feed_events(events[:1], 0, call.hold_room)
                self.at_event = True
            else:
                # The meter runs through the chunk's events until one needs a decision
                # (splitting a run of text deltas in `events` where one passes the room).
                self.done, grew = meter.feed_events(events, self.done, call.hold_room)
                self.grew = grew
                self.at_event = grew != UNCHANGED  # else it ran out of events: a cut follows them
                if (grew == UNCHANGED and deadline is None and call.generation == state.generation
                        and not self.push_due()):
                    break  # (the end of the chunk, and _check() would find nothing to do)
            step = self._check()
            if step is not None:
                return step
        return None

    # --- decisions ---------------------------------------------------------------------------
    def push_due(self) -> bool:
        """The running charge has grown since the last push, a second or more ago."""
        call = self.call
        return (self.meter.live_output_tokens() > call.pushed_output
                and self.state.clock() - call.pushed_at >= PUSH_INTERVAL_SECONDS)

    def _check(self) -> int | None:
        """Where the meter stopped: push the running charge when it may have outgrown the hold,
        then ask the clock and the config; None when the stream goes on."""
        grew = self.grew
        if grew == REPORTED:
            due = not self.meter.finished  # (the final usage report needs no push: settle follows at once)
        else:  # GREW: the live output passed call.hold_room; else the end of a chunk
            due = grew == GREW or self.push_due()
        if due and self._enforce():
            return PUSH
        return self._decide(None)

    def _enforce(self) -> bool:
        """True when the running charge must go to the store: it outgrows the hold (the store may
        grow the hold or refuse: a cut) or the last push is a second old. Otherwise the room to
        the next decision is worked out at once: between decisions the meter compares one
        integer per event."""
        call = self.call
        u = live_usage(call, self.meter)
        amounts = Amounts.of_usage(u, self.cost(call, u), 1)
        now = self.state.clock()
        if now - call.pushed_at < PUSH_INTERVAL_SECONDS and amounts.within(call.res.hold):
            call.hold_room = hold_room(call, u)  # inside the hold, and the store heard from this call lately
            return False
        self.usage, self.amounts, self.now = u, amounts, now
        return True

    def charged(self, answer: Reservation | Denied) -> int:
        """The store's answer to PUSH: the reservation as the charge left it (its hold grown to
        cover the push), or the denial of that growth; the next step."""
        denied = answer if isinstance(answer, Denied) else None
        if denied is None:
            call = self.call
            call.res = answer
            # (the live figure, uncapped, as push_due compares it: past the cap nothing is pushed again)
            call.pushed_at, call.pushed_output = self.now, self.meter.live_output_tokens()
            call.hold_room = hold_room(call, self.usage)  # (against the hold as the store left it)
        step = self._decide(denied)
        return self.feed(None) if step is None else step

    def rechecked(self, denied: Denied | None) -> int:
        """The answer to RECHECK: a scope the reloaded config leaves overspent, or None; the next step."""
        step = self._resolve(denied)
        return self.feed(None) if step is None else step

    def _decide(self, denied: Denied | None) -> int | None:
        """After the push: the wall clock runs out here, and a reload is rechecked (RECHECK)."""
        call, state = self.call, self.state
        if denied is None and self.deadline is not None and state.clock() >= self.deadline:
            denied = wall_clock_denial(call)
        if denied is None:
            return RECHECK if call.generation != state.generation else None
        return self._resolve(denied)

    def _resolve(self, denied: Denied | None) -> int | None:
        """A denial cuts the stream, unless its message already finished: nothing is left to stop,
        and its reported usage settles as reported."""
        if denied is None or self.meter.finished:
            return None
        self.denied = denied
        return self._cut(self.cut_event(cut_message(denied, self.call.caller)), "cut")

    def store_unavailable(self) -> int:
        """A store call failed: fail closed, a stream the ledger cannot follow is not metered blind."""
        return self._cut(self.cut_event("the budget ledger is unavailable; the stream was cut",
                                        error_type="api_error", error_code="store_unavailable"), "store_unavailable")

    def _cut(self, cut: bytes, outcome: str) -> int:
        """The body ends here: what was metered before the event that ran the budget out (the
        cut takes its place: its content is charged, never relayed), then the cut."""
        self.call.outcome = outcome
        if self.at_event:
            self.done -= 1
        relayed = self.events[:self.done]
        if self.filters:
            relayed = compress(relayed, map(self.forwardable, relayed, repeat(self.facts)))
        self.out, self.carry = self.carry + b"".join([ev.raw for ev in relayed]) + cut, b""
        return CUT

    # --- the end -----------------------------------------------------------------------------
    def flush(self) -> None:
        """The upstream's body ended: meter what the decoder still held, keep it for the end, and
        say how the stream ended. (SSEError when the decoder cannot finish: fail() then.)"""
        decoder, meter, call = self.decoder, self.meter, self.call
        rest = decoder.flush()
        for ev in rest:
            meter.feed(ev)
        rest = list(compress(rest, map(self.forwardable, rest, repeat(self.facts))))
        call.outcome = ("completed" if meter.complete else
                        "upstream_error" if meter.upstream_error else "upstream_dropped")
        if call.outcome == "completed":
            self.tail = b"".join([ev.raw for ev in rest]) + decoder.pending  # (bytes after the end, as they came)
        else:  # an event the upstream never finished is not relayed: the error event after it must parse
            self.tail = b"".join([ev.raw for ev in rest if ev.raw.endswith(_EVENT_ENDS)])

    def fail(self, outcome: str) -> None:
        """The upstream broke off ("upstream_dropped") or the relay failed ("proxy_error")."""
        self.call.outcome = outcome

    def end(self) -> bytes:
        """What ends the client's body, whatever happened upstream: truncation is never silent
        (an SDK would take what came as a complete message), and a proxy shutting down cuts
        what is still unfinished. A client gone gets nothing more."""
        call, tail = self.call, self.tail
        if call.outcome in ("upstream_dropped", "proxy_error") and not call.client_gone:
            # (an unfinished event's bytes are not relayed: the error event must parse)
            tail += self.cut_event("the upstream connection ended mid-stream", error_type="api_error",
                                   error_code="upstream_dropped")
        if call.client_gone:
            call.outcome = "client_disconnected"
        elif call.shutting_down and not self.meter.finished:
            call.outcome = "shutdown"
            tail = self.cut_event("the proxy is shutting down; the stream was cut and charged for what was "
                                  "generated", error_type="api_error", error_code="proxy_shutdown")
        self.ending = self.carry + tail
        return self.ending


_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")


# --- the figures the decisions rest on -------------------------------------------------------
def live_usage(call: Any, meter: Any) -> Usage:
    """The running charge: the meter's figure, its input at least what admission estimated
    until the provider reports one (a stream without message_start is no cheaper)."""
    u = meter.live_usage()
    if not meter.started:
        estimated = call.res.admitted.hold.input_tokens
        if u.total_input_tokens < estimated:
            u = u._replace(input_tokens=u.input_tokens + estimated - u.total_input_tokens)
    return capped(call, u)


def stream_usage(call: Any, meter: Any) -> Usage | None:
    """What a stream that ended is charged; None when it produced no message (no step). A
    stream that never sent its message start but relayed output is charged the estimate of
    that output plus the input admission estimated: an upstream lie does not make it free."""
    if meter.started:
        usage = meter.final_usage()
        return usage if meter.usage_reported else capped(call, usage)
    live = live_usage(call, meter)
    return None if live.output_tokens == 0 else live


def capped(call: Any, u: Usage) -> Usage:
    """The running estimate errs high; an honest upstream never generates past the max_tokens
    it was sent, so an estimate within ESTIMATE_TOLERANCE of it counts as max_tokens. Reported
    figures are settled as reported."""
    cap = call.output_cap
    if cap is None or u.output_tokens <= cap or u.output_tokens > cap * ESTIMATE_TOLERANCE:
        return u
    return u.with_output(cap)


def hold_room(call: Any, u: Usage) -> int:
    """The live output figure up to which this stream stays inside its hold in every dimension."""
    hold = call.res.hold
    total_input = u.total_input_tokens
    room = min(hold.output_tokens, hold.tokens - total_input)
    price = call.price
    if price is not None:
        spare = hold.cost_nanos - pricing_mod.cost_nanos(price, u.with_output(0))
        affordable = pricing_mod.output_tokens_within(price, spare, total_input)
        if affordable is not None and affordable < room:
            room = affordable
    cap = call.output_cap
    if cap is not None and room >= cap:
        # Up to the tolerance the charged output never counts past the cap (capped()), so it
        # stays inside this hold; past it, the next decision charges the estimate in full.
        return int(cap * ESTIMATE_TOLERANCE)
    return room


def wall_clock_denial(call: Any) -> Denied:
    """The call's wall-clock budget ran out (its reservation's deadline passed)."""
    scope = next(s for s in call.res.scopes if s.limits.wall_clock is not None)
    return Denied(scope, "wall_clock", scope.limits.wall_clock or 0, scope.limits.wall_clock or 0, 0, 0)
