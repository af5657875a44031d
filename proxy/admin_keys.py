"""POST / GET /admin/keys and DELETE /admin/keys/{team}/{name}: runtime keys, minted and revoked
through the admin API and kept in the store (docs/http-api.md, "Runtime keys"). A request is
validated with the config's own Budget model, so a runtime key's budgets mean what a config key's
do; the secret is shown once, in the 201, and only its SHA-256 digest is stored."""
from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.config import Budget, RunBudget, _pydantic_problems, key_digest, positive_duration
from proxy.errors import Conflict, InvalidRequest, NotFound, RequestTooLarge
from proxy.periods import iso
from proxy.store.base import KeyRecord

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # safe in a URL path, a log line and a metric label
MAX_BODY_BYTES = 64 * 1024
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # (an ISO-8601 date has 4 digits)


class KeyRequest(BaseModel):
    """The body of POST /admin/keys: every field but `team` optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    team: str
    name: str | None = None
    budget: Budget = Budget()
    run_budget: RunBudget = None
    runs: Literal["optional", "required"] = "optional"
    models: list[str] | None = None
    expires_in: float | None = None
    expires_at: datetime | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME.fullmatch(v):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 . _ -")
        return v

    @field_validator("expires_in", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else positive_duration(v)

    @model_validator(mode="after")
    def _one_expiry(self) -> KeyRequest:
        if self.expires_in is not None and self.expires_at is not None:
            raise ValueError("give expires_in or expires_at, not both")
        return self

    def expiry(self, now: float) -> float | None:
        """When the key stops working (epoch s); a time without a zone is UTC."""
        if self.expires_in is not None:
            if now + self.expires_in > LATEST:
                raise InvalidRequest("Invalid key request: expires_in: must end before the year 10000.")
            return now + self.expires_in
        if self.expires_at is None:
            return None
        at = self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=UTC)
        if at.timestamp() <= now:
            raise InvalidRequest("Invalid key request: expires_at: must be in the future.")
        return at.timestamp()


async def parse_request(request: Request) -> KeyRequest:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestTooLarge(f"A key request is at most {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidRequest("Invalid key request: the body is not JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("Invalid key request: the body must be a JSON object.")
    try:
        return KeyRequest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{path or '<body>'}: {msg}" for path, msg in _pydantic_problems(err))
        raise InvalidRequest(f"Invalid key request: {problems}") from None


def budget_view(budget: Budget | None) -> dict[str, Any] | None:
    """A budget as the listing shows it: the limits set, a cost as a number, and the period."""
    if budget is None:
        return None
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in budget.model_dump(exclude_none=True).items()}


def record_view(rec: KeyRecord) -> dict[str, Any]:
    run = None if rec.run_budget is None else budget_view(Budget.model_validate(rec.run_budget))
    return {"team": rec.team, "name": rec.name, "origin": "runtime", "created_at": iso(rec.created_at),
            "expires_at": iso(rec.expires_at), "revoked": rec.revoked_at is not None,
            "budget": budget_view(Budget.model_validate(rec.budget)), "run_budget": run, "runs": rec.runs,
            "models": None if rec.models is None else list(rec.models)}


def config_views(config: Any, team: str | None) -> list[dict[str, Any]]:
    return [{"team": t, "name": n, "origin": "config", "created_at": None, "expires_at": None, "revoked": False,
             "budget": budget_view(k.budget), "run_budget": budget_view(k.run_budget), "runs": k.runs,
             "models": k.models}
            for t, tc in config.teams.items() if team is None or t == team for n, k in tc.keys.items()]


def new_record(req: KeyRequest, name: str, secret: str, now: float) -> KeyRecord:
    run = None if req.run_budget is None else req.run_budget.model_dump(mode="json", exclude_none=True)
    return KeyRecord(req.team, name, key_digest(secret), req.budget.model_dump(mode="json", exclude_none=True), run,
                     req.runs, None if req.models is None else tuple(req.models), now, req.expiry(now))


class KeyRoutes:
    """The three routes' handlers, mixed into the admin API's routes: each under its `guarded`
    (admin key checked, errors in the provider's shape)."""

    ROUTES = (("/admin/keys", "POST", "create_key"), ("/admin/keys", "GET", "list_keys"),
              ("/admin/keys/{team}/{name}", "DELETE", "revoke_key"))
    state: Any
    guarded: Any

    def config_has(self, team: str, name: str) -> bool:
        return (team, name) in self.state.runtime.budgets.keys

    async def create_key(self, request: Request) -> Response:
        async def action() -> Response:
            req = await parse_request(request)
            if req.team not in self.state.runtime.budgets.teams:
                raise NotFound(f"No team named '{req.team}'.")
            if req.name is not None and self.config_has(req.team, req.name):
                raise Conflict(f"Team '{req.team}' already has a key named '{req.name}' (in the config).")
            return await self.mint_key(req)
        return await self.guarded(request, action)

    async def mint_key(self, req: KeyRequest) -> Response:
        """The 201 with the new key's secret, stored under req.name or a generated name not taken."""
        secret, now = "bp-" + secrets.token_urlsafe(24), self.state.clock()
        for _ in range(1 if req.name else 5):  # a generated name that is taken: draw another
            name = req.name or "key-" + secrets.token_hex(4)
            rec = new_record(req, name, secret, now)
            if not self.config_has(req.team, name) and await self.state.store.put_key(rec, now):
                return JSONResponse({"team": rec.team, "name": name, "key": secret,
                                     "expires_at": iso(rec.expires_at)}, status_code=201)
        raise Conflict(f"Team '{req.team}' already has a key named '{req.name}'.")

    async def list_keys(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            team = request.query_params.get("team")
            if team is not None and team not in self.state.runtime.budgets.teams:
                raise NotFound(f"No team named '{team}'.")
            records = sorted(await self.state.store.list_keys(team), key=lambda r: (r.team, r.created_at, r.name))
            return {"keys": config_views(self.state.runtime.config, team) + [record_view(r) for r in records]}
        return await self.guarded(request, action)

    async def revoke_key(self, request: Request) -> Response:
        async def action() -> Response:
            team, name = request.path_params["team"], request.path_params["name"]
            if self.config_has(team, name):
                raise Conflict(f"Key '{name}' of team '{team}' is in the config; edit the config to remove it.")
            rec = await self.state.store.revoke_key(team, name, self.state.clock())
            if rec is None:
                raise NotFound(f"Team '{team}' has no runtime key named '{name}'.")
            self.state.runtime_keys.forget(rec.digest)  # this replica refuses it at once; others within 1 s
            return Response(status_code=204)
        return await self.guarded(request, action)
