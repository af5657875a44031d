"""HTTP/2 to an upstream (`upstreams.*.http2: true`, docs/configuration.md): each request a stream,
many streams on one connection, on the `h2` library's state machine (framing, HPACK, flow control)
and asyncio. What it buys is connections: a stream relayed over HTTP/1.1 holds a socket (and a file
descriptor) of its own upstream, here up to MAX_STREAMS_PER_CONNECTION share one (bench/README.md,
"Scale"). http:// speaks h2c with prior knowledge; https:// offers only "h2" by ALPN.

The interface and the errors are proxy/http1.py's (the relay cannot tell them apart): ConnectError
/ ConnectTimeout before the request is sent, PoolTimeout when every connection is at its streams and
`max_connections` are open for `pool_timeout`, ReadTimeout when the head or the next body bytes are
`read_timeout` late or the whole response outlasts `max_duration`, RemoteProtocolError when the
upstream resets the stream or breaks the protocol, ReadError when the connection is lost.

Flow control: the connection's window is given back as data arrives, a stream's only as the relay
reads it, so a client that reads slowly stalls its own stream (at STREAM_WINDOW unread bytes, the
HTTP/1.1 pool's high-water mark), never the others on the connection. A request the upstream turned
away unprocessed (a stream above the last one a GOAWAY names, which HTTP/2 says the server never
processed; REFUSED_STREAM before any answer) is sent once more. What h2 counts as a connection error (a response head too
large or malformed, a window overrun) fails every stream on that connection, as HPACK's shared state
requires.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

from hpack import NeverIndexedHeaderTuple

from proxy.http1 import HIGH_WATER_BYTES, KEEPALIVE_SECONDS, Origin, PoolBase, ReplyBody

STREAM_WINDOW = HIGH_WATER_BYTES  # bytes a stream may have unread before the upstream waits for the relay
CONNECTION_WINDOW = 1 << 24
MAX_STREAMS_PER_CONNECTION = 1000  # also when the server allows more (or sets no limit)
MAX_HEAD_BYTES = 64 * 1024     # a response head's headers (HPACK-decoded), as proxy/http1.py bounds it
# Connection-specific headers, which HTTP/2 forbids; `host` goes as :authority.
# (content-length is the pool's to write, as proxy/http1.py writes it.)
_NOT_SENT = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host",
                       "content-length"})
# Sent never-indexed: HPACK keeps them out of its shared table (the upstream key rides on every request).
_SECRET = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
_SETTINGS = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
             h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_BYTES,
             h2.settings.SettingCodes.ENABLE_PUSH: 0}


class _Unprocessed(httpx.RemoteProtocolError):
    """The upstream did not process this request (a GOAWAY before its stream, REFUSED_STREAM, or a
    connection that takes no more streams): safe to send again."""


def request_headers(method: str, origin: Origin, headers: list[tuple[str, str]],
                    body_length: int) -> list[tuple[bytes, bytes]]:
    """[pure] The relay's request headers as an HTTP/2 header block: the pseudo-headers, then the
    rest lower-cased, without the connection-specific ones, with a content-length as proxy/http1.py
    sends one, secrets never indexed. A name or value holding CR, LF or NUL is refused
    (LocalProtocolError), as h2 would refuse it only midway through the block."""
    out = [(b":method", method.encode()), (b":scheme", b"https" if origin.tls else b"http"),
           (b":authority", origin.host_header.encode("latin-1")), (b":path", origin.target.encode("latin-1"))]
    for name, value in headers:
        name = name.lower()
        if name in _NOT_SENT or (name == "te" and value.strip().lower() != "trailers"):
            continue
        if "\r" in value or "\n" in value or "\0" in value or not name or "\r" in name or "\n" in name:
            raise httpx.LocalProtocolError("a header name or value holds a line break")
        pair = (name.encode("latin-1"), value.encode("latin-1"))
        out.append(NeverIndexedHeaderTuple(*pair) if name in _SECRET else pair)
    if body_length or method not in ("GET", "HEAD"):
        out.append((b"content-length", str(body_length).encode()))
    return out


class H2Reply(ReplyBody):
    """One stream's response; its body arrives as the connection reads it (proxy/http1.py Reply's
    interface)."""

    __slots__ = ("_unacked", "_conn", "_sid", "_last", "_deadline", "_timer")

    def __init__(self, conn: H2Connection, sid: int) -> None:
        super().__init__(conn.loop)
        loop = conn.loop
        self._unacked = 0          # flow-controlled bytes received and not yet given back to the stream
        self._conn: H2Connection | None = conn  # None once the stream is over
        self._sid = sid
        self._last = loop.time()   # the request, or the last bytes of the response
        self._deadline = self._last + conn.pool.max_duration
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            min(self._last + conn.pool.read_timeout, self._deadline), self._check_timeout)

    # --- fed by the connection --------------------------------------------------------------
    def _head(self, headers: list[tuple[bytes, bytes]]) -> None:
        status, out = b"", []
        for k, v in headers:
            if k == b":status":
                status = v
            elif not k.startswith(b":"):
                out.append((k, v))
                if k == b"content-type":
                    self.content_type = v.decode("latin-1")
        if not (len(status) == 3 and status.isdigit() and b"200" <= status <= b"599"):  # (1xx: h2's)
            self._fail(httpx.RemoteProtocolError("upstream sent a response without a valid :status"))
            return
        self.status_code, self.headers_raw = int(status), out
        self._last = self._loop.time()
        if not self._headers_in.done():
            self._headers_in.set_result(None)

    def _data(self, data: bytes, flow: int) -> None:
        self._last = self._loop.time()
        if data:
            self._chunks.append(data)
        self._unacked += flow
        self._wake()

    def _ended(self) -> None:
        conn, self._conn = self._conn, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if conn is not None:
            conn.ended(self._sid)

    def _check_timeout(self) -> None:
        self._timer = None
        if self._conn is None:
            return
        now, pool = self._loop.time(), self._conn.pool
        due = min(self._last + pool.read_timeout, self._deadline)
        if now < due:
            self._timer = self._loop.call_at(due, self._check_timeout)
            return
        if now >= self._deadline:
            error = httpx.ReadTimeout(f"upstream response exceeded its maximum duration ({pool.max_duration:g} s)")
        elif not self._headers_in.done():
            error = httpx.ReadTimeout("upstream read timed out waiting for the response headers")
        else:
            error = httpx.ReadTimeout("upstream read timed out between body bytes")
        self._fail(error)  # (the connection resets the stream)

    # --- read by the relay --------------------------------------------------------------------
    def _taken(self) -> None:
        if self._unacked >= STREAM_WINDOW // 2 and self._conn is not None:
            self._conn.consumed(self._sid, self._unacked)
            self._unacked = 0

    async def aclose(self) -> None:
        """A body not read to its end resets the stream (H2Connection.ended): that is what stops the
        upstream."""
        if self._conn is not None:
            self._fail(httpx.ReadError("the response was closed"))


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection to an origin and the streams open on it."""

    def __init__(self, pool: H2Pool, key: tuple[str, str, int]) -> None:
        self.pool, self.key, self.loop = pool, key, pool.loop
        self.h2 = _H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Reply] = {}
        self.closed = False
        self.retired = False  # takes no new stream (a GOAWAY, its stream ids used up, a header block refused)
        self.max_streams = 1                # until the server's SETTINGS say more
        self.ready: asyncio.Future[None] = self.loop.create_future()  # the server's SETTINGS came
        self._window_waiters: list[asyncio.Future[None]] = []
        self._conn_unacked = 0
        self.idle_since: float | None = None  # when its last stream ended (None: it has carried none yet)

    # --- asyncio ---------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.closed:  # (failed while connecting: the pool was closed meanwhile)
            transport.abort()
            return
        self.h2.initiate_connection()
        self.h2.update_settings(_SETTINGS)
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.fail(httpx.RemoteProtocolError(f"upstream broke HTTP/2: {exc.__class__.__name__}"))
            return
        for event in events:
            self._on(event)
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.fail(httpx.ReadError("the upstream connection was lost"))

    def pause_writing(self) -> None:
        # The upstream reads nothing of what is written: stop reading it too, else every frame it
        # sends that h2 answers by itself (PING, SETTINGS) grows the write buffer without bound.
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --- h2 events ---------------------------------------------------------------------------
    def _on(self, event: Any) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._conn_unacked += event.flow_controlled_length
            reply = self.streams.get(event.stream_id)
            if reply is not None:
                reply._data(event.data, event.flow_controlled_length)  # (an end comes as its own StreamEnded)
        elif kind is h2.events.ResponseReceived:
            reply = self.streams.get(event.stream_id)
            if reply is not None:
                reply._head(event.headers)
        elif kind is h2.events.StreamEnded:
            reply = self.streams.get(event.stream_id)
            if reply is not None:
                reply._finish()
        elif kind is h2.events.StreamReset:
            reply = self.streams.get(event.stream_id)
            if reply is not None:
                code = event.error_code
                if code == h2.errors.ErrorCodes.REFUSED_STREAM and not reply._headers_in.done():
                    reply._fail(_Unprocessed("upstream refused the stream unprocessed"))
                else:
                    reply._fail(httpx.RemoteProtocolError(f"upstream reset the stream ({_code_name(code)})"))
        elif kind is h2.events.WindowUpdated:
            self._wake_senders()
        elif kind is h2.events.RemoteSettingsChanged:
            if self._window_waiters:  # (SETTINGS_INITIAL_WINDOW_SIZE opens the streams' windows: no WINDOW_UPDATE)
                self._wake_senders()
            self.max_streams = max(1, min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONNECTION))
            if not self.ready.done():
                self.ready.set_result(None)
            self.pool.capacity_freed(self.max_streams - len(self.streams))
        elif kind is h2.events.ConnectionTerminated:
            self._goaway(event.last_stream_id or 0)

    def _goaway(self, last: int) -> None:
        for sid, reply in list(self.streams.items()):
            if sid > last:
                reply._fail(_Unprocessed("upstream went away before processing the stream"))
        self.retire()

    def retire(self) -> None:
        """No new stream goes on it; it closes once its streams have ended."""
        self.retired = True
        self.pool.forget(self)
        if not self.streams:
            self.close()

    # --- used by the pool and the replies ---------------------------------------------------
    def usable(self) -> bool:
        """Whether a new stream may go on it."""
        return not self.closed and not self.retired and len(self.streams) < self.max_streams

    def stale(self) -> bool:
        """Idle for KEEPALIVE_SECONDS since its last stream: not to be used again, as proxy/http1.py
        uses no such connection (a server or a middlebox may have dropped it)."""
        idle = self.idle_since
        return not self.streams and idle is not None and self.loop.time() - idle >= KEEPALIVE_SECONDS

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.closed:
            self.transport.write(out)

    async def start(self, headers: list[tuple[bytes, bytes]], body: bytes) -> H2Reply:
        """Open a stream for a request and send it (its body as the windows allow)."""
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, headers, end_stream=not body)
        except (h2.exceptions.NoAvailableStreamIDError, h2.exceptions.TooManyStreamsError):
            # (its stream ids used up, or the server lowered its limit: nothing was sent)
            self.retire()
            raise _Unprocessed("the connection takes no more streams") from None
        except h2.exceptions.ProtocolError as exc:
            # (refused midway through the block: HPACK's table may now differ from the server's)
            self.retire()
            raise httpx.LocalProtocolError(f"the request breaks HTTP/2's rules: {exc.__class__.__name__}") from None
        reply = self.streams[sid] = H2Reply(self, sid)
        self.flush()
        if body:
            await self._send_body(reply, sid, body)
        return reply

    async def _send_body(self, reply: H2Reply, sid: int, body: bytes) -> None:
        """The request body, as the upstream's windows open, until it is sent or the stream ends."""
        pos = 0
        try:
            while pos < len(body) and self.streams.get(sid) is reply:
                room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(body) - pos)
                if room <= 0:
                    waiter = self.loop.create_future()
                    self._window_waiters.append(waiter)
                    await waiter
                    continue
                self.h2.send_data(sid, body[pos:pos + room], end_stream=pos + room == len(body))
                self.flush()
                pos += room
        except h2.exceptions.H2Error as exc:
            await reply.aclose()
            raise httpx.RemoteProtocolError(f"upstream broke HTTP/2: {exc.__class__.__name__}") from None
        except BaseException:  # (cancelled while the upstream's window was shut)
            if self.streams.get(sid) is reply:
                await reply.aclose()
            raise

    def consumed(self, sid: int, n: int) -> None:
        """The relay read n flow-controlled bytes of stream sid: the upstream may send that much more
        (given back in large steps: a WINDOW_UPDATE per event would cost a frame per event)."""
        try:
            self.h2.increment_flow_control_window(n, stream_id=sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()

    def _wake_senders(self) -> None:
        """Bodies waiting for the upstream's window look again (it opened, or their stream ended)."""
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def ended(self, sid: int) -> None:
        """Stream sid is over for the relay (ended, failed, timed out, closed early)."""
        if self.streams.pop(sid, None) is not None:
            stream = self.h2.streams.get(sid)
            if stream is not None and not stream.closed and not self.closed:
                # Still open in h2 and at the server (closed early, timed out, answered before the
                # whole request was sent, a head refused): reset, or it holds one of the server's streams.
                try:
                    self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                self.flush()
            if self._window_waiters:  # (a body still waiting for window on this stream stops)
                self._wake_senders()
            if not self.streams:
                self.idle_since = self.loop.time()
            if self.retired:
                if not self.streams:
                    self.close()
            elif not self.closed:
                self.pool.capacity_freed(1)

    def fail(self, error: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # (retrieved: the pool's connect reports it)
        for reply in list(self.streams.values()):
            reply._fail(error)
        self.streams.clear()
        self._wake_senders()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.fail(httpx.ReadError("the upstream connection was closed"))


class _H2Connection(h2.connection.H2Connection):
    """h2's client connection, except that a GOAWAY leaves it open for the streams the GOAWAY lets
    finish (a draining server's): h2 would refuse their later frames, cutting every stream in flight
    whenever a server drains a connection. No new stream is opened on it (H2Connection.usable)."""

    def clear_outbound_data_buffer(self) -> None:
        """h2 calls it on a GOAWAY: it would drop what h2 has queued in answer to the frames read
        with it (a PING's ACK, a SETTINGS ACK, a WINDOW_UPDATE), on a connection kept open here."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        out = super()._receive_goaway_frame(frame)
        if self.state_machine.state == h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return out


def _code_name(code: Any) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Pool(PoolBase):
    """HTTP/2 connections to any number of origins, at most `max_connections` open at once, each
    carrying up to its server's SETTINGS_MAX_CONCURRENT_STREAMS (at most MAX_STREAMS_PER_CONNECTION).
    An origin's connections are opened one at a time: a burst of requests fills the first before a
    second is opened. The settings are proxy.http1.PoolBase's; the pool owns its TLS context (it
    offers only h2 by ALPN)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        if self._ssl_context is not None:
            self._ssl_context.set_alpn_protocols(["h2"])
        self._conns: dict[tuple[str, str, int], list[H2Connection]] = {}
        self._connecting: dict[tuple[str, str, int], asyncio.Future[None]] = {}

    async def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> H2Reply:
        """Send the request; return once the response headers are in (the body is not read)."""
        origin = self._begin(url)
        block = request_headers(method, origin, headers, len(body))
        for attempt in range(2):
            conn = await self._acquire(origin)
            reply = None
            try:
                reply = await conn.start(block, body)
                await reply._headers_in
            except _Unprocessed:
                if attempt:
                    raise
                continue
            except asyncio.CancelledError:
                if reply is not None:
                    await reply.aclose()  # a request abandoned midway is reset, nothing left behind
                raise
            return reply
        raise AssertionError("unreachable")

    async def _acquire(self, origin: Origin) -> H2Connection:
        """A connection with a free stream: one open, one being opened, a new one, or the first to
        free a stream within pool_timeout."""
        key, deadline = origin.key, 0.0
        while True:
            if self._closed:  # (woken by aclose: open nothing more)
                raise httpx.ConnectError("the upstream pool is closed")
            for conn in list(self._conns.get(key, ())):  # (a stale one is closed and dropped meanwhile)
                if conn.stale():
                    conn.close()
                elif conn.usable():
                    return conn
            connecting = self._connecting.get(key)
            if connecting is not None:
                await asyncio.shield(connecting)
                continue
            if len(self._open) < self.max_connections:
                await self._connect(origin)
                continue
            deadline = await self._wait_turn(deadline)  # a stream or a connection came free

    async def _connect(self, origin: Origin) -> None:
        done = self._connecting[origin.key] = self.loop.create_future()
        conn = H2Connection(self, origin.key)
        self._open.add(conn)
        try:
            await asyncio.wait_for(self._open_connection(conn, origin), self.connect_timeout)
        except (asyncio.TimeoutError, OSError) as exc:  # refused, unreachable, DNS, TLS; or no descriptor left
            error: BaseException = self._connect_error(exc)
        except httpx.HTTPError as exc:  # (no HTTP/2 by ALPN, or the connection failed before its SETTINGS)
            error = exc if isinstance(exc, httpx.ConnectError) else httpx.ConnectError(f"upstream connect failed: {exc}")
        except BaseException:
            conn.fail(httpx.ConnectError("connect abandoned"))
            self._connected(origin.key, done, None)
            raise
        else:
            if conn.usable():
                self._conns.setdefault(origin.key, []).append(conn)
                self._connected(origin.key, done, None)
                return
            # (a GOAWAY, or the close, came with its SETTINGS: connecting again at once would loop)
            error = httpx.ConnectError("upstream refused new streams on a new connection (GOAWAY)")
        conn.fail(error)
        self._connected(origin.key, done, error)
        raise error from None

    def _connected(self, key: tuple[str, str, int], done: asyncio.Future[None], error: BaseException | None) -> None:
        if self._connecting.get(key) is done:
            del self._connecting[key]
        if error is None:
            done.set_result(None)
        else:  # (every request waiting on this connect fails with it)
            done.set_exception(error)
            done.exception()

    async def _open_connection(self, conn: H2Connection, origin: Origin) -> None:
        await self.loop.create_connection(lambda: conn, origin.host, origin.port,
                                          ssl=self._tls() if origin.tls else None,
                                          server_hostname=origin.host if origin.tls else None)
        if origin.tls:
            tls = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            if tls is None or tls.selected_alpn_protocol() != "h2":
                raise httpx.ConnectError("upstream did not negotiate HTTP/2 (ALPN h2)")
        await conn.ready  # the server's SETTINGS: how many streams it takes

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = super()._tls()
            self._ssl_context.set_alpn_protocols(["h2"])
        return self._ssl_context

    def capacity_freed(self, n: int) -> None:
        """n more streams can be opened: wake as many waiting requests."""
        while n > 0 and self._waiting:
            w = self._waiting.popleft()
            if not w.done():
                w.set_result(None)
                n -= 1

    def forget(self, conn: H2Connection) -> None:
        """conn takes no more streams (closed, or going away)."""
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        if conn.closed:
            self._open.discard(conn)
        self.capacity_freed(len(self._waiting))  # (they look again: a new connection may be opened)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._fail_waiting()
