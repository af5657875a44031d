"""proxy/validate.py: the one gate for client strings (a body and its model)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.validate import MAX_MODEL_CHARS, check_model, parse_body


def refused(raw: bytes) -> str:
    with pytest.raises(InvalidRequest) as err:
        parse_body(raw)
    return err.value.message


def test_an_ordinary_body_parses_as_json_would():
    raw = b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"h\\u00e9 \\ud83d\\ude00"}]}'
    assert parse_body(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-haiku-4-5\\udfff","max_tokens":5}',          # a lone low surrogate
    b'{"model":"x","messages":[{"content":"\\ud800 tail"}]}',       # a lone high surrogate, nested
    b'{"model":"x","\\udc00":1}',                                   # in a key
    b'{"model":"x","t":"\\ude00\\ud83d"}',                          # a pair in the wrong order
])
def test_a_lone_surrogate_anywhere_is_refused(raw):
    assert "surrogate" in refused(raw)


def test_an_escaped_backslash_before_u_d800_is_text_not_a_surrogate():
    assert parse_body(b'{"model":"x","t":"\\\\ud800"}')["t"] == "\\ud800"


def test_invalid_utf8_is_refused():
    assert "UTF-8" in refused(b'{"model":"claude\xff"}')


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-haiku-4-5","max_tokens":5,"model":"claude-opus-4-1"}',
    b'{"model":"a","mod\\u0065l":"b"}',                              # the same key spelled with an escape
    b'{"model":"a","thinking":{"budget_tokens":1,"budget_tokens":99999}}',
])
def test_a_repeated_key_is_refused(raw):
    assert "repeats a key" in refused(raw)


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null"])
def test_a_body_that_is_not_an_object_is_refused(raw):
    assert "JSON object" in refused(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"[" * 100_000 + b"]" * 100_000])
def test_invalid_json_is_refused(raw):
    assert "not valid JSON" in refused(raw)


@pytest.mark.parametrize("model", [None, 5, "", "a" * (MAX_MODEL_CHARS + 1), "x\x00", "x\n", "x\x7f", "x\x85",
                                   "x\x9f", ["claude"]])
def test_a_bad_model_is_refused(model):
    with pytest.raises(InvalidRequest):
        check_model(model)


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "a" * MAX_MODEL_CHARS, "gpt-5.1-codex", "modèle", "x\xa0y"])
def test_a_model_of_printable_text_up_to_the_limit_passes(model):
    assert check_model(model) == model


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(st.characters(codec=None), max_size=8),
                                                                inner, max_size=4),
    max_leaves=20)


def _valid_unicode(v) -> bool:
    try:
        json.dumps(v, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(st.characters(codec=None), max_size=8), json_values, max_size=6))
def test_any_object_is_accepted_exactly_when_all_its_strings_are_valid_unicode(obj):
    raw = json.dumps(obj).encode()  # ASCII with \\u escapes: surrogates survive as escapes
    if _valid_unicode(obj):
        assert parse_body(raw) == obj
    else:
        with pytest.raises(InvalidRequest):
            parse_body(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_invalid_request_only(raw):
    try:
        body = parse_body(raw)
    except InvalidRequest:
        return
    assert isinstance(body, dict)
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # every string in it encodes
