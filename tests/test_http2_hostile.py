"""proxy/http2.py against a hostile HTTP/2 upstream: one that lies, stalls, floods, breaks the
protocol or goes away at the worst moment. The pool must never hang past its timeouts, leak a
connection, a stream, a waiter or a timer, or let one stream starve the others; and through the real
proxy, every charge must stay right.

Most tests drive proxy.http2.H2Pool directly against `Hostile`, a scriptable server on 127.0.0.1 in
the test's own event loop (an `h2` server connection reads what the pool sends; answers go through
h2 or, to break the rules, as raw frames). A few go through the real proxy and tests/h2_upstream.py.
No sleep-based timing assertions: waits are for events, bounded by generous `asyncio.wait_for`s
that only a hang reaches.
"""
from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame, PingFrame

import proxy.http2 as http2
from proxy.http2 import STREAM_WINDOW, H2Pool
from tests.h2_upstream import headers_only, message_json, respond
from tests.test_http2_upstream import (  # noqa: F401  (fixtures: make_up, up, launch, no_egress_proxy)
    HAIKU, HEADERS, METERED, anthropic_error, body_of, launch, make_up, no_egress_proxy, post, settled, up,
)

BOUND = 2.0  # seconds: only a hang waits this long


# --- a scriptable hostile server --------------------------------------------------------------------

class Peer:
    """One accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            validate_outbound_headers=False, normalize_outbound_headers=False, normalize_inbound_headers=False))
        self.seen: list[Any] = []          # every h2 event, in order
        self.requests: list[int] = []      # stream ids, as the requests opened
        self.open_at_request: list[int] = []  # streams open (the new one included) as each request opened
        self.open: set[int] = set()
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()       # streams whose request is complete
        self.reset_by_client: dict[int, int] = {}
        self.eof = asyncio.Event()         # the proxy closed the connection (or it broke)
        self.error: Exception | None = None
        self.task: asyncio.Task | None = None
        self._tick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ack_data = True

    # -- reading ---------------------------------------------------------------------------------
    def start(self, settings: dict[int, int] | None = None, read: bool = True) -> None:
        """The server preface (SETTINGS with `settings`); then read what the proxy sends, unless `read`
        is False (a server that never reads)."""
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings or {})
        self.h2.initiate_connection()
        self.flush()
        if read:
            self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.h2.receive_data(data):
                    self._event(ev)
                self.flush()
                self._poke()
        except Exception as exc:  # (what the proxy sent that h2 refused; or a reset socket)
            self.error = exc
        finally:
            self.eof.set()
            self._poke()

    def _event(self, ev: Any) -> None:
        self.seen.append(ev)
        sid = getattr(ev, "stream_id", None)
        if isinstance(ev, h2.events.RequestReceived):
            self.open.add(sid)
            self.requests.append(sid)
            self.open_at_request.append(len(self.open))
        elif isinstance(ev, h2.events.DataReceived):
            self.bodies[sid] = self.bodies.get(sid, b"") + ev.data
            if self.ack_data and ev.flow_controlled_length:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.add(sid)
        elif isinstance(ev, h2.events.StreamReset):
            self.reset_by_client[sid] = int(ev.error_code)
            self.open.discard(sid)

    def _poke(self) -> None:
        if not self._tick.done():
            self._tick.set_result(None)
        self._tick = asyncio.get_running_loop().create_future()

    async def until(self, pred: Callable[[], Any], what: str = "", timeout: float = BOUND) -> Any:
        """Wait (bounded) until pred() holds, re-checked whenever the proxy sends something."""
        async def wait() -> Any:
            while True:
                got = pred()
                if got:
                    return got
                if self.eof.is_set():
                    raise AssertionError(f"connection over while waiting for {what}")
                await asyncio.shield(self._tick)
        return await asyncio.wait_for(wait(), timeout)

    async def request(self, n: int = 1) -> int:
        """The stream id of request number n on this connection (1-based), once its request is complete."""
        await self.until(lambda: len(self.requests) >= n and self.requests[n - 1] in self.ended, f"request {n}")
        return self.requests[n - 1]

    async def opened(self, n: int = 1) -> int:
        """The stream id of request number n, once its headers are in (its body may still be coming)."""
        await self.until(lambda: len(self.requests) >= n, f"request {n}")
        return self.requests[n - 1]

    # -- writing ---------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
        self._poke()  # (what was sent may be what a waiter waits for)

    def raw(self, *frames: Any) -> None:
        self.flush()
        if not self.writer.is_closing():
            self.writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))
        self._poke()

    def head(self, sid: int, status: bytes = b"200", ctype: bytes = b"application/json", end: bool = False,
             extra: list[tuple[bytes, bytes]] = ()) -> None:
        self.h2.send_headers(sid, [(b":status", status), (b"content-type", ctype), *extra], end_stream=end)
        self.flush()
        if end:
            self.open.discard(sid)

    async def body(self, sid: int, data: bytes, end: bool = True) -> None:
        """`data` through h2, as the windows open; stops quietly if the stream or connection goes."""
        while data or end:
            if sid in self.reset_by_client or self.eof.is_set():
                return
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(data))
            if data and room <= 0:
                before = self.h2.local_flow_control_window(sid)
                await self.until(lambda: self.eof.is_set() or sid in self.reset_by_client
                                 or self.h2.local_flow_control_window(sid) != before, "window")
                continue
            last = end and room == len(data)
            self.h2.send_data(sid, data[:room], end_stream=last)
            data = data[room:]
            self.flush()
            await asyncio.sleep(0)  # (let the other streams' writers in)
            if last:
                self.open.discard(sid)
                return

    def reply(self, sid: int, status: int = 200, data: bytes = b"{}") -> Awaitable[None]:
        self.head(sid, str(status).encode())
        return self.body(sid, data)

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


Script = Callable[[Peer], Awaitable[None]]


class Hostile:
    """A listening server: each connection runs the next script (the last one again when they run out).
    After `limit` connections it stops listening (later connects are refused): a pool that reconnects
    in a loop is stopped there, and the test sees how many it opened."""

    def __init__(self, *scripts: Script, limit: int = 50, rcvbuf: int | None = None) -> None:
        self.scripts = list(scripts)
        self.limit = limit
        self.peers: list[Peer] = []
        self.tasks: list[asyncio.Task] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.rcvbuf = rcvbuf  # (a small socket receive buffer: a server that reads nothing fills it soon)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/messages"

    async def __aenter__(self) -> Hostile:
        sock = socket.socket()
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._accept, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for p in self.peers:
            p.writer.transport.abort()
        for t in self.tasks + [p.task for p in self.peers if p.task is not None]:
            t.cancel()
        await asyncio.gather(*self.tasks, *[p.task for p in self.peers if p.task], return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        if len(self.peers) >= self.limit:
            self.server.close()  # type: ignore[union-attr]
        script = self.scripts[min(len(self.peers), len(self.scripts)) - 1]
        task = asyncio.ensure_future(script(peer))
        self.tasks.append(task)

    async def peer(self, n: int = 1) -> Peer:
        async def wait() -> Peer:
            while len(self.peers) < n:
                await asyncio.sleep(0.001)
            return self.peers[n - 1]
        return await asyncio.wait_for(wait(), BOUND)


async def answer_nothing(p: Peer) -> None:
    """Take the connection, answer no request, wait for the client to close it."""
    p.start()
    await p.eof.wait()


async def serve_each(p: Peer, answer: Callable[[Peer, int], Awaitable[None]], settings: dict | None = None) -> None:
    """Answer every request on the connection with `answer`, each in a task of its own."""
    p.start(settings)
    tasks, n = [], 0
    try:
        while True:
            n += 1
            sid = await p.request(n) if not p.eof.is_set() else None
            if sid is None:
                return
            tasks.append(asyncio.ensure_future(answer(p, sid)))
    except (AssertionError, asyncio.TimeoutError):
        return
    finally:
        for t in tasks:
            t.cancel()


def ok(p: Peer, sid: int) -> Awaitable[None]:
    return p.reply(sid, 200, b'{"ok":true}')


# --- the pool and what it must not leave behind -------------------------------------------------------

@pytest.fixture
async def pools():
    made: list[H2Pool] = []

    def make(**kw: Any) -> H2Pool:
        kw = {"read_timeout": 5.0, "max_duration": 10.0, "pool_timeout": 2.0, "connect_timeout": 2.0, **kw}
        pool = H2Pool(**kw)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose()


def leaks(pool: H2Pool) -> list[str]:
    """What the pool holds that nothing will ever use or free."""
    out = []
    for c in pool._open:
        if c.closed:
            out.append("a closed connection still counted open")
        elif c not in pool._conns.get(c.key, []) and not c.streams:
            out.append(f"an open connection no request can use and none is on (going_away={c.going_away})")
        if not c.closed:
            live = sum(1 for s in c.h2.streams.values() if not s.closed)
            if live != len(c.streams):
                out.append(f"{live} h2 streams open on a connection the pool counts {len(c.streams)} on")
            if c._window_waiters:
                out.append(f"{len(c._window_waiters)} send-window waiters left behind")
        for reply in c.streams.values():
            if reply._timer is None:
                out.append("a stream in flight without its timer")
    for conns in pool._conns.values():
        out += ["a closed connection left in the pool's list" for c in conns if c.closed]
    if pool._connecting:
        out.append("a connect still registered")
    if any(not w.done() for w in pool._waiting):
        out.append("a request still waiting for a stream")
    return out


async def bounded(aw: Awaitable[Any], timeout: float = BOUND) -> Any:
    return await asyncio.wait_for(aw, timeout)


async def read_all(reply: Any) -> bytes:
    return b"".join([chunk async for chunk in reply.aiter_raw()])


# --- the send side: a window the upstream never opens ---------------------------------------------------

async def test_a_request_body_the_upstream_gives_no_window_for_times_out(pools):
    """The read timeout fails the reply; the request, waiting in start() for a WINDOW_UPDATE that
    never comes, must stop too (it hung for ever before b4f684f)."""
    async def zero_window(p: Peer) -> None:
        p.start({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        await p.eof.wait()

    async with Hostile(zero_window) as srv:
        pool = pools(read_timeout=0.3, max_duration=1.0)
        with pytest.raises(httpx.ReadTimeout):
            await bounded(pool.request("POST", srv.url, [], b"x" * 1000))
        p = await srv.peer()
        [sid] = p.requests
        await p.until(lambda: sid in p.reset_by_client, "the stream's RST_STREAM")
        assert leaks(pool) == []


async def test_a_settings_frame_that_opens_the_send_window_lets_the_body_go(pools):
    """A SETTINGS_INITIAL_WINDOW_SIZE increase opens every stream's window without a WINDOW_UPDATE:
    a body waiting for window goes on at once."""
    async def open_later(p: Peer) -> None:
        p.start({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid = await p.opened()
        p.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        p.flush()
        await p.request()
        await p.reply(sid)
        await p.eof.wait()

    async with Hostile(open_later) as srv:
        pool = pools(read_timeout=BOUND * 2)
        reply = await bounded(pool.request("POST", srv.url, [], b"y" * 1000))
        assert reply.status_code == 200 and await bounded(reply.aread()) == b"{}"
        p = await srv.peer()
        assert p.bodies[p.requests[0]] == b"y" * 1000


async def test_a_body_larger_than_the_windows_goes_as_they_open(pools):
    """The guarantee the two above are about: a 1 MB body through 64 KB windows arrives whole."""
    async with Hostile(lambda p: serve_each(p, ok)) as srv:
        pool = pools()
        body = bytes(range(256)) * 4096
        reply = await bounded(pool.request("POST", srv.url, [], body))
        assert reply.status_code == 200 and await bounded(reply.aread()) == b'{"ok":true}'
        assert srv.peers[0].bodies[srv.peers[0].requests[0]] == body
        assert leaks(pool) == []


async def test_an_early_response_ends_the_rest_of_the_request(pools):
    """A server may answer before the request body is in (a 413, say): the pool stops sending and
    resets the stream, which would otherwise hold one of the server's MAX_CONCURRENT_STREAMS for
    ever (and, once they were all held, leak the connection)."""
    async def answer_at_once(p: Peer) -> None:
        p.start({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        n = 0
        while True:
            n += 1
            sid = await p.opened(n)
            await p.reply(sid, 413, b'{"error":"too large"}')

    async with Hostile(answer_at_once) as srv:
        pool = pools(max_connections=2)
        for _ in range(5):
            reply = await bounded(pool.request("POST", srv.url, [], b"z" * 200_000))
            assert reply.status_code == 413 and await bounded(reply.aread()) == b'{"error":"too large"}'
            await reply.aclose()
        p = srv.peers[0]
        await p.until(lambda: all(s in p.reset_by_client or s in p.ended for s in p.requests),
                      "every stream ended by the proxy")
        assert leaks(pool) == []
        assert len(srv.peers) == 1, "the server's streams leaked: it took new connections"


# --- the pool: stream limits, GOAWAY, connections that go -------------------------------------------------

async def test_a_server_that_refuses_every_connection_at_once_is_not_reconnected_in_a_loop(pools):
    """SETTINGS and GOAWAY(0) in the same packet (a server draining, or overloaded) on every new
    connection: the request fails after one connection, never a reconnect loop bounded only by the
    process's file descriptors (here, the server stops listening after 50)."""
    async def refuse(p: Peer) -> None:
        g = GoAwayFrame(0)
        g.last_stream_id = 0
        p.h2.initiate_connection()
        p.raw(g)
        await p.reader.read()

    async with Hostile(refuse, limit=50) as srv:
        pool = pools(max_connections=4, pool_timeout=0.5)
        with pytest.raises(httpx.HTTPError):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert len(srv.peers) <= 2, f"{len(srv.peers)} connections opened for one request"
        assert leaks(pool) == []


async def test_max_concurrent_streams_zero_leaks_no_connection(pools):
    """SETTINGS_MAX_CONCURRENT_STREAMS 0: h2 refuses the stream and the connection is retired and
    closed, none left open (else every request leaked two, until max_connections made every request
    a PoolTimeout)."""
    async def no_streams(p: Peer) -> None:
        p.start({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        await p.eof.wait()

    async with Hostile(no_streams) as srv:
        pool = pools(max_connections=2, pool_timeout=0.3)
        for _ in range(3):
            with pytest.raises(httpx.HTTPError):
                await bounded(pool.request("POST", srv.url, [], b"x"))
        assert leaks(pool) == []


async def test_settings_lowering_the_stream_limit_below_the_open_streams_is_obeyed(pools):
    """Three streams open at MAX_CONCURRENT_STREAMS 3; the server lowers it to 1: a fourth request
    waits until all three have ended (h2 would refuse it otherwise), then goes."""
    gate = asyncio.Event()

    async def lower(p: Peer) -> None:
        p.start({SettingCodes.MAX_CONCURRENT_STREAMS: 3})
        s1, s2, s3 = [await p.request(n) for n in (1, 2, 3)]
        p.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        p.flush()
        await p.until(lambda: any(isinstance(e, h2.events.SettingsAcknowledged) for e in p.seen), "the ACK")
        gate.set()
        for sid in (s1, s2, s3):
            await p.reply(sid)
        s4 = await p.request(4)
        await p.reply(s4)
        await p.eof.wait()

    async with Hostile(lower) as srv:
        pool = pools(max_connections=1, pool_timeout=BOUND)
        first = [asyncio.ensure_future(pool.request("POST", srv.url, [], b"x")) for _ in range(3)]
        await bounded(gate.wait())
        fourth = asyncio.ensure_future(pool.request("POST", srv.url, [], b"x"))
        for reply in await bounded(asyncio.gather(*first, fourth)):
            assert reply.status_code == 200 and await bounded(reply.aread()) == b"{}"
        p = srv.peers[0]
        assert p.open_at_request == [1, 2, 3, 1] and len(srv.peers) == 1
        assert leaks(pool) == []


async def test_refused_stream_before_the_head_is_sent_once_more(pools):
    async def refuse_first(p: Peer) -> None:
        p.start()
        sid = await p.request(1)
        p.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        p.flush()
        await p.reply(await p.request(2))
        await p.eof.wait()

    async with Hostile(refuse_first) as srv:
        pool = pools()
        reply = await bounded(pool.request("POST", srv.url, [], b"again"))
        assert reply.status_code == 200 and await bounded(reply.aread()) == b"{}"
        p = srv.peers[0]
        assert [p.bodies[s] for s in p.requests] == [b"again", b"again"]
        assert leaks(pool) == []


@pytest.mark.parametrize("second", [ErrorCodes.REFUSED_STREAM, None], ids=["twice", "after_the_head"])
async def test_a_stream_refused_twice_or_after_its_head_is_not_sent_again(pools, second):
    """REFUSED_STREAM twice: two tries, then an error. REFUSED_STREAM after the head: the request
    was processed, so it is not sent again."""
    async def reset_all(p: Peer) -> None:
        p.start()
        n = 0
        while True:
            n += 1
            sid = await p.request(n)
            if second is None:  # the head, then REFUSED_STREAM: too late to be "unprocessed"
                p.head(sid, ctype=b"text/event-stream")
                p.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            else:
                p.h2.reset_stream(sid, second)
            p.flush()

    async with Hostile(reset_all) as srv:
        pool = pools()
        if second is None:
            reply = await bounded(pool.request("POST", srv.url, [], b"x"))
            with pytest.raises(httpx.RemoteProtocolError):
                await bounded(read_all(reply))
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await bounded(pool.request("POST", srv.url, [], b"x"))
        assert sum(len(p.requests) for p in srv.peers) == (2 if second is not None else 1)
        assert leaks(pool) == []


async def test_a_reset_with_another_code_before_the_head_is_an_error_not_retried(pools):
    async def internal(p: Peer) -> None:
        p.start()
        sid = await p.request()
        p.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        p.flush()
        await p.eof.wait()

    async with Hostile(internal) as srv:
        pool = pools()
        with pytest.raises(httpx.RemoteProtocolError, match="INTERNAL_ERROR"):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert sum(len(p.requests) for p in srv.peers) == 1
        assert leaks(pool) == []


async def test_goaway_naming_every_stream_then_a_close_fails_the_stream_in_flight_once(pools):
    """GOAWAY(2^31-1): every stream may have been processed, so none is sent again; the connection
    then closes: the stream in flight fails (an httpx error, not a hang), the pool forgets it."""
    async def go(p: Peer) -> None:
        p.start()
        await p.request()
        g = GoAwayFrame(0)
        g.last_stream_id = 2**31 - 1
        p.raw(g)
        await asyncio.sleep(0)
        p.writer.close()

    async with Hostile(go) as srv:
        pool = pools()
        with pytest.raises(httpx.TransportError):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert len(srv.peers) == 1 and len(srv.peers[0].requests) == 1
        assert leaks(pool) == [] and not pool._open


async def test_a_goaway_keeps_what_h2_answers_to_the_frames_before_it(pools):
    """What h2 answers to the frames read with a GOAWAY (a PING's ACK, a SETTINGS ACK, the
    WINDOW_UPDATE for DATA on a closed stream) is still sent: the connection stays open for the
    streams the GOAWAY lets finish."""
    async def ping_then_goaway(p: Peer) -> None:
        p.start()
        sid = await p.request()
        ping = PingFrame(0)
        ping.opaque_data = b"hostile!"
        g = GoAwayFrame(0)
        g.last_stream_id = sid
        p.raw(ping, g)  # one write
        await p.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in p.seen), "the PING ACK", 1.0)
        await p.reply(sid)
        await p.eof.wait()

    async with Hostile(ping_then_goaway) as srv:
        pool = pools()
        reply = await bounded(pool.request("POST", srv.url, [], b"x"))
        assert reply.status_code == 200 and await bounded(reply.aread()) == b"{}"


async def test_a_connection_closed_before_its_settings_is_a_connect_error(pools):
    async def hang_up(p: Peer) -> None:
        p.writer.close()

    async with Hostile(hang_up) as srv:
        pool = pools()
        with pytest.raises(httpx.ConnectError):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert leaks(pool) == [] and not pool._open


async def test_a_server_that_never_sends_its_settings_is_a_connect_timeout(pools):
    async def mute(p: Peer) -> None:
        await p.reader.read()

    async with Hostile(mute) as srv:
        pool = pools(connect_timeout=0.2)
        with pytest.raises(httpx.ConnectTimeout):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert leaks(pool) == [] and not pool._open
        assert (await srv.peer()).reader.at_eof() or await bounded(srv.peers[0].reader.read()) == b""


# --- the response head: too large, malformed -----------------------------------------------------------------

def _continuations(sid: int, block: bytes, frames: int | None = None) -> list[Any]:
    """`block` as a HEADERS frame and CONTINUATIONs of 16 KiB; or, with `frames`, that many empty
    ones of which none ends the block."""
    pieces = [block[i:i + 16384] for i in range(0, len(block), 16384)] if frames is None else [b""] * frames
    out: list[Any] = []
    for i, piece in enumerate(pieces):
        f = HeadersFrame(sid) if i == 0 else ContinuationFrame(sid)
        f.data = piece
        f.flags = {"END_HEADERS"} if i == len(pieces) - 1 and frames is None else set()
        out.append(f)
    return out


@pytest.mark.parametrize("attack", ["large", "endless_continuation", "hpack_bomb"])
async def test_a_response_head_past_64_kib_fails_without_buffering_it(pools, attack):
    async def big_head(p: Peer) -> None:
        p.start()
        sid = await p.request()
        if attack == "large":  # 96 KiB of headers, as HEADERS and CONTINUATIONs
            block = p.h2.encoder.encode([(b":status", b"200")] + [(b"x-h%d" % i, b"v" * 8192) for i in range(12)])
            p.raw(*_continuations(sid, block))
        elif attack == "endless_continuation":  # CONTINUATION frames that never end the block
            p.raw(*_continuations(sid, b"", frames=200))
        else:  # one 4 KB header in the HPACK table, then 1,000 one-byte references to it
            p.h2.encoder.header_table_size = 4096
            first = p.h2.encoder.encode([(b":status", b"200"), (b"x-bomb", b"b" * 4000)])
            ref = p.h2.encoder.encode([(b"x-bomb", b"b" * 4000)])
            assert len(ref) <= 2
            p.raw(*_continuations(sid, first + ref * 1000))
        await p.eof.wait()

    async with Hostile(big_head) as srv:
        pool = pools()
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(pool.request("POST", srv.url, [], b"x"))
        assert leaks(pool) == []


@pytest.mark.parametrize("status", [b"abc", b"2000", b"99", b""])
async def test_a_response_with_an_invalid_status_is_refused_and_its_stream_reset(pools, status):
    """A :status that is not three digits 200-599 (h2 sets the 1xx aside) fails the reply and
    resets its stream, which would otherwise hold one of the server's MAX_CONCURRENT_STREAMS."""
    async def bad(p: Peer) -> None:
        p.start()
        sid = await p.request()
        p.head(sid, status)
        await p.eof.wait()

    async with Hostile(bad) as srv:
        pool = pools()
        with pytest.raises(httpx.RemoteProtocolError):
            reply = await bounded(pool.request("POST", srv.url, [], b"x"))
            raise AssertionError(f"status {reply.status_code} accepted")
        p = srv.peers[0]
        [sid] = p.requests
        await p.until(lambda: sid in p.reset_by_client or p.eof.is_set(), "the stream reset")
        assert leaks(pool) == []


async def test_1xx_heads_then_the_final_head_then_trailers(pools):
    async def informative(p: Peer) -> None:
        p.start()
        sid = await p.request()
        p.h2.send_headers(sid, [(b":status", b"103"), (b"link", b"</x>; rel=preload")])
        p.h2.send_headers(sid, [(b":status", b"100")])
        p.head(sid, ctype=b"text/event-stream", extra=[(b"x-final", b"yes")])
        await p.body(sid, b"data: 1\n\n", end=False)
        p.h2.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
        p.flush()
        await p.eof.wait()

    async with Hostile(informative) as srv:
        pool = pools()
        reply = await bounded(pool.request("POST", srv.url, [], b"x"))
        assert reply.status_code == 200 and (b"x-final", b"yes") in reply.headers_raw
        assert reply.content_type == "text/event-stream"
        assert not any(k == b"link" for k, _ in reply.headers_raw)
        assert await bounded(read_all(reply)) == b"data: 1\n\n" and reply.body_complete
        assert leaks(pool) == []


async def test_end_stream_on_the_head_is_an_empty_complete_body(pools):
    async def empty(p: Peer) -> None:
        p.start()
        sid = await p.request()
        p.head(sid, ctype=b"text/event-stream", end=True)
        await p.eof.wait()

    async with Hostile(empty) as srv:
        pool = pools()
        reply = await bounded(pool.request("POST", srv.url, [], b"x"))
        assert reply.status_code == 200 and await bounded(read_all(reply)) == b"" and reply.body_complete
        assert leaks(pool) == []


# --- the receive side: flow control, floods, slow readers -----------------------------------------------------

async def test_a_whole_body_larger_than_the_stream_window_is_read(pools):
    """aread() (relay_whole's read) takes the chunks as they come, giving the stream's window back:
    a body over STREAM_WINDOW arrives whole (tests/test_http1.py has the same for HIGH_WATER_BYTES)."""
    big = b"a" * (STREAM_WINDOW * 2 + 12345)

    async def large(p: Peer, sid: int) -> None:
        p.head(sid)
        await p.body(sid, big)

    async with Hostile(lambda p: serve_each(p, large)) as srv:
        pool = pools(read_timeout=0.5)
        reply = await bounded(pool.request("POST", srv.url, [], b"x"))
        assert await bounded(reply.aread()) == big
        assert leaks(pool) == []


async def test_a_slow_stream_stalls_only_itself(pools, monkeypatch):
    """Stream A is never read; stream B, on the same connection, gets more than the connection's
    whole window (the connection's window is given back as data arrives, a stream's as it is read).
    A's unread bytes stay within STREAM_WINDOW."""
    monkeypatch.setattr(http2, "CONNECTION_WINDOW", STREAM_WINDOW + STREAM_WINDOW // 2)
    a_body, b_body = b"A" * (STREAM_WINDOW + 300_000), b"B" * (2 * STREAM_WINDOW)

    async def two(p: Peer, sid: int) -> None:
        p.head(sid, ctype=b"text/event-stream")
        await p.body(sid, a_body if sid == p.requests[0] else b_body)

    async with Hostile(lambda p: serve_each(p, two)) as srv:
        pool = pools()
        a = await bounded(pool.request("POST", srv.url, [], b"a"))
        p = srv.peers[0]
        sa = p.requests[0]
        await p.until(lambda: p.h2.local_flow_control_window(sa) == 0, "A's window to fill")
        b = await bounded(pool.request("POST", srv.url, [], b"b"))
        assert await bounded(read_all(b)) == b_body
        assert sum(map(len, a._chunks)) == STREAM_WINDOW  # (all A may have, none of it read)
        assert (await bounded(read_all(a))) == a_body  # and A, once read, completes
        assert leaks(pool) == []


async def test_data_on_a_stream_the_proxy_reset_keeps_the_connection_window(pools, monkeypatch):
    """The server keeps sending on a stream the pool reset (as it may, until it sees the RST): h2
    gives that DATA's connection window back itself; the next stream still gets a body larger than
    what is left of the connection's window."""
    monkeypatch.setattr(http2, "CONNECTION_WINDOW", 1 << 20)

    async def keep_sending(p: Peer) -> None:
        p.start()
        s1 = await p.request(1)
        p.head(s1, ctype=b"text/event-stream")
        await p.until(lambda: s1 in p.reset_by_client, "the reset")
        sent = 0
        while sent < 900_000:  # (raw: h2 would not send on a reset stream), within the window
            f = DataFrame(s1)
            f.data = b"x" * 16384
            p.raw(f)
            sent += 16384
        s2 = await p.request(2)
        p.head(s2)
        await p.body(s2, b"y" * 600_000)  # more than the 1 MiB connection window less the 900 KB
        await p.eof.wait()

    async with Hostile(keep_sending) as srv:
        pool = pools()
        first = await bounded(pool.request("POST", srv.url, [], b"1"))
        await first.aclose()
        second = await bounded(pool.request("POST", srv.url, [], b"2"))
        assert await bounded(read_all(second)) == b"y" * 600_000
        assert len(srv.peers) == 1 and leaks(pool) == []


async def test_a_server_overrunning_the_stream_window_fails_the_connection_not_hangs(pools):
    async def overrun(p: Peer) -> None:
        p.start()
        sid = await p.request()
        p.head(sid, ctype=b"text/event-stream")
        for _ in range(STREAM_WINDOW // 16384 + 4):
            f = DataFrame(sid)
            f.data = b"o" * 16384
            p.raw(f)
        await p.eof.wait()

    async with Hostile(overrun) as srv:
        pool = pools()
        reply = await bounded(pool.request("POST", srv.url, [], b"x"))
        await bounded(srv.peers[0].eof.wait())  # (nothing read meanwhile: the window is not given back)
        with pytest.raises(httpx.RemoteProtocolError):
            await bounded(read_all(reply))
        assert leaks(pool) == [] and not pool._open


async def test_a_ping_flood_from_a_server_that_never_reads_is_not_buffered_without_bound(pools):
    """A server that floods PINGs and never reads: the connection stops reading while its writes
    back up, so h2's ACKs (17 bytes a PING) do not grow the write buffer without bound."""
    n = 120_000
    ping = PingFrame(0)
    ping.opaque_data = b"floodfld"
    flood = ping.serialize() * n

    async def flooder(p: Peer) -> None:
        p.start(read=False)
        await asyncio.sleep(0)  # (the proxy's socket buffer is shrunk meanwhile)
        p.raw(flood)
        p.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 77})  # (the proxy has read the flood once it has this)
        p.flush()
        await p.eof.wait()

    async with Hostile(flooder, rcvbuf=4096) as srv:
        pool = pools()
        task = asyncio.ensure_future(pool.request("POST", srv.url, [], b"x"))
        conn = await bounded(_first_connection(pool))
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        p = await srv.peer()

        async def flood_in_or_paused() -> None:  # the flood read, or the proxy stopped reading
            while conn.max_streams != 77 and conn.transport.is_reading() and not conn.closed:
                await asyncio.sleep(0.005)
        await bounded(flood_in_or_paused())
        buffered = 0 if conn.closed else conn.transport.get_write_buffer_size()
        assert buffered <= 512 * 1024, f"{buffered} bytes of PING ACKs buffered for a server that reads nothing"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _first_connection(pool: H2Pool) -> Any:
    while not pool._open or next(iter(pool._open)).transport is None:
        await asyncio.sleep(0.001)
    return next(iter(pool._open))


# --- cancellation at every await, and the pool's lifetime --------------------------------------------------------

async def test_cancelled_while_waiting_for_a_stream_slot_frees_everything(pools):
    release = asyncio.Event()

    async def one_at_a_time(p: Peer) -> None:
        p.start({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        s1 = await p.request(1)
        p.head(s1)
        await release.wait()
        await p.body(s1, b"{}")
        await p.reply(await p.request(2))
        await p.eof.wait()

    async with Hostile(one_at_a_time) as srv:
        pool = pools(max_connections=1, pool_timeout=BOUND)
        first = await bounded(pool.request("POST", srv.url, [], b"1"))
        waiting = asyncio.ensure_future(pool.request("POST", srv.url, [], b"never sent"))
        await bounded(_until(lambda: any(not w.done() for w in pool._waiting)))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled()
        release.set()
        assert await bounded(first.aread()) == b"{}"
        third = await bounded(pool.request("POST", srv.url, [], b"3"))
        assert await bounded(third.aread()) == b"{}"
        p = srv.peers[0]
        assert [p.bodies[s] for s in p.requests] == [b"1", b"3"]
        assert leaks(pool) == [] and not pool._waiting


async def test_cancelled_while_sending_a_body_resets_the_stream_and_frees_everything(pools):
    async def starve(p: Peer) -> None:
        p.ack_data = False  # (the window shuts after 64 KB)
        p.start()
        await p.eof.wait()

    async with Hostile(starve) as srv:
        pool = pools()
        task = asyncio.ensure_future(pool.request("POST", srv.url, [], b"s" * 200_000))
        conn = await bounded(_first_connection(pool))
        await bounded(_until(lambda: conn._window_waiters))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        p = srv.peers[0]
        [sid] = p.requests
        await p.until(lambda: p.reset_by_client.get(sid) == ErrorCodes.CANCEL, "RST_STREAM(CANCEL)")
        assert not conn.streams and leaks(pool) == []


async def test_cancelled_while_waiting_for_the_head_resets_the_stream_and_frees_everything(pools):
    async with Hostile(answer_nothing) as srv:
        pool = pools()
        task = asyncio.ensure_future(pool.request("POST", srv.url, [], b"x"))
        p = await srv.peer()
        conn = await bounded(_first_connection(pool))
        [reply] = await bounded(_until(lambda: list(conn.streams.values())))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sid = p.requests[0]
        await p.until(lambda: p.reset_by_client.get(sid) == ErrorCodes.CANCEL, "RST_STREAM(CANCEL)")
        assert reply._timer is None and not conn.streams and leaks(pool) == []


async def test_cancelled_while_connecting_leaves_no_connection(pools):
    async def mute(p: Peer) -> None:
        await p.reader.read()

    async with Hostile(mute) as srv:
        pool = pools()
        task = asyncio.ensure_future(pool.request("POST", srv.url, [], b"x"))
        p = await srv.peer()
        await bounded(_until(lambda: pool._open and next(iter(pool._open)).transport is not None))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await bounded(p.reader.read()) == b"" or p.reader.at_eof()
        assert not pool._open and leaks(pool) == []


async def test_sequential_requests_leave_no_connections_behind(pools, monkeypatch):
    async with Hostile(lambda p: serve_each(p, ok)) as srv:
        pool = pools()
        for _ in range(30):
            reply = await bounded(pool.request("POST", srv.url, [], b"x"))
            assert await bounded(reply.aread()) == b'{"ok":true}'
        assert len(srv.peers) == 1 and len(pool._open) == 1 and leaks(pool) == []
        monkeypatch.setattr(http2, "KEEPALIVE_SECONDS", 0.0)  # every idle connection stale: a new one each time
        for _ in range(5):
            reply = await bounded(pool.request("POST", srv.url, [], b"x"))
            assert await bounded(reply.aread()) == b'{"ok":true}'
        assert len(srv.peers) == 6 and len(pool._open) == 1 and leaks(pool) == []
        assert sum(len(v) for v in pool._conns.values()) == 1
        for p in srv.peers[:-1]:
            await bounded(p.eof.wait())


async def test_aclose_with_streams_in_flight_fails_them_all_promptly(pools):
    async def busy(p: Peer) -> None:
        p.ack_data = False
        p.start({SettingCodes.MAX_CONCURRENT_STREAMS: 3})
        s1 = await p.request(1)
        p.head(s1, ctype=b"text/event-stream")
        await p.body(s1, b"data: 1\n\n", end=False)
        await p.eof.wait()

    async with Hostile(busy) as srv:
        pool = pools(max_connections=1, pool_timeout=BOUND)
        streaming = await bounded(pool.request("POST", srv.url, [], b"1"))
        heading = asyncio.ensure_future(pool.request("POST", srv.url, [], b"2"))
        sending = asyncio.ensure_future(pool.request("POST", srv.url, [], b"3" * 200_000))
        slotless = asyncio.ensure_future(pool.request("POST", srv.url, [], b"4"))
        conn = next(iter(pool._open))
        await bounded(_until(lambda: len(conn.streams) == 3 and conn._window_waiters
                             and any(not w.done() for w in pool._waiting)))
        await pool.aclose()
        results = await bounded(asyncio.gather(read_all(streaming), heading, sending, slotless, return_exceptions=True))
        assert all(isinstance(r, httpx.HTTPError) for r in results), results
        await bounded(srv.peers[0].eof.wait())
        assert not pool._open and leaks(pool) == []
        with pytest.raises(httpx.ConnectError):
            await pool.request("POST", srv.url, [], b"5")


async def test_aclose_while_a_connection_is_being_made_closes_it_too(pools):
    """aclose() while a connection is still connecting: once the TCP connect completes, its socket
    is closed (the server sees EOF), not left open."""
    async with Hostile(answer_nothing) as srv:
        pool = pools()
        task = asyncio.ensure_future(pool.request("POST", srv.url, [], b"x"))
        await bounded(_until(lambda: pool._open))  # (the connect under way: no transport yet)
        conn = next(iter(pool._open))
        assert conn.transport is None
        await pool.aclose()
        with pytest.raises(httpx.HTTPError):
            await bounded(task)
        p = await srv.peer()
        await bounded(p.eof.wait())


async def _until(pred: Callable[[], Any]) -> Any:
    while not (got := pred()):
        await asyncio.sleep(0.001)
    return got


# --- through the real proxy: the charge stays right --------------------------------------------------------------

def test_a_request_body_the_upstream_never_takes_is_a_504_that_charges_nothing(make_up, launch):
    """The first test above, end to end: a 504 within the read timeout, the hold released (before
    b4f684f the client waited for ever, the hold held)."""
    up = make_up(withhold_window=True)
    proxy = launch(up, timeout_seconds=0.5)
    big = "q" * 300_000  # (more than the 64 KB windows)
    try:
        r = httpx.post(proxy.url + "/v1/messages", content=body_of(big), headers=HEADERS, timeout=4)
    except httpx.ReadTimeout:
        pytest.fail("the proxy never answered: the request hangs waiting for send window")
    anthropic_error(r, 504)
    [row], used = settled(proxy, 1)
    assert row.outcome == "upstream_timeout" and all(used[d] == 0 for d in METERED)


def test_a_json_reply_larger_than_the_stream_window_is_relayed_and_charged(up, launch):
    """A 2.5 MB JSON message (over the stream window) is relayed whole and charged."""
    reply = message_json(HAIKU, 31, 9, "z" * (STREAM_WINDOW * 5 // 2))
    payload = json.dumps(reply).encode()
    proxy = launch(up, timeout_seconds=1)
    up.queue(respond(200, payload))
    r = post(proxy, body_of())
    assert r.status_code == 200 and r.content == payload
    [row], used = settled(proxy, 1)
    assert (row.outcome, row.input_tokens, row.output_tokens, row.steps) == ("completed", 31, 9, 1)


def test_a_200_event_stream_ended_on_its_head_charges_no_output(up, launch):
    """END_STREAM on the HEADERS of a 200 text/event-stream: no event at all. The proxy must end the
    client's stream (no hang) and charge no output it never saw; the hold goes back."""
    proxy = launch(up)
    up.queue(headers_only(200, [("content-type", "text/event-stream")]))
    r = post(proxy, body_of(stream=True))
    assert r.status_code == 200
    [row], used = settled(proxy, 1)
    assert row.output_tokens == 0 and used["output_tokens"] == 0
    assert row.outcome != "completed", row.outcome
