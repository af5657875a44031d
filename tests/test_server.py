"""proxy/server.py's CoalescingTransport: the writes of one event-loop turn leave as one, in
order, and nothing is lost or written to a connection that has gone; and the real proxy answers
with its head and body in one write; and the running server's collector thresholds."""
from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any

from proxy.server import GC_THRESHOLDS, CoalescingHttpToolsProtocol, CoalescingTransport, GracefulServer
from tests.conftest import default_teams
from tests.harness import ProxyServer, make_config


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.closed_after: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closing = True
        self.closed_after = list(self.writes)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def turn() -> None:
    await asyncio.sleep(0)


async def test_the_writes_of_one_loop_turn_leave_as_one_in_order() -> None:
    raw = FakeTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"")
    t.write(b"body")
    assert raw.writes == []  # nothing yet: the turn is not over
    await turn()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"next")
    await turn()
    t.write(b"last")
    await turn()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next", b"last"]


async def test_close_sends_what_is_pending_first_and_nothing_follows() -> None:
    raw = FakeTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"head")
    t.write(b"tail")
    t.close()
    assert raw.closed_after == [b"headtail"]
    await turn()  # the flush scheduled by the first write finds nothing left
    assert raw.writes == [b"headtail"]


async def test_a_connection_gone_before_the_flush_is_not_written_to() -> None:
    raw = FakeTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"head")
    raw.closing = True  # the client went away within the turn
    await turn()
    assert raw.writes == []
    assert t.is_closing() and t.get_extra_info("peername") == ("127.0.0.1", 1)  # passed through


def test_the_proxy_serves_on_the_coalescing_protocol_unless_told_otherwise() -> None:
    from proxy.app import create_app

    app = create_app(make_config("http://127.0.0.1:9", default_teams()))
    assert GracefulServer(app).config.http is CoalescingHttpToolsProtocol
    assert GracefulServer(app, http="h11").config.http == "h11"


class RecordingProtocol(CoalescingHttpToolsProtocol):
    """The proxy's protocol, over a transport that records what reaches the socket."""

    writes: list[bytes] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        real_write = transport.write

        def write(data: bytes) -> None:
            RecordingProtocol.writes.append(bytes(data))
            real_write(data)

        transport.write = write  # type: ignore[method-assign]
        super().connection_made(transport)


def test_a_response_leaves_the_real_proxy_in_one_write() -> None:
    """Starlette and the relay send a response's head and body as two ASGI messages, which uvicorn
    writes separately; under the real server they reach the socket as one write."""
    from proxy.app import create_app

    RecordingProtocol.writes.clear()
    proxy = ProxyServer(create_app(make_config("http://127.0.0.1:9", default_teams())))
    proxy.server = GracefulServer(proxy.app, http=RecordingProtocol)
    proxy.start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            for _ in range(3):  # keep-alive: each response one write
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                got = b""
                while not got.endswith(b'{"status":"ok"}'):
                    got += s.recv(65536)
        assert len(RecordingProtocol.writes) == 3
        assert all(w.startswith(b"HTTP/1.1 200") and w.endswith(b'{"status":"ok"}') for w in RecordingProtocol.writes)
    finally:
        proxy.stop()


def test_the_running_server_collects_less_often_than_the_defaults() -> None:
    """Once up, the server sets GC_THRESHOLDS (at CPython's defaults, collections took a quarter of
    the CPU per event with thousands of streams open)."""
    from proxy.app import create_app

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    proxy = ProxyServer(create_app(make_config("http://127.0.0.1:9", default_teams()))).start()
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > 700
    finally:
        proxy.stop()
        gc.set_threshold(*before)
