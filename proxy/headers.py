"""What crosses the proxy in each direction."""
from __future__ import annotations

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Never forwarded upstream: the client's credentials (the upstream key replaces them), the
# proxy's own cookies, what the proxy recomputes (host, length, encoding), and Expect (the proxy
# has the whole body before it forwards: there is nothing to wait for a 100 Continue about).
DROP_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization", b"cookie",
                              b"accept-encoding", b"expect"}
DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length"}


def upstream_headers(client: list[tuple[bytes, bytes]], provider: str, api_key: str) -> list[tuple[str, str]]:
    out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in client if k not in DROP_UPSTREAM]
    out.append(("accept-encoding", "identity"))  # metering needs the plain body
    if api_key:
        out.append(("x-api-key", api_key) if provider == "anthropic" else ("authorization", f"Bearer {api_key}"))
    return out


def downstream_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(lk, v) for k, v in upstream if (lk := k.lower()) not in DROP_DOWNSTREAM]
