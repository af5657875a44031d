"""A lean HTTP/1.1 client: pooled keep-alive connections on asyncio, responses parsed by httptools
(the C parser uvicorn already uses on the server side).

Why not aiohttp's ClientSession: measured on the bench (bench/RESULTS.md), its per-request
machinery (ClientRequest/ClientResponse objects, CIMultiDicts, URL handling, timer contexts,
traces) cost most of what a whole raw pass-through spends per request; this client does the same
socket work in a fraction of that. It does only what the relay needs: one request per
connection at a time, bodies sent whole, responses with a length, chunked or read to EOF, bodies
relayed raw (no decompression: the relay asks for identity), no cookies, no redirects, no proxies
(an upstream reached through an egress proxy goes through httpx's transport: proxy/upstream.py).

Errors are httpx's, as the relay expects from any transport: ConnectError/ConnectTimeout before
the request is written; PoolTimeout when all `max_connections` stay busy for `pool_timeout`, and
OutOfDescriptors (a PoolTimeout: the same 503) when the process has no file descriptor left;
ReadTimeout when the response head is not in within `read_timeout` of the request, when no body
byte arrives for `read_timeout`, or when the whole response takes longer than `max_duration`;
RemoteProtocolError when the upstream breaks the protocol, sends a response head over
MAX_HEAD_BYTES or ends a body early; ReadError when the connection fails.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
import ssl
from collections import deque
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httpx
import httptools

# An idle connection older than this is closed rather than reused: servers drop idle keep-alive
# connections after a while (nginx 75 s, many APIs 15-60 s), and a request written into one that
# the server is closing fails. aiohttp uses the same figure.
KEEPALIVE_SECONDS = 15.0
# Past this much unread body, the socket stops being read until the relay catches up.
HIGH_WATER_BYTES = 256 * 1024
URL_CACHE_SIZE = 64
# A response head (status line and headers, 1xx interim heads included) past this is refused: the
# parser would otherwise buffer whatever an upstream sends before its blank line.
MAX_HEAD_BYTES = 64 * 1024
# Out of file descriptors, the warning is logged at most this often (every refused connect would
# otherwise log one).
FD_WARNING_EVERY_SECONDS = 10.0

log = logging.getLogger("budget_proxy")


class OutOfDescriptors(httpx.PoolTimeout):
    """The process is at its open-file limit (RLIMIT_NOFILE): the proxy's own limit, not the
    upstream's, so it answers 503 (retry later) rather than 502."""


class Origin:
    """One parsed upstream URL: where to connect and what to write on the request line."""

    __slots__ = ("key", "host", "port", "tls", "target", "host_header")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"cannot request {parts.scheme or 'a relative'} URL")
        self.host = parts.hostname
        tls = self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.key = (parts.scheme, self.host, self.port)
        self.target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        default_port = self.port == (443 if tls else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if default_port else f"{name}:{self.port}"


class ReplyBody:
    """A response as its connection reads it in (its head, then _data, _finish or _fail) and the
    relay's side of it (aiter_raw, aread). The connection's hooks: `_ended` once the body is over
    (complete or failed), `_taken` once the relay has read what came."""

    __slots__ = ("status_code", "headers_raw", "content_type", "_chunks", "_waiter", "_complete", "_error",
                 "_loop", "_headers_in")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status_code = 0
        self.headers_raw: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._loop = loop
        self._headers_in: asyncio.Future[None] = loop.create_future()

    # --- fed by the connection --------------------------------------------------------------
    def _finish(self) -> None:
        self._complete = True
        self._ended()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        self._ended()
        if not self._headers_in.done():
            self._headers_in.set_exception(error)
            self._headers_in.exception()  # (retrieved: a request that no longer awaits it logs nothing)
        self._wake()

    def _ended(self) -> None:
        pass

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _taken(self) -> None:
        pass

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._taken()
        return data

    async def _more(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        await waiter

    @property
    def body_complete(self) -> bool:
        """The whole body has arrived and been read: the chunk just taken was the last."""
        return self._complete and not self._chunks

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._more()

    async def aread(self) -> bytes:
        parts: list[bytes] = []
        while not self._complete:
            if self._error is not None:
                raise self._error
            if self._chunks:  # (taken as they come: the connection reads on, the upstream's window opens)
                parts += self._chunks
                self._chunks.clear()
                self._taken()
            await self._more()
        parts += self._chunks
        self._chunks.clear()
        return parts[0] if len(parts) == 1 else b"".join(parts)


class Reply(ReplyBody):
    """A response whose headers are in; its body arrives through the connection as it is read."""

    __slots__ = ("_buffered", "_conn")

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn.loop)
        self._buffered = 0
        self._conn: Connection | None = conn  # None once the body is complete or the reply closed

    # --- fed by the connection --------------------------------------------------------------
    def _data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _ended(self) -> None:
        self._conn = None

    def _taken(self) -> None:
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()

    async def aclose(self) -> None:
        """A body not read to its end closes the connection: that is what stops the upstream."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()
            self._fail(httpx.ReadError("the response was closed"))


class Connection(asyncio.Protocol):
    """One upstream connection: carries one request at a time; back in the pool when its
    response is complete and the server keeps it alive."""

    def __init__(self, pool: Pool, origin_key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.origin_key = origin_key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: Reply | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.last_data = 0.0
        self.sent_at = 0.0   # when the request in flight was written
        self.deadline = 0.0  # when the response in flight has taken its maximum duration
        self.timer: asyncio.TimerHandle | None = None
        # The head of the response in flight: True until its final (non-1xx) head is parsed; what
        # is left of MAX_HEAD_BYTES as the parser reports it (status, header names and values);
        # its size as received.
        self.heading = False
        self.head_left = MAX_HEAD_BYTES
        self.head_raw = 0

    # --- the request ----------------------------------------------------------------------------
    def send(self, data: bytes) -> Reply:
        reply = self.reply = Reply(self)
        now = self.sent_at = self.last_data = self.loop.time()
        self.heading = True
        self.head_left = MAX_HEAD_BYTES
        self.head_raw = 0
        deadline = self.deadline = now + self.pool.max_duration
        quiet_until = now + self.pool.read_timeout
        # One timer a request: it fires at the first of the read timeout and the deadline; once
        # the head is in, it moves itself on while body bytes keep arriving.
        self.timer = self.loop.call_at(quiet_until if quiet_until < deadline else deadline, self._check_timeout)
        self.transport.write(data)  # type: ignore[union-attr]
        return reply

    def _check_timeout(self) -> None:
        reply = self.reply
        if reply is None:
            return
        now = self.loop.time()
        if now >= self.deadline:  # the whole response, however its bytes trickle in
            error = httpx.ReadTimeout(f"upstream response exceeded its maximum duration ({self.pool.max_duration:g} s)")
        else:
            # The read timeout bounds the whole wait for the head, dripped or not, then each gap
            # between body bytes.
            heading = self.heading
            until = (self.sent_at if heading else self.last_data) + self.pool.read_timeout
            if now < until:
                self.timer = self.loop.call_at(until if until < self.deadline else self.deadline, self._check_timeout)
                return
            error = httpx.ReadTimeout("upstream read timed out waiting for the response headers" if heading
                                      else "upstream read timed out")
        self.timer = None
        self.reply = None
        reply._fail(error)
        self.close()

    def _done_with(self) -> None:
        self.reply = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.reply is None:  # nothing was asked: a server that talks out of turn is not reused
            self.close()
            return
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools' parse errors, and what a callback raised
            reply = self.reply
            if reply is not None:  # (a callback that refused the head has failed it already)
                reply._fail(httpx.RemoteProtocolError(f"upstream sent invalid HTTP: {exc.__class__.__name__}"))
            self.close()
            return
        if self.heading:  # the head is still incomplete: every byte since the request is head
            self.head_raw += len(data)  # (the parser holds a header line until it ends: bound it here)
            if self.head_raw > MAX_HEAD_BYTES:
                self._head_too_large()

    def eof_received(self) -> bool:
        self.closed = True  # never reused: connection_lost follows, and ends or fails a reply in flight
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        reply = self.reply
        if reply is not None:
            self._done_with()
            if reply._headers_in.done() and self.read_to_eof:
                reply._finish()  # a body without length or chunking ends where the connection does
            elif not reply._headers_in.done():
                reply._fail(httpx.RemoteProtocolError("upstream closed the connection without a response"))
            else:
                reply._fail(httpx.RemoteProtocolError("upstream ended the body early"))
        self.pool._forget(self)

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- httptools callbacks ----------------------------------------------------------------------
    read_to_eof = False  # the body in flight ends where the connection does
    interim = False      # the message being parsed is a 1xx: the real response follows it

    def _head_too_large(self) -> None:
        reply = self.reply
        if reply is not None:
            reply._fail(httpx.RemoteProtocolError(f"upstream response head exceeds {MAX_HEAD_BYTES} bytes"))
        self.close()

    def on_status(self, status: bytes) -> None:
        left = self.head_left = self.head_left - len(status) - 15  # (and "HTTP/1.1 200 ", CRLF)
        if left < 0:
            self._head_too_large()
            raise httpx.RemoteProtocolError("response head too large")  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.headers_raw.append((name, value))  # type: ignore[union-attr]
        left = self.head_left = self.head_left - len(name) - len(value) - 4  # (and ": ", CRLF)
        if left < 0:
            self._head_too_large()
            raise httpx.RemoteProtocolError("response head too large")  # stops the parser

    def on_headers_complete(self) -> None:
        reply = self.reply
        assert reply is not None
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: not the answer (their heads count in the cap)
            self.interim = True
            reply.headers_raw.clear()
            return
        self.heading = False
        reply.status_code = status
        framed = False
        for name, value in reply.headers_raw:
            lname = name.lower()
            if lname == b"content-type":
                reply.content_type = value.decode("latin-1")
            elif lname == b"content-length" or lname == b"transfer-encoding":
                framed = True
        self.read_to_eof = not framed and status not in (204, 304)
        if not reply._headers_in.done():
            reply._headers_in.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.reply._data(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        reply = self.reply
        if reply is None:
            return
        if self.interim:
            self.interim = False
            return
        self._done_with()
        reply._finish()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool._release(self)
        else:
            self.close()


def _pool_timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # (a waiter set done is skipped by _wake_one)
        waiter.set_exception(httpx.PoolTimeout("upstream connection pool exhausted"))


class PoolBase:
    """What both pools (this one, proxy/http2.py's) share: their settings, parsed URLs, the wait for
    room, connect errors and TLS context."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0, max_duration: float = 3600.0,
                 ssl_context: ssl.SSLContext | None = None, pool_timeout: float = 10.0) -> None:
        """`read_timeout`: the longest wait for a whole response head (dripped or not), then
        between any two body bytes; `max_duration`: the longest a whole response (head and body) may take from
        the moment its request is written; `ssl_context`: for https origins; by default the
        system's CAs, with hostname checks; `pool_timeout`: the longest a request waits for a
        connection while all `max_connections` are busy."""
        self._ssl_context = ssl_context
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_duration = max_duration
        self.pool_timeout = pool_timeout
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on first use
        self._origins: dict[str, Origin] = {}
        self._waiting: deque[asyncio.Future[None]] = deque()  # requests waiting for a connection
        self._closed = False
        self._open: set[Any] = set()  # (each pool's connections)
        self._fd_warned_at = float("-inf")

    def _begin(self, url: str) -> Origin:
        """A request to `url` may go: the pool is open, on this loop; its origin."""
        if self._closed:
            raise httpx.ConnectError("the upstream pool is closed")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.origin(url)

    async def _wait_turn(self, deadline: float) -> float:
        """Wait until woken (a connection or a stream came free) or, at `deadline`, PoolTimeout; the
        deadline is set at the first wait (0.0: none yet), one bound on the whole wait however often
        the request is woken. Returns it."""
        if not deadline:
            deadline = self.loop.time() + self.pool_timeout
        waiter = self.loop.create_future()
        self._waiting.append(waiter)
        timer = self.loop.call_at(deadline, _pool_timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
        return deadline

    def _connect_error(self, exc: BaseException) -> httpx.HTTPError:
        """What a failed connect is to the relay: ConnectTimeout, OutOfDescriptors (the process's own
        limit, warned about at most every FD_WARNING_EVERY_SECONDS) or ConnectError."""
        if isinstance(exc, asyncio.TimeoutError):
            return httpx.ConnectTimeout("upstream connect timed out")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if now >= self._fd_warned_at + FD_WARNING_EVERY_SECONDS:
                self._fd_warned_at = now
                log.warning("out of file descriptors (%d connections open upstream): new upstream connections "
                            "answer 503 until some close; raise the process's RLIMIT_NOFILE (docs/configuration.md)",
                            len(self._open))
            return OutOfDescriptors("the proxy is at its open-file limit; retry shortly")
        if isinstance(exc, httpx.ConnectError):
            return exc
        return httpx.ConnectError(f"upstream unreachable: {exc.__class__.__name__}")

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # (loading the CAs takes milliseconds: once a pool, when first needed)
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _fail_waiting(self) -> None:
        """The pool closed: every request still waiting for room fails."""
        while self._waiting:
            w = self._waiting.popleft()
            if not w.done():
                w.set_exception(httpx.ConnectError("the upstream pool is closed"))

    def origin(self, url: str) -> Origin:
        o = self._origins.get(url)
        if o is None:
            if len(self._origins) >= URL_CACHE_SIZE:  # bounded: the query string comes from the client
                self._origins.clear()
            o = self._origins[url] = Origin(url)
        return o


class Pool(PoolBase):
    """Keep-alive connections to any number of origins, at most `max_connections` open at once."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}

    async def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        """Write the request; return once the response headers are in (the body is not read)."""
        origin = self._begin(url)
        lines = [f"{method} {origin.target} HTTP/1.1\r\nhost: {origin.host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # No header may smuggle a line break into the request (one LF per line, each after a CR).
        if head.count("\n") != len(lines) + 1 or head.count("\r") != head.count("\n"):
            raise httpx.LocalProtocolError("a header name or value holds a line break")
        data = head.encode("latin-1") + body
        conn = self._reuse(origin.key) or await self._connect(origin)
        reply = conn.send(data)
        try:
            await reply._headers_in
        except asyncio.CancelledError:
            conn.close()  # a request abandoned midway leaves nothing on the connection
            raise
        return reply

    def _reuse(self, key: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been dropped
            # (a connection whose server sent EOF is closed, and one being closed is closing)
            if not conn.closed and now - conn.idle_since < KEEPALIVE_SECONDS:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin) -> Connection:
        deadline = 0.0
        while len(self._open) >= self.max_connections:
            self._close_one_idle()
            deadline = await self._wait_turn(deadline)  # a connection closed or went back to the pool
            conn = self._reuse(origin.key)
            if conn is not None:
                return conn
        conn = Connection(self, origin.key)
        self._open.add(conn)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: conn, origin.host, origin.port,
                                            ssl=self._tls() if origin.tls else None,
                                            server_hostname=origin.host if origin.tls else None),
                self.connect_timeout)
        except (asyncio.TimeoutError, OSError) as exc:  # refused, unreachable, DNS, TLS; or no descriptor left here
            self._forget(conn)
            raise self._connect_error(exc) from None
        except BaseException:
            self._forget(conn)
            conn.close()
            raise
        return conn

    def _close_one_idle(self) -> None:
        """At the limit, an idle connection to another origin makes room (its close wakes a waiter)."""
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return

    def _wake_one(self) -> None:
        while self._waiting:
            w = self._waiting.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _release(self, conn: Connection) -> None:
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.origin_key, []).append(conn)
        if self._waiting:
            self._wake_one()

    def _forget(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.origin_key)
            if idle and conn in idle:
                idle.remove(conn)
            self._wake_one()

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._fail_waiting()
