"""One error tree. Each error knows its HTTP status and its kind; each provider renders it in its
own shape (Provider.render_error). Messages are written for clients and never contain a secret."""
from __future__ import annotations

import itertools
import os
import secrets
from typing import Any


# A random prefix per process and a counter: unique across replicas and workers sharing a Redis
# ledger (where it names the reservation), and no urandom syscall per request. A forked worker
# draws its own prefix: one inherited from the supervisor would repeat its siblings' ids.
def _new_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = "req_proxy_" + secrets.token_hex(6)
    _id_counter = itertools.count()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class ProxyError(Exception):
    """`kind` says what went wrong, in the words the access log has always used for it; a
    provider maps a kind to its own error type and code, and falls back to its server error
    for a kind it does not know."""

    status = 500
    kind = "api_error"

    def __init_subclass__(cls, status: int = 0, kind: str = "", **kw: Any) -> None:
        """A subclass may name its status and kind in its head, `class NotFound(ProxyError,
        status=404, kind="not_found_error")`; what it does not name it keeps from its parent."""
        super().__init_subclass__(**kw)
        if status:
            cls.status = status
        if kind:
            cls.kind = kind

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def extra_body(self) -> dict[str, Any]:
        """Top-level members every shape carries after `error`."""
        return {}


class AuthenticationError(ProxyError, status=401, kind="authentication_error"): ...
class PermissionDenied(ProxyError, status=403, kind="permission_error"): ...
class NotFound(ProxyError, status=404, kind="not_found_error"): ...
class InvalidRequest(ProxyError, status=400, kind="invalid_request_error"): ...
class RequestTooLarge(ProxyError, status=413, kind="request_too_large"): ...
class UpstreamUnavailable(ProxyError, status=502): ...
class UpstreamTimeout(ProxyError, status=504): ...
class StoreUnavailable(ProxyError, status=503): ...


class Conflict(ProxyError, status=409, kind="invalid_request_error"):
    """409: the request clashes with what exists (an admin route: a key name taken)."""


class BudgetExceeded(ProxyError, status=429, kind="rate_limit_error"):
    """A budget 429. `budget` is the object naming scope, dimension, limit, used, resets_at."""

    def __init__(self, message: str, *, budget: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.budget = budget

    def extra_body(self) -> dict[str, Any]:
        return {"budget": self.budget}
