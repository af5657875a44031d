"""proxy/http1.py, the upstream keep-alive pool, against a raw loopback server whose every byte the
test writes: framing (length, chunked, to EOF), interim 1xx answers, connection reuse and loss,
the connection limit, and what a broken upstream turns into."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import httpx
import pytest

from proxy.http1 import Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (by content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (cancelled: the server is closing at the end of a test)
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def answer(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


async def test_keep_alive_reuses_one_connection_and_sends_the_request_as_given():
    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            server.heads.append(head)
            writer.write(answer("200 OK", b"echo:" + body, b"content-type: application/json\r\n"))
            await writer.drain()

    server = RawServer(handler)
    async with server as base:
        pool = Pool()
        for i in range(3):
            reply = await pool.request("POST", base + "/v1/messages?beta=true", [("x-api-key", "k")], b"%d" % i)
            assert (reply.status_code, reply.content_type) == (200, "application/json")
            assert await reply.aread() == b"echo:%d" % i
        await pool.aclose()
    assert server.connections == 1
    assert server.heads[0].startswith(b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\nx-api-key: k\r\ncontent-length: 1\r\n\r\n" in server.heads[0]


async def test_a_chunked_stream_arrives_chunk_by_chunk_and_the_connection_is_reused():
    gate = asyncio.Event()

    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"12\r\nevent: a\ndata: 1\n\n\r\n")
            await writer.drain()
            await gate.wait()
            writer.write(b"12\r\nevent: b\ndata: 2\n\n\r\n0\r\n\r\n")
            await writer.drain()
            gate.clear()

    server = RawServer(handler)
    async with server as base:
        pool = Pool()
        for _ in range(2):
            reply = await pool.request("POST", base + "/s", [], b"{}")
            got = []
            async for chunk in reply.aiter_raw():
                got.append(chunk)
                if len(got) == 1:
                    gate.set()  # the second event is written only once the first has been read
            assert got == [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"]
        await pool.aclose()
    assert server.connections == 1


async def test_an_interim_100_continue_is_not_the_answer():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer("201 Created", b"done", b"x-final: yes\r\n"))
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as base:
        pool = Pool()
        reply = await pool.request("POST", base + "/", [], b"x")
        assert reply.status_code == 201
        assert (b"x-final", b"yes") in reply.headers_raw
        assert await reply.aread() == b"done"
        await pool.aclose()


@pytest.mark.parametrize("sent,body", [
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it", b"all of it"),  # no length: ends with the connection
    (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", None),       # cut short: a protocol error
])
async def test_a_body_that_ends_with_its_connection(sent, body):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(sent)
        await writer.drain()

    async with RawServer(handler) as base:
        pool = Pool()
        reply = await pool.request("POST", base + "/", [], b"")
        if body is None:
            with pytest.raises(httpx.RemoteProtocolError):
                await reply.aread()
        else:
            assert await reply.aread() == body
        await pool.aclose()


@pytest.mark.parametrize("garbage", [b"SPDY/9 banana\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                                     b""])  # (b"": the connection closes without an answer)
async def test_an_upstream_that_does_not_speak_http_is_a_protocol_error(garbage):
    async def handler(reader, writer):
        await read_request(reader)
        if garbage:
            writer.write(garbage)
            await writer.drain()
            await reader.read()

    async with RawServer(handler) as base:
        pool = Pool()
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.request("POST", base + "/", [], b"")
        await pool.aclose()


async def test_an_idle_connection_the_server_closed_is_not_reused():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer("200 OK", b"one"))  # keep-alive by default, then closed anyway
        await writer.drain()

    server = RawServer(handler)
    async with server as base:
        pool = Pool()
        for _ in range(2):
            reply = await pool.request("POST", base + "/", [], b"")
            assert await reply.aread() == b"one"
            for _ in range(100):  # until the pool has seen the close
                if not pool._open:
                    break
                await asyncio.sleep(0.01)
        await pool.aclose()
    assert server.connections == 2


@pytest.mark.parametrize("name,value", [("x-evil", "a\r\nx-injected: 1"), ("x-evil\r\nx-injected", "1"),
                                        ("x-evil", "a\nb")])
async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(name, value):
    async def handler(reader, writer):
        await read_request(reader)

    server = RawServer(handler)
    async with server as base:
        pool = Pool()
        with pytest.raises(httpx.LocalProtocolError):
            await pool.request("POST", base + "/", [(name, value)], b"")
        await pool.aclose()
    assert server.connections == 0


async def test_the_connection_limit_queues_requests_until_a_connection_is_free():
    release = asyncio.Event()

    async def handler(reader, writer):
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(answer("200 OK", b"ok"))
            await writer.drain()

    server = RawServer(handler)
    async with server as base:
        pool = Pool(max_connections=1)

        async def one() -> bytes:
            reply = await pool.request("POST", base + "/", [], b"")
            return await reply.aread()

        tasks = [asyncio.ensure_future(one()) for _ in range(3)]
        for _ in range(500):  # until all three have asked
            if len(pool._waiting) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(pool._open) == 1 and len(pool._waiting) == 2
        release.set()
        assert await asyncio.gather(*tasks) == [b"ok"] * 3
        await pool.aclose()
    assert server.connections == 1


async def test_closing_a_reply_early_closes_its_connection():
    closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # returns at EOF: the client closed
        closed.set()

    async with RawServer(handler) as base:
        pool = Pool()
        reply = await pool.request("POST", base + "/", [], b"")
        async for chunk in reply.aiter_raw():
            assert chunk == b"first"
            break
        await reply.aclose()
        await asyncio.wait_for(closed.wait(), 5)
        assert not pool._open
        await pool.aclose()


async def test_unsupported_scheme_is_refused():
    pool = Pool()
    with pytest.raises(httpx.UnsupportedProtocol):
        await pool.request("POST", "ftp://127.0.0.1/", [], b"")
    await pool.aclose()


@pytest.fixture
def tls_files(tmp_path):
    """A self-signed certificate for localhost (openssl, as on every machine this runs on)."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


async def test_https_upstreams_are_spoken_to_over_verified_tls(tls_files):
    import ssl

    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader, writer):
        try:
            while True:
                head, body = await read_request(reader)
                writer.write(answer("200 OK", b"over tls:" + body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            writer.close()  # (the client left, or refused the handshake)

    served = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = served.sockets[0].getsockname()[1]
    try:
        trusting = Pool(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):  # (the second on the same, kept-alive TLS connection)
            reply = await trusting.request("POST", f"https://localhost:{port}/v1/messages", [], b"hi")
            assert await reply.aread() == b"over tls:hi"
        assert len(trusting._open) == 1
        await trusting.aclose()
        default = Pool()  # the system's CAs do not know this certificate: refused, nothing sent
        with pytest.raises(httpx.ConnectError):
            await default.request("POST", f"https://localhost:{port}/v1/messages", [], b"hi")
        await default.aclose()
    finally:
        served.close()


# --- hardening: the response head's size, the whole response's duration -----------------

def head_of(size: int, status: bytes = b"200 OK") -> bytes:
    """A response head of about `size` bytes (headers of 1 KiB each), ending in its blank line."""
    line = b"x-pad-%05d: " + b"a" * 1000 + b"\r\n"
    lines = [line % i for i in range(size // len(line % 0))]
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(lines) + b"\r\n"


@pytest.mark.parametrize("size,ok", [(60 * 1024, True), (70 * 1024, False)])
async def test_a_response_head_over_64_kib_is_a_protocol_error(size, ok):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(head_of(size)[:-2] + b"content-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as base:
        pool = Pool()
        if ok:
            reply = await pool.request("POST", base + "/", [], b"")
            assert reply.status_code == 200 and len(reply.headers_raw) > 50
            assert await reply.aread() == b"ok"
        else:
            with pytest.raises(httpx.RemoteProtocolError, match="head exceeds 65536 bytes"):
                await pool.request("POST", base + "/", [], b"")
            assert all(conn.closed for conn in pool._open)  # the connection is closed, never reused
        await pool.aclose()


async def test_one_endless_header_line_is_refused_before_it_ends():
    """The parser holds a header until its line ends: an upstream that never ends one is cut off at
    the cap, not buffered (nor timed out: the bytes keep coming)."""
    closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(1000):  # up to 16 MiB, never a line end
            if reader.at_eof():
                break
            writer.write(b"a" * 16384)
            await writer.drain()
            await asyncio.sleep(0.001)
        await reader.read()
        closed.set()

    async with RawServer(handler) as base:
        pool = Pool(read_timeout=30)
        with pytest.raises(httpx.RemoteProtocolError, match="head exceeds"):
            await pool.request("POST", base + "/", [], b"")
        await asyncio.wait_for(closed.wait(), 10)
        await pool.aclose()


async def test_interim_heads_count_toward_the_head_cap():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(head_of(40 * 1024, b"103 Early Hints") + head_of(40 * 1024)[:-2] + b"content-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as base:
        pool = Pool()
        with pytest.raises(httpx.RemoteProtocolError, match="head exceeds"):
            await pool.request("POST", base + "/", [], b"")
        await pool.aclose()


async def test_the_head_cap_is_per_response_on_a_kept_alive_connection():
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(head_of(40 * 1024)[:-2] + b"content-length: 2\r\n\r\nok")
            await writer.drain()

    server = RawServer(handler)
    async with server as base:
        pool = Pool()
        for _ in range(3):  # 120 KiB of heads in all, on one connection
            reply = await pool.request("POST", base + "/", [], b"")
            assert await reply.aread() == b"ok"
        await pool.aclose()
    assert server.connections == 1


def drip_server(prefix: bytes, drip: bytes, closed: asyncio.Event) -> RawServer:
    """Writes `prefix` at once, then `drip` one byte every 50 ms; notes when the client closes."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(prefix)
        await writer.drain()
        for byte in drip:
            await asyncio.sleep(0.05)
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            await writer.drain()
        await reader.read()
        closed.set()

    return RawServer(handler)


@pytest.mark.parametrize("read_timeout,max_duration,match", [
    (0.3, 0.5, "upstream"),  # both bound it: whichever ends it, a ReadTimeout
    (0.3, 60, "waiting for the response headers"),  # the read timeout bounds the whole wait for the head...
    (30, 0.5, "maximum duration"),  # ...and so does the response's maximum duration
])
async def test_a_dripped_head_is_a_read_timeout(read_timeout, max_duration, match):
    """A byte every 50 ms, well within the read timeout's gap, never completing the head: the
    gap alone would never end it."""
    closed = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(200))
    loop = asyncio.get_running_loop()
    async with drip_server(b"", head, closed) as base:
        pool = Pool(read_timeout=read_timeout, max_duration=max_duration)
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout, match=match):
            await pool.request("POST", base + "/", [], b"")
        assert loop.time() - started < 10  # (it ended: no assertion on when, within that)
        await asyncio.wait_for(closed.wait(), 5)  # and the connection was closed
        await pool.aclose()


async def test_a_dripped_body_is_bounded_by_the_maximum_duration_not_the_read_timeout():
    closed = asyncio.Event()
    async with drip_server(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", b"x" * 1000, closed) as base:
        pool = Pool(read_timeout=0.3, max_duration=0.5)
        reply = await pool.request("POST", base + "/", [], b"")
        got = b""
        with pytest.raises(httpx.ReadTimeout, match="maximum duration"):
            async for chunk in asyncio_timeout_guard(reply.aiter_raw(), 5):
                got += chunk
        assert got and set(got) == {ord("x")} and len(got) < 1000  # bytes flowed until the deadline
        await asyncio.wait_for(closed.wait(), 5)
        await pool.aclose()


async def test_a_body_that_keeps_coming_is_not_bounded_by_the_read_timeout_in_total():
    """The read timeout bounds each gap between body bytes, not the body."""
    closed = asyncio.Event()
    async with drip_server(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", b"x" * 12, closed) as base:
        pool = Pool(read_timeout=0.3, max_duration=60)  # (12 bytes 50 ms apart: 0.6 s in all)
        reply = await pool.request("POST", base + "/", [], b"")
        assert await asyncio.wait_for(reply.aread(), 10) == b"x" * 12
        await pool.aclose()


async def asyncio_timeout_guard(chunks, seconds: float):
    """The chunks of an iterator, failing the test (TimeoutError) if it has not ended after `seconds`."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    it = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), max(until - loop.time(), 0.001))
        except StopAsyncIteration:
            return
        yield chunk


@pytest.mark.parametrize("sent,match", [
    (b"", "waiting for the response headers"),  # silence before the head,
    (b"HTTP/1.1 200 OK\r\n", "waiting for the response headers"),  # or within it,
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart", "read timed out$"),  # or a body that stalls
])
async def test_silence_is_bounded_by_the_read_timeout_well_before_the_maximum_duration(sent, match):
    closed = asyncio.Event()
    async with drip_server(sent, b"", closed) as base:
        pool = Pool(read_timeout=0.2, max_duration=60)
        with pytest.raises(httpx.ReadTimeout, match=match):
            reply = await asyncio.wait_for(pool.request("POST", base + "/", [], b""), 10)
            await asyncio.wait_for(reply.aread(), 10)
        await asyncio.wait_for(closed.wait(), 5)
        await pool.aclose()


async def test_the_maximum_duration_is_per_response_on_a_kept_alive_connection():
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(answer("200 OK", b"ok"))
            await writer.drain()

    server = RawServer(handler)
    async with server as base:
        pool = Pool(max_duration=0.4)
        for _ in range(6):  # 0.6 s or more in all, each response well within its own 0.4 s
            reply = await pool.request("POST", base + "/", [], b"")
            assert await reply.aread() == b"ok"
        await pool.aclose()
    assert server.connections == 1


def lowest_free_descriptor() -> int:
    import os

    fd = os.dup(0)  # (dup takes the lowest free number)
    os.close(fd)
    return fd


async def test_a_process_out_of_descriptors_is_the_proxys_own_limit_not_an_unreachable_upstream(caplog):
    """At the open-file limit a connect fails with EMFILE: OutOfDescriptors (a PoolTimeout, so the
    relay answers 503), one warning however many fail, and requests go through again once
    descriptors are free. (Port 1 has no listener: a socket that could still be made would be
    refused instead, a ConnectError, and fail this test.)"""
    import resource

    from proxy.http1 import OutOfDescriptors

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer("200 OK", b"fine"))
        await writer.drain()

    pool = Pool()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_descriptor(), hard))  # no new descriptor
    try:
        with pytest.raises(OutOfDescriptors, match="open-file limit"):
            await pool.request("GET", "http://127.0.0.1:1/", [], b"")
        with pytest.raises(httpx.PoolTimeout):
            await pool.request("GET", "http://127.0.0.1:1/", [], b"")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    warnings = [r for r in caplog.records if r.getMessage().startswith("out of file descriptors")]
    assert len(warnings) == 1
    async with RawServer(ok) as base:
        reply = await pool.request("GET", base + "/", [], b"")
        assert reply.status_code == 200 and await reply.aread() == b"fine"
    await pool.aclose()


async def test_a_whole_body_far_past_the_high_water_mark_is_read():
    """aread takes the body as it comes: the socket, paused past HIGH_WATER_BYTES unread, is read on
    (a reply read whole, e.g. a large JSON message, would otherwise wait for its read timeout)."""
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB: far past the high-water mark and any socket buffer

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer("200 OK", big))
        await writer.drain()

    async with RawServer(handler) as url:
        pool = Pool(read_timeout=5.0)
        reply = await pool.request("POST", url + "/v1/messages", [], b"{}")
        assert await reply.aread() == big
        await pool.aclose()
