"""[pure] Provider adapters: what the relay needs to know about one client API.

The relay is provider-neutral: it asks the adapter to parse a request, estimate its input,
write the body to forward, read usage from a whole response, meter a stream, and word a
mid-stream cut. A new provider is a new adapter, not a fork of the relay."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.meter import StreamMeter
from proxy.sse import RunReader, SSEEvent
from proxy.usage import Usage


@dataclass(frozen=True, slots=True)
class RequestFacts:
    body: dict[str, Any]
    model: str
    max_tokens: int | None     # None: the client set no output limit (OpenAI allows that)
    stream: bool
    client_wants_usage: bool = True   # OpenAI: the client asked for stream_options.include_usage


def json_object(raw: bytes | str) -> dict[str, Any] | None:
    """The JSON object in `raw`, or None for anything else (never raises, even on absurd nesting)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class Provider(Protocol):
    name: str          # the upstream's name in the config, and the error shape
    path: str          # the upstream path this adapter forwards to
    default_max_tokens: int   # the output hold when the client set no limit
    filters_events: bool      # False: every stream event is relayed, forwardable() is never asked
    event_runs: tuple[str, RunReader] | None  # SSEDecoder(runs=...) for this provider's streams

    def parse_request(self, raw: bytes) -> RequestFacts: ...
    def estimate_input(self, facts: RequestFacts) -> int: ...
    def count_tokens_body(self, facts: RequestFacts) -> bytes | None: ...
    def min_output(self, facts: RequestFacts) -> int:
        """The fewest output tokens a clamped request can be forwarded with."""
    def upstream_body(self, facts: RequestFacts, raw: bytes, max_tokens: int | None) -> bytes:
        """The body to forward: `raw` byte for byte unless max_tokens must be set or lowered."""

    def usage_from_response(self, raw: bytes) -> Usage | None: ...
    def new_meter(self, facts: RequestFacts, input_estimate: int, bytes_per_token_milli: int) -> StreamMeter:
        """A meter for one stream; `input_estimate` is what admission reserved for input, and
        output is estimated at `bytes_per_token_milli` / 1000 bytes a token until reported."""
    def forwardable(self, event: SSEEvent, facts: RequestFacts) -> bool: ...
    def cut_event(self, message: str, error_type: str = "rate_limit_error",
                  error_code: str = "budget_exceeded") -> bytes:
        """The provider's mid-stream error, ending the stream (a budget cut by default)."""
