"""An HTTP/2 upstream for tests: cleartext HTTP/2 with prior knowledge (h2c, no Upgrade), on
127.0.0.1, an asyncio.Protocol around an `h2` server connection, in a thread of its own (like
tests/hostile_upstream.py, so that the real proxy under uvicorn reaches it from its own loop).

It advertises SETTINGS_MAX_CONCURRENT_STREAMS (in its first SETTINGS frame) and
SETTINGS_INITIAL_WINDOW_SIZE (a smaller one in force once the client acknowledges it, as HTTP/2
has it) as given, and records, per stream, what it received (headers with the pseudo-headers, in
order; the whole body), every RST_STREAM the client sent (with its error code), the streams left
open when their connection went, the GOAWAYs it sent, the most streams open at once on each
connection, and anything the client did that HTTP/2 forbids or a script did not expect
(`violations`). Each complete request is answered by the next queued `Answer`, else `default`:

    up.queue(json_answer({...}, status=200))           a whole JSON reply
    up.queue(sse(frames, event_delay=0.01))            an event stream, one DATA frame a frame
    up.queue(sse(frames, hold_after=3))                three frames, then nothing until the client goes
    up.queue(sse(frames, hold_after=3, until="x"))     three frames, the rest once release("x")
    up.queue(rst_after(frames, 4, ErrorCodes.INTERNAL_ERROR))   four frames, then RST_STREAM
    up.queue(goaway())                                  GOAWAY naming a last stream below this one, no answer
    up.queue(never())                                   no answer at all (until the client resets)
    up.queue(hold("name"))                              no answer until release("name")
    up.queue(*[barrier(10)] * 10)                       no answer until 10 requests wait at that barrier
    up.queue(headers_only(200, [("content-type", "text/event-stream")]))   END_STREAM on the HEADERS frame

`H2Upstream(withhold_window=True)` never gives back the receive windows the client's request
bodies use up: the client can send no more than the initial windows (65,535 bytes).

Every public method may be called from any thread.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from tests.hostile_upstream import ORDINARY_USAGE, ScriptedServer, frame, message_json, message_stream, text_delta

__all__ = ["H2Upstream", "Seen", "Reset", "Stream", "ErrorCodes", "ORDINARY_USAGE", "frame", "message_json",
           "message_stream", "text_delta", "json_answer", "respond", "sse", "rst_after", "goaway", "never", "hold",
           "barrier", "ordinary", "headers_only"]

Headers = Iterable[tuple[str, str]]


@dataclass
class Seen:
    """One request as it arrived: its connection (1, 2, ... in the order they were accepted), its
    stream id, its header block as sent (pseudo-headers included, names as they came) and its body."""

    conn: int
    stream_id: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.headers]

    @property
    def method(self) -> str | None:
        return self.header(":method")

    @property
    def path(self) -> str:
        return (self.header(":path") or "").split("?", 1)[0]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reset:
    """An RST_STREAM the client sent."""

    conn: int
    stream_id: int
    error_code: int


class Gone(Exception):
    """The stream was reset, or its connection lost, while an answer was writing or waiting."""


class Stream:
    """The stream an Answer writes on."""

    def __init__(self, link: _Link, seen: Seen) -> None:
        self.link = link
        self.seen = seen
        self.stream_id = seen.stream_id
        self.gone = asyncio.Event()  # reset by the client, or the connection lost
        self.window = asyncio.Event()  # set by WINDOW_UPDATE and SETTINGS changes

    @property
    def upstream(self) -> H2Upstream:
        return self.link.upstream

    def _check(self) -> None:
        if self.gone.is_set() or self.link.closed:
            raise Gone

    async def headers(self, status: int, headers: Headers = (), end: bool = False) -> None:
        self._check()
        self.link.conn.send_headers(self.stream_id, [(":status", str(status)), *headers], end_stream=end)
        if end:
            self.link.stream_done(self.stream_id)
        self.link.flush()

    async def data(self, payload: bytes, end: bool = False) -> None:
        """`payload` in DATA frames as flow control allows (one frame when it fits); with `end`,
        the last one ends the stream (an empty payload: an empty DATA frame that ends it)."""
        conn = self.link.conn
        while payload or end:
            self._check()
            room = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
            if payload and room <= 0:
                self.window.clear()
                await self._wait(self.window.wait())
                continue
            chunk, payload = payload[:room], payload[room:]
            last = end and not payload
            conn.send_data(self.stream_id, chunk, end_stream=last)
            if last:
                self.link.stream_done(self.stream_id)
            self.link.flush()
            if last:
                return

    async def _wait(self, awaitable: Awaitable[Any], timeout: float | None = None) -> bool:
        """Wait for `awaitable` (True) or `timeout` (False); Gone if the stream goes first."""
        waited = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            done, _ = await asyncio.wait({waited, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waited.cancel()
            gone.cancel()
        if gone in done or self.gone.is_set():
            raise Gone
        return waited in done

    async def pause(self, seconds: float) -> None:
        await self._wait(asyncio.sleep(seconds))

    async def until_gone(self) -> None:
        await self._wait(asyncio.Event().wait())

    def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        self._check()
        self.link.conn.reset_stream(self.stream_id, code)
        self.link.stream_done(self.stream_id)
        self.link.flush()

    def goaway(self, last_stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """A GOAWAY frame written as is (h2's own would refuse to answer the streams it keeps); the
        connection is closed once no stream at or below `last_stream_id` is still open."""
        self.link.goaway(last_stream_id, error_code)


# An answer writes the response to one request (Gone ends it quietly).
Answer = Callable[[Stream], Awaitable[None]]


def respond(status: int = 200, body: bytes = b"", headers: Headers = (),
            content_type: str = "application/json") -> Answer:
    async def answer(s: Stream) -> None:
        await s.headers(status, [("content-type", content_type), ("content-length", str(len(body))), *headers])
        await s.data(body, end=True)
    return answer


def json_answer(obj: Any, status: int = 200, headers: Headers = ()) -> Answer:
    return respond(status, json.dumps(obj).encode(), headers)


def sse(frames: list[bytes], headers: Headers = (), event_delay: float = 0.0,
        hold_after: int | None = None, until: str | None = None) -> Answer:
    """text/event-stream, one DATA frame an event, `event_delay` seconds apart; with `hold_after`,
    that many events and then nothing until release(until), or without `until` until the client
    resets the stream or leaves."""
    async def answer(s: Stream) -> None:
        await s.headers(200, [("content-type", "text/event-stream"), *headers])
        for i, f in enumerate(frames):
            if hold_after is not None and i == hold_after:
                if until is None:
                    await s.until_gone()
                await s._wait(s.upstream._gate(until).wait())
            if event_delay and i:
                await s.pause(event_delay)
            await s.data(f)
        await s.data(b"", end=True)
    return answer


def rst_after(frames: list[bytes], n: int, code: int = ErrorCodes.INTERNAL_ERROR) -> Answer:
    """The head and the first `n` events, then RST_STREAM with `code`."""
    async def answer(s: Stream) -> None:
        await s.headers(200, [("content-type", "text/event-stream")])
        for f in frames[:n]:
            await s.data(f)
        s.reset(code)
    return answer


def goaway(last_stream_id: int | None = None) -> Answer:
    """GOAWAY (NO_ERROR) naming `last_stream_id`, by default the highest other stream id this
    connection has seen below this one (0 if none): this stream was never processed. No answer."""
    async def answer(s: Stream) -> None:
        last = last_stream_id
        if last is None:
            last = max((i for i in s.link.stream_ids if i < s.stream_id), default=0)
        s.goaway(last)
        await s.until_gone()
    return answer


def headers_only(status: int = 200, headers: Headers = ()) -> Answer:
    """A response head with END_STREAM on its HEADERS frame: no body at all, not even an empty DATA frame."""
    async def answer(s: Stream) -> None:
        await s.headers(status, headers, end=True)
    return answer


def never() -> Answer:
    async def answer(s: Stream) -> None:
        await s.until_gone()
    return answer


def hold(name: str, then: Answer | None = None) -> Answer:
    """No answer until release(name); then `then` (default: the ordinary answer)."""
    async def answer(s: Stream) -> None:
        await s._wait(s.upstream._gate(name).wait())
        await (then or ordinary)(s)
    return answer


def barrier(n: int, then: Answer | None = None, timeout: float = 5.0) -> Answer:
    """One barrier, to queue for several requests (`b = barrier(10); up.queue(*[b] * 10)`): none
    of them is answered until `n` are waiting at it, then each gets `then`. A barrier still closed
    after `timeout` is a violation (the client never had that many requests in flight at once), the
    request then answered with a 500."""
    waiting: list[int] = []
    opened: list[asyncio.Event] = []

    async def answer(s: Stream) -> None:
        if not opened:
            opened.append(asyncio.Event())
        waiting.append(s.stream_id)
        if len(waiting) >= n:
            opened[0].set()
        if not await s._wait(opened[0].wait(), timeout):
            s.upstream._violation(f"barrier({n}) timed out with {len(waiting)} requests at it")
            await json_answer({"type": "error", "error": {"type": "api_error", "message": "barrier"}}, 500)(s)
            return
        await (then or ordinary)(s)
    return answer


async def ordinary(s: Stream) -> None:
    """What an honest Anthropic API would say (the same bodies as tests/hostile_upstream.ordinary)."""
    seen = s.seen
    if seen.method == "POST" and seen.path == "/v1/messages":
        body = seen.json
        model = body.get("model", "?")
        if body.get("stream") is True:
            frames = message_stream(["Hello ", "from ", "the ", "hostile ", "upstream."], model, *ORDINARY_USAGE)
            return await sse(frames)(s)
        return await json_answer(message_json(model, *ORDINARY_USAGE))(s)
    if seen.method == "POST" and seen.path == "/v1/messages/count_tokens":
        return await json_answer({"input_tokens": 7})(s)
    return await json_answer({"type": "error", "error": {"type": "not_found_error", "message": "no route"}},
                             status=404)(s)


class _Link(asyncio.Protocol):
    """One accepted connection."""

    def __init__(self, upstream: H2Upstream) -> None:
        self.upstream = upstream
        self.no = 0
        self.transport: asyncio.Transport | None = None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self.streams: dict[int, Stream] = {}
        self.partial: dict[int, Seen] = {}  # requests whose body is still coming
        self.open: set[int] = set()  # streams the client opened that are not yet closed
        self.stream_ids: list[int] = []
        self.closed = False
        self.goaway_last: int | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.no = self.upstream._connected(self)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self.upstream.alpn.append(tls.selected_alpn_protocol())
        # The stream limit goes in the first SETTINGS frame (and holds at once); a smaller window in
        # a second one, in force once acknowledged: until then a client may use the default 65535.
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.upstream.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536})
        self.conn.initiate_connection()
        if self.upstream.initial_window_size != 65535:
            self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.upstream.initial_window_size})
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.upstream._violation(f"connection {self.no}: {exc.__class__.__name__}: {exc}")
            self.flush()  # (h2's GOAWAY)
            self.close()
            return
        for event in events:
            self.on_event(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for sid in list(self.open):
            self.upstream._abandoned(self.no, sid)
        self.open.clear()
        for stream in self.streams.values():
            stream.gone.set()

    # -- events -------------------------------------------------------------------------------------
    def on_event(self, event: h2.events.Event) -> None:
        up = self.upstream
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            if self.goaway_last is not None and sid > self.goaway_last:
                up._note(f"connection {self.no}: stream {sid} opened after GOAWAY({self.goaway_last})")
            self.partial[sid] = Seen(self.no, sid, headers)
            self.stream_ids.append(sid)
            self.open.add(sid)
            up._opened(self.no, len(self.open))
        elif isinstance(event, h2.events.DataReceived):
            seen = self.partial.get(event.stream_id)
            if seen is not None:
                seen.body += event.data
            if not up.withhold_window:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            seen = self.partial.pop(event.stream_id, None)
            if seen is not None:
                stream = self.streams[event.stream_id] = Stream(self, seen)
                up._dispatch(stream)
        elif isinstance(event, h2.events.StreamReset):
            sid = event.stream_id
            if not event.remote_reset:  # (h2 reset it: the client broke the stream's rules)
                up._violation(f"connection {self.no}: stream {sid} reset by h2: {event.error_code!r}")
                return
            up._reset(Reset(self.no, sid, int(event.error_code)))
            self.partial.pop(sid, None)
            self.stream_done(sid)
            if sid in self.streams:
                self.streams[sid].gone.set()
        elif isinstance(event, h2.events.WindowUpdated) and event.stream_id in self.streams:
            self.streams[event.stream_id].window.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for stream in self.streams.values():  # (the connection's window, or every stream's)
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            up._note(f"connection {self.no}: client GOAWAY {event.error_code!r}")

    # -- writing ------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def stream_done(self, sid: int) -> None:
        self.open.discard(sid)
        self.maybe_close_after_goaway()

    def goaway(self, last_stream_id: int, error_code: int) -> None:
        self.flush()
        f = GoAwayFrame(0)
        f.last_stream_id = last_stream_id
        f.error_code = int(error_code)
        if self.transport is not None and not self.closed:
            self.transport.write(f.serialize())
        self.goaway_last = last_stream_id
        self.upstream._goaway_sent(self.no, last_stream_id)
        self.maybe_close_after_goaway()

    def maybe_close_after_goaway(self) -> None:
        if self.goaway_last is not None and not any(s <= self.goaway_last for s in self.open):
            asyncio.get_running_loop().call_soon(self.close)  # (after this turn's writes)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()


class H2Upstream(ScriptedServer):
    """`start()` returns once it listens on 127.0.0.1; `stop()` closes every connection."""

    thread_name = "h2-upstream"

    def __init__(self, max_concurrent_streams: int = 100, initial_window_size: int = 65535,
                 ssl_context: ssl.SSLContext | None = None, withhold_window: bool = False) -> None:
        """With `ssl_context` (its certificate for localhost), TLS offering only "h2" by ALPN; with
        `withhold_window`, no WINDOW_UPDATE for what request bodies use up."""
        self.max_concurrent_streams = max_concurrent_streams
        self.withhold_window = withhold_window
        self.initial_window_size = initial_window_size
        self.ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        super().__init__()
        self.default: Answer = ordinary
        self.alpn: list[str | None] = []  # per TLS connection, the protocol ALPN settled on
        self._resets: list[Reset] = []
        self._abandoned_streams: list[tuple[int, int]] = []
        self._goaways: list[tuple[int, int]] = []
        self._violations: list[str] = []
        self._notes: list[str] = []
        self._peak: dict[int, int] = {}
        self._links: list[_Link] = []

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}" if self.ssl_context else f"http://127.0.0.1:{self.port}"

    async def _listen(self) -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_server(lambda: _Link(self), "127.0.0.1", 0,
                                                              ssl=self.ssl_context)

    def _closing(self) -> None:
        for link in self._links:
            if link.transport is not None:
                link.transport.abort()

    # -- inspection (any thread) -----------------------------------------------------------------------------
    def _get(self, name: str) -> list:
        with self._cond:
            return list(getattr(self, name))

    requests = property(lambda self: self._get("_requests"))  # list[Seen], in arrival order
    resets = property(lambda self: self._get("_resets"))  # list[Reset]: RST_STREAMs from the client
    abandoned = property(lambda self: self._get("_abandoned_streams"))  # (conn, stream): open when it closed
    goaways = property(lambda self: self._get("_goaways"))  # (conn, last_stream_id) sent
    violations = property(lambda self: self._get("_violations"))  # what the client did that it must not
    notes = property(lambda self: self._get("_notes"))  # what is worth knowing when a test fails

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._links)

    @property
    def peak_open_streams(self) -> dict[int, int]:
        """Per connection, the most streams the client had open on it at once."""
        with self._cond:
            return dict(self._peak)

    def wait_for(self, pred: Callable[[H2Upstream], Any], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self), timeout)

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda u: len(u._requests) >= count, timeout)

    def wait_resets(self, count: int = 1, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda u: len(u._resets) >= count, timeout)

    def wait_let_go(self, seen: Seen, timeout: float = 5.0) -> bool:
        """True once the client reset `seen`'s stream or closed its connection."""
        key = (seen.conn, seen.stream_id)
        return self.wait_for(lambda u: key in u._abandoned_streams
                             or any((r.conn, r.stream_id) == key for r in u._resets), timeout)

    # -- server side (own thread) ------------------------------------------------------------------------
    def _connected(self, link: _Link) -> int:
        with self._cond:
            self._links.append(link)
            self._cond.notify_all()
            return len(self._links)

    def _opened(self, conn: int, open_now: int) -> None:
        with self._cond:
            self._peak[conn] = max(self._peak.get(conn, 0), open_now)
            if open_now > self.max_concurrent_streams:
                self._violations.append(f"connection {conn}: {open_now} streams open, "
                                        f"SETTINGS_MAX_CONCURRENT_STREAMS {self.max_concurrent_streams}")

    def _dispatch(self, stream: Stream) -> None:
        with self._cond:
            self._requests.append(stream.seen)
            answer = self._queue.popleft() if self._queue else self.default
            self._cond.notify_all()
        task = asyncio.ensure_future(self._answer(answer, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, answer: Answer, stream: Stream) -> None:
        try:
            await answer(stream)
        except Gone:
            pass
        except h2.exceptions.ProtocolError as exc:  # (e.g. the stream was reset as it was written)
            if not (stream.gone.is_set() or stream.link.closed):
                self._violation(f"answering stream {stream.stream_id}: {exc!r}")

    def _reset(self, reset: Reset) -> None:
        with self._cond:
            self._resets.append(reset)
            self._cond.notify_all()

    def _abandoned(self, conn: int, sid: int) -> None:
        with self._cond:
            self._abandoned_streams.append((conn, sid))
            self._cond.notify_all()

    def _goaway_sent(self, conn: int, last: int) -> None:
        with self._cond:
            self._goaways.append((conn, last))
            self._cond.notify_all()

    def _violation(self, what: str) -> None:
        with self._cond:
            self._violations.append(what)
            self._cond.notify_all()

    def _note(self, what: str) -> None:
        with self._cond:
            self._notes.append(what)
