"""[pure] Input-token estimate from a request body, for admission (docs/budgets.md "Estimates").

No tokenizer exists for current Claude models, so text counts as ceil(utf8_bytes / 3):
a third above the ~4 characters per token of English on older tokenizers, roughly
right for the Claude 4.7+ tokenizer, high for ordinary prose. Code, JSON and non-English
text tokenise worse; the provider's usage settles the difference afterwards.

Images and documents are counted from their kind, never from their base64 length:
an image costs at most ~1,600 tokens however many bytes encode it; a PDF costs about
3,000 tokens per page, pages counted in the decoded file.

Odd shapes never raise: an unknown block, or a value of the wrong type, counts as the
size of its JSON.
"""
from __future__ import annotations

import binascii
import re
import zlib

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD = 4            # role and turn markers, per message (and for `system`)
TOOL_OVERHEAD = 10              # per tool definition, around its name and schema
# The hidden tool-use system prompt was a few hundred tokens per request in the 2025
# docs (UNVERIFIED for current models); 500 errs high.
TOOLS_PROMPT_TOKENS = 500
IMAGE_TOKENS = 1_600            # practical per-image ceiling: larger images are downscaled
PDF_PAGE_TOKENS = 3_000         # top of the 1,500-3,000 per page range (text + page image)
# A document given by URL or file id has no size we can see; ten PDF pages. Longer
# documents are under-estimated and settled from the provider's usage.
UNSIZED_DOCUMENT_TOKENS = 10 * PDF_PAGE_TOKENS
AUDIO_BYTES_PER_TOKEN = 1_000   # ~10 tokens/s of audio; compressed audio is >= 16 kB/s

_MAX_DEPTH = 32                 # deeper nesting is counted as JSON, without recursion
# A PDF name ends at whitespace or a delimiter, so /Page here never matches /Pages.
_NAME_END = rb"(?![^\s()<>\[\]{}/%])"
_PDF_PAGE = re.compile(rb"/Type\s*/Page" + _NAME_END)
_PDF_OBJECT_STREAM = re.compile(rb"/Type\s*/ObjStm" + _NAME_END + rb".*?stream(?:\r\n|\r|\n)", re.S)
_OBJECT_STREAM_CAP = 16 << 20   # decompressed bytes inspected per PDF, against zip bombs


def estimate_input_tokens(body: object) -> int:
    """Conservative input-token estimate of an Anthropic Messages request body."""
    if not isinstance(body, dict):
        return _tokens(_json_bytes(body))
    t = _Tally()
    system = body.get("system")
    if system is not None:
        t.tokens += MESSAGE_OVERHEAD
        _content(t, system, 0)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            t.tokens += MESSAGE_OVERHEAD
            if isinstance(message, dict):
                _content(t, message.get("content"), 0)
            else:
                t.bytes += _json_bytes(message)
    elif messages is not None:
        t.bytes += _json_bytes(messages)
    _anthropic_tools(t, body.get("tools"))
    return t.total()


def estimate_openai_input_tokens(body: object) -> int:
    """Conservative input-token estimate of an OpenAI Chat Completions request body."""
    if not isinstance(body, dict):
        return _tokens(_json_bytes(body))
    t = _Tally()
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            t.tokens += MESSAGE_OVERHEAD
            if isinstance(message, dict):
                _openai_message(t, message)
            else:
                t.bytes += _json_bytes(message)
    elif messages is not None:
        t.bytes += _json_bytes(messages)
    tools = [x for key in ("tools", "functions") for x in _as_list(t, body.get(key))]
    if tools:
        t.tokens += TOOLS_PROMPT_TOKENS + TOOL_OVERHEAD * len(tools)
        t.bytes += sum(_json_bytes(tool) for tool in tools)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        t.bytes += _json_bytes(response_format)
    return t.total()


def output_estimate_tokens(text_bytes: int) -> int:
    """Live output estimate while a stream flows: ceil(bytes / 3), deliberately high."""
    return _tokens(text_bytes) if text_bytes > 0 else 0


# --- tally -------------------------------------------------------------------------


class _Tally:
    """Text bytes and fixed-figure tokens of one body; text is divided once, at the end."""

    __slots__ = ("bytes", "tokens")

    def __init__(self) -> None:
        self.bytes = 0
        self.tokens = 0

    def total(self) -> int:
        return self.tokens + _tokens(self.bytes)


def _tokens(n_bytes: int) -> int:
    return -(-n_bytes // BYTES_PER_TOKEN)


def _text_bytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _text(t: _Tally, value: object) -> None:
    if isinstance(value, str):
        t.bytes += _text_bytes(value)
    elif value is not None:
        t.bytes += _json_bytes(value)


def _as_list(t: _Tally, value: object) -> list[object]:
    if isinstance(value, list):
        return value
    if value is not None:
        t.bytes += _json_bytes(value)
    return []


def _json_bytes(value: object) -> int:
    """About the size of `value` as compact JSON with UTF-8 strings; iterative, so depth
    costs no recursion, and it never raises."""
    total = 0
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += _text_bytes(v) + 2
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 30103 // 100000 + 2   # digits, without str() of huge ints
        elif isinstance(v, float):
            total += len(repr(v))
        elif isinstance(v, (dict, list, tuple)):
            if id(v) in seen:                               # not from JSON, but never loop
                continue
            seen.add(id(v))
            total += 2 + len(v)
            if isinstance(v, dict):
                for key, item in v.items():
                    stack.append(key)
                    stack.append(item)
            else:
                stack.extend(v)
        else:
            total += 8
    return total


# --- Anthropic ---------------------------------------------------------------------


def _anthropic_tools(t: _Tally, tools: object) -> None:
    tools = _as_list(t, tools)
    if not tools:
        return
    t.tokens += TOOLS_PROMPT_TOKENS + TOOL_OVERHEAD * len(tools)
    for tool in tools:
        if isinstance(tool, dict) and "input_schema" in tool:
            _text(t, tool.get("name"))
            _text(t, tool.get("description"))
            t.bytes += _json_bytes(tool.get("input_schema"))
        else:                                               # server tools, odd shapes
            t.bytes += _json_bytes(tool)


def _content(t: _Tally, content: object, depth: int) -> None:
    if isinstance(content, str):
        t.bytes += _text_bytes(content)
    elif isinstance(content, list):
        for block in content:
            _block(t, block, depth)
    elif content is not None:
        t.bytes += _json_bytes(content)


_TALLIED = object()  # what _kind answers for an item it has tallied itself


def _kind(t: _Tally, item: object, flat: bool = False) -> object:
    """The `type` of a content block (Anthropic) or part (OpenAI), for the caller to tally by; or
    _TALLIED once tallied here: a non-object item, or any item when `flat` (nested too deep), as
    text, and a `text` one by its text (the same in both APIs)."""
    if not isinstance(item, dict) or flat:
        _text(t, item)
        return _TALLIED
    kind = item.get("type")
    if kind == "text":
        _text(t, item.get("text"))
        return _TALLIED
    return kind


def _block(t: _Tally, b: object, depth: int) -> None:
    kind = _kind(t, b, depth > _MAX_DEPTH)
    if kind is _TALLIED:
        return
    if kind == "image":
        t.tokens += IMAGE_TOKENS
    elif kind == "document":
        _document(t, b, depth)
    elif kind in ("tool_use", "server_tool_use"):
        _text(t, b.get("id"))
        _text(t, b.get("name"))
        t.bytes += _json_bytes(b.get("input"))
    elif kind == "tool_result":
        _text(t, b.get("tool_use_id"))
        _content(t, b.get("content"), depth + 1)
    elif kind == "thinking":
        _text(t, b.get("thinking"))          # the signature is opaque and not tokens
    elif kind == "redacted_thinking":
        _text(t, b.get("data"))
    else:
        t.bytes += _json_bytes(b)


def _document(t: _Tally, b: dict, depth: int) -> None:
    _text(t, b.get("title"))
    _text(t, b.get("context"))
    source = b.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if not isinstance(source, dict) or kind not in ("text", "content", "base64"):
        t.tokens += UNSIZED_DOCUMENT_TOKENS   # url, file, or no usable source
    elif kind == "text":
        _text(t, source.get("data"))
    elif kind == "content":
        _content(t, source.get("content"), depth + 1)
    else:
        t.tokens += _base64_document_tokens(source.get("data"), source.get("media_type"))


def _base64_document_tokens(data: object, media_type: object) -> int:
    raw = _b64decode(data)
    if raw is None:
        return UNSIZED_DOCUMENT_TOKENS
    if isinstance(media_type, str) and media_type.startswith("text/"):
        return _tokens(len(raw))
    return max(1, pdf_pages(raw)) * PDF_PAGE_TOKENS


def _b64decode(data: object) -> bytes | None:
    if not isinstance(data, str):
        return None
    try:
        return binascii.a2b_base64(data)
    except ValueError:                       # binascii.Error, or non-ASCII text
        return None


def pdf_pages(pdf: bytes) -> int:
    """Page objects in a PDF (`/Type /Page`, not `/Pages`), including those packed in
    compressed object streams, as modern writers do; 0 when none are found."""
    pages = _count(_PDF_PAGE, pdf)
    budget = _OBJECT_STREAM_CAP
    view = memoryview(pdf)
    for m in _PDF_OBJECT_STREAM.finditer(pdf):
        if budget <= 0:
            break
        try:
            inflated = zlib.decompressobj().decompress(view[m.end():], budget)
        except zlib.error:
            continue
        budget -= len(inflated)
        pages += _count(_PDF_PAGE, inflated)
    return pages


def _count(pattern: re.Pattern[bytes], data: bytes) -> int:
    return sum(1 for _ in pattern.finditer(data))   # no list of matches for a hostile file


# --- OpenAI ------------------------------------------------------------------------


def _openai_message(t: _Tally, message: dict) -> None:
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            _openai_part(t, part)
    else:
        _text(t, content)
    for key in ("name", "tool_call_id", "refusal"):
        _text(t, message.get(key))
    for key in ("tool_calls", "function_call"):
        if message.get(key) is not None:
            t.bytes += _json_bytes(message[key])


def _openai_part(t: _Tally, part: object) -> None:
    kind = _kind(t, part)
    if kind is _TALLIED:
        return
    if kind == "refusal":
        _text(t, part.get("refusal"))
    elif kind == "image_url":
        t.tokens += IMAGE_TOKENS
    elif kind == "file":
        t.tokens += _openai_file_tokens(part.get("file"))
    elif kind == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        if isinstance(data, str):           # audio tokens follow duration, so size is the signal
            t.tokens += -(-(len(data) * 3 // 4) // AUDIO_BYTES_PER_TOKEN)
    else:
        t.bytes += _json_bytes(part)


def _openai_file_tokens(file: object) -> int:
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        return UNSIZED_DOCUMENT_TOKENS       # by file_id, or no data
    media_type = None
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        media_type = header[5:].split(";", 1)[0]
    return _base64_document_tokens(data, media_type)

