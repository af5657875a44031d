"""The paced fake upstream: the bench's 55-event Anthropic stream, one event per tick
(nginx cannot pace). Raw asyncio on uvloop, HTTP/1.1 keep-alive, chunked encoding.

    python -m bench.paced --port 18002 --interval-ms 1 [--events 55]

`--events N` (N >= 55) repeats the last text delta N - 55 times (`events(n)`): the scale run's
60-event, 60 s stream at 1 s a tick; the default is the bench's 55-event payload unchanged.

One timer serves every stream: at each tick each open stream gets its next event, so
pacing costs one wake-up per tick however many streams are open (1,000 streams at 20 ms
would otherwise be 50,000 timer wake-ups a second on the load generator's core)."""
from __future__ import annotations

import argparse
import asyncio
import re

from bench import payloads

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")


def events(n: int = len(payloads.sse_events())) -> list[bytes]:
    """The bench's SSE events; more than 55: the last text delta again before content_block_stop."""
    base = payloads.sse_events()
    if n < len(base):
        raise ValueError(f"at least {len(base)} events")
    return base[:-3] + [base[-4]] * (n - len(base)) + base[-3:]


def frames(n: int) -> list[bytes]:
    return [b"%x\r\n%b\r\n" % (len(e), e) for e in events(n)]


FRAMES = frames(len(payloads.sse_events()))
LAST_CHUNK = b"0\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


class Ticker:
    """Calls `step` on every registered stream once per interval; idle when none is open."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.active: list[Stream] = []
        self._next: float | None = None

    def add(self, stream: Stream) -> None:
        self.active.append(stream)
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self.interval
            loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        streams, self.active = self.active, []  # a stream that starts its next request re-adds itself
        self.active.extend(s for s in streams if s.step())
        if not self.active:
            self._next = None
            return
        loop = asyncio.get_running_loop()
        self._next = max(self._next + self.interval, loop.time())  # late: no burst to catch up
        loop.call_at(self._next, self._tick)


class Stream(asyncio.Protocol):
    """One client connection: requests in, paced streams out, one at a time."""

    def __init__(self, ticker: Ticker, frames: list[bytes] = FRAMES) -> None:
        self.ticker = ticker
        self.frames = frames
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.index = -1  # next frame to write; -1 when no stream is running
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.start_next()

    def start_next(self) -> None:
        if self.index >= 0 or self.closed:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _LENGTH.search(self.buf, 0, end + 2)
        size = end + 4 + (int(m.group(1)) if m else 0)
        if len(self.buf) < size:
            return
        del self.buf[:size]
        self.transport.write(HEAD)  # type: ignore[union-attr]
        self.index = 0
        self.ticker.add(self)

    def step(self) -> bool:
        """Write the next event; False when this stream is over (or the client left)."""
        if self.closed:
            return False
        self.transport.write(self.frames[self.index])  # type: ignore[union-attr]
        self.index += 1
        if self.index < len(self.frames):
            return True
        self.transport.write(LAST_CHUNK)  # type: ignore[union-attr]
        self.index = -1
        self.start_next()  # a pipelined request waits for the end of the previous stream
        return False


async def serve(port: int, interval_ms: float, n_events: int) -> None:
    ticker = Ticker(interval_ms / 1000)
    loop = asyncio.get_running_loop()
    paced = frames(n_events)
    server = await loop.create_server(lambda: Stream(ticker, paced), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval-ms", type=float, default=1.0)
    p.add_argument("--events", type=int, default=len(FRAMES), help="events a stream (>= 55; default 55)")
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.interval_ms, args.events))


if __name__ == "__main__":
    main()
