import ast
import base64
import json
import math
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.estimate as estimate
from proxy.estimate import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD,
    PDF_PAGE_TOKENS,
    TOOL_OVERHEAD,
    TOOLS_PROMPT_TOKENS,
    UNSIZED_DOCUMENT_TOKENS,
    estimate_input_tokens,
    estimate_openai_input_tokens,
    output_estimate_tokens,
    pdf_pages,
)

ENGLISH = ("The quick brown fox jumps over the lazy dog while the budget proxy counts every token "
           "that passes through it, erring high rather than low. ")


def user(content: object) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": content}]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(data)}}


def pdf(pages: int, *, extra: bytes = b"") -> bytes:
    objs = [b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
            b"2 0 obj << /Type /Pages /Kids [] /Count %d >> endobj" % pages]
    objs += [b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj" % (3 + i) for i in range(pages)]
    return b"%PDF-1.4\n" + b"\n".join(objs) + extra + b"\n%%EOF\n"


def pdf_doc(data: bytes) -> dict:
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)}}


# --- text --------------------------------------------------------------------------


def test_text_is_bytes_over_three_plus_message_overhead():
    assert estimate_input_tokens(user("a" * 3000)) == MESSAGE_OVERHEAD + 1000
    assert estimate_input_tokens(user("a" * 3001)) == MESSAGE_OVERHEAD + 1001
    assert estimate_input_tokens(user("")) == MESSAGE_OVERHEAD


def test_text_scales_linearly():
    one = estimate_input_tokens(user(ENGLISH * 10)) - MESSAGE_OVERHEAD
    ten = estimate_input_tokens(user(ENGLISH * 100)) - MESSAGE_OVERHEAD
    assert abs(ten - 10 * one) <= 10


def test_utf8_bytes_not_characters():
    assert estimate_input_tokens(user("é" * 300)) == MESSAGE_OVERHEAD + 200      # 2 bytes each
    assert estimate_input_tokens(user("日" * 300)) == MESSAGE_OVERHEAD + 300     # 3 bytes each
    assert estimate_input_tokens(user("\ud800 lone surrogate")) > MESSAGE_OVERHEAD


def test_string_and_block_content_agree():
    text = ENGLISH * 5
    assert estimate_input_tokens(user(text)) == estimate_input_tokens(user([{"type": "text", "text": text}]))


def test_system_string_and_blocks():
    base = estimate_input_tokens(user("hi"))
    body = user("hi") | {"system": "x" * 300}
    assert estimate_input_tokens(body) == base + MESSAGE_OVERHEAD + 100
    body = user("hi") | {"system": [{"type": "text", "text": "x" * 150, "cache_control": {"type": "ephemeral"}},
                                    {"type": "text", "text": "y" * 150}]}
    assert estimate_input_tokens(body) == base + MESSAGE_OVERHEAD + 100


def test_every_message_counted():
    body = {"messages": [{"role": "user", "content": "a" * 300}, {"role": "assistant", "content": "b" * 300},
                         {"role": "user", "content": "c" * 300}]}
    assert estimate_input_tokens(body) == 3 * MESSAGE_OVERHEAD + 300


@given(st.text())
def test_errs_high_for_any_text(text):
    assert estimate_input_tokens(user(text)) >= len(text) / 4


@given(st.lists(st.sampled_from(ENGLISH.split() + ["budget", "proxy", "token", "Anthropic", "a", "I"]),
                min_size=1, max_size=400))
def test_errs_high_for_ordinary_english(words):
    text = " ".join(words) + "."
    assert estimate_input_tokens(user(text)) >= len(text) / 4
    assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": text}]}) >= len(text) / 4


# --- images and documents ------------------------------------------------------------


def test_image_counts_the_same_whatever_its_size():
    tiny = estimate_input_tokens(user([image(b"\x89PNG tiny")]))
    huge = estimate_input_tokens(user([image(b"\x00" * 1_000_000)]))
    assert tiny == huge == MESSAGE_OVERHEAD + IMAGE_TOKENS
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert estimate_input_tokens(user([url, url])) == MESSAGE_OVERHEAD + 2 * IMAGE_TOKENS


@pytest.mark.parametrize("pages", [1, 2, 7, 40])
def test_pdf_pages_counted(pages):
    assert pdf_pages(pdf(pages)) == pages
    assert estimate_input_tokens(user([pdf_doc(pdf(pages))])) == MESSAGE_OVERHEAD + pages * PDF_PAGE_TOKENS


def test_pdf_without_page_objects_counts_one_page():
    assert estimate_input_tokens(user([pdf_doc(b"%PDF-1.7 garbage")])) == MESSAGE_OVERHEAD + PDF_PAGE_TOKENS


def test_pdf_pages_not_pages_tree_and_name_variants():
    assert pdf_pages(b"/Type/Page>>/Type /Pages/Type\r\n/Page\n/Type /PageLabel /Type /Page/Parent") == 3


def test_pdf_pages_inside_compressed_object_streams():
    packed = zlib.compress(b" ".join(b"<< /Type /Page /Parent 2 0 R >>" for _ in range(5)))
    extra = b"\n9 0 obj << /Type /ObjStm /N 5 /First 10 /Filter /FlateDecode /Length %d >>\nstream\r\n" % len(packed)
    data = pdf(2, extra=extra + packed + b"\nendstream endobj")
    assert pdf_pages(data) == 7
    broken = pdf(2, extra=b"\n<< /Type /ObjStm >>\nstream\nnot zlib\nendstream")
    assert pdf_pages(broken) == 2


def test_pdf_size_does_not_matter_only_pages():
    padded = pdf(3, extra=b"\n% " + b"x" * 500_000)
    assert estimate_input_tokens(user([pdf_doc(padded)])) == MESSAGE_OVERHEAD + 3 * PDF_PAGE_TOKENS


def test_documents_without_a_visible_size_use_the_fixed_figure():
    for source in ({"type": "url", "url": "https://example.com/a.pdf"}, {"type": "file", "file_id": "file_1"},
                   {"type": "base64", "media_type": "application/pdf", "data": "not base64 ==="},
                   {"type": "base64", "data": 12}, None, "weird"):
        block = {"type": "document", "source": source}
        assert estimate_input_tokens(user([block])) == MESSAGE_OVERHEAD + UNSIZED_DOCUMENT_TOKENS


def test_text_and_content_documents_count_their_text():
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a" * 300},
                "title": "t" * 30}
    assert estimate_input_tokens(user([text_doc])) == MESSAGE_OVERHEAD + 110
    content_doc = {"type": "document", "source": {"type": "content", "content": [
        {"type": "text", "text": "a" * 300}, image(b"x" * 10_000)]}}
    assert estimate_input_tokens(user([content_doc])) == MESSAGE_OVERHEAD + 100 + IMAGE_TOKENS


# --- tools, tool use, thinking -------------------------------------------------------


def test_tools_counted():
    schema = {"type": "object", "properties": {"city": {"type": "string", "description": "a city"}}}
    tool = {"name": "get_weather", "description": "Weather for a city", "input_schema": schema}
    base = estimate_input_tokens(user("hi"))
    one = estimate_input_tokens(user("hi") | {"tools": [tool]})
    two = estimate_input_tokens(user("hi") | {"tools": [tool, tool | {"name": "other"}]})
    assert one - base >= TOOLS_PROMPT_TOKENS + TOOL_OVERHEAD + len(json.dumps(schema, separators=(",", ":"))) // 3
    assert two - one >= TOOL_OVERHEAD + len(json.dumps(schema, separators=(",", ":"))) // 3
    server = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    assert estimate_input_tokens(user("hi") | {"tools": [server]}) > base + TOOLS_PROMPT_TOKENS


def test_tool_use_and_tool_result():
    big_input = {"query": "x" * 3000}
    use = {"type": "tool_use", "id": "toolu_1", "name": "search", "input": big_input}
    assert estimate_input_tokens(user([use])) > MESSAGE_OVERHEAD + 1000
    result = {"type": "tool_result", "tool_use_id": "toolu_1",
              "content": [{"type": "text", "text": "y" * 3000}, image(b"z" * 500_000)]}
    got = estimate_input_tokens(user([result]))
    assert MESSAGE_OVERHEAD + 1000 + IMAGE_TOKENS < got < MESSAGE_OVERHEAD + 1000 + IMAGE_TOKENS + 10
    assert estimate_input_tokens(user([{"type": "tool_result", "content": "y" * 3000}])) == MESSAGE_OVERHEAD + 1000


def test_thinking_text_counted_signature_not():
    block = {"type": "thinking", "thinking": "t" * 3000, "signature": "S" * 100_000}
    assert estimate_input_tokens(user([block])) == MESSAGE_OVERHEAD + 1000


def test_unknown_blocks_count_their_json():
    block = {"type": "search_result", "source": "https://x", "title": "T", "content": [{"type": "text", "text": "a" * 900}]}
    assert estimate_input_tokens(user([block])) >= MESSAGE_OVERHEAD + 300


# --- odd shapes ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    | st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
         "image_url", "file", "input_audio", "refusal", "content", "base64", "url"])},
        optional={"text": children, "content": children, "source": children, "input": children,
                  "data": children, "file": children, "input_audio": children, "image_url": children,
                  "thinking": children, "name": children}),
    max_leaves=30,
)


@settings(max_examples=150)
@given(json_values, json_values, json_values)
def test_odd_shapes_never_raise(messages_or_content, system, tools):
    for body in (
        {"messages": messages_or_content, "system": system, "tools": tools},
        {"messages": [{"role": "user", "content": messages_or_content}, messages_or_content], "tools": tools},
        {"messages": [{"role": "user", "content": [messages_or_content, system, tools]}]},
        {"messages": [{"content": [{"type": "tool_result", "content": [messages_or_content]}]}]},
        {"messages": [{"content": [{"type": "document", "source": system}]}]},
        messages_or_content,
    ):
        for fn in (estimate_input_tokens, estimate_openai_input_tokens):
            n = fn(body)
            assert isinstance(n, int) and n >= 0


def test_deep_nesting_and_huge_numbers_never_raise():
    deep: object = "x"
    for _ in range(50_000):
        deep = [deep]
    nested: object = [{"type": "text", "text": "x"}]
    for _ in range(5_000):
        nested = [{"type": "tool_result", "content": nested}]
    cyclic: list = []
    cyclic.append(cyclic)
    for content in (deep, nested, [{"type": "tool_use", "input": deep}], [{"type": "tool_use", "input": 10**10000}],
                    [{"type": "tool_use", "input": cyclic}], [{"type": "thing", "x": float("nan")}]):
        assert estimate_input_tokens(user(content)) > 0
        assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": content}]}) > 0


@pytest.mark.parametrize("body", [None, [], "text", 3, {}, {"messages": None}, {"messages": "hi"},
                                  {"messages": [None, 3, "x"]}, {"system": {"a": 1}}, {"tools": "x"}])
def test_wrong_top_level_types(body):
    for fn in (estimate_input_tokens, estimate_openai_input_tokens):
        assert fn(body) >= 0


def test_large_images_never_dominate_a_body():
    body = user([image(b"\x00" * 3_000_000), {"type": "text", "text": "describe"}])
    assert estimate_input_tokens(body) < IMAGE_TOKENS + 20


# --- OpenAI --------------------------------------------------------------------------


def test_openai_text_and_parts():
    assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": "a" * 3000}]}) \
        == MESSAGE_OVERHEAD + 1000
    parts = [{"type": "text", "text": "a" * 300},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b"\x00" * 1_000_000)}},
             {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "high"}}]
    assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": parts}]}) \
        == MESSAGE_OVERHEAD + 100 + 2 * IMAGE_TOKENS


def test_openai_tools_and_tool_calls():
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 300,
                                              "parameters": {"type": "object", "properties": {}}}}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    base = estimate_openai_input_tokens(body)
    assert estimate_openai_input_tokens(body | {"tools": [tool]}) >= base + TOOLS_PROMPT_TOKENS + TOOL_OVERHEAD + 100
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 3000}}]}
    reply = {"role": "tool", "tool_call_id": "c1", "content": "y" * 300}
    assert estimate_openai_input_tokens({"messages": [call, reply]}) >= 2 * MESSAGE_OVERHEAD + 1100


def test_openai_pdf_file_counts_pages():
    part = {"type": "file", "file": {"filename": "a.pdf",
                                     "file_data": "data:application/pdf;base64," + b64(pdf(4))}}
    assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": [part]}]}) \
        == MESSAGE_OVERHEAD + 4 * PDF_PAGE_TOKENS
    by_id = {"type": "file", "file": {"file_id": "file-abc"}}
    assert estimate_openai_input_tokens({"messages": [{"role": "user", "content": [by_id]}]}) \
        == MESSAGE_OVERHEAD + UNSIZED_DOCUMENT_TOKENS


# --- live output estimate --------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (3, 1), (4, 2), (3000, 1000), (-7, 0)])
def test_output_estimate_tokens(n, expected):
    assert output_estimate_tokens(n) == expected


@given(st.integers(0, 10**9))
def test_output_estimate_is_ceil_of_a_third(n):
    assert output_estimate_tokens(n) == math.ceil(n / 3)


# --- purity --------------------------------------------------------------------------


def test_estimate_is_pure():
    tree = ast.parse(Path(estimate.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "binascii", "re", "zlib"}
