"""[pure] Provider adapters: what the relay and the app need to know about one client API.

The relay is provider-neutral: it asks the adapter to parse a request, estimate its input,
write the body to forward, read usage from a whole response, meter a stream, and word a
mid-stream cut. The app asks it for its routes, how the upstream key is sent and how an error
looks. A new provider is a new adapter registered in proxy/providers/registry.py, not a fork
of the relay or the app."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from proxy.errors import NotFound, ProxyError
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
    choices: int = 1                  # completions asked for (OpenAI's n): each may run to the model's limit


def json_object(raw: bytes | str) -> dict[str, Any] | None:
    """The JSON object in `raw`, or None for anything else (never raises, even on absurd nesting)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


Scope = dict[str, Any]
Rendered = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body


@dataclass(frozen=True, slots=True)
class PassRoute:
    """An unmetered route, forwarded and never charged. The upstream URL is the configured base
    URL plus what `upstream_path` builds, never the client's raw path."""

    template: str       # the app's route, in Starlette's path syntax
    method: str
    upstream_path: Callable[[Scope], str]
    label: str          # the metric label: the route's template, never the client's path
    checks_model: bool = False  # the body names a model: validate it, apply the allow-list


def fixed_path(path: str) -> Callable[[Scope], str]:
    return lambda scope: path


# One raw path segment: no percent-encoding, slash, backslash or dot segment can pass.
_MODEL_ID = re.compile(rb"[A-Za-z0-9._:@-]{1,128}")


def model_path(route_prefix: str, upstream_prefix: str) -> Callable[[Scope], str]:
    """`upstream_prefix` + the one model id that follows `route_prefix` in the client's raw path;
    NotFound for an id outside the allowed grammar."""
    prefix = route_prefix.encode()

    def build(scope: Scope) -> str:
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        raw = raw.split(b"?", 1)[0]
        model_id = raw[len(prefix):] if raw.startswith(prefix) else b""
        if _MODEL_ID.fullmatch(model_id) is None or model_id in (b".", b".."):
            raise NotFound("No such model id: it must be one path segment of letters, digits and ._:@-")
        return upstream_prefix + model_id.decode("ascii")
    return build


def cache_write_kind(raw: bytes) -> str:
    """The input rate admission reserves at: a body that asks for caching (read on the raw bytes:
    no parse on the hot path) is held at the cache-write rate, 1h when it names one."""
    if b'"cache_control"' in raw:
        return "cache_write_1h" if b'"1h"' in raw else "cache_write_5m"
    return "input"


def rendered(err: ProxyError, body: dict[str, Any], id_header: bytes, request_id: str) -> Rendered:
    """An error response: the JSON body, the request-id header under the provider's name, and
    whatever headers the error carries (a budget's remaining figures)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (id_header, request_id.encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    return err.status, headers, payload


class Provider(Protocol):
    name: str          # the upstream's name under `upstreams` in the config
    path: str          # the metered route clients POST to (and its metric label)
    upstream_path: str  # where the metered route's requests are forwarded
    route_prefix: str  # a path under it that matches no route is answered in this shape
    default_base_url: str  # the upstream's base URL when the config gives none
    count_tokens_path: str | None  # the upstream's token counter; None: the heuristic it is
    passthrough_routes: tuple[PassRoute, ...]
    default_max_tokens: int   # the output hold when the client set no limit
    filters_events: bool      # False: every stream event is relayed, forwardable() is never asked
    event_runs: tuple[str, RunReader] | None  # SSEDecoder(runs=...) for this provider's streams

    def upstream_auth(self, api_key: str) -> tuple[str, str]:
        """The header that carries the upstream key (only asked when one is configured)."""
    def render_error(self, err: ProxyError, request_id: str) -> Rendered:
        """A ProxyError as this API's clients expect it: status, headers, body."""
    def input_kind(self, raw: bytes) -> str:
        """The pricing rate the request's input is held at ("input", "cache_write_5m"...)."""

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
