"""The Redis store's own pipelined client (proxy/store/resp.py): the RESP2 reply parser over every
split of its input, replies matched to callers in order, and every way a connection fails. Real
Redis (DB 13) where a server answers; small asyncio servers of the test's own for the failures."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis as redis_sync
from hypothesis import given
from hypothesis import strategies as st

from proxy.store.resp import (Incomplete, ProtocolError, RespClient, RespError, encode_command,
                              parse_reply)

REDIS_HOST, REDIS_PORT, TEST_DB = "127.0.0.1", 6379, 13


def encode_reply(value: Any) -> bytes:
    """A reply as Redis writes it (the parser's inverse)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, RespError):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    if isinstance(value, int):
        return b":%d\r\n" % value
    return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)


line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)
replies = st.recursive(
    st.none() | st.binary(max_size=40) | line_text | st.integers(-2**63, 2**63 - 1)
    | line_text.map(lambda t: RespError("ERR " + t)),
    lambda inner: st.lists(inner, max_size=4), max_leaves=12)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, RespError):
        return isinstance(b, RespError) and str(a) == str(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@given(st.lists(replies, min_size=1, max_size=5))
def test_parse_reply_reads_back_every_reply_and_nothing_from_a_partial_one(values: list[Any]) -> None:
    wire = b"".join(encode_reply(v) for v in values)
    pos = 0
    for v in values:
        got, end = parse_reply(wire, pos)
        assert same(got, v)
        for cut in range(pos, end):  # every prefix of this reply is incomplete, never misread
            with pytest.raises(Incomplete):
                parse_reply(wire[:cut], pos)
        pos = end
    assert pos == len(wire)


def test_parse_reply_refuses_what_is_not_resp2() -> None:
    with pytest.raises(ProtocolError):
        parse_reply(b"%2\r\n")  # a RESP3 map: never asked for
    with pytest.raises(ProtocolError):
        parse_reply(b"$3\r\nabcde\r\n")  # a bulk string longer than it said


def test_encode_command_is_what_redis_reads() -> None:
    assert encode_command([b"SET", "k", b"v\r\n"]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"


def client(**kw: Any) -> RespClient:
    return RespClient(kw.pop("host", REDIS_HOST), kw.pop("port", REDIS_PORT), **kw)


async def test_pipelined_calls_get_their_own_replies_in_order() -> None:
    c = client(db=TEST_DB)
    try:
        got = await asyncio.gather(*(c.call("ECHO", f"reply-{i}") for i in range(200)))
        assert got == [f"reply-{i}".encode() for i in range(200)]
        with pytest.raises(RespError, match="unknown command"):
            await c.call("NO-SUCH-COMMAND")
        assert await c.call("PING") == "PONG"  # an error reply leaves the connection usable
    finally:
        c.close()


async def test_select_from_the_url_is_applied_on_every_connection() -> None:
    c = client(db=TEST_DB)
    sync = redis_sync.Redis(host=REDIS_HOST, port=REDIS_PORT, db=TEST_DB)
    try:
        await c.call("SET", "resp-test:db", "13")
        assert sync.get("resp-test:db") == b"13"
        c._conn.close()  # type: ignore[union-attr]  # broken: the next call opens a new one, SELECTed too
        await c.call("SET", "resp-test:db", "again")
        assert sync.get("resp-test:db") == b"again"
    finally:
        sync.delete("resp-test:db")
        sync.close()
        c.close()


async def test_a_refused_password_fails_the_call_without_telling_the_password() -> None:
    c = client(password="hunter2-secret")
    with pytest.raises(ConnectionError) as info:
        await c.call("PING")  # this Redis has no password: AUTH is refused
    assert "hunter2" not in repr(info.value) and "hunter2" not in str(info.value.__cause__ or "")
    c.close()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others() -> None:
    c = client()
    try:
        await c.call("PING")
        slow = asyncio.ensure_future(c.call("BLPOP", "resp-test:never", "0.2"))
        await asyncio.sleep(0)
        after = asyncio.ensure_future(c.call("ECHO", "mine"))
        await asyncio.sleep(0)
        slow.cancel()
        assert await after == b"mine"
        assert await c.call("ECHO", "next") == b"next"
    finally:
        c.close()


class Silent:
    """A server that accepts, reads and answers what `answer` returns for each chunk it reads."""

    def __init__(self, answer: bytes = b"") -> None:  # b"": never answers
        self.answer = answer
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while await reader.read(65536):
            if self.answer:
                writer.write(self.answer)

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


async def test_a_server_that_never_answers_times_out_every_waiting_call() -> None:
    async with Silent() as port:
        c = client(port=port, read_timeout=0.05)
        got = await asyncio.gather(c.call("PING"), c.call("PING"), return_exceptions=True)
        assert [type(g) for g in got] == [TimeoutError, TimeoutError]
        assert c._conn is not None and c._conn.closed  # dropped: a late reply could not be matched
        c.close()


async def test_a_garbled_reply_drops_the_connection_and_fails_the_call() -> None:
    async with Silent(answer=b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        c = client(port=port)
        with pytest.raises(ProtocolError):
            await c.call("PING")
        c.close()


async def test_a_connection_closed_by_the_server_fails_its_calls_and_the_next_call_reconnects() -> None:
    server = Silent()
    async with server as port:
        c = client(port=port)
        pending = asyncio.ensure_future(c.call("PING"))
        while not server.writers:
            await asyncio.sleep(0.001)
        server.writers.pop().close()  # the server hangs up with the call unanswered
        with pytest.raises(ConnectionError):
            await pending
        server.answer = b"+PONG\r\n"
        assert await c.call("PING") == "PONG"  # on a new connection
        assert len(server.writers) == 1
        c.close()


async def test_a_refused_connection_is_a_connection_error() -> None:
    async with Silent() as port:
        pass  # closed: nothing listens there now
    c = client(port=port)
    with pytest.raises(OSError):
        await c.call("PING")
