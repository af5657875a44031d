"""A hostile upstream: a raw asyncio TCP server on loopback, in its own thread, whose every byte the
test scripts. It records each request as it arrived (request line, raw target, headers, body) and
answers it with the next queued `Answer`, else `default`:

    up.queue(raw(b"HTTP/1.1 200 OK\\r\\n..."))      arbitrary bytes, then close
    up.queue(json_answer({...}, headers=[...]))     a framed JSON answer (keeps the connection)
    up.queue(sse(frames, event_delay=0.002))        a chunked event stream, frame by frame
    up.queue(huge_head(70 * 1024))                  a response head larger than any proxy should take
    up.queue(drip_head(interval=0.1, bound=30))     a head that never ends, one byte at a time
    up.queue(hold("name"))                          no answer until release("name") or the peer leaves
    up.queue(close_mid_body())                      a content-length it never honours

An answer that sees its peer close the connection before it is done records the request in
`closed_early` (what "the proxy closed the upstream request" looks like from here). Every public
method may be called from any thread.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

Headers = Iterable[tuple[str, str]]


@dataclass
class Seen:
    """One request as the upstream received it (header names lower-cased, in order)."""

    request_line: bytes
    method: str
    target: str  # the raw request target, exactly as written on the request line
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class PeerGone(Exception):
    """The proxy closed the connection while the answer was being written or held."""


class Peer:
    """The connection an Answer writes on."""

    def __init__(self, upstream: HostileUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.sent = 0  # bytes written for the request in hand

    @property
    def gone(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    async def send(self, data: bytes) -> None:
        if self.gone:
            raise PeerGone
        self.writer.write(data)
        self.sent += len(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            raise PeerGone from None

    async def wait_gone(self, timeout: float) -> bool:
        """Wait up to `timeout` for the peer to close; True if it did. (Reads: only while no
        further request can be on its way, i.e. while an answer is pending.)"""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            return True


# An answer writes the response to one request; True keeps the connection for the next one.
Answer = Callable[[Peer, Seen], Awaitable[bool]]


def head(status: int = 200, headers: Headers = (), reason: str = "OK") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"] + [f"{k}: {v}\r\n" for k, v in headers]
    return ("".join(lines) + "\r\n").encode("latin-1")


def respond(status: int = 200, body: bytes = b"", headers: Headers = (),
            content_type: str = "application/json") -> Answer:
    """A complete response framed by content-length; the connection stays open."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        hs = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        await peer.send(head(status, hs) + body)
        return True
    return answer


def json_answer(obj: Any, status: int = 200, headers: Headers = ()) -> Answer:
    return respond(status, json.dumps(obj).encode(), headers)


def raw(data: bytes, close: bool = True) -> Answer:
    """Exactly these bytes; then the connection is closed unless `close` is False."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        await peer.send(data)
        return not close
    return answer


def frame(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def text_delta(text: str, index: int = 0) -> bytes:
    return frame("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": {"type": "text_delta", "text": text}})


def message_stream(chunks: list[str], model: str = "claude-haiku-4-5", input_tokens: int = 25,
                   output_tokens: int | None = None) -> list[bytes]:
    """An honest stream's frames: message_start, one text block, message_delta with the usage."""
    out = output_tokens if output_tokens is not None else max(1, len("".join(chunks)) // 4)
    message = {"id": "msg_hostile", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 1}}
    return ([frame("message_start", {"type": "message_start", "message": message}),
             frame("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})]
            + [text_delta(c) for c in chunks]
            + [frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
               frame("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                       "usage": {"output_tokens": out}}),
               frame("message_stop", {"type": "message_stop"})])


def sse(frames: list[bytes], headers: Headers = (), event_delay: float = 0.0) -> Answer:
    """A chunked text/event-stream, one chunk a frame, `event_delay` seconds apart."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        hs = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked"), *headers]
        await peer.send(head(200, hs))
        for i, f in enumerate(frames):
            if event_delay and i:
                if await peer.wait_gone(event_delay):
                    raise PeerGone
            await peer.send(b"%x\r\n%s\r\n" % (len(f), f))
        await peer.send(b"0\r\n\r\n")
        return True
    return answer


def huge_head(size: int, status: int = 200) -> Answer:
    """A response head of about `size` bytes (in 1 KiB headers), then a small body."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        pads = [(f"x-pad-{i}", "p" * 1000) for i in range(size // 1010 + 1)]
        await peer.send(head(status, [("content-type", "application/json"), ("content-length", "2"), *pads]) + b"{}")
        return False
    return answer


def drip_head(interval: float = 0.1, bound: float = 30.0) -> Answer:
    """A status line, then one header line that never ends, a byte every `interval` seconds, for
    at most `bound` seconds (or until the peer leaves)."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        await peer.send(b"HTTP/1.1 200 OK\r\nx-drip: ")
        for _ in range(int(bound / interval)):
            if await peer.wait_gone(interval):
                raise PeerGone
            await peer.send(b"a")
        return False
    return answer


def hold(name: str, then: Answer | None = None) -> Answer:
    """No byte until `release(name)` (then `then`, default the ordinary answer), or until the peer
    closes the connection (recorded in closed_early)."""
    async def answer(peer: Peer, seen: Seen) -> bool:
        gate = asyncio.ensure_future(peer.upstream._gate(name).wait())
        closed = asyncio.ensure_future(peer.reader.read(1))
        try:
            await asyncio.wait({gate, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gate.cancel()
        if closed.done():
            raise PeerGone
        closed.cancel()
        return await (then or ordinary)(peer, seen)
    return answer


def close_mid_body(declared: int = 1000, sent: bytes = b'{"type":"mess') -> Answer:
    async def answer(peer: Peer, seen: Seen) -> bool:
        await peer.send(head(200, [("content-type", "application/json"), ("content-length", str(declared))]) + sent)
        return False
    return answer


def message_json(model: str, input_tokens: int = 25, output_tokens: int = 7, text: str = "Hello.") -> dict:
    return {"id": "msg_hostile", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


ORDINARY_USAGE = (25, 7)  # what `ordinary` reports for every message, streamed or not


async def ordinary(peer: Peer, seen: Seen) -> bool:
    """What an honest Anthropic API would say to the request (bodies kept minimal)."""
    if seen.method == "POST" and seen.path == "/v1/messages":
        body = seen.json
        model = body.get("model", "?")
        if body.get("stream") is True:
            return await sse(message_stream(["Hello ", "from ", "the ", "hostile ", "upstream."], model,
                                            *ORDINARY_USAGE))(peer, seen)
        return await json_answer(message_json(model, *ORDINARY_USAGE))(peer, seen)
    if seen.method == "POST" and seen.path == "/v1/messages/count_tokens":
        return await json_answer({"input_tokens": 7})(peer, seen)
    if seen.method == "GET" and seen.path == "/v1/models":
        return await json_answer({"data": [{"type": "model", "id": "claude-haiku-4-5"}], "has_more": False,
                                  "first_id": "claude-haiku-4-5", "last_id": "claude-haiku-4-5"})(peer, seen)
    if seen.method == "GET" and seen.path.startswith("/v1/models/"):
        return await json_answer({"type": "model", "id": seen.path.rsplit("/", 1)[1]})(peer, seen)
    return await json_answer({"type": "error", "error": {"type": "not_found_error", "message": "no route"}},
                             status=404)(peer, seen)


class ScriptedServer:
    """A scripted loopback server on an event loop in a thread of its own (this module's, and
    tests/h2_upstream.py's): `start()` returns once it listens on 127.0.0.1; `stop()` ends what is
    still answering. Subclasses listen in `_listen` and may drop more in `_closing`."""

    thread_name = "scripted-upstream"

    def __init__(self) -> None:
        self.port = 0
        self.default: Answer = ordinary
        self._cond = threading.Condition()
        self._queue: deque[Answer] = deque()
        self._requests: list[Seen] = []
        self._gates: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _listen(self) -> asyncio.AbstractServer:
        raise NotImplementedError

    def _closing(self) -> None:
        pass

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Any:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.thread_name, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(self._listen())
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            self._closing()
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.close()

    # -- scripting (any thread) ---------------------------------------------------------------
    def queue(self, *answers: Answer) -> None:
        with self._cond:
            self._queue.extend(answers)

    def release(self, name: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._gate(name).set())

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())


class HostileUpstream(ScriptedServer):
    """`start()` returns once it listens on 127.0.0.1; `stop()` cancels whatever is still answering."""

    thread_name = "hostile-upstream"

    def __init__(self) -> None:
        super().__init__()
        self._closed_early: list[Seen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _listen(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    # -- inspection (any thread) --------------------------------------------------------------
    @property
    def requests(self) -> list[Seen]:
        with self._cond:
            return list(self._requests)

    @property
    def closed_early(self) -> list[Seen]:
        with self._cond:
            return list(self._closed_early)

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_closed_early(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._closed_early) >= count, timeout)

    # -- server side (own thread) --------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, reader, writer)
        try:
            while True:
                try:
                    seen = await self._read_request(reader)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
                    return
                with self._cond:
                    self._requests.append(seen)
                    answer = self._queue.popleft() if self._queue else self.default
                    self._cond.notify_all()
                peer.sent = 0
                try:
                    keep = await answer(peer, seen)
                except PeerGone:
                    with self._cond:
                        self._closed_early.append(seen)
                        self._cond.notify_all()
                    return
                if not keep:
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> Seen:
        head_bytes = await reader.readuntil(b"\r\n\r\n")
        lines = head_bytes[:-4].split(b"\r\n")
        method, target, _version = lines[0].decode("latin-1").split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        length = sum(int(v) for k, v in headers if k == "content-length")
        body = await reader.readexactly(length) if length else b""
        return Seen(lines[0], method, target, headers, body)
