"""Anthropic upstream simulator: a real loopback HTTP server speaking the Messages API.

Wire format per docs PROTOCOL.md sections 1-5 and 7. The server runs aiohttp in its own thread
with its own event loop, so synchronous SDK clients (and other event loops) can talk to it.
Tests script answers with `Reply` (a queue, then `responder`, then `default`) and inspect what
arrived with `Recorded` and `StreamInfo`.

What a reply turns into is planned by the pure function `plan_reply`; the handlers only pace,
gate and write the planned events, and notice a client that goes away.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

_key = getattr(web, "RequestKey", lambda name, _type: name)  # plain str keys before aiohttp 3.13
REQUEST_ID = _key("request_id", str)

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
RATE_LIMIT_REQUESTS = 1000
MAX_BODY_BYTES = 32 * 1024 * 1024  # the Messages API's request size limit (PROTOCOL 4.1)

MODELS = [
    # (id, display name, created, lifecycle, line)
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-17T00:00:00Z", "active", "opus"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-08-20T00:00:00Z", "active", "sonnet"),
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-07-30T00:00:00Z", "active", "haiku"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z", "active", "haiku"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", "deprecated", "sonnet"),
]


@dataclass
class Reply:
    """What the simulator answers to ONE /v1/messages call.

    Content is emitted in the order thinking, text, tool_use. If `chunks` is given, it is the text.
    If the output would exceed the request's `max_tokens`, the text is cut proportionally, the
    tool_use is dropped, and usage reports output_tokens == max_tokens with stop_reason
    "max_tokens". "After N text deltas" points (error_event_after, drop_after, gate_after) are
    clamped to just after the last text delta.
    """

    text: str = "Hello from the simulator."
    chunks: list[str] | None = None  # text_delta pieces (their join is the text); default: ~8 word groups
    input_tokens: int = 25
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    output_tokens: int | None = None  # default: max(1, ceil(len(text.encode()) / 4))
    message_delta_count: int = 1  # >1: several message_delta events with running (cumulative) totals
    final_input_tokens: int | None = None  # final message_delta (and JSON usage) report this input
    web_search_requests: int = 0
    thinking: str | None = None  # thinking block (thinking_delta pieces + signature_delta) before the text
    tool_use: dict | None = None  # tool_use block with this input after the text; stop_reason tool_use
    tool_name: str | None = None  # default: first tool named in the request, else "get_weather"
    stop_reason: str | None = None  # override (e.g. "pause_turn"); max_tokens truncation wins
    full_delta_usage: bool = False  # final message_delta also carries input and cache counts
    event_delay: float = 0.0  # seconds between SSE events
    headers_delay: float = 0.0  # seconds before the response headers
    status: int = 200  # != 200: Anthropic error body with this status (stream or not)
    error_type: str | None = None  # default: Anthropic's type for the status; overloaded_error mid-stream
    error_message: str | None = None
    error_code: str | None = None  # error.details.error_code
    error_event_after: int | None = None  # stream: after N text deltas send `event: error`, end cleanly
    drop_after: int | None = None  # stream: after N text deltas close the connection, no final chunk;
    #                                non-stream: close the connection instead of answering
    gate: str | None = None  # wait until `open_gate(gate)` ...
    gate_after: int | None = None  # ... before the headers (None) or after N text deltas
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
    reply: Reply | None = None  # the Reply used, for /v1/messages calls that got one


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
class Plan:
    events: list[tuple[str, dict]]  # (event name, payload); payload["type"] == name
    message: dict  # the same answer as one Message object (non-streaming body)
    text_delta_at: list[int]  # indexes of text_delta events in `events`

    def cut_index(self, after: int) -> int:
        """Index of the event before which `after` text deltas have been sent (see Reply fields)."""
        if after < len(self.text_delta_at):
            return self.text_delta_at[after]
        if self.text_delta_at:
            return self.text_delta_at[-1] + 1
        return next(i for i, (name, _) in enumerate(self.events) if name == "message_delta")


def split_words(text: str, pieces: int = 8) -> list[str]:
    """Split into at most `pieces` parts on word starts; the parts join back to `text`."""
    words = [w for w in re.split(r"(?<=\s)(?=\S)", text) if w]
    n = min(pieces, len(words))
    bounds = [len(words) * i // n for i in range(n + 1)] if n else []
    return ["".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]


def default_output_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode()) / 4))


def _truncate(chunks: list[str], keep: int) -> list[str]:
    out = []
    for chunk in chunks:
        if keep <= 0:
            break
        out.append(chunk[:keep])
        keep -= len(chunk)
    return out


def _tool_name(body: dict) -> str:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict) and tools[0].get("name"):
        return str(tools[0]["name"])
    return "get_weather"


def plan_reply(reply: Reply, body: dict, msg_id: str = "msg_sim", tool_id: str = "toolu_sim") -> Plan:
    """[pure] The events (and the equivalent Message) that answer `body` with `reply`.

    If the output would exceed the request's `max_tokens`, the text is cut proportionally,
    any tool_use is dropped, output_tokens == max_tokens and stop_reason is "max_tokens".
    """
    chunks = list(reply.chunks) if reply.chunks is not None else split_words(reply.text)
    text = "".join(chunks)
    output = reply.output_tokens if reply.output_tokens is not None else default_output_tokens(text)
    stop = reply.stop_reason or ("tool_use" if reply.tool_use is not None else "end_turn")
    tool, truncated, max_tokens = reply.tool_use, False, body.get("max_tokens")
    if isinstance(max_tokens, int) and output > max_tokens:
        chunks = _truncate(chunks, len(text) * max_tokens // output)
        text, output, stop, tool, truncated = "".join(chunks), max_tokens, "max_tokens", None, True

    blocks: list[tuple[dict, list[dict], dict]] = []  # (start block, deltas, final block)
    if reply.thinking is not None:
        sig = "sig_" + uuid.uuid5(uuid.NAMESPACE_OID, reply.thinking).hex
        deltas = [{"type": "thinking_delta", "thinking": p} for p in split_words(reply.thinking)]
        blocks.append(({"type": "thinking", "thinking": "", "signature": ""},
                       deltas + [{"type": "signature_delta", "signature": sig}],
                       {"type": "thinking", "thinking": reply.thinking, "signature": sig}))
    if text or not (truncated or blocks or tool is not None):
        blocks.append(({"type": "text", "text": ""},
                       [{"type": "text_delta", "text": c} for c in chunks],
                       {"type": "text", "text": text}))
    if tool is not None:
        name = reply.tool_name or _tool_name(body)
        raw = json.dumps(tool)
        size = math.ceil(len(raw) / 3)  # "" first, as the API does, then three fragments
        pieces = [""] + [raw[i:i + size] for i in range(0, len(raw), size)]
        blocks.append(({"type": "tool_use", "id": tool_id, "name": name, "input": {}},
                       [{"type": "input_json_delta", "partial_json": p} for p in pieces],
                       {"type": "tool_use", "id": tool_id, "name": name, "input": tool}))

    cache_write = reply.cache_write_5m + reply.cache_write_1h
    start_usage = {
        "input_tokens": reply.input_tokens, "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": reply.cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": reply.cache_write_5m,
                           "ephemeral_1h_input_tokens": reply.cache_write_1h},
        "output_tokens": min(1, output), "service_tier": "standard",
    }
    final_input = reply.final_input_tokens if reply.final_input_tokens is not None else reply.input_tokens
    server_tool_use = ({"web_search_requests": reply.web_search_requests, "web_fetch_requests": 0}
                       if reply.web_search_requests else None)
    message = {
        "id": msg_id, "type": "message", "role": "assistant", "model": reply.model or body.get("model"),
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage,
    }
    events: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": message}),
                                      ("ping", {"type": "ping"})]
    for index, (start, deltas, _) in enumerate(blocks):
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    count = max(1, reply.message_delta_count)
    for k in range(1, count + 1):
        usage: dict[str, Any] = {"output_tokens": math.ceil(output * k / count)}
        if k == count and (reply.full_delta_usage or reply.final_input_tokens is not None):
            usage = {"input_tokens": final_input, "cache_creation_input_tokens": cache_write,
                     "cache_read_input_tokens": reply.cache_read, **usage}
        if k == count and server_tool_use:
            usage["server_tool_use"] = server_tool_use
        delta = {"stop_reason": stop if k == count else None, "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(("message_stop", {"type": "message_stop"}))

    final_usage = {**start_usage, "input_tokens": final_input, "output_tokens": output,
                   "server_tool_use": server_tool_use, "inference_geo": "global"}
    full = {**message, "content": [b[2] for b in blocks], "stop_reason": stop, "usage": final_usage}
    text_at = [i for i, (_, p) in enumerate(events) if p.get("delta", {}).get("type") == "text_delta"]
    return Plan(events, full, text_at)


def sse(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def error_body(error_type: str, message: str, request_id: str, code: str | None = None) -> dict:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if code is not None:
        error["details"] = {"error_code": code}
    return {"type": "error", "error": error, "request_id": request_id}


def _model_info(model: tuple[str, str, str, str, str]) -> dict:
    mid, name, created, lifecycle, line = model
    return {"type": "model", "id": mid, "display_name": name, "created_at": created,
            "lifecycle": lifecycle, "deprecated_at": "2026-10-01T00:00:00Z" if lifecycle != "active" else None,
            "retires_at": None, "line": line, "max_input_tokens": 1_000_000, "max_tokens": 128_000}


def models_page(query: dict[str, str]) -> dict:
    """[pure] GET /v1/models: limit, after_id, before_id, lifecycle (PROTOCOL 7.2)."""
    models = [_model_info(m) for m in MODELS
              if "lifecycle" not in query or m[3] == query["lifecycle"]]
    ids = [m["id"] for m in models]
    limit = max(1, min(1000, int(query.get("limit", 20))))
    if query.get("before_id") in ids:
        end = ids.index(query["before_id"])
        page, more = models[max(0, end - limit):end], end - limit > 0
    else:
        start = ids.index(query["after_id"]) + 1 if query.get("after_id") in ids else 0
        page, more = models[start:start + limit], start + limit < len(models)
    return {"data": page, "has_more": more,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


class AnthropicSimulator:
    """A loopback Anthropic API. `start()` returns once it listens; `stop()` shuts it down.

    Routes: POST /v1/messages (JSON, or SSE when the body has `"stream": true`; any query string),
    POST /v1/messages/count_tokens, GET /v1/models, GET /v1/models/{id}; anything else is a 404
    in Anthropic's error shape. Every request is recorded first, then checked: no `x-api-key` /
    `Authorization: Bearer` (or one not in `api_keys`) -> 401, no `anthropic-version` -> 400,
    a Messages body without model/messages/max_tokens -> 400.

    Stream bookkeeping: a stream is a /v1/messages call with `stream: true` whose Reply has
    status 200; it counts as started when its handler begins (before headers_delay and gates)
    and ends as exactly one of completed (message_stop written), aborted (the client went away:
    a failed write, or the handler cancelled because the connection closed or at `stop()`),
    error_event or dropped. Once `wait_idle()` returns True:
    started == completed + aborted + errored + dropped.

    All public methods may be called from any thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.default = Reply()
        self.responder: Callable[[Recorded], Reply] | None = None  # used when the queue is empty
        self.count_tokens_reply: int | None = None
        self.api_keys: set[str] | None = None  # if set, only these keys (either header style) pass
        self._cond = threading.Condition()
        self._queue: deque[Reply] = deque()
        self._requests: list[Recorded] = []
        self._streams: list[StreamInfo] = []
        self._in_progress = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._at_gate: dict[str, int] = {}
        self._end_counter = itertools.count(1)
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready: list[BaseException | None] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready, started), name="anthropic-sim", daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            self._thread = None
            raise ready[0]

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> AnthropicSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self, ready: list, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(self._common_headers)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id}", self._model)
        # handler_cancellation: a client that leaves is noticed at once, even mid-sleep.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # reported to start()'s caller
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.append(exc)
            started.set()
            return
        ready.append(None)
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            with self._cond:
                self._in_progress = 0
                self._cond.notify_all()

    # -- scripting and inspection (any thread) ---------------------------------------------
    def queue(self, *replies: Reply) -> None:
        with self._cond:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget queued replies, recorded requests, streams and gates; restore `default`.

        Responses held at a gate are released first, so nothing stays stuck.
        """
        with self._cond:
            names = list(self._gates)
        for name in names:
            self.open_gate(name)
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._streams.clear()
            self._gates.clear()
            self._at_gate.clear()
        self.default, self.responder, self.count_tokens_reply, self.api_keys = Reply(), None, None, None

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    def messages_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    @property
    def streams(self) -> list[StreamInfo]:
        with self._cond:
            return list(self._streams)

    def _count(self, outcome: str | None) -> int:
        return sum(1 for s in self.streams if outcome is None or s.outcome == outcome)

    streams_started = property(lambda self: self._count(None))
    streams_completed = property(lambda self: self._count("completed"))
    streams_aborted = property(lambda self: self._count("aborted"))
    streams_errored = property(lambda self: self._count("error_event"))
    streams_dropped = property(lambda self: self._count("dropped"))

    def last_stream_events_sent(self) -> int:
        """Events written by the stream that ended most recently (0 if none has ended)."""
        ended = [s for s in self.streams if s.end_order]
        return max(ended, key=lambda s: s.end_order).events_sent if ended else 0

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled (answered, or its handler ended). True if idle.

        A request still on its way here does not count: use `wait_requests` first if that matters.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._in_progress == 0, timeout)

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` requests (any route) have arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def open_gate(self, name: str) -> None:
        with self._cond:
            gate = self._gates.setdefault(name, asyncio.Event())
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(gate.set)
        else:
            gate.set()

    def close_gate(self, name: str) -> None:
        with self._cond:
            gate = self._gates.setdefault(name, asyncio.Event())
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(gate.clear)
        else:
            gate.clear()

    def wait_at_gate(self, name: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `count` responses are held at gate `name`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._at_gate.get(name, 0) >= count, timeout)

    # -- server side (simulator thread) ----------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        request[REQUEST_ID] = f"req_sim_{uuid.uuid4().hex[:24]}"
        with self._cond:
            self._in_progress += 1
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._error(request, 413, "request_too_large", "Request exceeds the maximum size (32 MB).")
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None
            headers: dict[str, str] = {}
            for key, value in request.headers.items():
                k = key.lower()
                headers[k] = f"{headers[k]}, {value}" if k in headers else value
            rec = Recorded(request.method, request.path, request.query_string, headers, body, parsed)
            request[RECORDED] = rec
            with self._cond:
                self._requests.append(rec)
                self._cond.notify_all()
            try:
                resp = self._check_headers(request, rec) or await handler(request)
            except web.HTTPException as exc:
                resp = self._error(request, exc.status, ERROR_TYPES.get(exc.status, "invalid_request_error"),
                                   f"{request.method} {request.path}: {exc.reason}")
            if not resp.prepared:  # write it here, so wait_idle() means "answered"
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:
                    pass
            return resp
        finally:
            with self._cond:
                self._in_progress -= 1
                self._cond.notify_all()

    async def _common_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        with self._cond:
            used = len(self._requests)
        response.headers.setdefault("request-id", request.get(REQUEST_ID, "req_sim_unknown"))
        response.headers.setdefault("anthropic-organization-id", "org_sim")
        response.headers.setdefault("anthropic-ratelimit-requests-limit", str(RATE_LIMIT_REQUESTS))
        response.headers.setdefault("anthropic-ratelimit-requests-remaining", str(max(0, RATE_LIMIT_REQUESTS - used)))
        response.headers.setdefault("anthropic-ratelimit-requests-reset", "2026-12-01T00:00:00Z")

    def _check_headers(self, request: web.Request, rec: Recorded) -> web.Response | None:
        key = rec.headers.get("x-api-key")
        bearer = rec.headers.get("authorization", "")
        if key is None and bearer.lower().startswith("bearer "):
            key = bearer[7:].strip()
        if not key or (self.api_keys is not None and key not in self.api_keys):
            return self._error(request, 401, "authentication_error", "invalid x-api-key")
        if not rec.headers.get("anthropic-version"):
            return self._error(request, 400, "invalid_request_error", "anthropic-version: header is required")
        return None

    def _error(self, request: web.Request, status: int, error_type: str, message: str,
               code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        body = error_body(error_type, message, request[REQUEST_ID], code)
        return web.json_response(body, status=status, headers=headers)

    @staticmethod
    def _body_problem(body: Any, required: tuple[str, ...]) -> str | None:
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        missing = [k for k in required if k not in body]
        if missing:
            return f"{missing[0]}: Field required"
        if "max_tokens" in required and (not isinstance(body["max_tokens"], int) or body["max_tokens"] < 0):
            return "max_tokens: must be a non-negative integer"
        return None

    def _next_reply(self, rec: Recorded) -> Reply:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
        return self.responder(rec) if self.responder is not None else self.default

    async def _pass_gate(self, name: str) -> None:
        with self._cond:
            gate = self._gates.setdefault(name, asyncio.Event())
            self._at_gate[name] = self._at_gate.get(name, 0) + 1
            self._cond.notify_all()
        try:
            await gate.wait()
        finally:
            with self._cond:
                self._at_gate[name] -= 1

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        rec: Recorded = request[RECORDED]
        problem = self._body_problem(rec.json, ("model", "messages", "max_tokens"))
        if problem:
            return self._error(request, 400, "invalid_request_error", problem)
        reply = rec.reply = self._next_reply(rec)
        stream = rec.json.get("stream") is True
        info = StreamInfo(rec) if stream and reply.status == 200 else None
        if info is not None:
            with self._cond:
                self._streams.append(info)
        try:
            return await self._answer(request, rec, reply, info)
        except asyncio.CancelledError:  # the client left (handler_cancellation) or stop()
            if info is not None:
                self._end(info, "aborted")
            raise

    async def _answer(self, request: web.Request, rec: Recorded, reply: Reply,
                      info: StreamInfo | None) -> web.StreamResponse:
        if reply.headers_delay:
            await asyncio.sleep(reply.headers_delay)
        if reply.gate is not None and reply.gate_after is None:
            await self._pass_gate(reply.gate)
        if reply.status != 200:
            error_type = reply.error_type or ERROR_TYPES.get(reply.status, "api_error")
            return self._error(request, reply.status, error_type, reply.error_message or f"simulated {error_type}",
                               reply.error_code, reply.extra_headers)
        n = next(self._ids)
        plan = plan_reply(reply, rec.json, f"msg_sim_{n:06d}", f"toolu_sim_{n:06d}")
        if info is None:
            if reply.drop_after is not None and request.transport is not None:
                request.transport.close()
            return web.json_response(plan.message, headers=reply.extra_headers)
        return await self._stream(request, reply, plan, info)

    async def _stream(self, request: web.Request, reply: Reply, plan: Plan, info: StreamInfo) -> web.StreamResponse:
        info.planned_events = len(plan.events)
        cuts = {"dropped": reply.drop_after, "error_event": reply.error_event_after}
        cut_at = {plan.cut_index(after): outcome for outcome, after in cuts.items() if after is not None}
        gate_at = plan.cut_index(reply.gate_after) if reply.gate and reply.gate_after is not None else None
        resp = web.StreamResponse(headers={**reply.extra_headers, "content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for i, (name, payload) in enumerate(plan.events):
                if i == gate_at:
                    await self._pass_gate(reply.gate)  # type: ignore[arg-type]
                if cut_at.get(i) == "dropped":  # a drop at the same point as an error event wins
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then FIN: no final chunk
                    self._end(info, "dropped")
                    return resp
                if i in cut_at:
                    error = error_body(reply.error_type or "overloaded_error", reply.error_message or "Overloaded",
                                       request[REQUEST_ID], reply.error_code)
                    await self._write(resp, info, sse("error", error), reply.event_delay)
                    self._end(info, "error_event")
                    break
                await self._write(resp, info, sse(name, payload), reply.event_delay if i else 0.0)
                if i in plan.text_delta_at:
                    info.text_deltas_sent += 1
            else:
                self._end(info, "completed")
            await resp.write_eof()
        except ConnectionError:  # a write found the client gone; aiohttp must not log it
            self._end(info, "aborted")
        return resp

    async def _write(self, resp: web.StreamResponse, info: StreamInfo, data: bytes, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await resp.write(data)
        info.events_sent += 1

    def _end(self, info: StreamInfo, outcome: str) -> None:
        if info.outcome == "in_progress":
            with self._cond:
                info.outcome, info.end_order = outcome, next(self._end_counter)
                self._cond.notify_all()

    async def _count_tokens(self, request: web.Request) -> web.Response:
        rec: Recorded = request[RECORDED]
        problem = self._body_problem(rec.json, ("model", "messages"))
        if problem:
            return self._error(request, 400, "invalid_request_error", problem)
        tokens = self.count_tokens_reply
        if tokens is None:
            tokens = max(1, math.ceil(len(rec.body) / 4))
        return web.json_response({"input_tokens": tokens})

    async def _models(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(models_page(dict(request.query)))
        except ValueError:
            return self._error(request, 400, "invalid_request_error", "limit: must be an integer")

    async def _model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        for model in MODELS:
            if model[0] == model_id:
                return web.json_response(_model_info(model))
        return self._error(request, 404, "not_found_error", f"model: {model_id}")
