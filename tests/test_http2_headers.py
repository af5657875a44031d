"""proxy.http2.request_headers: the relay's request headers as an HTTP/2 header block (pure)."""
from __future__ import annotations

import httpx
import pytest

from proxy.http1 import Origin
from proxy.http2 import request_headers


def test_pseudo_headers_first_then_the_rest_lower_cased() -> None:
    block = request_headers("POST", Origin("http://127.0.0.1:8081/v1/messages?beta=true"),
                            [("Content-Type", "application/json"), ("x-api-key", "up-key")])
    assert block == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8081"),
                     (b":path", b"/v1/messages?beta=true"), (b"content-type", b"application/json"),
                     (b"x-api-key", b"up-key")]


def test_https_on_its_default_port_names_no_port() -> None:
    block = request_headers("GET", Origin("https://api.anthropic.com/v1/models"), [])
    assert block[1:3] == [(b":scheme", b"https"), (b":authority", b"api.anthropic.com")]


@pytest.mark.parametrize("name", ["connection", "Keep-Alive", "proxy-connection", "transfer-encoding", "upgrade",
                                  "host"])
def test_connection_specific_headers_are_not_sent(name: str) -> None:
    block = request_headers("POST", Origin("http://h/p"), [(name, "x"), ("accept", "*/*")])
    assert [k for k, _ in block if not k.startswith(b":")] == [b"accept"]


def test_te_goes_only_as_trailers() -> None:
    block = request_headers("POST", Origin("http://h/p"), [("te", "gzip"), ("TE", " Trailers ")])
    assert [(k, v) for k, v in block if k == b"te"] == [(b"te", b" Trailers ")]


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b"])
def test_a_line_break_or_nul_in_a_value_is_refused(value: str) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        request_headers("POST", Origin("http://h/p"), [("x-thing", value)])
