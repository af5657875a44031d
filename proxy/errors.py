"""One error tree. Each error knows its HTTP status and renders itself in either
provider's shape; messages are written for clients and never contain a secret."""
from __future__ import annotations

import itertools
import json
import secrets
from typing import Any


# A random prefix per process and a counter: unique across replicas sharing a Redis ledger
# (where it names the reservation), and no urandom syscall per request.
_ID_PREFIX = "req_proxy_" + secrets.token_hex(6)
_id_counter = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class ProxyError(Exception):
    status = 500
    anthropic_type = "api_error"
    openai_type = "server_error"
    openai_code: str | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def extra_body(self) -> dict[str, Any]:
        return {}

    def error_details(self) -> dict[str, Any] | None:
        return None

    def anthropic_body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.anthropic_type, "message": self.message}
        details = self.error_details()
        if details:
            error["details"] = details
        return {"type": "error", "error": error, **self.extra_body(), "request_id": request_id}

    def openai_body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": None,
                "code": self.openai_code,
            },
            **self.extra_body(),
        }

    def render(self, provider: str, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        body = self.anthropic_body(request_id) if provider == "anthropic" else self.openai_body(request_id)
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"request-id" if provider == "anthropic" else b"x-request-id", request_id.encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        return self.status, headers, payload


class AuthenticationError(ProxyError):
    status = 401
    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status = 403
    anthropic_type = "permission_error"
    openai_type = "invalid_request_error"
    openai_code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    anthropic_type = "not_found_error"
    openai_type = "invalid_request_error"
    openai_code = "not_found"


class InvalidRequest(ProxyError):
    status = 400
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class RequestTooLarge(ProxyError):
    status = 413
    anthropic_type = "request_too_large"
    openai_type = "invalid_request_error"
    openai_code = "request_too_large"


class UpstreamUnavailable(ProxyError):
    status = 502
    openai_type = "server_error"


class UpstreamTimeout(ProxyError):
    status = 504
    openai_type = "server_error"


class StoreUnavailable(ProxyError):
    status = 503
    openai_type = "server_error"


class BudgetExceeded(ProxyError):
    """A budget 429. `budget` is the SPEC §4 object naming scope, dimension, limit, used, resets_at."""

    status = 429
    anthropic_type = "rate_limit_error"
    openai_type = "insufficient_quota"
    openai_code = "budget_exceeded"

    def __init__(self, message: str, *, budget: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.budget = budget

    def error_details(self) -> dict[str, Any]:
        return {"error_code": "budget_exceeded"}

    def extra_body(self) -> dict[str, Any]:
        return {"budget": self.budget}
