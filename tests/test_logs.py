"""The access log: one JSON object a line, with the request's fields and never a secret."""
from __future__ import annotations

import io
import json
import logging

from proxy.logs import JsonFormatter, log_request


def capture(level: int = logging.INFO) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"budget_proxy.test.{id(out)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(level)
    return logger, out


def test_one_json_line_per_request_with_its_fields():
    logger, out = capture()
    log_request(logger, {"request_id": "req_1", "team": "t", "status": 200, "cost_usd": 0.5})
    log_request(logger, {"request_id": "req_2", "team": "t", "status": 429})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["request_id"] == "req_1" and first["status"] == 200 and first["cost_usd"] == 0.5
    assert first["level"] == "info" and first["message"] == "request" and first["logger"] == logger.name
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-11-30T22:00:00Z")
    assert json.loads(lines[1])["request_id"] == "req_2"


def test_nothing_is_written_below_the_logger_level():
    logger, out = capture(logging.WARNING)
    log_request(logger, {"request_id": "req_1"})
    assert out.getvalue() == ""


def test_values_json_cannot_encode_are_written_as_text():
    logger, out = capture()
    log_request(logger, {"request_id": "req_1", "odd": {1, 2} and object()})
    assert json.loads(out.getvalue())["odd"].startswith("<object object")
