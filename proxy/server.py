"""uvicorn with budget-proxy's lifecycle: SIGHUP reloads the config; SIGTERM/SIGINT stop
accepting, let in-flight requests finish within the grace period, then cut the streams that
remain (each settled), and close the store."""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from typing import Any, Generator

import contextlib

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.app import BudgetProxyApp

# uvicorn cancels what is still running this long after our own cut, as a last resort.
CANCEL_MARGIN_SECONDS = 5
# The collector's thresholds once the server is up: the youngest generation collected every 10,000
# allocations, not CPython's 700. The older ones are counted in collections of the younger, so all
# three run 14 times less often. With thousands of streams open, the defaults' collections took a
# quarter of the CPU per relayed event; RSS under load stays the same.
GC_THRESHOLDS = (10_000, 10, 10)


class CoalescingTransport:
    """A connection's transport whose writes made in one event-loop turn leave in one send: uvicorn
    writes a response's head and its body separately, a syscall each, though the relay sends them
    back to back (one write instead of two: measurably more throughput, SSE most, in bench.ab). The rest
    of the transport is passed through."""

    __slots__ = ("_transport", "_loop", "_pending", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():  # (the client went away meanwhile: nothing to send to)
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescingTransport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class GracefulServer(uvicorn.Server):
    def __init__(self, app: BudgetProxyApp, config_path: str | None = None, **uvicorn_kwargs: Any) -> None:
        self.grace = app.state.runtime.config.server.shutdown_grace_seconds
        if uvicorn_kwargs.get("http", "auto") in ("auto", "httptools"):
            uvicorn_kwargs["http"] = CoalescingHttpToolsProtocol
        # No date/server headers of uvicorn's own: the upstream's come back unchanged (no duplicates).
        # No X-Forwarded-* rewriting of the client's address: nothing here reads it, and it cost a
        # middleware call per request.
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                server_header=False, date_header=False, proxy_headers=False,
                                timeout_graceful_shutdown=int(self.grace) + CANCEL_MARGIN_SECONDS,
                                **uvicorn_kwargs)
        super().__init__(config)
        self.proxy = app
        self.config_path = config_path
        self.reload_requested = False
        self.supervisor_pid: int | None = None  # set in a --workers worker: stop when the supervisor is gone

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # What exists once the server is up (modules, config, pools) lives as long as the process:
        # freezing it keeps the collector from traversing it on every full collection. Under load
        # those run often over many objects, each a pause with every request waiting, and dominate
        # the p99 latency unless frozen.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def shutdown(self, sockets: Any = None) -> None:
        self.proxy.state.begin_shutdown(self.grace)
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.reload_requested:
            self.reload_requested = False
            if self.config_path:
                self.proxy.state.reload(self.config_path)
        if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid:
            self.should_exit = True  # (the supervisor was killed: nobody would stop or restart this worker)
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGHUP, self._on_sighup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _on_sighup(self, sig: int, frame: Any) -> None:
        self.reload_requested = True  # acted on in on_tick, on the event loop
