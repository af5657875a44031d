"""The scale client: N concurrent streamed /v1/messages calls through one proxy, each read to
its end and compared byte for byte with the fake upstream's stream.

    python -m bench.scale --url http://127.0.0.1:PORT --key KEY --body request.json --streams 1000
        [--events 55] [--ramp-per-step 1000 --ramp-step-ms 100 --max-pending 1024]

Started all at once by default (the `make bench` scale phase); `--ramp-per-step N` starts at most
N streams every `--ramp-step-ms`, and `--max-pending M` holds further starts while M are
waiting for their response headers: the proxy's listen backlog (uvicorn's 2048) never overflows,
so no SYN is dropped and retried a second later.

Cheap enough for one core at 10,000 streams: one asyncio Protocol a connection on uvloop, no
HTTP client library; each read appends to a buffer and a stream is parsed once, at its end
(chunked body decoded, compared with the expected bytes, its events counted).

Prints one JSON object: errors by kind, the peak number of streams open at once, the events
received, the time to headers and the whole-stream time (p50 / p99 / max, ms), the ramp's
length and the client's own CPU. Bounded: the run has a deadline after its last start."""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import paced


@dataclass
class Tally:
    open: int = 0       # headers (200) received, stream not over
    peak: int = 0
    pending: int = 0    # started, no response headers yet
    finished: int = 0   # over, one way or another
    ok: int = 0
    events: int = 0     # SSE events received, over every stream
    errors: Counter[str] = field(default_factory=Counter)
    headers_ms: list[float] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    less_pending: asyncio.Event = field(default_factory=asyncio.Event)
    streams: int = 0


def dechunk(raw: bytes) -> bytes | None:
    """A complete chunked body decoded; None when it is malformed."""
    out, i = bytearray(), 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            return None
        try:
            size = int(raw[i:j].split(b";", 1)[0], 16)
        except ValueError:
            return None
        if size == 0:
            return bytes(out)
        out += raw[j + 2:j + 2 + size]
        i = j + 4 + size


class Call(asyncio.Protocol):
    """One streamed call on its own connection (`connection: close`)."""

    def __init__(self, request: bytes, expected: bytes, tally: Tally) -> None:
        self.request, self.expected, self.tally = request, expected, tally
        self.t0 = time.perf_counter()
        self.buf = bytearray()
        self.body_at = -1       # where the body starts in buf, once the head is in
        self.status = 0
        self.transport: asyncio.Transport | None = None
        self.over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.body_at < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.body_at = end + 4
            t = self.tally
            t.headers_ms.append((time.perf_counter() - self.t0) * 1000)
            self.unpend()
            try:
                self.status = int(self.buf[9:12])
            except ValueError:
                self.status = 0
            if self.status != 200:
                self.finish(f"status {self.status}")
                return
            t.open += 1
            t.peak = max(t.peak, t.open)
        if self.buf.endswith(b"\r\n0\r\n\r\n") or self.buf.endswith(b"\n\n0\r\n\r\n"):
            raw = bytes(self.buf[self.body_at:])
            self.tally.events += raw.count(b"\n\n")
            body = dechunk(raw)
            if body != self.expected:
                self.finish("stream differs from the upstream's")
            else:
                self.tally.stream_ms.append((time.perf_counter() - self.t0) * 1000)
                self.finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.over:
            if self.status == 200:
                self.tally.events += bytes(self.buf[self.body_at:]).count(b"\n\n")
            self.finish("connection closed before the end" if self.body_at >= 0 or exc is None
                        else exc.__class__.__name__)

    def unpend(self) -> None:
        self.tally.pending -= 1
        self.tally.less_pending.set()

    def finish(self, error: str | None) -> None:
        if self.over:
            return
        self.over = True
        t = self.tally
        if self.body_at < 0:
            self.unpend()
        elif self.status == 200:
            t.open -= 1
        if error is None:
            t.ok += 1
        else:
            t.errors[error] += 1
        t.finished += 1
        if t.finished == t.streams:
            t.all_done.set()
        if self.transport is not None:
            self.transport.close()
            self.buf = bytearray()


def quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {"p50": round(s[len(s) // 2], 1), "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 1),
            "max": round(s[-1], 1)}


async def start(host: str, port: int, request: bytes, expected: bytes, tally: Tally, calls: list[Call]) -> None:
    call = Call(request, expected, tally)
    calls.append(call)
    try:
        await asyncio.get_running_loop().create_connection(lambda: call, host, port)
    except OSError as exc:  # refused, EMFILE, ...
        call.finish(f"connect: {exc.__class__.__name__} {exc.errno}")


async def run(url: str, key: str, body: bytes, streams: int, deadline_s: float, events: int,
              per_step: int, step_ms: float, max_pending: int) -> dict[str, object]:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    request = (f"POST /v1/messages HTTP/1.1\r\nhost: {host}:{port}\r\nx-api-key: {key}\r\n"
               f"content-type: application/json\r\nanthropic-version: 2023-06-01\r\nconnection: close\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    expected = b"".join(paced.events(events))
    tally = Tally(streams=streams)
    calls: list[Call] = []
    tasks: set[asyncio.Task] = set()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step = per_step if per_step > 0 else streams
    started = 0
    while started < streams:
        tick = time.perf_counter()
        for _ in range(min(step, streams - started)):
            while max_pending and tally.pending >= max_pending:
                tally.less_pending.clear()
                await tally.less_pending.wait()
            tally.pending += 1
            task = asyncio.ensure_future(start(host, int(port), request, expected, tally, calls))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += 1
        if started < streams:
            await asyncio.sleep(max(0.0, step_ms / 1000 - (time.perf_counter() - tick)))
    ramp_s = time.perf_counter() - t0
    try:
        await asyncio.wait_for(tally.all_done.wait(), deadline_s)
    except asyncio.TimeoutError:
        pass
    late = streams - tally.finished
    if late:
        tally.errors["not finished by the deadline"] += late
        for c in calls:
            if not c.over and c.transport is not None:
                c.transport.abort()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"streams": streams, "ok": tally.ok, "errors": dict(+tally.errors), "peak_open": tally.peak,
            "events": tally.events, "wall_s": round(wall, 2), "ramp_s": round(ramp_s, 2),
            "client_cpu_s": round(cpu, 2), "headers_ms": quantiles(tally.headers_ms),
            "stream_ms": quantiles(tally.stream_ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--events", type=int, default=55, help="events the paced upstream sends a stream")
    p.add_argument("--deadline-s", type=float, default=120.0, help="after the last start")
    p.add_argument("--ramp-per-step", type=int, default=0, help="starts a step; 0: all at once")
    p.add_argument("--ramp-step-ms", type=float, default=100.0)
    p.add_argument("--max-pending", type=int, default=0, help="starts waiting for headers at most; 0: no cap")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.streams + 1024)), hard))
    import uvloop

    out = uvloop.run(run(args.url, args.key, args.body.read_bytes(), args.streams, args.deadline_s, args.events,
                         args.ramp_per_step, args.ramp_step_ms, args.max_pending))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
