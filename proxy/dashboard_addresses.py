"""Who a dashboard request came from, and whether over TLS, believing x-forwarded-for and
x-forwarded-proto only from a peer in server.trusted_proxies."""
from __future__ import annotations

import functools
import ipaddress
from typing import Union

from starlette.requests import Request

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=16)
def _networks(items: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in items)


def _last_value(request: Request, name: str) -> str:
    """The last comma-separated item of every `name` header, in order ("" when there is none)."""
    values = [v.strip() for h in request.headers.getlist(name) for v in h.split(",")]
    values = [v for v in values if v]
    return values[-1] if values else ""


def from_trusted_proxy(request: Request, trusted: list[str] | tuple[str, ...]) -> bool:
    """True when the direct peer is in server.trusted_proxies."""
    if not trusted:
        return False
    client = request.scope.get("client")
    peer = _ip(client[0]) if client else None
    if peer is None:
        return False
    return any(peer.version == net.version and peer in net for net in _networks(tuple(trusted)))


def client_address(request: Request, trusted: list[str] | tuple[str, ...]) -> str:
    """The direct peer; when that is a trusted proxy, the last address of x-forwarded-for."""
    client = request.scope.get("client")
    peer = client[0] if client else ""
    if from_trusted_proxy(request, trusted):
        forwarded = _ip(_last_value(request, "x-forwarded-for"))
        if forwarded is not None:
            return str(forwarded)
    ip = _ip(peer)
    return str(ip) if ip is not None else peer


def is_secure(request: Request, trusted: list[str] | tuple[str, ...]) -> bool:
    """The request arrived over TLS, or a trusted proxy says its client's did."""
    if request.scope.get("scheme") == "https":
        return True
    return (from_trusted_proxy(request, trusted)
            and _last_value(request, "x-forwarded-proto").lower() == "https")
