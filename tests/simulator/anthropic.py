"""Anthropic upstream simulator: a real loopback HTTP server speaking the Messages API.

Wire format: Anthropic's Messages API. The thread, loop, recording, reply queue,
gates and stream bookkeeping are `LoopbackSimulator`'s (server.py; shared types in common.py).
Tests script answers with `Reply` (a queue, then `responder`, then `default`) and inspect what
arrived with `Recorded` and `StreamInfo`.

What a reply turns into is planned by the pure function `plan_reply`; the shared handlers only
pace, gate and write the planned events, and notice a client that goes away.
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from tests.simulator.common import (
    RECORDED, REQUEST_ID, BaseReply, Recorded, StreamInfo, Wire, compact_json, cut_after, split_words, truncate,
)
from tests.simulator.server import LoopbackSimulator

__all__ = ["AnthropicSimulator", "Plan", "Recorded", "Reply", "StreamInfo", "error_body", "models_page",
           "plan_reply", "split_words", "sse"]

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
RATE_LIMIT_REQUESTS = 1000

MODELS = [
    # (id, display name, created, lifecycle, line)
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-17T00:00:00Z", "active", "opus"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-08-20T00:00:00Z", "active", "sonnet"),
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-07-30T00:00:00Z", "active", "haiku"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z", "active", "haiku"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", "deprecated", "sonnet"),
]


@dataclass
class Reply(BaseReply):
    """What the simulator answers to ONE /v1/messages call (pacing, gates, drops: `BaseReply`).

    Content is emitted in the order thinking, text, tool_use. If `chunks` is given, it is the text.
    If the output would exceed the request's `max_tokens`, the text is cut proportionally, the
    tool_use is dropped, and usage reports output_tokens == max_tokens with stop_reason
    "max_tokens". "After N text deltas" points (error_event_after, drop_after, gate_after) are
    clamped to just after the last text delta. Errors: the Anthropic type for `status` unless
    `error_type` says otherwise, overloaded_error mid-stream; `error_code` is error.details.error_code.
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
    error_event_after: int | None = None  # stream: after N text deltas send `event: error`, end cleanly
    data_only: bool = False  # stream: frames without `event:` lines (data only, as some gateways send)


@dataclass
class Plan:
    events: list[tuple[str, dict]]  # (event name, payload); payload["type"] == name
    message: dict  # the same answer as one Message object (non-streaming body)
    text_delta_at: list[int]  # indexes of text_delta events in `events`

    def cut_index(self, after: int) -> int:
        """Index of the event before which `after` text deltas have been sent (see Reply fields)."""
        first_delta = next(i for i, (name, _) in enumerate(self.events) if name == "message_delta")
        return cut_after(self.text_delta_at, after, first_delta)


def default_output_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode()) / 4))


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
        chunks = truncate(chunks, len(text) * max_tokens // output)
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
    return f"event: {name}\ndata: {compact_json(payload)}\n\n".encode()


def sse_data_only(name: str, payload: dict) -> bytes:
    """The frame without its `event:` line: a reader must type it by the data's `type`."""
    return f"data: {compact_json(payload)}\n\n".encode()


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
    """[pure] GET /v1/models: limit, after_id, before_id, lifecycle."""
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


class AnthropicSimulator(LoopbackSimulator):
    """A loopback Anthropic API. `start()` returns once it listens; `stop()` shuts it down.

    Routes: POST /v1/messages (JSON, or SSE when the body has `"stream": true`; any query string),
    POST /v1/messages/count_tokens, GET /v1/models, GET /v1/models/{id}; anything else is a 404
    in Anthropic's error shape. Every request is recorded first, then checked: no `x-api-key` /
    `Authorization: Bearer` (or one not in `api_keys`) -> 401, no `anthropic-version` -> 400,
    a Messages body without model/messages/max_tokens -> 400.

    Stream bookkeeping as in server.py: a stream completes when message_stop is written; `stop()`
    cancels responses held at a gate (they end aborted). All public methods: any thread.
    """

    reply_type = Reply
    thread_name = "anthropic-sim"
    default: Reply
    responder: Callable[[Recorded], Reply] | None

    def _knobs(self) -> None:
        super()._knobs()
        self.count_tokens_reply: int | None = None  # count_tokens answer; default ceil(body bytes / 4)

    def messages_requests(self) -> list[Recorded]:
        return self._requests_to("/v1/messages")

    # -- hooks for LoopbackSimulator (simulator thread) ---------------------------------------
    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self._messages)
        router.add_post("/v1/messages/count_tokens", self._count_tokens)
        router.add_get("/v1/models", self._models)
        router.add_get("/v1/models/{model_id}", self._model)

    def _request_id(self) -> str:
        return f"req_sim_{uuid.uuid4().hex[:24]}"

    def _too_large(self, request: web.Request) -> web.Response:
        return self._error(request, 413, "request_too_large", "Request exceeds the maximum size (32 MB).")

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        return self._error(request, exc.status, ERROR_TYPES.get(exc.status, "invalid_request_error"),
                           f"{request.method} {request.path}: {exc.reason}")

    def _response_headers(self, request: web.Request, used: int) -> dict[str, str]:
        return {"request-id": request.get(REQUEST_ID, "req_sim_unknown"),
                "anthropic-organization-id": "org_sim",
                "anthropic-ratelimit-requests-limit": str(RATE_LIMIT_REQUESTS),
                "anthropic-ratelimit-requests-remaining": str(max(0, RATE_LIMIT_REQUESTS - used)),
                "anthropic-ratelimit-requests-reset": "2026-12-01T00:00:00Z"}

    def _check(self, request: web.Request, rec: Recorded) -> web.Response | None:
        key = rec.headers.get("x-api-key")
        bearer = rec.headers.get("authorization", "")
        if key is None and bearer.lower().startswith("bearer "):
            key = bearer[7:].strip()
        if not key or (self.api_keys is not None and key not in self.api_keys):
            return self._error(request, 401, "authentication_error", "invalid x-api-key")
        if not rec.headers.get("anthropic-version"):
            return self._error(request, 400, "invalid_request_error", "anthropic-version: header is required")
        return None

    def _reply_error(self, request: web.Request, reply: Reply) -> web.Response:
        error_type = reply.error_type or ERROR_TYPES.get(reply.status, "api_error")
        return self._error(request, reply.status, error_type, reply.error_message or f"simulated {error_type}",
                           reply.error_code, reply.extra_headers)

    def _plan(self, request: web.Request, rec: Recorded, reply: Reply, n: int) -> Wire:
        plan = plan_reply(reply, rec.json, f"msg_sim_{n:06d}", f"toolu_sim_{n:06d}")
        frame = sse_data_only if reply.data_only else sse

        def error_frame() -> bytes:
            return frame("error", error_body(reply.error_type or "overloaded_error", reply.error_message or "Overloaded",
                                             request[REQUEST_ID], reply.error_code))
        return Wire(plan.message, plan.events, lambda event: frame(*event), plan.text_delta_at, plan.cut_index,
                    reply.error_event_after, error_frame)

    # -- routes ------------------------------------------------------------------------------
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

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        rec: Recorded = request[RECORDED]
        problem = self._body_problem(rec.json, ("model", "messages", "max_tokens"))
        if problem:
            return self._error(request, 400, "invalid_request_error", problem)
        return await self._reply(request, rec)

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
