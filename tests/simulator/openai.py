"""OpenAI upstream simulator: a real loopback HTTP server speaking Chat Completions.

Wire format per PROTOCOL.md §8: a JSON `chat.completion` with `usage`, or (`"stream": true`) SSE
`data:` chunks without `event:` lines, ending `data: [DONE]`; the usage chunk (`choices: []`)
only when the request set `stream_options.include_usage`. Errors are `{"error": {"message",
"type", "param", "code"}}` with an `x-request-id` header, as on every response.

Shaped like the Anthropic simulator (tests/simulator/anthropic.py): aiohttp in its own thread
and loop; `Reply` scripts one answer (a queue, then `responder`, then `default`); `Recorded`
and `StreamInfo` say what arrived and how each stream ended. What a reply turns into is planned
by the pure `plan_reply`; the handlers only pace, gate and write it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from tests.simulator.anthropic import Recorded, StreamInfo, split_words

_key = getattr(web, "RequestKey", lambda name, _type: name)  # plain str keys before aiohttp 3.13
REQUEST_ID = _key("openai_request_id", str)
RECORDED = _key("openai_recorded", Recorded)

ERRORS = {  # status -> (error.type, error.code) as the API words them
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 409: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"), 429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None), 503: ("server_error", None),
}
RATE_LIMIT_REQUESTS = 10_000
MAX_BODY_BYTES = 32 * 1024 * 1024
CREATED = 1764500000


@dataclass
class Reply:
    """What the simulator answers to ONE /v1/chat/completions call.

    `completion_tokens` includes `reasoning_tokens` (hidden, billed as output), as the API
    reports it. If it exceeds the request's max_completion_tokens (else max_tokens), the answer is
    cut to that many tokens with finish_reason "length": reasoning first, the visible text cut
    proportionally, any tool call dropped. "After N content deltas" points (error_chunk_after,
    drop_after, gate_after) are clamped to just after the last content delta.
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
    event_delay: float = 0.0              # seconds between chunks
    headers_delay: float = 0.0
    status: int = 200                     # != 200: OpenAI error body with this status (stream or not)
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_chunk_after: int | None = None  # stream: after N content deltas send `data: {"error": ...}`, end
    drop_after: int | None = None         # stream: after N content deltas close the connection;
    #                                       non-stream: close it instead of answering
    gate: str | None = None               # wait until `open_gate(gate)` ...
    gate_after: int | None = None         # ... before the headers (None) or after N content deltas
    extra_headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None              # default: echo the request's model


@dataclass
class Plan:
    chunks: list[dict]         # every chunk object of the stream, in order ([DONE] not included)
    completion: dict           # the same answer as one chat.completion (non-streaming body)
    content_at: list[int]      # indexes of content-delta chunks in `chunks`

    def cut_index(self, after: int) -> int:
        """Index of the chunk before which `after` content deltas have been sent."""
        if after < len(self.content_at):
            return self.content_at[after]
        if self.content_at:
            return self.content_at[-1] + 1
        return next(i for i, c in enumerate(self.chunks) if c["choices"] and c["choices"][0]["finish_reason"])


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
        keep = len(text) * room // shown if shown else 0
        out, left = [], keep
        for p in pieces:
            if left <= 0:
                break
            out.append(p[:left])
            left -= len(p)
        pieces, text, args = out, "".join(out), None
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
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def error_object(error_type: str, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class OpenAISimulator:
    """A loopback OpenAI API. `start()` returns once it listens; `stop()` shuts it down.

    Route: POST /v1/chat/completions (JSON, or SSE when `"stream": true`); anything else is a 404
    in OpenAI's error shape. Every request is recorded first, then checked: no
    `Authorization: Bearer` (or one not in `api_keys`) -> 401; a body that is not an object, or
    lacks model/messages, or has `stream_options` without `stream: true`, or a limit below 1 -> 400.

    Stream bookkeeping: a stream is a call with `stream: true` whose Reply has status 200; it
    counts as started when its handler begins and ends as exactly one of completed ([DONE]
    written), aborted (the client went away), error_event or dropped. Once `wait_idle()` returns
    True: started == completed + aborted + errored + dropped. Public methods: any thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.default = Reply()
        self.responder: Callable[[Recorded], Reply] | None = None  # used when the queue is empty
        self.api_keys: set[str] | None = None
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
    def start(self) -> OpenAISimulator:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready: list[BaseException | None] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready, started), name="openai-sim", daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            self._thread = None
            raise ready[0]
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            names = list(self._gates)
        for name in names:  # nothing stays parked at a gate
            self.open_gate(name)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> OpenAISimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The upstream base_url for the proxy's config (it appends /v1/chat/completions)."""
        return f"http://{self.host}:{self.port}"

    def _run(self, ready: list, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(self._common_headers)
        app.router.add_post("/v1/chat/completions", self._completions)
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

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    def completions_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/chat/completions"]

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

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled. A request still on its way does not count."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_progress == 0, timeout)

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_stream_end(self, index: int = -1, timeout: float = 5.0) -> str:
        """Wait until stream `index` has ended; its outcome ("in_progress" on timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: self._streams and self._streams[index].outcome != "in_progress", timeout)
            return self._streams[index].outcome if self._streams else "none"

    def open_gate(self, name: str) -> None:
        with self._cond:
            gate = self._gates.setdefault(name, asyncio.Event())
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(gate.set)
        else:
            gate.set()

    def wait_at_gate(self, name: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `count` responses are held at gate `name`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._at_gate.get(name, 0) >= count, timeout)

    # -- server side (simulator thread) ----------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        request[REQUEST_ID] = f"req_{uuid.uuid4().hex[:32]}"
        with self._cond:
            self._in_progress += 1
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._error(request, 413, "Request too large.")
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
                resp = self._check_auth(request, rec) or await handler(request)
            except web.HTTPException as exc:
                resp = self._error(request, exc.status, f"Invalid URL ({request.method} {request.path})", code=None)
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
        response.headers.setdefault("x-request-id", request.get(REQUEST_ID, "req_unknown"))
        response.headers.setdefault("openai-organization", "org-sim")
        response.headers.setdefault("openai-processing-ms", "7")
        response.headers.setdefault("x-ratelimit-limit-requests", str(RATE_LIMIT_REQUESTS))
        response.headers.setdefault("x-ratelimit-remaining-requests", str(max(0, RATE_LIMIT_REQUESTS - used)))
        response.headers.setdefault("x-ratelimit-reset-requests", "6ms")

    def _check_auth(self, request: web.Request, rec: Recorded) -> web.Response | None:
        bearer = rec.headers.get("authorization", "")
        if not bearer.lower().startswith("bearer ") or not bearer[7:].strip():
            return self._error(request, 401, "You didn't provide an API key.", code=None)
        if self.api_keys is not None and bearer[7:].strip() not in self.api_keys:
            return self._error(request, 401, "Incorrect API key provided.")
        return None

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

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        rec: Recorded = request[RECORDED]
        problem = self._body_problem(rec.json)
        if problem:
            return self._error(request, 400, problem[0], param=problem[1], code=None)
        reply = rec.reply = self._next_reply(rec)  # type: ignore[assignment]
        info = StreamInfo(rec) if rec.json.get("stream") is True and reply.status == 200 else None
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
            return self._error(request, reply.status, reply.error_message or f"simulated error {reply.status}",
                               error_type=reply.error_type, code=reply.error_code or "",
                               headers=reply.extra_headers)
        n = next(self._ids)
        plan = plan_reply(reply, rec.json, f"chatcmpl-sim{n:06d}", f"call_sim{n:06d}")
        if info is None:
            if reply.drop_after is not None and request.transport is not None:
                request.transport.close()
            return web.json_response(plan.completion, headers=reply.extra_headers)
        return await self._stream(request, reply, plan, info)

    async def _stream(self, request: web.Request, reply: Reply, plan: Plan, info: StreamInfo) -> web.StreamResponse:
        info.planned_events = len(plan.chunks) + 1
        cuts = {"dropped": reply.drop_after, "error_event": reply.error_chunk_after}
        cut_at = {plan.cut_index(after): outcome for outcome, after in cuts.items() if after is not None}
        gate_at = plan.cut_index(reply.gate_after) if reply.gate and reply.gate_after is not None else None
        resp = web.StreamResponse(headers={**reply.extra_headers, "content-type": "text/event-stream; charset=utf-8",
                                           "cache-control": "no-cache"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for i, payload in enumerate(plan.chunks):
                if i == gate_at:
                    await self._pass_gate(reply.gate)  # type: ignore[arg-type]
                if cut_at.get(i) == "dropped":  # a drop at the same point as an error chunk wins
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then FIN: no final chunk
                    self._end(info, "dropped")
                    return resp
                if i in cut_at:
                    message = reply.error_message or "The server had an error while processing your request."
                    error = error_object(reply.error_type or "server_error", message, reply.error_code)
                    await self._write(resp, info, data(error), reply.event_delay)
                    self._end(info, "error_event")
                    break
                await self._write(resp, info, data(payload), reply.event_delay if i else 0.0)
                if i in plan.content_at:
                    info.text_deltas_sent += 1
            else:
                await self._write(resp, info, data("[DONE]"), reply.event_delay)
                self._end(info, "completed")
            await resp.write_eof()
        except ConnectionError:  # a write found the client gone
            self._end(info, "aborted")
        return resp

    async def _write(self, resp: web.StreamResponse, info: StreamInfo, chunk: bytes, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await resp.write(chunk)
        info.events_sent += 1

    def _end(self, info: StreamInfo, outcome: str) -> None:
        if info.outcome == "in_progress":
            with self._cond:
                info.outcome, info.end_order = outcome, next(self._end_counter)
                self._cond.notify_all()
