"""proxy/headers.py: what crosses the proxy in each direction (docs/http-api.md "Forwarding", "What the proxy refuses"):
never an upstream's cookies, never a header a `connection` header names, either way."""
from __future__ import annotations

import pytest

from proxy.headers import connection_names, downstream_headers, upstream_headers

PROVIDER_RESPONSE = [
    (b"Date", b"Mon, 01 Dec 2026 00:00:00 GMT"), (b"Content-Type", b"application/json"),
    (b"Transfer-Encoding", b"chunked"), (b"request-id", b"req_1"), (b"retry-after", b"3"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"), (b"via", b"1.1 google"), (b"x-dup", b"1"), (b"x-dup", b"2"),
]
KEPT_DOWNSTREAM = [
    (b"date", b"Mon, 01 Dec 2026 00:00:00 GMT"), (b"content-type", b"application/json"), (b"request-id", b"req_1"),
    (b"retry-after", b"3"), (b"anthropic-ratelimit-requests-remaining", b"3999"), (b"via", b"1.1 google"),
    (b"x-dup", b"1"), (b"x-dup", b"2"),
]
CLIENT_REQUEST = [  # (ASGI: names lower-case)
    (b"host", b"localhost:8080"), (b"x-api-key", b"bp-client-key"), (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"x-2026"), (b"content-type", b"application/json"), (b"content-length", b"99"),
    (b"accept-encoding", b"gzip"), (b"user-agent", b"Anthropic/Python"), (b"cookie", b"session=1"),
]
KEPT_UPSTREAM = [
    ("anthropic-version", "2023-06-01"), ("anthropic-beta", "x-2026"), ("content-type", "application/json"),
    ("user-agent", "Anthropic/Python"), ("accept-encoding", "identity"), ("x-api-key", "sk-up"),
]


# --- downstream: upstream response -> client ----------------------------------------------------

def test_without_a_connection_header_the_response_headers_pass_lower_cased_in_order():
    assert downstream_headers(PROVIDER_RESPONSE) == KEPT_DOWNSTREAM


@pytest.mark.parametrize("value", [b"keep-alive", b"Keep-Alive", b"close", b"keep-alive, close"])
def test_a_connection_header_naming_nothing_else_changes_nothing(value):
    assert downstream_headers(PROVIDER_RESPONSE + [(b"Connection", value)]) == KEPT_DOWNSTREAM


@pytest.mark.parametrize("name", [b"set-cookie", b"Set-Cookie", b"SET-COOKIE", b"set-cookie2", b"Set-Cookie2"])
def test_an_upstream_cookie_never_reaches_the_client(name):
    got = downstream_headers([(name, b"tenant=alpha; Path=/; HttpOnly")] + PROVIDER_RESPONSE)
    assert got == KEPT_DOWNSTREAM


def test_headers_the_upstream_connection_header_names_are_dropped():
    got = downstream_headers([(b"X-Hop-A", b"1"), (b"Connection", b"keep-alive, X-Hop-A ,x-hop-b,, "),
                              (b"x-hop-b", b"2"), (b"x-hop-c", b"3"), (b"connection", b"X-HOP-C")]
                             + PROVIDER_RESPONSE + [(b"x-hop-a", b"again")])
    assert got == KEPT_DOWNSTREAM  # case-insensitive, every token, every connection header, every instance


def test_a_connection_header_may_name_an_end_to_end_header_and_it_is_dropped():
    got = downstream_headers(PROVIDER_RESPONSE + [(b"connection", b"request-id")])
    assert (b"request-id", b"req_1") not in got and len(got) == len(KEPT_DOWNSTREAM) - 1


# --- upstream: client request -> provider ----------------------------------------------------------

def test_without_a_connection_header_the_request_headers_pass_as_before():
    assert upstream_headers(CLIENT_REQUEST, "anthropic", "sk-up") == KEPT_UPSTREAM
    assert upstream_headers(CLIENT_REQUEST, "openai", "sk-up")[-1] == ("authorization", "Bearer sk-up")
    assert upstream_headers(CLIENT_REQUEST, "anthropic", "")[-1] == ("accept-encoding", "identity")


@pytest.mark.parametrize("value", [b"keep-alive", b"close", b"Keep-Alive, Upgrade"])
def test_a_client_connection_header_naming_nothing_else_changes_nothing(value):
    assert upstream_headers(CLIENT_REQUEST + [(b"connection", value)], "anthropic", "sk-up") == KEPT_UPSTREAM


def test_headers_the_client_connection_header_names_are_not_forwarded():
    client = [(b"connection", b"X-Client-Hop, keep-alive"), (b"x-client-hop", b"secret"),
              (b"connection", b"x-other")] + CLIENT_REQUEST + [(b"x-other", b"1"), (b"x-client-hop", b"again")]
    assert upstream_headers(client, "anthropic", "sk-up") == KEPT_UPSTREAM


def test_a_client_connection_header_cannot_remove_what_the_proxy_sets():
    client = CLIENT_REQUEST + [(b"connection", b"x-api-key, accept-encoding, authorization, anthropic-version")]
    got = upstream_headers(client, "anthropic", "sk-up")
    assert ("accept-encoding", "identity") in got and ("x-api-key", "sk-up") in got
    assert all(k != "anthropic-version" for k, _ in got)  # (named by the client: its own choice)
    got = upstream_headers(client, "openai", "sk-up")
    assert got[-1] == ("authorization", "Bearer sk-up")


# --- the parsing ---------------------------------------------------------------------------------

def test_connection_names_are_lower_cased_tokens_less_what_is_dropped_anyway():
    assert connection_names(b"keep-alive", frozenset()) == frozenset()
    assert connection_names(b" X-A ,\tx-b,, close,keep-alive,te", frozenset({b"te", b"keep-alive"})) == {b"x-a", b"x-b"}
