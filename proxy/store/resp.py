"""A lean pipelined Redis client for the store's hot path: one connection, each command written as it
comes, replies matched to callers in order. redis-py spends more CPU per call than the Redis store's
whole batch around it (a pool checkout, an asyncio timeout, StreamWriter, its parser, event hooks);
this is a Protocol on the event loop, with one re-armed timer for the read timeout.

`parse_reply` is sans-IO. RESP2 only (no HELLO), which every Redis speaks; AUTH and SELECT from the
store's URL are sent on connect."""
from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque
from typing import Any, Awaitable, Callable, Sequence

CRLF = b"\r\n"


class RespError(Exception):
    """An error reply (-ERR ..., -NOSCRIPT ...): that command failed; the connection is fine."""


class Incomplete(Exception):
    """The buffer ends inside a reply."""


class ProtocolError(ConnectionError):
    """The server sent something that is not RESP2: the connection cannot be trusted."""


def encode_command(args: Sequence[bytes | str]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def parse_reply(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One reply from buf[pos:] and the position after it; raises Incomplete when it has not all arrived.
    Bulk strings come as bytes, simple strings as str, errors as RespError instances (not raised),
    nil as None, arrays as lists."""
    end = buf.find(CRLF, pos)
    if end < 0:
        raise Incomplete
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise Incomplete
        if buf[pos + n:pos + n + 2] != CRLF:
            raise ProtocolError("bulk string not terminated")
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        return RespError(line.decode(errors="replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = parse_reply(buf, pos)
            items.append(item)
        return items, pos
    raise ProtocolError(f"unexpected reply type {bytes(kind)!r}")


class RespConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.loop, self.read_timeout = loop, read_timeout
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buf = bytearray()
        self.closed = False
        self.last_data = 0.0   # the last byte received, or the start of a wait after an idle spell
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("redis connection closed")
        fut = self.loop.create_future()
        if not self.waiting:
            self.last_data = self.loop.time()
        self.waiting.append(fut)
        self.transport.write(command)
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_data + self.read_timeout, self._check_timeout)
        return fut

    def _check_timeout(self) -> None:
        self.timer = None
        if not self.waiting or self.closed:
            return
        due = self.last_data + self.read_timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check_timeout)
            return
        self._fail(TimeoutError("redis did not answer in time"))

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        buf = self.buf
        buf += data
        pos = 0
        try:
            while pos < len(buf) and self.waiting:
                reply, pos = parse_reply(buf, pos)
                fut = self.waiting.popleft()
                if not fut.done():  # (a caller that was cancelled: its reply is read and dropped)
                    if isinstance(reply, RespError):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        except Incomplete:
            pass
        except (ProtocolError, ValueError) as exc:
            self._fail(ProtocolError(str(exc)))
            return
        del buf[:pos]
        if buf and not self.waiting:
            self._fail(ProtocolError("a reply nobody asked for"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("redis connection lost"))

    def _fail(self, exc: Exception) -> None:
        """Every caller still waiting fails with exc, and the connection is dropped: the replies that
        may still come could no longer be matched."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._fail(ConnectionError("redis connection closed"))


class RespClient:
    """One pipelined connection, opened on first use and again after it broke.

    ssl: an SSLContext for TLS (rediss://; server_hostname checked against the certificate when the
    context checks hostnames). resolve: an async callable answering (host, port) on every connect,
    e.g. asking Sentinel for the current primary; host and port are then only its first guess. A
    connect that fails (refused, timed out, credentials refused, no primary known) makes the next
    ones fail at once for a backoff (min_backoff doubling to max_backoff), reset by a success: the
    callers see ConnectionError without each waiting a connect timeout. A READONLY reply (the server
    became a replica after a failover) drops the connection, so that the next connect resolves anew.
    (max_backoff 0, the default: no backoff, every call tries to connect, as a refused connect costs
    nothing; the store sets one for Sentinel, where a connect asks the sentinels first.)
    Error messages never carry the password."""

    def __init__(self, host: str, port: int, db: int = 0, username: str | None = None, password: str | None = None,
                 connect_timeout: float = 0.5, read_timeout: float = 1.0, *, ssl: _ssl.SSLContext | None = None,
                 resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
                 min_backoff: float = 0.05, max_backoff: float = 0.0) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.ssl, self.resolve = ssl, resolve
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_error: str | None = None  # the last connect failure, password-free (for logs)
        self._conn: RespConnection | None = None
        self._connecting: asyncio.Future[RespConnection] | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def call(self, *args: bytes | str) -> Any:
        """The reply of one command; RespError for an error reply; ConnectionError or TimeoutError
        (OSError both) when the connection failed, before or after the command was sent."""
        return await self.call_encoded(encode_command(args))

    async def call_encoded(self, command: bytes) -> Any:
        """call() of a command already in RESP (encode_command's output)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        try:
            return await conn.send(command)
        except RespError as exc:
            if "READONLY" in str(exc)[:40]:  # a demoted primary: find the new one
                conn.close()
                raise ConnectionError("redis server is a read-only replica") from None
            raise

    async def recheck(self) -> None:
        """With resolve (Sentinel): ask it again, and drop the connection if it is to another server than
        the one named now (a failover the connection has not noticed: the old primary may take writes
        until it is demoted). Raises nothing."""
        conn = self._conn
        if self.resolve is None or conn is None or conn.closed:
            return
        try:
            addr = await asyncio.wait_for(self.resolve(), self.connect_timeout * 4)
        except Exception:  # (no answer: keep what works; a failing connection re-resolves by itself)
            return
        if (str(addr[0]), int(addr[1])) != (self.host, self.port) and self._conn is conn:
            conn.close()

    async def connect(self) -> None:
        """Open the connection now if it is not open (ConnectionError / TimeoutError if it cannot be)."""
        if not self.connected:
            await self._connect()

    async def _connect(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        if self._connecting is None and loop.time() < self._retry_at:
            raise ConnectionError(f"redis unavailable (retrying): {self.last_error}")
        if self._connecting is None:  # one connect, however many callers are waiting for it
            self._connecting = asyncio.ensure_future(self._open())
            # (its failure is each waiter's to see; if every waiter was cancelled, nobody's)
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        try:
            conn = await self._open_once(loop)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.last_error = exc.__class__.__name__ if isinstance(exc, TimeoutError) else str(exc)
                if self.max_backoff > 0:
                    self._backoff = min(self.max_backoff, max(self.min_backoff, self._backoff * 2))
                    self._retry_at = loop.time() + self._backoff
            raise
        self._backoff, self._retry_at, self.last_error = 0.0, 0.0, None
        return conn

    async def _open_once(self, loop: asyncio.AbstractEventLoop) -> RespConnection:
        host, port = self.host, self.port
        if self.resolve is not None:
            try:
                host, port = await asyncio.wait_for(self.resolve(), self.connect_timeout * 4)
            except (OSError, asyncio.TimeoutError) as exc:
                raise ConnectionError(f"no redis primary known ({exc.__class__.__name__})") from None
            except Exception as exc:  # (redis-py's MasterNotFoundError and the like: not OSError)
                raise ConnectionError(f"no redis primary known ({exc.__class__.__name__})") from None
            self.host, self.port = host, port
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: RespConnection(loop, self.read_timeout), host, port,
                                       ssl=self.ssl, server_hostname=host if self.ssl is not None else None),
                self.connect_timeout * (4 if self.ssl is not None else 1))  # (a TLS handshake too)
        except _ssl.SSLError as exc:
            raise ConnectionError(f"redis TLS handshake failed ({exc.__class__.__name__})") from None
        except OSError as exc:
            raise ConnectionError(f"redis connect to {host}:{port} failed ({exc.__class__.__name__})") from None
        except asyncio.TimeoutError:
            raise TimeoutError(f"redis connect to {host}:{port} timed out") from None
        try:
            setup = []
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                setup.append(conn.send(encode_command(auth)))
            if self.db:
                setup.append(conn.send(encode_command(("SELECT", str(self.db)))))
            for reply in await asyncio.gather(*setup, return_exceptions=True):
                if isinstance(reply, RespError):  # (WRONGPASS ..., NOAUTH ...: the server's words, never the password)
                    raise ConnectionError(f"redis connection setup failed: {str(reply).split(' ', 1)[0]}")
                if isinstance(reply, BaseException):
                    raise ConnectionError(f"redis connection setup failed: {type(reply).__name__}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
