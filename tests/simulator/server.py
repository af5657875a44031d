"""The loopback server both upstream simulators are: `LoopbackSimulator`.

It runs aiohttp in its own thread with its own event loop, so synchronous SDK clients (and other
event loops) can talk to it. It records every request (`Recorded`), picks the Reply for a call
(a queue, then `responder`, then `default`), holds responses at named gates, and paces an answer
out as SSE frames while keeping `StreamInfo` bookkeeping. A provider subclass (anthropic.py,
openai.py) supplies its routes, checks, error shapes, rate-limit headers and the `Wire` form of
a planned answer; its Reply extends `BaseReply` (common.py), the fields read here.

Stream bookkeeping: a stream is a call with `stream: true` whose Reply has status 200; it counts
as started when its handler begins (before headers_delay and gates) and ends as exactly one of
completed (the last frame written), aborted (the client went away: a failed write, or the
handler cancelled because the connection closed or at `stop()`), error_event or dropped. Once
`wait_idle()` returns True: started == completed + aborted + errored + dropped.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque
from typing import Any, Callable, Self

from aiohttp import web

from tests.simulator.common import MAX_BODY_BYTES, RECORDED, REQUEST_ID, BaseReply, Recorded, StreamInfo, Wire


class LoopbackSimulator:
    """A loopback API server. `start()` returns once it listens; `stop()` shuts it down.

    All public methods may be called from any thread.
    """

    reply_type: type[BaseReply]  # the provider's Reply; `default` and `reset()` make one
    thread_name = "loopback-sim"
    stream_content_type = "text/event-stream"
    release_gates_on_stop = False  # open every gate before stopping, instead of cancelling

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._cond = threading.Condition()
        self._queue: deque[Any] = deque()
        self._requests: list[Recorded] = []
        self._streams: list[StreamInfo] = []
        self._in_progress = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._at_gate: dict[str, int] = {}
        self._end_counter = itertools.count(1)
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._knobs()

    def _knobs(self) -> None:
        """(Re)set the public knobs; `reset()` calls it too."""
        self.default = self.reply_type()
        self.responder: Callable[[Recorded], BaseReply] | None = None  # used when the queue is empty
        self.api_keys: set[str] | None = None  # if set, only these keys pass

    # -- provider hooks ----------------------------------------------------------------------
    def _routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def _request_id(self) -> str:
        raise NotImplementedError

    def _check(self, request: web.Request, rec: Recorded) -> web.Response | None:
        """The response refusing `rec` before its handler runs (auth, required headers), or None."""
        raise NotImplementedError

    def _too_large(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        """The provider's error body for an aiohttp HTTPException (unknown route, bad method)."""
        raise NotImplementedError

    def _response_headers(self, request: web.Request, used: int) -> dict[str, str]:
        """Headers every response carries unless set already; `used`: requests so far."""
        raise NotImplementedError

    def _reply_error(self, request: web.Request, reply: Any) -> web.Response:
        """The error response a Reply with status != 200 stands for."""
        raise NotImplementedError

    def _plan(self, request: web.Request, rec: Recorded, reply: Any, n: int) -> Wire:
        """The answer to call number `n` (1, 2, ...)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready: list[BaseException | None] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready, started), name=self.thread_name, daemon=True)
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
        if self.release_gates_on_stop:
            self._open_all_gates()  # nothing stays parked at a gate
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The upstream base_url for the proxy's config."""
        return f"http://{self.host}:{self.port}"

    def _run(self, ready: list, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(self._common_headers)
        self._routes(app.router)
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
    def queue(self, *replies: BaseReply) -> None:
        with self._cond:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget queued replies, recorded requests, streams and gates; restore the knobs.

        Responses held at a gate are released first, so nothing stays stuck.
        """
        self._open_all_gates()
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._streams.clear()
            self._gates.clear()
            self._at_gate.clear()
        self._knobs()

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    def _requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

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

    def wait_stream_end(self, index: int = -1, timeout: float = 5.0) -> str:
        """Wait until stream `index` has ended; its outcome ("in_progress" on timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: self._streams and self._streams[index].outcome != "in_progress", timeout)
            return self._streams[index].outcome if self._streams else "none"

    def _set_gate(self, name: str, is_open: bool) -> None:
        with self._cond:
            gate = self._gates.setdefault(name, asyncio.Event())
        action = gate.set if is_open else gate.clear
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(action)
        else:
            action()

    def _open_all_gates(self) -> None:
        with self._cond:
            names = list(self._gates)
        for name in names:
            self.open_gate(name)

    def open_gate(self, name: str) -> None:
        self._set_gate(name, True)

    def close_gate(self, name: str) -> None:
        self._set_gate(name, False)

    def wait_at_gate(self, name: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `count` responses are held at gate `name`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._at_gate.get(name, 0) >= count, timeout)

    # -- server side (simulator thread) ----------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        request[REQUEST_ID] = self._request_id()
        with self._cond:
            self._in_progress += 1
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(request)
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
                resp = self._check(request, rec) or await handler(request)
            except web.HTTPException as exc:
                resp = self._http_error(request, exc)
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
        for name, value in self._response_headers(request, used).items():
            response.headers.setdefault(name, value)

    def _next_reply(self, rec: Recorded) -> BaseReply:
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

    async def _reply(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        """Answer a call whose body passed the provider's checks with the next Reply."""
        reply = rec.reply = self._next_reply(rec)
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

    async def _answer(self, request: web.Request, rec: Recorded, reply: BaseReply,
                      info: StreamInfo | None) -> web.StreamResponse:
        if reply.headers_delay:
            await asyncio.sleep(reply.headers_delay)
        if reply.gate is not None and reply.gate_after is None:
            await self._pass_gate(reply.gate)
        if reply.status != 200:
            return self._reply_error(request, reply)
        wire = self._plan(request, rec, reply, next(self._ids))
        if info is None:
            if reply.drop_after is not None and request.transport is not None:
                request.transport.close()
            return web.json_response(wire.body, headers=reply.extra_headers)
        return await self._stream(request, reply, wire, info)

    async def _stream(self, request: web.Request, reply: BaseReply, wire: Wire, info: StreamInfo) -> web.StreamResponse:
        info.planned_events = len(wire.events)
        cuts = {"dropped": reply.drop_after, "error_event": wire.error_after}
        cut_at = {wire.cut_index(after): outcome for outcome, after in cuts.items() if after is not None}
        gate_at = wire.cut_index(reply.gate_after) if reply.gate and reply.gate_after is not None else None
        resp = web.StreamResponse(headers={**reply.extra_headers, "content-type": self.stream_content_type,
                                           "cache-control": "no-cache"})
        resp.enable_chunked_encoding()
        deltas = set(wire.delta_at)
        try:
            await resp.prepare(request)
            for i, event in enumerate(wire.events):
                if i == gate_at:
                    await self._pass_gate(reply.gate)
                if cut_at.get(i) == "dropped":  # a drop at the same point as an error event wins
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then FIN: no final chunk
                    self._end(info, "dropped")
                    return resp
                if i in cut_at:
                    await self._write(resp, info, wire.error_frame(), reply.event_delay)
                    self._end(info, "error_event")
                    break
                await self._write(resp, info, wire.encode(event), reply.event_delay if i else 0.0)
                if i in deltas:
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
