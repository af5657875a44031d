"""Proxy-key extraction and lookup (secrets kept only as SHA-256 digests)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from proxy.auth import Caller, KeyRing, presented_secret
from proxy.config import ProxyConfig, key_digest, parse_config
from proxy.errors import AuthenticationError

CI_SECRET = "bp-auth-test-ci-bot-secret-00000001"
NOTEBOOK_SECRET = "bp-auth-test-notebook-secret-000002"
AGENT_SECRET = "bp-auth-test-agent-secret-000000003"
ADMIN_SECRET = "bp-auth-test-admin-secret-000000004"
ALL_SECRETS = (CI_SECRET, NOTEBOOK_SECRET, AGENT_SECRET, ADMIN_SECRET)


def config(admin: str = "") -> ProxyConfig:
    return parse_config(
        {
            "admin_key": admin,
            "teams": {
                "research": {
                    "keys": {
                        "ci-bot": {"key": CI_SECRET, "models": ["claude-sonnet-*", "claude-haiku-*"]},
                        "notebook": {"key_sha256": key_digest(NOTEBOOK_SECRET)},
                    }
                },
                "support": {"keys": {"agent": {"key": AGENT_SECRET}}},
            },
        },
        {},
    ).proxy


# --- presented_secret --------------------------------------------------------------


def test_x_api_key() -> None:
    assert presented_secret({b"x-api-key": CI_SECRET.encode()}) == CI_SECRET


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER"])
def test_authorization_bearer(scheme: bytes) -> None:
    assert presented_secret({b"authorization": scheme + b" " + CI_SECRET.encode()}) == CI_SECRET


def test_both_headers_equal_ok() -> None:
    headers = {b"x-api-key": CI_SECRET.encode(), b"authorization": b"Bearer " + CI_SECRET.encode()}
    assert presented_secret(headers) == CI_SECRET


def test_both_headers_different_refused() -> None:
    headers = {b"x-api-key": CI_SECRET.encode(), b"authorization": b"Bearer " + AGENT_SECRET.encode()}
    with pytest.raises(AuthenticationError) as info:
        presented_secret(headers)
    assert info.value.status == 401
    assert CI_SECRET not in info.value.message and AGENT_SECRET not in info.value.message


@pytest.mark.parametrize("headers", [{}, {b"content-type": b"application/json"}, {b"x-api-key": b""}])
def test_no_key_refused(headers: dict[bytes, bytes]) -> None:
    with pytest.raises(AuthenticationError) as info:
        presented_secret(headers)
    assert info.value.status == 401


@pytest.mark.parametrize("value", [b"Basic " + CI_SECRET.encode(), b"Token " + CI_SECRET.encode(),
                                   CI_SECRET.encode()])
def test_non_bearer_scheme_refused(value: bytes) -> None:
    with pytest.raises(AuthenticationError) as info:
        presented_secret({b"authorization": value})
    assert CI_SECRET not in info.value.message


@pytest.mark.parametrize("value", [b"Bearer", b"Bearer ", b"Bearer    "])
def test_empty_bearer_refused(value: bytes) -> None:
    with pytest.raises(AuthenticationError):
        presented_secret({b"authorization": value})


def test_non_ascii_key_refused() -> None:
    with pytest.raises(AuthenticationError):
        presented_secret({b"x-api-key": "bp-\u00e9t\u00e9".encode()})


# --- KeyRing.lookup ------------------------------------------------------------------


def test_lookup_raw_key_entry() -> None:
    caller = KeyRing(config()).lookup(CI_SECRET)
    assert caller == Caller("research", "ci-bot", ("claude-sonnet-*", "claude-haiku-*"))


def test_lookup_key_sha256_entry_by_raw_secret() -> None:
    ring = KeyRing(config())
    assert ring.lookup(NOTEBOOK_SECRET) == Caller("research", "notebook", None)
    assert ring.lookup(AGENT_SECRET) == Caller("support", "agent", None)


@pytest.mark.parametrize("secret", ["", "bp-unknown", CI_SECRET + "x", CI_SECRET[:-1], CI_SECRET.upper(),
                                    key_digest(CI_SECRET), key_digest(NOTEBOOK_SECRET), ADMIN_SECRET])
def test_lookup_unknown_is_none(secret: str) -> None:
    assert KeyRing(config(admin=ADMIN_SECRET)).lookup(secret) is None


def test_lookup_on_empty_config() -> None:
    assert KeyRing(parse_config({}, {}).proxy).lookup(CI_SECRET) is None


def test_caller_model_allow_list() -> None:
    ring = KeyRing(config())
    ci = ring.lookup(CI_SECRET)
    assert ci is not None
    assert ci.may_use("claude-haiku-4-5")
    assert not ci.may_use("claude-opus-4-1")
    nb = ring.lookup(NOTEBOOK_SECRET)
    assert nb is not None and nb.may_use("claude-opus-4-1")


# --- secrets held only as digests ----------------------------------------------------


def _reachable(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every value reachable from obj through attributes, slots, dicts and sequences."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
        return
    if isinstance(obj, dict):
        children: list[Any] = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for klass in type(obj).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if hasattr(obj, slot):
                    children.append(getattr(obj, slot))
    for child in children:
        yield from _reachable(child, seen)


def test_walker_would_see_a_raw_secret() -> None:
    # The check below is only meaningful if the walker can find a secret where one is kept.
    cfg = config(admin=ADMIN_SECRET)
    values = list(_reachable(cfg))
    assert CI_SECRET in values and ADMIN_SECRET in values


def test_keyring_holds_no_raw_secret() -> None:
    ring = KeyRing(config(admin=ADMIN_SECRET))
    for value in _reachable(ring):
        if isinstance(value, str):
            for s in ALL_SECRETS:
                assert s not in value
        elif isinstance(value, (bytes, bytearray)):
            for s in ALL_SECRETS:
                assert s.encode() not in value
        else:
            assert not isinstance(value, ProxyConfig)


# --- is_admin ----------------------------------------------------------------------


def test_is_admin_with_admin_key() -> None:
    ring = KeyRing(config(admin=ADMIN_SECRET))
    assert ring.is_admin(ADMIN_SECRET)
    for other in (CI_SECRET, ADMIN_SECRET + "x", ADMIN_SECRET[:-1], "", None, key_digest(ADMIN_SECRET)):
        assert not ring.is_admin(other)


def test_is_admin_without_admin_key() -> None:
    ring = KeyRing(config())
    for candidate in ("", None, ADMIN_SECRET, CI_SECRET):
        assert not ring.is_admin(candidate)


def test_admin_key_is_not_a_proxy_key() -> None:
    assert KeyRing(config(admin=ADMIN_SECRET)).lookup(ADMIN_SECRET) is None
