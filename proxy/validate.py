"""[pure] The one gate for client strings: a JSON body and the strings in it that reach the
upstream, a metric label, a log line or the store (docs/http-api.md, "What the proxy refuses").

A body is refused (400, nothing forwarded) when it is not UTF-8, holds a lone surrogate anywhere
(as a `\\udXXX` escape: raw UTF-8 cannot encode one), repeats a key in any object (a provider
parser that keeps the first `model` would bypass the allow-list, pricing and hold that used the
last), or names a model that is empty, longer than MAX_MODEL_CHARS or holds a control character.
"""
from __future__ import annotations

import json
import re
from typing import Any

from proxy.errors import InvalidRequest

MAX_MODEL_CHARS = 256
# C0, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A \uD800-\uDFFF escape; found only where a lone surrogate is possible, then confirmed by a walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


_decode = json.JSONDecoder(object_pairs_hook=_unique_pairs).decode


def _has_lone_surrogate(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object whose every string is valid Unicode and whose objects
    repeat no key; InvalidRequest otherwise."""
    try:
        body = _decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid JSON: it is not UTF-8.") from None
    except _DuplicateKey:
        raise InvalidRequest("The request body repeats a key in one JSON object.") from None
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(raw) is not None and _has_lone_surrogate(body):
        raise InvalidRequest("The request body holds a lone UTF-16 surrogate (invalid Unicode).")
    return body


def check_model(model: Any) -> str:
    """`model` as a string fit for a label, a log and the store; InvalidRequest otherwise."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: field required (a non-empty string).")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"model: at most {MAX_MODEL_CHARS} characters.")
    if _CONTROL.search(model) is not None:
        raise InvalidRequest("model: must not hold control characters.")
    return model
