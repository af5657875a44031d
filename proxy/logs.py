"""Logs on stderr: one JSON object a line, or text for humans. Never a key, prompt or completion."""
from __future__ import annotations

import json
import logging
import sys
import time


# One encoder: json.dumps with any non-default option builds a new JSONEncoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def log_request(logger: logging.Logger, fields: dict) -> None:
    """One access-log line. Logger.info would also walk the stack for the caller's file and line
    (findCaller), which no format here prints: a third of the cost of every request's line."""
    if logger.isEnabledFor(logging.INFO):
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, "request", None, None,
                                        extra={"fields": fields}))


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would duplicate ours and its format is not JSON.
    logging.getLogger("uvicorn.access").disabled = True
