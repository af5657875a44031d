"""Logs on stderr: one JSON object a line, or text for humans. Never a key, prompt or completion."""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
from typing import TextIO


# One encoder: json.dumps with any non-default option builds a new JSONEncoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


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
# when FLUSH_LINES are waiting. A write + flush per event-loop turn cost 3-10% of the proxy's CPU
# at c=16 (bench.ab); a line is at most this late, and a kill -9 loses at most this much of the
# log (never a charge: the ledger has its own rows).
FLUSH_SECONDS = 0.05
FLUSH_LINES = 256


class AccessSink:
    """Access-log lines in JsonFormatter's exact shape, without a LogRecord, a handler lock and a
    formatter per request (~50 us a request here, a sixth of the relay's own CPU on a JSON call),
    written many at a time (FLUSH_SECONDS, FLUSH_LINES) instead of per line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._flush_scheduled = False
        self._clock = JsonFormatter()
        atexit.register(self.flush)

    def write(self, logger_name: str, fields: dict) -> None:
        lines = self._lines
        lines.append(_encode({"time": self._clock._time(time.time()), "level": "info", "logger": logger_name,
                              "message": "request", **fields}) + "\n")
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
        second = int(created)
        if second != self._second:  # one strftime a second, not one a request
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + "Z"
            self._second = second
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self._time(record.created),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else "unknown"
        return _encode(out)


def setup_logging(fmt: str = "json", level: str = "INFO") -> None:
    global _access_sink
    _access_sink = AccessSink(sys.stderr) if fmt == "json" else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would duplicate ours and its format is not JSON.
    logging.getLogger("uvicorn.access").disabled = True
