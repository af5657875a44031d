"""Logs on stderr: one JSON object a line, or text for humans. Never a key, prompt or completion.

The access log (docs/http-api.md, "Access log") is one line per answered request, in the fields
ACCESS_FIELDS names; the helpers below make each client- or upstream-given value safe to log
(bounded, escaped)."""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
from typing import Any, Iterable, TextIO

import orjson


# One encoder: json.dumps with any non-default option builds a new JSONEncoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode_line(fields: dict) -> str:
    """`fields` as one line of JSON, ASCII only: orjson's text when it is ASCII (about ten times
    faster than the stdlib's, a share of the proxy's CPU per request: bench/RESULTS.md), else the
    stdlib's, whose \\u escapes keep a client's non-ASCII string from ending a line for readers that
    split on Unicode line breaks (U+2028). What orjson refuses (an integer beyond 64 bits, a key
    that is not a string) the stdlib writes too. The two differ only in spelling: a float's
    exponent (3e-6, 3e-06), a NaN (null, NaN), a type the stdlib writes through str() (a datetime)."""
    try:
        text = orjson.dumps(fields, default=str)
    except TypeError:  # (orjson.JSONEncodeError is one)
        return _encode(fields)
    return text.decode("ascii") if text.isascii() else _encode(fields)


def log_request(logger: logging.Logger, fields: dict) -> None:
    """One access-log line. With setup_logging's JSON format the line goes straight to the access
    sink; otherwise through the logging module (without Logger.info's stack walk for the caller's
    file and line, which no format here prints)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if _access_sink is not None:
        _access_sink.write(logger.name, fields)
    else:
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, "request", None, None,
                                        extra={"fields": fields}))


# The access sink writes its lines together: FLUSH_SECONDS after the first one waiting, or at once
# when FLUSH_LINES are waiting. A write + flush per event-loop turn costs a measurable share of the
# proxy's CPU under load (bench.ab); a line is at most this late, and a kill -9 loses at most this much of the
# log (never a charge: the ledger has its own rows).
FLUSH_SECONDS = 0.05
FLUSH_LINES = 256

# Every access-log line has these fields, in this order (null when they do not apply), after
# time, level, logger and message.
ACCESS_FIELDS = ("request_id", "upstream_request_id", "client", "method", "path", "status", "team", "key",
                 "run", "model", "outcome", "error", "denied_scope", "denied_dimension", "input_tokens",
                 "output_tokens", "cost_usd", "steps", "duration_ms")
PATH_MAX = 256       # characters of a request's path logged (client input: bounded)
HEADER_VALUE_MAX = 128  # characters of an upstream's request id logged
# C0 controls and DEL as \xNN (JSON would escape them anyway; this keeps a `grep`ped line readable)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_UPSTREAM_ID_HEADERS = (b"request-id", b"x-request-id")
# The ASGI scope entry where a route answered through Starlette notes what its access-log line
# says (request_id, upstream_request_id, team, key, model, outcome, error): see note().
ACCESS_NOTE = "budget_proxy.access"


def note(scope: dict[str, Any], **fields: Any) -> None:
    """Tell the access log about the request `scope` (a no-op for a scope that is not logged so)."""
    noted = scope.get(ACCESS_NOTE)
    if noted is not None:
        noted.update(fields)


def path_field(scope: dict[str, Any]) -> str:
    """The request's path as the client sent it (percent-encoding kept, no query), at most PATH_MAX
    characters, non-ASCII bytes and controls escaped: a path is client input."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        raw = scope.get("path", "").encode("utf-8", "backslashreplace")
    else:
        raw = raw.partition(b"?")[0]  # (servers that leave the query in raw_path)
    text = raw[:PATH_MAX].decode("ascii", "backslashreplace")
    if not text.isprintable():
        text = text.translate(_CONTROLS)
    return text + "..." if len(raw) > PATH_MAX else text


def client_field(scope: dict[str, Any]) -> str | None:
    """The peer's address (no port)."""
    client = scope.get("client")
    return client[0] if client else None


def upstream_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The upstream's `request-id` (Anthropic) or `x-request-id` (OpenAI) among lower-cased response
    headers, bounded; None when it sent neither."""
    for k, v in headers:
        if k in _UPSTREAM_ID_HEADERS:
            text = v[:HEADER_VALUE_MAX].decode("ascii", "backslashreplace")
            return text if text.isprintable() else text.translate(_CONTROLS)
    return None


class AccessSink:
    """Access-log lines in JsonFormatter's exact shape, without a LogRecord, a handler lock and a
    formatter per request (a large share of the relay's own CPU on a JSON call),
    written many at a time (FLUSH_SECONDS, FLUSH_LINES) instead of per line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._flush_scheduled = False
        self._clock = JsonFormatter()
        self._middles: dict[str, str] = {}
        atexit.register(self.flush)

    def write(self, logger_name: str, fields: dict) -> None:
        lines = self._lines
        # (the constant members are encoded once per logger, not merged into `fields` and encoded
        # again for every line: the same text as one dict encoded whole)
        middle = self._middles.get(logger_name)
        if middle is None:
            middle = self._middles[logger_name] = _encode({"level": "info", "logger": logger_name,
                                                           "message": "request"})[1:-1]
        body = encode_line(fields)
        lines.append(f'{{"time":"{self._clock._time(time.time())}",{middle}'
                     f'{"," + body[1:] if len(body) > 2 else "}"}\n')
        if len(lines) >= FLUSH_LINES:
            self.flush()
        elif not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no loop running: write at once
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._lines:
            text, self._lines = "".join(self._lines), []
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed stderr must not fail a request
                pass


_access_sink: AccessSink | None = None


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def _time(self, created: float) -> str:
        """ISO-8601 UTC with milliseconds: 2026-12-07T10:00:00.123Z."""
        second = int(created)
        if second != self._second:  # one strftime a second, not one a request
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self._time(record.created),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else "unknown"
        return encode_line(out)


def flush_access_log() -> None:
    """Write the access-log lines still batched (a forked worker leaves by os._exit, without atexit)."""
    if _access_sink is not None:
        _access_sink.flush()


def setup_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Every log line to `stream` (stderr by default), in `fmt`: "json" or "text"."""
    global _access_sink
    out = sys.stderr if stream is None else stream
    _access_sink = AccessSink(out) if fmt == "json" else None
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would duplicate ours and its format is not JSON.
    logging.getLogger("uvicorn.access").disabled = True
