"""OpenAI upstream simulator: a real loopback HTTP server speaking Chat Completions.

Wire format: a JSON `chat.completion` with `usage`, or (`"stream": true`) SSE
`data:` chunks without `event:` lines, ending `data: [DONE]`; the usage chunk (`choices: []`)
only when the request set `stream_options.include_usage`. Errors are `{"error": {"message",
"type", "param", "code"}}` with an `x-request-id` header, as on every response.

The thread, loop, recording, reply queue, gates and stream bookkeeping are `LoopbackSimulator`'s
(server.py; shared types in common.py), as for the Anthropic simulator: `Reply` scripts one
answer (a queue, then `responder`, then `default`); `Recorded` and `StreamInfo` say what
arrived and how each stream ended. What a reply turns into is planned by the pure `plan_reply`;
the shared handlers only pace, gate and write it.
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

__all__ = ["OpenAISimulator", "Plan", "Recorded", "Reply", "StreamInfo", "data", "error_object", "plan_reply",
           "usage_object"]

ERRORS = {  # status -> (error.type, error.code) as the API words them
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 409: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"), 429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None), 503: ("server_error", None),
}
RATE_LIMIT_REQUESTS = 10_000
CREATED = 1764500000


@dataclass
class Reply(BaseReply):
    """What the simulator answers to ONE /v1/chat/completions call (pacing, gates, drops: `BaseReply`).

    `completion_tokens` includes `reasoning_tokens` (hidden, billed as output), as the API
    reports it. If it exceeds the request's max_completion_tokens (else max_tokens), the answer is
    cut to that many tokens with finish_reason "length": reasoning first, the visible text cut
    proportionally, any tool call dropped. "After N content deltas" points (error_chunk_after,
    drop_after, gate_after) are clamped to just after the last content delta. Errors: the type and
    code of `ERRORS` for `status` unless given, server_error mid-stream.
    """

    text: str = "Hello from the OpenAI simulator."
    chunks: list[str] | None = None       # content pieces (their join is the text); default ~8 word groups
    prompt_tokens: int = 25               # includes cached_tokens
    cached_tokens: int = 0
    completion_tokens: int | None = None  # default: ceil(text bytes / 4) + tool-call tokens + reasoning
    reasoning_tokens: int = 0
    tool_call: dict | None = None         # a function call with these arguments after the text
    tool_name: str = "get_weather"
    finish_reason: str | None = None      # override; truncation ("length") wins
    error_chunk_after: int | None = None  # stream: after N content deltas send `data: {"error": ...}`, end


@dataclass
class Plan:
    chunks: list[dict]         # every chunk object of the stream, in order ([DONE] not included)
    completion: dict           # the same answer as one chat.completion (non-streaming body)
    content_at: list[int]      # indexes of content-delta chunks in `chunks`

    def cut_index(self, after: int) -> int:
        """Index of the chunk before which `after` content deltas have been sent."""
        finish = next(i for i, c in enumerate(self.chunks) if c["choices"] and c["choices"][0]["finish_reason"])
        return cut_after(self.content_at, after, finish)


def limit_of(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def usage_object(prompt: int, cached: int, completion: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def plan_reply(reply: Reply, body: dict, completion_id: str = "chatcmpl-sim", call_id: str = "call_sim") -> Plan:
    """[pure] The chunks (and the equivalent chat.completion) that answer `body` with `reply`."""
    pieces = list(reply.chunks) if reply.chunks is not None else split_words(reply.text)
    text = "".join(pieces)
    args = json.dumps(reply.tool_call) if reply.tool_call is not None else None
    visible = math.ceil(len(text.encode()) / 4) + (math.ceil(len(args) / 4) if args else 0)
    completion = reply.completion_tokens if reply.completion_tokens is not None else visible + reply.reasoning_tokens
    reasoning = min(reply.reasoning_tokens, completion)
    finish = reply.finish_reason or ("tool_calls" if args else "stop")
    limit = limit_of(body)
    if limit is not None and completion > limit:
        kept_reasoning = min(reasoning, limit)
        room, shown = limit - kept_reasoning, completion - reasoning
        pieces = truncate(pieces, len(text) * room // shown if shown else 0)
        text, args = "".join(pieces), None
        completion, reasoning, finish = limit, kept_reasoning, "length"

    model = reply.model or body.get("model")
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    usage = usage_object(reply.prompt_tokens, reply.cached_tokens, completion, reasoning)

    def chunk(delta: dict | None, finish_reason: str | None = None) -> dict:
        c: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": CREATED,
                             "model": model, "service_tier": "default", "system_fingerprint": "fp_sim",
                             "choices": [] if delta is None else
                             [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if with_usage:
            c["usage"] = None
        return c

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    content_at = []
    for p in pieces:
        content_at.append(len(chunks))
        chunks.append(chunk({"content": p}))
    tool_calls = None
    if args is not None:
        tool_calls = [{"id": call_id, "type": "function", "function": {"name": reply.tool_name, "arguments": args}}]
        chunks.append(chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                             "function": {"name": reply.tool_name, "arguments": ""}}]}))
        size = math.ceil(len(args) / 3)
        for i in range(0, len(args), size):
            chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + size]}}]}))
    chunks.append(chunk({}, finish))
    if with_usage:
        chunks.append({**chunk(None), "usage": usage})
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None, "annotations": []}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    completion_body = {"id": completion_id, "object": "chat.completion", "created": CREATED, "model": model,
                       "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                       "usage": usage, "service_tier": "default", "system_fingerprint": "fp_sim"}
    return Plan(chunks, completion_body, content_at)


def data(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else compact_json(payload)
    return f"data: {text}\n\n".encode()


def error_object(error_type: str, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class OpenAISimulator(LoopbackSimulator):
    """A loopback OpenAI API. `start()` returns once it listens; `stop()` shuts it down.

    Route: POST /v1/chat/completions (JSON, or SSE when `"stream": true`); anything else is a 404
    in OpenAI's error shape. Every request is recorded first, then checked: no
    `Authorization: Bearer` (or one not in `api_keys`) -> 401; a body that is not an object, or
    lacks model/messages, or has `stream_options` without `stream: true`, or a limit below 1 -> 400.

    Stream bookkeeping as in server.py: a stream completes when `data: [DONE]` is written;
    `stop()` first opens every gate. Public methods: any thread.
    """

    reply_type = Reply
    thread_name = "openai-sim"
    stream_content_type = "text/event-stream; charset=utf-8"
    release_gates_on_stop = True
    default: Reply
    responder: Callable[[Recorded], Reply] | None

    def completions_requests(self) -> list[Recorded]:
        return self._requests_to("/v1/chat/completions")

    # -- hooks for LoopbackSimulator (simulator thread) ---------------------------------------
    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self._completions)

    def _request_id(self) -> str:
        return f"req_{uuid.uuid4().hex[:32]}"

    def _too_large(self, request: web.Request) -> web.Response:
        return self._error(request, 413, "Request too large.")

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        return self._error(request, exc.status, f"Invalid URL ({request.method} {request.path})", code=None)

    def _response_headers(self, request: web.Request, used: int) -> dict[str, str]:
        return {"x-request-id": request.get(REQUEST_ID, "req_unknown"),
                "openai-organization": "org-sim",
                "openai-processing-ms": "7",
                "x-ratelimit-limit-requests": str(RATE_LIMIT_REQUESTS),
                "x-ratelimit-remaining-requests": str(max(0, RATE_LIMIT_REQUESTS - used)),
                "x-ratelimit-reset-requests": "6ms"}

    def _check(self, request: web.Request, rec: Recorded) -> web.Response | None:
        bearer = rec.headers.get("authorization", "")
        if not bearer.lower().startswith("bearer ") or not bearer[7:].strip():
            return self._error(request, 401, "You didn't provide an API key.", code=None)
        if self.api_keys is not None and bearer[7:].strip() not in self.api_keys:
            return self._error(request, 401, "Incorrect API key provided.")
        return None

    def _reply_error(self, request: web.Request, reply: Reply) -> web.Response:
        return self._error(request, reply.status, reply.error_message or f"simulated error {reply.status}",
                           error_type=reply.error_type, code=reply.error_code or "", headers=reply.extra_headers)

    def _plan(self, request: web.Request, rec: Recorded, reply: Reply, n: int) -> Wire:
        plan = plan_reply(reply, rec.json, f"chatcmpl-sim{n:06d}", f"call_sim{n:06d}")

        def error_frame() -> bytes:
            message = reply.error_message or "The server had an error while processing your request."
            return data(error_object(reply.error_type or "server_error", message, reply.error_code))
        return Wire(plan.completion, [*plan.chunks, "[DONE]"], data, plan.content_at, plan.cut_index,
                    reply.error_chunk_after, error_frame)

    # -- route -------------------------------------------------------------------------------
    def _error(self, request: web.Request, status: int, message: str, *, error_type: str | None = None,
               code: str | None = "", param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        default_type, default_code = ERRORS.get(status, ("invalid_request_error", None))
        body = error_object(error_type or default_type, message, default_code if code == "" else code, param)
        return web.json_response(body, status=status, headers=headers)

    @staticmethod
    def _body_problem(body: Any) -> tuple[str, str | None] | None:
        """(message, param) of the API's 400 for this body, or None."""
        if not isinstance(body, dict):
            return "We could not parse the JSON body of your request.", None
        if not body.get("model"):
            return "you must provide a model parameter", "model"
        if not isinstance(body.get("messages"), list):
            return "Missing required parameter: 'messages'.", "messages"
        if body.get("stream_options") is not None and body.get("stream") is not True:
            return "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        for name in ("max_completion_tokens", "max_tokens"):
            v = body.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                return f"Invalid '{name}': integer below minimum value.", name
        return None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        rec: Recorded = request[RECORDED]
        problem = self._body_problem(rec.json)
        if problem:
            return self._error(request, 400, problem[0], param=problem[1], code=None)
        return await self._reply(request, rec)
