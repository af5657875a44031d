"""[pure] The OpenAI Chat Completions API: what the proxy reads from requests, responses and streams.

Where it differs from Anthropic, and why the code below looks the way it does:

* The output limit is optional (`max_completion_tokens`, or the older `max_tokens`) and applies
  to each of the `n` choices, so the request's output bound is the limit times `n`.
* A stream carries usage only when `stream_options.include_usage` is set: one chunk with
  `choices == []` just before `data: [DONE]`. The proxy always asks for it upstream, so metering
  cannot be bypassed, and strips that chunk again for a client that did not ask for it.
* `prompt_tokens` includes `cached_tokens` (and `cache_write_tokens` where billed);
  `completion_tokens` includes `reasoning_tokens`. Usage.input_tokens is the uncached rest.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

from proxy.billing import NO_BILL, Bill
from proxy.errors import InvalidRequest, ProxyError
from proxy.estimate import estimate_openai_input_tokens
from proxy.meter import GREW, REPORTED, UNCHANGED, OutputEstimate, feed_events
from proxy.providers import Rendered, RequestFacts, cache_write_kind, json_object, rendered
from proxy.sse import SSEEvent
from proxy.usage import Usage
from proxy.validate import check_model, parse_body

LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")  # the first is the current name
# A chunk whose choices are empty: the only kind that can be the usage chunk. Checked on the
# raw JSON first so that ordinary chunks are not parsed twice; a match is confirmed by parsing.
_EMPTY_CHOICES = re.compile(r'"choices"\s*:\s*\[\s*\]')


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def choices(body: dict[str, Any]) -> int:
    """How many completions the request asks for (`n`); anything odd counts as 1 (upstream refuses it)."""
    n = body.get("n")
    return n if _positive_int(n) else 1


def parse_request(raw: bytes) -> RequestFacts:
    body = parse_body(raw)
    model = check_model(body.get("model"))
    if not isinstance(body.get("messages"), list):
        raise InvalidRequest("messages: field required (a list of messages).")
    for name in LIMIT_FIELDS:  # null means "not set", as the API reads it
        if body.get(name) is not None and not _positive_int(body[name]):
            raise InvalidRequest(f"{name}: must be a positive integer.")
    per_choice = body.get("max_completion_tokens") or body.get("max_tokens")
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return RequestFacts(body, model, None if per_choice is None else per_choice * choices(body),
                        body.get("stream") is True, wants_usage, choices(body))


def upstream_body(facts: RequestFacts, raw: bytes, max_tokens: int | None) -> bytes:
    """`raw` byte for byte unless a stream lacks include_usage or the output limit must be set or
    lowered. `max_tokens` bounds the whole request: each of the n choices gets its share, in
    every limit field the client used (max_completion_tokens when it used none)."""
    body = facts.body
    changes: dict[str, Any] = {}
    if facts.stream and not facts.client_wants_usage:
        options = body.get("stream_options")
        changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if max_tokens is not None:
        share = max(1, max_tokens // choices(body))
        used = [name for name in LIMIT_FIELDS if body.get(name) is not None] or [LIMIT_FIELDS[0]]
        for name in used:
            value = min(body.get(name) or share, share)
            if value != body.get(name):
                changes[name] = value
    if not changes:
        return raw
    try:
        return json.dumps({**body, **changes}, separators=(",", ":")).encode()
    except RecursionError:  # parsed at the very edge of the recursion limit
        raise InvalidRequest("The request body is nested too deeply.") from None


def usage_from(u: Any) -> Usage:
    """Map an OpenAI `usage` object onto Usage (cached and cache-written tokens are parts of the prompt)."""
    if not isinstance(u, dict):
        return Usage()
    prompt = _int(u.get("prompt_tokens"))
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = min(_int(details.get("cached_tokens")), prompt)
    written = min(_int(details.get("cache_write_tokens")), prompt - cached)
    return Usage(input_tokens=prompt - cached - written, cache_write_5m_tokens=written,
                 cache_read_tokens=cached, output_tokens=_int(u.get("completion_tokens")))


def _model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    return model if isinstance(model, str) and model else None


def usage_from_response(raw: bytes) -> tuple[Usage, Bill] | None:
    obj = json_object(raw)
    usage = None if obj is None else obj.get("usage")
    return (usage_from(usage), Bill(_model_of(obj))) if isinstance(usage, dict) else None  # type: ignore[arg-type]


def cut_event(message: str, error_type: str = "insufficient_quota", error_code: str = "budget_exceeded") -> bytes:
    """The error chunk the openai SDK raises APIError on (docs/http-api.md "Cut by a budget"), then [DONE] for other
    clients. A budget cut by default: the type and code of OpenAI's own out-of-credit 429."""
    payload = {"error": {"message": message, "type": error_type, "param": None, "code": error_code}}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"


def is_usage_chunk(data: str) -> bool:
    """The include_usage chunk: `choices` empty and a `usage` object."""
    if not _EMPTY_CHOICES.search(data):
        return False
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


def forwardable(event: SSEEvent, facts: RequestFacts) -> bool:
    """The client gets exactly what it asked for: no usage chunk unless it set include_usage."""
    return facts.client_wants_usage or not is_usage_chunk(event.data)


def _delta_texts(delta: dict[str, Any]) -> list[Any]:
    """The generated pieces of one choice's delta: text, refusal, reasoning and tool-call JSON."""
    texts = [delta.get(k) for k in ("content", "refusal", "reasoning_content", "reasoning")]
    calls = delta.get("tool_calls")
    functions = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    functions.append(delta.get("function_call"))  # the deprecated single-function form
    for f in functions:
        if isinstance(f, dict):
            texts += [f.get("name"), f.get("arguments")]
    return texts


class OpenAIStreamMeter:
    """Running usage of one Chat Completions stream.

    Output is estimated from the deltas as they flow (the relay caps that estimate at the limit
    it forwarded); input is the admission estimate until the provider reports. The include_usage
    chunk is the whole request's usage and the final truth. A stream cut (or dropped) before it
    settles at the live figure."""

    __slots__ = ("started", "finished", "complete", "upstream_error", "bill", "_input_estimate", "_reported", "_final",
                 "_estimate")

    def __init__(self, input_estimate: int, bytes_per_token_milli: int = 3000) -> None:
        self.bill = NO_BILL  # the served model, as the chunks name it
        self.complete = False  # data: [DONE] came after the final chunk
        self.started = False
        self.finished = False
        self.upstream_error: str | None = None
        self._input_estimate = input_estimate  # what admission estimated
        self._reported: Usage | None = None
        self._final = False
        self._estimate = OutputEstimate(bytes_per_token_milli)

    def feed(self, event: SSEEvent) -> int:
        data = event.data
        if data.startswith("[DONE]"):  # the SDK's own test
            self.finished = self.upstream_error is None
            self.complete = self.finished and self.started
            return UNCHANGED
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return UNCHANGED
        if not isinstance(chunk, dict):
            return UNCHANGED
        if chunk.get("error"):
            error = chunk["error"]
            kind = (error.get("type") or error.get("code")) if isinstance(error, dict) else None
            self.upstream_error = str(kind or "error")
            return UNCHANGED
        self.started = True
        if self.bill.model is None:  # (the first chunk that names one: some gateways lead with a filter chunk)
            self.bill = Bill(_model_of(chunk))
        grew = self._add_output(chunk.get("choices"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._reported = usage_from(usage)
            if chunk.get("choices") == []:
                self._final = self.finished = True
            return REPORTED
        return GREW if grew else UNCHANGED

    def _add_output(self, choice_list: Any) -> bool:
        if not isinstance(choice_list, list):
            return False
        before = self._estimate.bytes
        for choice in choice_list:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                for text in _delta_texts(delta):
                    if isinstance(text, str) and text:
                        self._estimate.add(text)
        return self._estimate.bytes > before

    def feed_events(self, events: Sequence[SSEEvent], start: int, room: int) -> tuple[int, int]:
        return feed_events(self, events, start, room)

    def live_output_tokens(self) -> int:
        r = self._reported
        if self._final and r is not None:
            return r.output_tokens
        return max(0 if r is None else r.output_tokens, self._estimate.tokens)

    def live_usage(self) -> Usage:
        r = self._reported
        if self._final and r is not None:
            return r
        if r is None:
            r = Usage(input_tokens=self._input_estimate)
        out = max(r.output_tokens, self._estimate.tokens)
        return r if out == r.output_tokens else Usage(r.input_tokens, r.cache_write_5m_tokens,
                                                      r.cache_write_1h_tokens, r.cache_read_tokens, out)

    @property
    def usage_reported(self) -> bool:
        return self._reported is not None

    @property
    def output_bytes(self) -> int:
        return self._estimate.bytes

    def final_usage(self) -> Usage:
        return self._reported if self._reported is not None else self.live_usage()


# A ProxyError's kind as error.type and error.code, the pair the openai SDK and OpenAI's own
# errors use (a budget refusal reads as OpenAI's out-of-credit 429); docs/http-api.md, "Errors".
ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "api_error": ("server_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "model_not_allowed"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "invalid_request_error": ("invalid_request_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("insufficient_quota", "budget_exceeded"),
}


def render_error(err: ProxyError, request_id: str) -> Rendered:
    error_type, code = ERROR_TYPES.get(err.kind, ERROR_TYPES["api_error"])
    body = {"error": {"message": err.message, "type": error_type, "param": None, "code": code},
            **err.extra_body()}
    return rendered(err, body, b"x-request-id", request_id)


class OpenAIAdapter:
    name = "openai"
    path = "/v1/chat/completions"
    upstream_path = "/v1/chat/completions"
    route_prefix = "/v1/chat"
    default_base_url = "https://api.openai.com"
    count_tokens_path: str | None = None  # Chat Completions has no token-counting endpoint
    passthrough_routes = ()
    # The output hold for a request that sets no limit when the pricing table does not give the
    # model's max_output_tokens (nothing is forwarded for it unless clamping lowers it).
    default_max_tokens = 128_000

    parse_request = staticmethod(parse_request)
    upstream_body = staticmethod(upstream_body)
    usage_from_response = staticmethod(usage_from_response)
    filters_events = True  # the usage chunk the proxy asked for is dropped (see forwardable)
    event_runs = None      # every chunk is metered on its own
    forwardable = staticmethod(forwardable)
    cut_event = staticmethod(cut_event)
    render_error = staticmethod(render_error)
    # (no cache_control in Chat Completions, but gateways that route to Claude accept it)
    input_kind = staticmethod(cache_write_kind)

    @staticmethod
    def upstream_auth(api_key: str) -> tuple[str, str]:
        return ("authorization", f"Bearer {api_key}")

    @staticmethod
    def estimate_input(facts: RequestFacts) -> int:
        return estimate_openai_input_tokens(facts.body)

    @staticmethod
    def min_output(facts: RequestFacts) -> int:
        return 1

    @staticmethod
    def count_tokens_body(facts: RequestFacts) -> bytes | None:
        return None  # Chat Completions has no token-counting endpoint: the heuristic it is

    @staticmethod
    def new_meter(facts: RequestFacts, input_estimate: int, bytes_per_token_milli: int = 3000) -> OpenAIStreamMeter:
        return OpenAIStreamMeter(input_estimate, bytes_per_token_milli)
