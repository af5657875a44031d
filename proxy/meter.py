"""[pure] Provider-neutral stream metering: the interface the relay drives, and the running
output estimate every provider adapter shares.

Reported usage is the final truth; the estimate only exists so a stream can be cut while
it flows (Anthropic reports output once, at the end). The estimate errs high (bytes / 3),
but thinking can be billed without visible text, so it is a floor there: the clamped
max_tokens is the hard bound.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from proxy.sse import SSEEvent
from proxy.usage import Usage


# What feeding one event did to the live usage.
UNCHANGED, GREW, REPORTED = 0, 1, 2  # GREW: the output estimate rose; REPORTED: the provider reported usage


class StreamMeter(Protocol):
    started: bool        # a message began: the call counts as a step
    finished: bool       # the provider's own end-of-message arrived
    complete: bool       # the stream ended as the provider ends one (message_stop, [DONE])
    upstream_error: str | None  # error type of an upstream error event, if one came
    usage_reported: bool  # the provider reported its final output figure (then it is the truth)
    output_bytes: int     # generated content relayed so far, in bytes (what the estimate counts)

    def feed(self, event: SSEEvent) -> int:
        """Take one event; UNCHANGED, GREW or REPORTED (the relay checks the budget on the last two)."""

    def feed_events(self, events: list[SSEEvent], start: int, room: int) -> tuple[int, int]:
        """Feed events[start:] until one REPORTED usage or took the live output past `room`;
        return (the index after that event, REPORTED or GREW), or (len(events), UNCHANGED).
        The relay decides only at those events, so this loop is the per-event cost. An SSERun
        (from a decoder built with the adapter's `event_runs`) is taken whole when no event in it
        can pass `room`; otherwise the meter splits it in `events`, in place, so that the event
        that passes stands alone (the list may grow)."""

    def live_output_tokens(self) -> int:
        """live_usage().output_tokens, cheaply."""

    def live_usage(self) -> Usage:
        """Best current figure: reported where known, the running estimate for output otherwise."""

    def final_usage(self) -> Usage:
        """What to settle: the reported usage when the provider reported it, else the live figure."""


def feed_events(meter: StreamMeter, events: Sequence[SSEEvent], start: int, room: int) -> tuple[int, int]:
    """StreamMeter.feed_events for any meter, one feed() at a time."""
    for i in range(start, len(events)):
        grew = meter.feed(events[i])
        if grew == REPORTED or (grew == GREW and meter.live_output_tokens() > room):
            return i + 1, grew
    return len(events), UNCHANGED


class OutputEstimate:
    """Counts generated content bytes; tokens = ceil(bytes / bytes-per-token), the latter in
    thousandths (proxy/ratio.py learns it; bytes / 3 by default)."""

    __slots__ = ("bytes", "milli")

    def __init__(self, bytes_per_token_milli: int = 3000) -> None:
        self.bytes = 0
        self.milli = bytes_per_token_milli

    def bytes_within(self, tokens: int) -> int:
        """The most bytes whose estimate is at most `tokens`."""
        return tokens * self.milli // 1000

    def add(self, text: str) -> None:
        # surrogatepass: JSON may carry a lone surrogate escape, which plain encode() rejects
        self.bytes += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    @property
    def tokens(self) -> int:
        return -(-self.bytes * 1000 // self.milli)
