"""[pure] The Anthropic Messages API: what the proxy reads from requests, responses and streams."""
from __future__ import annotations

import json
import re
from bisect import bisect_right
from itertools import accumulate
from typing import Any, Sequence

from proxy.billing import NO_BILL, Bill, total_of
from proxy.errors import InvalidRequest, ProxyError
from proxy.estimate import estimate_input_tokens
from proxy.meter import GREW, REPORTED, UNCHANGED, OutputEstimate
from proxy.providers import (PassRoute, Rendered, RequestFacts, cache_write_kind, fixed_path, json_object,
                             model_path, rendered)
from proxy.sse import SSEEvent, SSERun, expand, run_reader, run_sizes, split
from proxy.usage import Usage
from proxy.validate import check_model, parse_body


def parse_request(raw: bytes) -> RequestFacts:
    body = parse_body(raw)
    model = check_model(body.get("model"))
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: must be a positive integer.")
    return RequestFacts(body, model, max_tokens, body.get("stream") is True)


# Extended thinking: budget_tokens must be at least this and below max_tokens, or the API refuses.
THINKING_MIN_BUDGET = 1024


def thinking_budget(body: dict[str, Any]) -> int | None:
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    return budget if isinstance(budget, int) and not isinstance(budget, bool) else None


def min_output(facts: RequestFacts) -> int:
    """The fewest output tokens the request can be forwarded with once clamped: with a thinking
    budget, its minimum plus one (budget_tokens < max_tokens)."""
    return 1 if thinking_budget(facts.body) is None else THINKING_MIN_BUDGET + 1


def with_max_tokens(facts: RequestFacts, max_tokens: int) -> bytes:
    """The body with max_tokens lowered, and a thinking budget lowered below it (never below the
    API's minimum: the relay forwards no clamp below min_output)."""
    body = {**facts.body, "max_tokens": max_tokens}
    budget = thinking_budget(body)
    if budget is not None and budget >= max_tokens:
        body["thinking"] = {**body["thinking"], "budget_tokens": max(THINKING_MIN_BUDGET, max_tokens - 1)}
    return json.dumps(body, separators=(",", ":")).encode()


def count_tokens_body(facts: RequestFacts) -> bytes:
    keep = ("model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control",
            "output_config", "speed")
    return json.dumps({k: facts.body[k] for k in keep if k in facts.body}).encode()


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


_NO_USAGE = Usage()


def usage_from(u: Any, *, previous: Usage | None = None) -> Usage:
    """Map an Anthropic `usage` object onto Usage. Fields a message_delta leaves out keep their
    previous running totals; the 5m/1h split of cache writes comes from the breakdown when given."""
    prev = previous or _NO_USAGE
    if not isinstance(u, dict):
        return prev
    get = u.get
    # (each field: its new figure when present, else the previous running total)
    v = get("cache_creation_input_tokens")
    cache_total = prev.cache_write_tokens if v is None else _int(v)
    breakdown = get("cache_creation")
    if isinstance(breakdown, dict):
        w1h = _int(breakdown.get("ephemeral_1h_input_tokens"))
        w5m = max(cache_total - w1h, _int(breakdown.get("ephemeral_5m_input_tokens")))
        if w5m + w1h < cache_total:
            w5m = cache_total - w1h
    else:
        # No breakdown (message_delta never has one): keep the 1h part known so far, rest at 5m.
        w1h = min(prev.cache_write_1h_tokens, cache_total)
        w5m = cache_total - w1h
    searches = prev.web_search_requests
    stu = get("server_tool_use")
    if isinstance(stu, dict) and stu.get("web_search_requests") is not None:
        searches = _int(stu.get("web_search_requests"))
    v = get("input_tokens")
    input_tokens = prev.input_tokens if v is None else _int(v)
    v = get("cache_read_input_tokens")
    cache_read = prev.cache_read_tokens if v is None else _int(v)
    v = get("output_tokens")
    output = prev.output_tokens if v is None else _int(v)
    return Usage(input_tokens, w5m, w1h, cache_read, output, searches)


_USAGE_KEY = b'"usage":'
_decode_at = json.JSONDecoder().raw_decode


def _trailing_usage(raw: bytes) -> Any:
    """The reply's usage object when it is the last member of the top-level object (the API's
    own order), read without parsing the content before it; None otherwise. Sound: the bytes
    '"usage":' cannot occur inside a JSON string (its quotes would be escaped), and an object
    followed by nothing but '}' closes the document, so it is a top-level member, and the last
    one, which is the one a parser keeps."""
    at = raw.rfind(_USAGE_KEY)
    if at == -1:
        return None
    try:
        text = raw[at + len(_USAGE_KEY):].decode()
        usage, end = _decode_at(text, len(text) - len(text.lstrip()))
    except (ValueError, RecursionError):
        return None
    return usage if isinstance(usage, dict) and text[end:].strip() == "}" else None


def _declined(item: dict[str, Any], later: list[Any]) -> bool:
    """A fallback's declined attempt: a `message` iteration that generated nothing, followed by
    the `fallback_message` that served. A refusal without output is not billed (docs/budgets.md)."""
    return (item.get("type") == "message" and _int(item.get("output_tokens")) == 0
            and any(isinstance(x, dict) and x.get("type") == "fallback_message" for x in later))


def iterations_from(u: Any) -> tuple[tuple[str | None, Usage], ...] | None:
    """The billed sampling calls of `usage.iterations` as (model or None, usage); None when the
    usage is not itemised. Not billed: an iteration marked `billed: false`, a declined attempt."""
    items = u.get("iterations") if isinstance(u, dict) else None
    if not isinstance(items, list) or not items:
        return None
    parts = []
    for i, it in enumerate(items):
        if isinstance(it, dict) and it.get("billed") is not False and not _declined(it, items[i + 1:]):
            model = it.get("model")
            parts.append((model if isinstance(model, str) and model else None, usage_from(it)))
    return tuple(parts)


_SERVER_TOOL_BLOCK = re.compile(rb'"type":\s*"server_tool_use"')


def ran_server_tools(u: Any, content: bytes) -> bool:
    """Server tools ran (a block of theirs, or a request counted): the usage sums a loop of
    sampling calls, none of which need have been long."""
    stu = u.get("server_tool_use") if isinstance(u, dict) else None
    if isinstance(stu, dict) and any(_int(v) for v in stu.values()):
        return True
    return _SERVER_TOOL_BLOCK.search(content) is not None


def billed_usage(u: Any, usage: Usage, bill: Bill) -> tuple[Usage, Bill]:
    """`usage` (the top-level figures) and `bill`, or, when `u` itemises the call, the sum of its
    billed iterations and a bill naming them."""
    parts = iterations_from(u)
    if parts is None:
        return usage, bill
    return total_of(parts, usage.web_search_requests), bill._replace(parts=parts)


# The response's model: the first "model" member (the API sends it before the content). The bytes
# '"model":' only ever occur as a key (a quote inside a JSON string is escaped).
_MODEL_MEMBER = re.compile(rb'"model":\s*"([^"\\]{1,256})"')


def served_model(raw: bytes) -> str | None:
    m = _MODEL_MEMBER.search(raw)
    return None if m is None else m[1].decode("utf-8", "replace")


def usage_from_response(raw: bytes) -> tuple[Usage, Bill] | None:
    usage = _trailing_usage(raw)
    if usage is None:
        obj = json_object(raw)
        usage = None if obj is None else obj.get("usage")
    if not isinstance(usage, dict):
        return None
    return billed_usage(usage, usage_from(usage), Bill(served_model(raw), (), ran_server_tools(usage, raw)))


def cut_event(message: str, error_type: str = "rate_limit_error", error_code: str = "budget_exceeded") -> bytes:
    payload = {"type": "error", "error": {"type": error_type, "message": message,
                                          "details": {"error_code": error_code}}}
    return b"event: error\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _stop_reason(body: dict[str, Any]) -> bool:
    delta = body.get("delta")
    return isinstance(delta, dict) and delta.get("stop_reason") is not None


# A text delta in the API's own compact form, its text with no escape (no backslash) and so no
# quote: the captured text is exactly what a JSON parse would give.
_TEXT_DELTA = re.compile(r'\{"type":"content_block_delta","index":[0-9]+,'
                         r'"delta":\{"type":"text_delta","text":"([^"\\]*)"\}\}')
_match_text_delta = _TEXT_DELTA.fullmatch
# The same events for SSEDecoder(runs=...): a stream's text deltas, consecutive and of one content
# block (its index is the run's key), are read by one possessive match and metered a run at a time:
# their text is the run's bytes less each event's fixed frame (_RUN_FRAME plus the index).
_RUN_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_RUN_MID = b',"delta":{"type":"text_delta","text":"'
_RUN_TAIL = b'"}}\n\n'
_RUN_FRAME = len(_RUN_HEAD) + len(_RUN_MID) + len(_RUN_TAIL)


def _member(index: bytes) -> bytes:
    return re.escape(_RUN_HEAD) + index + re.escape(_RUN_MID) + rb'[^"\\\n]*+' + re.escape(_RUN_TAIL)


_read_run_exactly = run_reader(re.compile(_member(rb"([0-9]++)") + rb"(?:" + _member(rb"\1") + rb")*+"))
_RUN_QUOTES = (_RUN_HEAD + _RUN_MID + _RUN_TAIL).count(b'"')
_between: dict[bytes, bytes] = {}  # per index: one delta's tail and the next one's head


def read_text_delta_run(data: bytes, pos: int, end: int) -> tuple[int, bytes, int] | None:
    """The run of text deltas at `pos`, as the possessive pattern above reads it, in a few C
    scans instead of thousands of regex steps (measurably faster: bench/RESULTS.md): the run's last member is
    the last one of its index before `end`, and the run is whole when counts add up. Each member
    has 3 LFs and _RUN_QUOTES quotes, and members meet at `between` (which holds a LF LF, so it
    is only ever found at a boundary): when the LFs are 3 x (betweens + 1), every boundary is a
    between; when the quotes are _RUN_QUOTES x members and there is no backslash, no text holds
    a quote or an escape. Anything else, the pattern decides."""
    if not data.startswith(_RUN_HEAD, pos):
        return None
    k = pos + len(_RUN_HEAD)
    comma = data.find(b",", k, k + 24)
    key = data[k:comma]
    if comma == -1 or not key.isdigit() or not data.startswith(_RUN_MID, comma):
        return _read_run_exactly(data, pos, end)
    between = _between.get(key)
    if between is None:
        if len(_between) > 64:
            _between.clear()
        between = _between[key] = _RUN_TAIL + _RUN_HEAD + key + _RUN_MID
    last = data.rfind(between, comma, end)
    text = comma + len(_RUN_MID) if last == -1 else last + len(between)
    quote = data.find(b'"', text, end)
    run_end = quote + len(_RUN_TAIL)
    if quote != -1 and run_end <= end and data.startswith(_RUN_TAIL, quote):
        n = 1 + (0 if last == -1 else data.count(between, pos, run_end))
        if (data.count(10, pos, run_end) == 3 * n and data.count(34, pos, run_end) == _RUN_QUOTES * n
                and data.find(92, pos, run_end) == -1):
            return run_end, key, n
    return _read_run_exactly(data, pos, end)


TEXT_DELTA_RUNS = ("content_block_delta", read_text_delta_run)


def _plain_text_delta(data: str) -> str | None:
    """The text of a text delta in the API's own compact form, read without a JSON parse (the
    parse was a third of the relay's per-event cost); None for anything else, which the JSON
    path handles."""
    m = _match_text_delta(data)
    return None if m is None else m[1]


_DATA_TYPE = re.compile(r'\{\s*"type"\s*:\s*"([a-z_]{1,40})"')


def event_type(data: str) -> str | None:
    """The `type` a data-only event's JSON names (its leading member in the API's own order, else
    parsed)."""
    m = _DATA_TYPE.match(data)
    if m is not None:
        return m[1]
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


_CONTENT_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


class AnthropicStreamMeter:
    """Running usage of one Anthropic stream. Every usage figure is a running total: each
    message_delta overwrites, never adds (docs/budgets.md "Metering")."""

    __slots__ = ("started", "finished", "complete", "upstream_error", "bill", "_top", "_reported", "_delta_seen", "_estimate")

    def __init__(self, bytes_per_token_milli: int = 3000) -> None:
        self.started = False
        self.finished = False
        self.complete = False  # message_stop came: the stream ended as the API ends one
        self.upstream_error: str | None = None
        self.bill = NO_BILL  # the served model (message_start) and the billed iterations (message_delta)
        self._top = Usage()       # the top-level running totals
        self._reported = Usage()  # what is billed: the top-level totals, or the sum of the iterations
        self._delta_seen = False
        self._estimate = OutputEstimate(bytes_per_token_milli)

    def feed(self, event: SSEEvent) -> int:
        name = event.event
        if name is None:  # a data-only event (some compatible gateways): its JSON's type names it
            name = event_type(event.data)
        if name == "content_block_delta":
            text = _plain_text_delta(event.data)
            if text is not None:
                if text:
                    self._estimate.add(text)
                    return GREW
                return UNCHANGED
            try:
                delta = json.loads(event.data)["delta"]
                text = delta[_CONTENT_FIELDS[delta["type"]]]
            except (ValueError, KeyError, TypeError, RecursionError):
                return UNCHANGED
            if isinstance(text, str) and text:
                self._estimate.add(text)
                return GREW
            return UNCHANGED
        if name == "message_start":
            try:
                message = json.loads(event.data)["message"]
                usage = message["usage"]
            except (ValueError, KeyError, TypeError, RecursionError):
                message = usage = None
            self.started = True
            model = message.get("model") if isinstance(message, dict) else None
            self.bill = Bill(model if isinstance(model, str) else None)
            self._top = usage_from(usage)
            self._reported, self.bill = billed_usage(usage, self._top, self.bill)
            return REPORTED
        if name == "message_delta":
            try:
                body = json.loads(event.data)
                usage = body.get("usage")
            except (ValueError, AttributeError, RecursionError):
                return UNCHANGED
            self._top = usage_from(usage, previous=self._top)
            if self._top.web_search_requests and not self.bill.tool_loop:
                self.bill = self.bill._replace(tool_loop=True)
            if not self.bill.parts or iterations_from(usage) is not None:
                # (an itemised report stands until another itemises: the top level leaves parts out)
                self._reported, self.bill = billed_usage(usage, self._top, self.bill)
            self._delta_seen = self._delta_seen or isinstance(usage, dict)
            if _stop_reason(body):
                self.finished = True  # the final delta: the message is complete, nothing left to cut
            return REPORTED
        if name == "content_block_start":
            if not self.bill.tool_loop and "server_tool_use" in event.data:
                self.bill = self.bill._replace(tool_loop=ran_server_tools(None, event.data.encode()))
            return UNCHANGED
        if name == "message_stop":
            self.finished = self.complete = True
        elif name == "error":
            try:
                self.upstream_error = str(json.loads(event.data)["error"]["type"])
            except (ValueError, KeyError, TypeError, RecursionError):
                self.upstream_error = "error"
        return UNCHANGED

    def feed_events(self, events: Sequence[SSEEvent], start: int, room: int) -> tuple[int, int]:
        # feed() inlined for the text deltas that make up most of a stream: the live output
        # passes `room` exactly when the reported figure or the byte estimate does.
        estimate = self._estimate
        limit_bytes = -1 if self._reported.output_tokens > room else estimate.bytes_within(room)
        match = _match_text_delta
        i = start
        while i < len(events):
            ev = events[i]
            i += 1
            if type(ev) is SSERun:  # text deltas in the compact form (TEXT_DELTA_RUNS), no escapes
                raw = ev.raw
                if not raw.isascii():  # ASCII: the bytes are the text's UTF-8; else event by event
                    events[i - 1:i] = expand(ev)
                    i -= 1
                    continue
                frame = _RUN_FRAME + len(ev.key)
                text_bytes = len(raw) - ev.count * frame
                if estimate.bytes + text_bytes <= limit_bytes:
                    estimate.bytes += text_bytes
                    continue
                # The event that passes the room stands alone; the relay decides at it.
                sizes = list(accumulate([n - frame for n in run_sizes(ev)]))
                events[i - 1:i] = split(ev, bisect_right(sizes, limit_bytes - estimate.bytes))
                i -= 1
                continue
            if ev[0] == "content_block_delta" and (m := match(ev[1])) is not None:
                text = m[1]
                if text:
                    estimate.bytes += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
                    if estimate.bytes > limit_bytes:
                        return i, GREW
                continue
            grew = self.feed(ev)
            if grew == REPORTED or (grew == GREW and self.live_output_tokens() > room):
                return i, grew
        return len(events), UNCHANGED

    def live_output_tokens(self) -> int:
        return max(self._reported.output_tokens, self._estimate.tokens)

    def live_usage(self) -> Usage:
        r = self._reported
        out = max(r.output_tokens, self._estimate.tokens)
        if out == r.output_tokens:
            return r
        return Usage(r.input_tokens, r.cache_write_5m_tokens, r.cache_write_1h_tokens, r.cache_read_tokens,
                     out, r.web_search_requests)

    @property
    def usage_reported(self) -> bool:
        return self._delta_seen

    @property
    def output_bytes(self) -> int:
        return self._estimate.bytes

    def final_usage(self) -> Usage:
        return self._reported if self._delta_seen else self.live_usage()


# A ProxyError's kind as error.type and error.details.error_code (details only when there is a code);
# the table in docs/http-api.md, "Errors".
ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "api_error": ("api_error", None),
    "authentication_error": ("authentication_error", None),
    "permission_error": ("permission_error", None),
    "not_found_error": ("not_found_error", None),
    "invalid_request_error": ("invalid_request_error", None),
    "request_too_large": ("request_too_large", None),
    "rate_limit_error": ("rate_limit_error", "budget_exceeded"),
}


def render_error(err: ProxyError, request_id: str) -> Rendered:
    error_type, code = ERROR_TYPES.get(err.kind, ERROR_TYPES["api_error"])
    error: dict[str, Any] = {"type": error_type, "message": err.message}
    if code is not None:
        error["details"] = {"error_code": code}
    return rendered(err, {"type": "error", "error": error, **err.extra_body(), "request_id": request_id},
                    b"request-id", request_id)


# Unmetered: counting tokens and listing models cost nothing.
PASSTHROUGH_ROUTES = (
    PassRoute("/v1/messages/count_tokens", "POST", fixed_path("/v1/messages/count_tokens"),
              "/v1/messages/count_tokens", checks_model=True),
    PassRoute("/v1/models", "GET", fixed_path("/v1/models"), "/v1/models"),
    PassRoute("/v1/models/{model_id}", "GET", model_path("/v1/models/", "/v1/models/"), "/v1/models/{id}"),
)


class AnthropicAdapter:
    name = "anthropic"
    path = "/v1/messages"
    upstream_path = "/v1/messages"
    route_prefix = "/v1/"
    default_base_url = "https://api.anthropic.com"
    count_tokens_path: str | None = "/v1/messages/count_tokens"
    passthrough_routes = PASSTHROUGH_ROUTES
    default_max_tokens = 4096  # unused: max_tokens is required by the Messages API
    filters_events = False     # every event is relayed as it came
    event_runs = TEXT_DELTA_RUNS  # the relay's decoder groups text deltas (see feed_events)

    parse_request = staticmethod(parse_request)
    usage_from_response = staticmethod(usage_from_response)
    cut_event = staticmethod(cut_event)
    render_error = staticmethod(render_error)
    input_kind = staticmethod(cache_write_kind)

    @staticmethod
    def upstream_auth(api_key: str) -> tuple[str, str]:
        return ("x-api-key", api_key)

    @staticmethod
    def estimate_input(facts: RequestFacts) -> int:
        return estimate_input_tokens(facts.body)

    min_output = staticmethod(min_output)

    @staticmethod
    def count_tokens_body(facts: RequestFacts) -> bytes | None:
        return count_tokens_body(facts)

    @staticmethod
    def upstream_body(facts: RequestFacts, raw: bytes, max_tokens: int | None) -> bytes:
        return raw if max_tokens is None else with_max_tokens(facts, max_tokens)

    @staticmethod
    def new_meter(facts: RequestFacts, input_estimate: int, bytes_per_token_milli: int = 3000) -> AnthropicStreamMeter:
        return AnthropicStreamMeter(bytes_per_token_milli)

    @staticmethod
    def forwardable(event: SSEEvent, facts: RequestFacts) -> bool:
        return True
