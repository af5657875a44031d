"""Proxy keys: digest -> (team, key) in O(1); secrets live in memory only as SHA-256 digests."""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config import ProxyConfig
from proxy.errors import AuthenticationError

if TYPE_CHECKING:
    from proxy.ledger import Limits, Scope


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling. A config key's scopes are found by name (proxy/budgets.py, proxy/runs.py);
    a runtime key (proxy/runtime_keys.py) has no config entry, so it carries its own."""

    team: str
    key: str
    models: tuple[str, ...] | None
    scope: Scope | None = None            # a runtime key's key scope; None: a config key
    run_limits: Limits | None = None      # a runtime key's run budget (None: no run scope)
    runs_required: bool = False           # a runtime key's `runs: required`

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, pat) for pat in self.models)


class KeyRing:
    def __init__(self, config: ProxyConfig) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Caller]] = {}
        for team_name, team in config.teams.items():
            for key_name, key in team.keys.items():
                digest = bytes.fromhex(key.digest.removeprefix("sha256:"))
                models = tuple(key.models) if key.models is not None else None
                self._by_digest[digest] = (digest, Caller(team_name, key_name, models))
        admin = config.admin_key.get_secret_value()
        self._admin_digest = hashlib.sha256(admin.encode()).digest() if admin else None

    def lookup(self, secret: str) -> Caller | None:
        digest = hashlib.sha256(secret.encode()).digest()
        found = self._by_digest.get(digest)
        # The dict lookup is by digest, not by secret; the final comparison is constant-time anyway.
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def is_admin(self, secret: str | None) -> bool:
        if not secret or self._admin_digest is None:
            return False
        return hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), self._admin_digest)


def presented_secret(headers: dict[bytes, bytes]) -> str:
    """The proxy key from `x-api-key` or `Authorization: Bearer`; both with different values is a 401."""
    api_key = headers.get(b"x-api-key")
    bearer = None
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not value.strip():
            raise AuthenticationError("The Authorization header must be 'Bearer <proxy key>'.")
        bearer = value.strip()
    if api_key is not None and bearer is not None and api_key != bearer:
        raise AuthenticationError("x-api-key and Authorization carry different keys; send one proxy key.")
    secret = api_key if api_key is not None else bearer
    if not secret:
        raise AuthenticationError("Missing proxy key: send it as x-api-key or Authorization: Bearer.")
    try:
        return secret.decode("ascii")
    except UnicodeDecodeError:
        raise AuthenticationError("Invalid proxy key.") from None


def bearer_matches(headers: dict[bytes, bytes], expected: str) -> bool:
    """`Authorization: Bearer <expected>`, compared in constant time."""
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(value.strip()).digest(), hashlib.sha256(expected.encode()).digest())
