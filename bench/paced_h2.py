"""The paced fake upstream over HTTP/2 cleartext (h2c, prior knowledge): bench/paced.py's
events and pacing, many streams on one connection. Built on the `h2` library, one
asyncio Protocol a connection, on uvloop.

    python -m bench.paced_h2 --port 18002 --interval-ms 1000 [--events 60] [--max-streams 1000]

The scale run's upstream when the proxy speaks HTTP/2 to it (`upstreams.<name>.http2: true`):
the proxy then needs one upstream connection per up to `--max-streams` streams (advertised as
SETTINGS_MAX_CONCURRENT_STREAMS) instead of one a stream.

- Each POST (its body read to END_STREAM) gets status 200, `content-type: text/event-stream`,
  and then one DATA frame per event of `paced.events(n)` (the same bytes as bench/paced.py),
  END_STREAM on the last event's frame.
- Pacing is paced.py's: one timer for every stream of every connection; at each tick each
  open stream's next event is framed, and each connection written to once (one
  `transport.write` a connection a tick, not one a stream).
- Flow control: the server advertises a large initial window (`--window`) and hands back
  what it receives (`acknowledge_received_data`); it never sends past the client's window:
  an event that does not fit waits, with the ones due after it, for the client's
  WINDOW_UPDATE (counted as a stall).
- RST_STREAM from the client stops that stream; connection loss stops all of its streams;
  so does a GOAWAY from the client (`h2` sends nothing once it has one), and the connection is
  closed.
- A stream opened past the advertised limit is a connection error in `h2` (GOAWAY
  PROTOCOL_ERROR); it is counted and logged.

Counters (connections, those that carried a stream, streams started / completed / reset / lost,
the peak of streams open on one connection and at once, stalls) go to stderr as one JSON line
prefixed `paced_h2 stats` every 5 s while they change and at SIGTERM / SIGINT: `stats_from_log`
reads the last one. Its CPU: about 8 µs an event (10,000 streams at one event a second: under a
tenth of a core)."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from bench import paced

STATS_PREFIX = "paced_h2 stats "
RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache")]
CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                                   normalize_outbound_headers=False)


class Stats:
    """What the server did, over every connection."""

    def __init__(self) -> None:
        self.connections = 0          # accepted, ever (the bench's port probe included)
        self.used_connections = 0     # that carried at least one stream
        self.open_connections = 0
        self.peak_connections = 0
        self.started = 0              # requests answered with headers
        self.completed = 0            # last event sent (END_STREAM)
        self.reset = 0                # RST_STREAM from the client before the end
        self.lost = 0                 # open when their connection was lost
        self.open_streams = 0
        self.peak_streams = 0         # open at once, over every connection
        self.peak_per_connection = 0  # open at once on one connection
        self.stalls = 0               # an event held back by the client's flow-control window
        self.protocol_errors: dict[str, int] = {}

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


class Ticker(paced.Ticker):
    """paced.Ticker (one timer, each registered stream's `step` once a tick) that then writes
    each connection a stream framed an event on: one write a connection a tick."""

    def __init__(self, interval: float) -> None:
        super().__init__(interval)
        self.dirty: list[Connection] = []

    def _tick(self) -> None:
        super()._tick()
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()


class Stream:
    """One response on a connection: `due` events are owed by now, `sent` are framed."""

    __slots__ = ("conn", "sid", "due", "sent", "closed", "blocked")

    def __init__(self, conn: Connection, sid: int) -> None:
        self.conn, self.sid = conn, sid
        self.due = self.sent = 0
        self.closed = False   # reset by the client, or its connection is gone
        self.blocked = False  # waiting for a WINDOW_UPDATE

    def step(self) -> bool:
        """A tick: one more event is due. False once every event is due (or the stream is gone)."""
        if self.closed:
            return False
        self.due += 1
        if not self.blocked:
            self.conn.push(self)
        return self.due < len(self.conn.frames)


class Connection(asyncio.Protocol):
    def __init__(self, ticker: Ticker, frames: list[bytes], stats: Stats, max_streams: int, window: int) -> None:
        self.ticker, self.frames, self.stats = ticker, frames, stats
        self.max_streams, self.window = max_streams, window
        self.h2 = h2.connection.H2Connection(CONFIG)
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.is_dirty = False
        self.used = False

    # --- asyncio -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        st = self.stats
        st.connections += 1
        st.open_connections += 1
        st.peak_connections = max(st.peak_connections, st.open_connections)
        S = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            S.MAX_CONCURRENT_STREAMS: self.max_streams, S.INITIAL_WINDOW_SIZE: self.window,
            S.MAX_HEADER_LIST_SIZE: 1 << 16})
        self.h2.initiate_connection()
        if self.window > 65535:  # the connection's own window starts at 65,535 whatever SETTINGS say
            self.h2.increment_flow_control_window(self.window - 65535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        st = self.stats
        st.open_connections -= 1
        for s in self.streams.values():
            s.closed = True
            st.lost += 1
            st.open_streams -= 1
        self.streams.clear()
        self.blocked.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 has queued a GOAWAY
            name = exc.__class__.__name__
            self.stats.protocol_errors[name] = self.stats.protocol_errors.get(name, 0) + 1
            print(f"paced_h2: protocol error from the client: {name}: {exc}", file=sys.stderr, flush=True)
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_ended is not None:
                    self.respond(ev.stream_id)
            elif isinstance(ev, h2.events.RequestReceived):
                if ev.stream_ended is not None:  # a request without a body
                    self.respond(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset(ev.stream_id)
            elif isinstance(ev, h2.events.WindowUpdated):
                self.unblock(ev.stream_id)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.unblock(0)  # the initial window may have grown
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated()
                return
        self.flush()

    # --- streams -------------------------------------------------------------------------
    def respond(self, sid: int) -> None:
        """The request is complete (END_STREAM): headers now, events on the ticks to come."""
        if sid in self.streams:
            return
        self.h2.send_headers(sid, RESPONSE_HEADERS)
        s = self.streams[sid] = Stream(self, sid)
        st = self.stats
        if not self.used:
            self.used = True
            st.used_connections += 1
        st.started += 1
        st.open_streams += 1
        st.peak_streams = max(st.peak_streams, st.open_streams)
        st.peak_per_connection = max(st.peak_per_connection, len(self.streams))
        self.ticker.add(s)

    def push(self, s: Stream) -> None:
        """Frame the events of `s` that are due, as far as the client's window lets."""
        frames, h2c = self.frames, self.h2
        while s.sent < s.due:
            data = frames[s.sent]
            last = s.sent + 1 == len(frames)
            try:
                if h2c.local_flow_control_window(s.sid) < len(data):
                    if not s.blocked:
                        s.blocked = True
                        self.blocked[s.sid] = s
                        self.stats.stalls += 1
                    break
                h2c.send_data(s.sid, data, end_stream=last)
            except h2.exceptions.ProtocolError:  # (the stream or the connection is closed for sending)
                self.drop(s)
                break
            s.sent += 1
            if last:
                self.stats.completed += 1
                self.drop(s)
        if not self.is_dirty:
            self.is_dirty = True
            self.ticker.dirty.append(self)

    def unblock(self, sid: int) -> None:
        if not self.blocked:
            return
        if sid == 0:
            waiting = list(self.blocked.values())
        else:
            waiting = [self.blocked[sid]] if sid in self.blocked else []
        for s in waiting:
            del self.blocked[s.sid]
            s.blocked = False
            if not s.closed:
                self.push(s)

    def reset(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            self.stats.reset += 1
            self.drop(s)

    def terminated(self) -> None:
        """The client sent GOAWAY: h2 frames nothing more, so every open stream is lost."""
        self.flush()
        for s in list(self.streams.values()):
            self.stats.lost += 1
            self.drop(s)
        if self.transport is not None:
            self.transport.close()

    def drop(self, s: Stream) -> None:
        s.closed = True
        if self.streams.pop(s.sid, None) is not None:
            self.stats.open_streams -= 1
        self.blocked.pop(s.sid, None)

    # --- writing -------------------------------------------------------------------------
    def flush(self) -> None:
        self.is_dirty = False
        if self.closed:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]


def stats_from_log(log: Path) -> dict[str, object]:
    """The last stats line paced_h2 wrote to `log` ({} when none)."""
    last = None
    try:
        with open(log, "rb") as f:
            for line in f:
                if line.startswith(STATS_PREFIX.encode()):
                    last = line
    except OSError:
        return {}
    return json.loads(last[len(STATS_PREFIX):]) if last else {}


async def serve(port: int, interval_ms: float, n_events: int, max_streams: int, window: int) -> None:
    ticker = Ticker(interval_ms / 1000)
    stats = Stats()
    frames = paced.events(n_events)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(ticker, frames, stats, max_streams, window),
                                      "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def report() -> None:
        print(STATS_PREFIX + json.dumps(stats.as_dict()), file=sys.stderr, flush=True)

    async def every(seconds: float) -> None:
        last = None
        while True:
            await asyncio.sleep(seconds)
            now = stats.as_dict()
            if now != last:
                report()
                last = now

    reporter = asyncio.ensure_future(every(5.0))
    await stop.wait()
    reporter.cancel()
    report()
    server.close()  # not wait_closed(): it would wait for the clients' connections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval-ms", type=float, default=1.0)
    p.add_argument("--events", type=int, default=len(paced.FRAMES), help="events a stream (>= 55; default 55)")
    p.add_argument("--max-streams", type=int, default=1000, help="SETTINGS_MAX_CONCURRENT_STREAMS advertised")
    p.add_argument("--window", type=int, default=1 << 24,
                   help="SETTINGS_INITIAL_WINDOW_SIZE advertised, and the connection's receive window")
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.interval_ms, args.events, args.max_streams, args.window))


if __name__ == "__main__":
    main()
