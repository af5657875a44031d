"""What both upstream simulators share besides the server: the request record, stream
bookkeeping, the common part of a Reply, the `Wire` form of a planned answer, and the pure
helpers their planners use.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

_key = getattr(web, "RequestKey", lambda name, _type: name)  # plain str keys before aiohttp 3.13
REQUEST_ID = _key("request_id", str)
MAX_BODY_BYTES = 32 * 1024 * 1024  # both APIs' request size limit


@dataclass(kw_only=True)
class BaseReply:
    """What both providers' Replies share: how an answer is paced, gated, failed or cut off.

    "After N deltas" points count the deltas that carry answer text and are clamped to just after
    the last of them. The provider's Reply adds the answer itself and its mid-stream error point.
    """

    event_delay: float = 0.0  # seconds between SSE events
    headers_delay: float = 0.0  # seconds before the response headers
    status: int = 200  # != 200: the provider's error body with this status (stream or not)
    error_type: str | None = None  # default: the provider's type for the status (mid-stream: see Reply)
    error_message: str | None = None
    error_code: str | None = None
    drop_after: int | None = None  # stream: after N deltas close the connection, no final chunk;
    #                                non-stream: close the connection instead of answering
    gate: str | None = None  # wait until `open_gate(gate)` ...
    gate_after: int | None = None  # ... before the headers (None) or after N deltas
    extra_headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # default: echo the request's model


@dataclass
class Recorded:
    """One request as the simulator received it (header names lower-cased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    reply: Any | None = None  # the Reply used, for Messages / Chat Completions calls that got one


RECORDED = _key("recorded", Recorded)


@dataclass
class StreamInfo:
    """Bookkeeping for one SSE response; mutated by the server thread only."""

    request: Recorded = field(repr=False)
    planned_events: int = 0
    events_sent: int = 0
    text_deltas_sent: int = 0
    outcome: str = "in_progress"  # completed | aborted (client left) | error_event | dropped
    end_order: int = 0


@dataclass
class Wire:
    """A planned answer as the shared writer sends it."""

    body: dict  # the non-streaming JSON body
    events: list[Any]  # every event of the stream, in order, the closing one included
    encode: Callable[[Any], bytes]  # one event -> its SSE frame
    delta_at: list[int]  # indexes of the events that carry answer text
    cut_index: Callable[[int], int]  # event before which N text deltas have been sent
    error_after: int | None = None  # after N text deltas send `error_frame()` instead, then end
    error_frame: Callable[[], bytes] = bytes


def split_words(text: str, pieces: int = 8) -> list[str]:
    """Split into at most `pieces` parts on word starts; the parts join back to `text`."""
    words = [w for w in re.split(r"(?<=\s)(?=\S)", text) if w]
    n = min(pieces, len(words))
    bounds = [len(words) * i // n for i in range(n + 1)] if n else []
    return ["".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]


def truncate(chunks: list[str], keep: int) -> list[str]:
    """The first `keep` characters of the joined `chunks`, still split where they were."""
    out = []
    for chunk in chunks:
        if keep <= 0:
            break
        out.append(chunk[:keep])
        keep -= len(chunk)
    return out


def cut_after(delta_at: list[int], after: int, fallback: int) -> int:
    """Index of the event before which `after` text deltas have been sent, clamped to just after
    the last one; `fallback` when there are none."""
    if after < len(delta_at):
        return delta_at[after]
    return delta_at[-1] + 1 if delta_at else fallback


def compact_json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
