"""proxy.http2.request_headers: the relay's request headers as an HTTP/2 header block (pure)."""
from __future__ import annotations

import httpx
import pytest
from hpack import NeverIndexedHeaderTuple

from proxy.http1 import Origin
from proxy.http2 import request_headers


def test_pseudo_headers_first_then_the_rest_lower_cased_then_the_length() -> None:
    block = request_headers("POST", Origin("http://127.0.0.1:8081/v1/messages?beta=true"),
                            [("Content-Type", "application/json"), ("anthropic-version", "2023-06-01")], 17)
    assert block == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8081"),
                     (b":path", b"/v1/messages?beta=true"), (b"content-type", b"application/json"),
                     (b"anthropic-version", b"2023-06-01"), (b"content-length", b"17")]


def test_https_on_its_default_port_names_no_port_and_a_bodiless_get_no_length() -> None:
    block = request_headers("GET", Origin("https://api.anthropic.com/v1/models"), [], 0)
    assert block == [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"api.anthropic.com"),
                     (b":path", b"/v1/models")]


@pytest.mark.parametrize("name", ["x-api-key", "Authorization", "cookie"])
def test_secrets_are_never_indexed(name: str) -> None:
    """HPACK must not keep the upstream key in its shared table."""
    block = request_headers("POST", Origin("http://h/p"), [(name, "sk-secret"), ("accept", "*/*")], 2)
    secret = [h for h in block if h[0] == name.lower().encode()]
    assert secret == [(name.lower().encode(), b"sk-secret")] and isinstance(secret[0], NeverIndexedHeaderTuple)
    assert not any(isinstance(h, NeverIndexedHeaderTuple) for h in block if h[0] != name.lower().encode())


@pytest.mark.parametrize("name", ["connection", "Keep-Alive", "proxy-connection", "transfer-encoding", "upgrade",
                                  "host", "content-length"])
def test_connection_specific_headers_and_a_client_length_are_not_sent(name: str) -> None:
    block = request_headers("POST", Origin("http://h/p"), [(name, "9"), ("accept", "*/*")], 2)
    assert [k for k, _ in block if not k.startswith(b":")] == [b"accept", b"content-length"]
    assert block[-1] == (b"content-length", b"2")


def test_te_goes_only_as_trailers() -> None:
    block = request_headers("POST", Origin("http://h/p"), [("te", "gzip"), ("TE", " Trailers ")], 0)
    assert [(k, v) for k, v in block if k == b"te"] == [(b"te", b" Trailers ")]


@pytest.mark.parametrize("name, value", [("x-thing", "a\r\nx-injected: 1"), ("x-thing", "a\nb"), ("x-thing", "a\0b"),
                                         ("x-\r\nthing", "v"), ("", "v")])
def test_a_line_break_or_nul_in_a_header_is_refused(name: str, value: str) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        request_headers("POST", Origin("http://h/p"), [(name, value)], 0)
