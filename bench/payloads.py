"""[pure] The bench workload: a 2.2 kB /v1/messages request, a 2.1 kB JSON reply and an
8.4 kB Anthropic stream of 55 events (50 text deltas), as bench/README.md describes it.

The texts hold no `"`, `\\`, `$` or non-ASCII byte, so they go into an nginx config as they are.
"""
from __future__ import annotations

import json

MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 1024
REQUEST_BYTES = 2_200
JSON_REPLY_BYTES = 2_100
SSE_BYTES = 8_400
TEXT_DELTAS = 50
INPUT_TOKENS = 612
OUTPUT_TOKENS = 540

_WORDS = ("the proxy meters every stream and holds each budget before a request is forwarded so "
          "that no team can overspend while many agents call the model at once ").split()


def prose(n: int, offset: int = 0) -> str:
    """Exactly n characters of plain ASCII words."""
    out: list[str] = []
    size, i = 0, offset
    while size < n:
        w = _WORDS[i % len(_WORDS)]
        out.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(out)[:n]


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def request_body(stream: bool) -> bytes:
    def build(n: int) -> bytes:
        return _dumps({"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
                       "system": "You are a careful assistant.",
                       "messages": [{"role": "user", "content": prose(n)}]})

    return build(REQUEST_BYTES - len(build(0)))


def _usage(output_tokens: int) -> dict[str, int]:
    return {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens}


def json_reply() -> bytes:
    def build(n: int) -> bytes:
        return _dumps({"id": "msg_bench0000000000000000", "type": "message", "role": "assistant", "model": MODEL,
                       "content": [{"type": "text", "text": prose(n, 3)}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": _usage(OUTPUT_TOKENS)})

    return build(JSON_REPLY_BYTES - len(build(0)))


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def sse_events() -> list[bytes]:
    """message_start (with usage), content_block_start, 50 text deltas, content_block_stop,
    message_delta (with usage), message_stop: 55 events, 8.4 kB."""
    def build(delta_chars: int) -> list[bytes]:
        head = [
            _event("message_start", {"type": "message_start", "message": {
                "id": "msg_bench0000000000000000", "type": "message", "role": "assistant", "model": MODEL,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(1)}}),
            _event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
        ]
        deltas = [_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": prose(delta_chars, i)}}) for i in range(TEXT_DELTAS)]
        tail = [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                     "usage": {"output_tokens": OUTPUT_TOKENS}}),
            _event("message_stop", {"type": "message_stop"}),
        ]
        return head + deltas + tail

    fixed = sum(map(len, build(0)))
    return build(round((SSE_BYTES - fixed) / TEXT_DELTAS))


def sse_body() -> bytes:
    return b"".join(sse_events())
