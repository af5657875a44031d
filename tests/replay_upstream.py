"""A loopback upstream that answers every POST with one recorded body, byte for byte.

`ReplayUpstream` is a plain HTTP/1.1 server (keep-alive) in a thread of its own. The test says
what the next call gets with `serve(body, sse=...)`; the server answers it to whatever path was
asked (/v1/messages, /v1/chat/completions), records the request (`requests`), and sends:

* JSON: `content-type: application/json` and a Content-Length;
* SSE: `content-type: text/event-stream`, chunked, one chunk per event (the events are cut at
  blank lines exactly as the file has them, so the concatenated chunks are the file's bytes).

Nothing is parsed or re-serialised on the way out: the recording is the wire.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Next:
    body: bytes = b""
    sse: bool = False
    status: int = 200
    extra_headers: dict[str, str] = field(default_factory=dict)


def sse_chunks(body: bytes) -> list[bytes]:
    """The body cut after every event terminator; b"".join(result) == body."""
    chunks, start = [], 0
    for m in _EVENT_END.finditer(body):
        chunks.append(body[start:m.end()])
        start = m.end()
    if start < len(body):
        chunks.append(body[start:])
    return chunks


class ReplayUpstream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = _Next()
        self.requests: list[Recorded] = []
        self.served = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer._lock:
                    outer.requests.append(Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                                                   body))
                    nxt = outer._next
                    outer.served += 1
                    rid = f"req_replay_{outer.served:04d}"
                self.send_response(nxt.status)
                self.send_header("request-id", rid)
                self.send_header("x-request-id", rid)
                for k, v in nxt.extra_headers.items():
                    self.send_header(k, v)
                if nxt.sse:
                    self.send_header("content-type", "text/event-stream; charset=utf-8")
                    self.send_header("cache-control", "no-cache")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for chunk in sse_chunks(nxt.body):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(nxt.body)))
                    self.end_headers()
                    self.wfile.write(nxt.body)
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="replay-upstream", daemon=True)

    def serve(self, body: bytes, *, sse: bool, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """What every following call gets, until the next serve()."""
        with self._lock:
            self._next = _Next(body, sse, status, dict(headers or {}))

    def start(self) -> ReplayUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> ReplayUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
