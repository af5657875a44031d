"""The access log: one JSON object a line, with the request's fields and never a secret."""
from __future__ import annotations

import io
import json
import logging
import re

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
    # ISO-8601 UTC with milliseconds (docs/http-api.md "Access log")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"]), first["time"]
    assert json.loads(lines[1])["request_id"] == "req_2"


def test_nothing_is_written_below_the_logger_level():
    logger, out = capture(logging.WARNING)
    log_request(logger, {"request_id": "req_1"})
    assert out.getvalue() == ""


def test_values_json_cannot_encode_are_written_as_text():
    logger, out = capture()
    log_request(logger, {"request_id": "req_1", "odd": {1, 2} and object()})
    assert json.loads(out.getvalue())["odd"].startswith("<object object")


def test_the_access_sink_writes_what_the_json_formatter_would_lines_together():
    import asyncio

    from proxy.logs import FLUSH_SECONDS, AccessSink

    out = io.StringIO()
    sink = AccessSink(out)
    logger, formatted = capture()

    async def two_requests() -> str:
        sink.write(logger.name, {"request_id": "req_1", "status": 200})
        sink.write(logger.name, {"request_id": "req_2", "status": 429})
        await asyncio.sleep(0)
        before = out.getvalue()  # nothing yet: the lines go out together, FLUSH_SECONDS after the first
        await asyncio.sleep(FLUSH_SECONDS * 2)  # (waits for the flush; asserts nothing about speed)
        return before

    assert asyncio.run(two_requests()) == ""
    log_request(logger, {"request_id": "req_1", "status": 200})
    via_sink = [json.loads(line) for line in out.getvalue().splitlines()]
    via_formatter = json.loads(formatted.getvalue())
    assert [r["request_id"] for r in via_sink] == ["req_1", "req_2"]
    assert list(via_sink[0]) == list(via_formatter)  # same keys, same order
    assert {k: v for k, v in via_sink[0].items() if k != "time"} == \
        {k: v for k, v in via_formatter.items() if k != "time"}


def test_the_access_sink_writes_at_once_without_a_loop():
    from proxy.logs import AccessSink

    out = io.StringIO()
    AccessSink(out).write("budget_proxy.access", {"request_id": "req_9"})
    assert json.loads(out.getvalue())["request_id"] == "req_9"


def test_the_access_sink_writes_at_once_when_many_lines_wait():
    import asyncio

    from proxy.logs import FLUSH_LINES, AccessSink

    out = io.StringIO()
    sink = AccessSink(out)

    async def burst() -> int:
        for i in range(FLUSH_LINES):
            sink.write("budget_proxy.access", {"request_id": f"req_{i}"})
        return len(out.getvalue().splitlines())  # (no await: written before this turn ends)

    assert asyncio.run(burst()) == FLUSH_LINES


from hypothesis import given, settings, strategies as st  # noqa: E402

from proxy.logs import _encode, encode_line  # noqa: E402

# what a log line's fields can hold: client text of any kind (lone surrogates, U+2028, controls),
# integers past 64 bits, floats of every exponent, nesting, and keys that are not strings
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(),
                     st.sampled_from(["model\u2028name", "a\x00b\x1b[31m\x7f", "\ud800", "é", "req_proxy_5f0c"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=8)
_fields = st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 3)), _values, max_size=8)


@settings(max_examples=200, deadline=None)
@given(_fields)
def test_a_line_is_the_stdlibs_json_in_ascii_whichever_encoder_wrote_it(fields: dict) -> None:
    line = encode_line(fields)
    # (JSON escapes every C0 control, so no line break of any kind; DEL it may leave, as the stdlib does)
    assert line.isascii() and not any(c < " " for c in line)
    assert json.loads(line) == json.loads(_encode(fields))


def test_an_ascii_line_is_orjsons_and_the_same_text_as_the_stdlibs(monkeypatch) -> None:
    fields = {"request_id": "req_proxy_5f0c", "client": None, "status": 200, "team": "research",
              "input_tokens": 612, "cost_usd": 0.004536, "duration_ms": 1.3, "steps": 1}
    stdlib = _encode(fields)

    def no_stdlib(_: dict) -> str:
        raise AssertionError("the stdlib encoder wrote an ASCII line")

    monkeypatch.setattr("proxy.logs._encode", no_stdlib)  # (the fast path is the one taken)
    assert encode_line(fields) == stdlib
