"""What crosses the proxy in each direction.

Both functions run on every proxied request, so the common case costs one pass over the headers:
a `connection` header is noted on the way (it is dropped anyway), and only when it names more than
`keep-alive`/`close` (what nearly every client and upstream sends) is there a second pass to drop
the headers it names (RFC 9110 §7.6.1: they concern this hop alone).
"""
from __future__ import annotations

from proxy.providers.registry import PROVIDERS

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Never forwarded upstream: the client's credentials (the upstream key replaces them), the
# proxy's own cookies, what the proxy recomputes (host, length, encoding), and Expect (the proxy
# has the whole body before it forwards: there is nothing to wait for a 100 Continue about).
DROP_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization", b"cookie", b"x-budget-run",
                              b"accept-encoding", b"expect"}
# Never forwarded to the client: an upstream's cookies (one tenant's session must never reach
# another through the shared upstream key), and what the server recomputes.
DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"set-cookie", b"set-cookie2"}

# `connection` values that name nothing beyond what is dropped anyway.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade", b""})


def connection_names(value: bytes, already_dropped: frozenset[bytes]) -> frozenset[bytes]:
    """The header names a `connection` value (its comma-joined values) lists, lower-cased, less
    those in `already_dropped` and the `close` option."""
    lowered = value.lower()
    if lowered in _PLAIN_CONNECTION:
        return frozenset()
    return frozenset(t.strip(b" \t") for t in lowered.split(b",")) - already_dropped - _PLAIN_CONNECTION


def upstream_headers(client: list[tuple[bytes, bytes]], provider: str, api_key: str) -> list[tuple[str, str]]:
    """The client's headers (ASGI: names lower-case) as the upstream gets them, with the upstream
    key sent the way the provider named `provider` takes it."""
    out = []
    connection = None
    for k, v in client:
        if k not in DROP_UPSTREAM:
            out.append((k.decode("latin-1"), v.decode("latin-1")))
        elif k == b"connection":
            connection = v if connection is None else connection + b"," + v
    if connection is not None:
        named = connection_names(connection, DROP_UPSTREAM)
        if named:
            names = {n.decode("latin-1") for n in named}
            out = [h for h in out if h[0] not in names]
    out.append(("accept-encoding", "identity"))  # metering needs the plain body
    if api_key:
        out.append(PROVIDERS[provider].upstream_auth(api_key))
    return out


def downstream_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers (any case) as the client gets them: names lower-cased."""
    out = []
    connection = None
    for k, v in upstream:
        lk = k.lower()
        if lk not in DROP_DOWNSTREAM:
            out.append((lk, v))
        elif lk == b"connection":
            connection = v if connection is None else connection + b"," + v
    if connection is not None:
        named = connection_names(connection, DROP_DOWNSTREAM)
        if named:
            out = [h for h in out if h[0] not in named]
    return out
