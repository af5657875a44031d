"""The store protocol and the value types that cross it. (The stores themselves are opened by
proxy/store/factory.py: this module imports none of them, so each may import it.)"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Protocol, Sequence

from proxy.ledger import INDEX, ZERO, Admitted, Amounts, Ask, Denied, Scope, ScopeState


class Reservation(NamedTuple):
    """A request in flight: what it holds and what it has been charged so far, per its scopes.
    Immutable: charge() and settle() answer the reservation as it is after them, and the caller
    keeps that (the store keeps its own account; a stale copy never corrupts it). A tuple: one is
    built every request, and a frozen dataclass of 9 fields costs ~1 µs more."""

    id: str
    scopes: tuple[Scope, ...]
    period_starts: tuple[float, ...]
    admitted: Admitted
    hold: Amounts
    charged: Amounts = ZERO
    deadline: float | None = None      # wall-clock budget deadline (epoch seconds)
    settled: bool = False
    # tightest limit - used - held across scopes right after admission, for x-budget-remaining-*
    remaining: dict[str, int] = {}  # (never mutated: shared by every reservation without one)

    def as_settled(self) -> Reservation:
        """This reservation, settled (a faster _replace: every request settles)."""
        rid, scopes, starts, admitted, hold, charged, deadline, settled, remaining = self
        return self if settled else _new(Reservation, (rid, scopes, starts, admitted, hold, charged, deadline, True,
                                                       remaining))

    def with_charge(self, hold: Amounts, charged: Amounts) -> Reservation:
        """This reservation with the hold and running charge a charge() left it (a faster _replace)."""
        rid, scopes, starts, admitted, _, _, deadline, settled, remaining = self
        return _new(Reservation, (rid, scopes, starts, admitted, hold, charged, deadline, settled, remaining))


_new = tuple.__new__


class UsageRow(NamedTuple):
    """One settled request, as the usage log keeps it. A tuple: built once a request, and a frozen
    dataclass of 16 fields costs ~2 µs to build."""

    time: float
    team: str
    key: str
    model: str
    route: str
    input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    output_tokens: int
    web_search_requests: int
    cost_nanos: int
    steps: int
    duration_s: float
    outcome: str
    request_id: str

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self)


# The usage row's amounts (input_tokens .. steps), and for each the metered dimension of the same name
# (None: none). A request settled from its running charge alone (its process died: SQLite's
# "interrupted", Redis' "hold_expired") is logged with those; its token kinds are not known, so all
# its input counts as input_tokens and the rest is 0.
ROW_AMOUNTS = tuple((f, INDEX.get(f)) for f in UsageRow._fields[5:13])


class KeyRecord(NamedTuple):
    """A runtime key as the store keeps it (docs/http-api.md, "Runtime keys"): the secret only as
    its SHA-256 digest, the budgets as the config's Budget model dumps to JSON (exact: a cost is a
    decimal string), times in epoch seconds. Immutable but for the revocation, which only the
    store sets."""

    team: str
    name: str
    digest: str                        # "sha256:" + 64 hex digits, as a config key_sha256
    budget: dict[str, Any]
    run_budget: dict[str, Any] | None
    runs: str                          # "optional" | "required"
    models: tuple[str, ...] | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(self._asdict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRecord:
        d = json.loads(text)
        models = d.get("models")
        return cls(**{**d, "models": None if models is None else tuple(models)})

    def gone_at(self) -> float | None:
        """When the key stopped working (revoked or expired); None while it may still."""
        ends = [t for t in (self.revoked_at, self.expires_at) if t is not None]
        return min(ends) if ends else None


# A revoked or expired key's record is kept this long (listed, its name taken) and then forgotten.
KEY_RETENTION_S = 35 * 86400


class LedgerStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot serve."""

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied: ...

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Reservation | Denied:
        """Set what a request in flight has been charged so far; grow its hold if needed (the
        reservation as it is now), or deny (nothing changed). A settled one comes back as it was."""

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> Reservation:
        """Charge the actual usage, release the rest of the hold, log the row: res, settled. Exactly once
        per reservation id. It takes effect when called: a caller cancelled while it awaits the store
        loses nothing (the book is updated before the first await; the write is finished by the store,
        not the caller)."""

    async def release(self, res: Reservation) -> None:
        """Drop a reservation without a usage row: its charges so far count as settled, the rest of its
        hold is released. Exactly once, as settle."""

    async def renew(self) -> None:
        """Keep this process's holds from expiring (the Redis store's expire when unrenewed)."""

    async def states(self, scopes: Sequence[Scope], now: float) -> list[ScopeState]: ...
    async def reset(self, scope: Scope, now: float) -> None: ...
    async def usage_log(self, limit: int = 100) -> list[UsageRow]: ...

    async def list_runs(self, prefix: str, now: float, limit: int) -> tuple[int, list[tuple[str, ScopeState, float]]]:
        """The run scopes (Scope.ttl) whose id starts with `prefix` ("run:TEAM/KEY/") and that are not
        forgotten yet: how many, and the `limit` latest as (scope id, state, forgotten at, epoch s),
        the latest first (/admin/runs)."""

    # Runtime keys (docs/http-api.md, "Runtime keys"): kept by every store, shared by every replica
    # on Redis; a record whose key is gone (revoked or expired) KEY_RETENTION_S ago is forgotten.
    async def put_key(self, rec: KeyRecord, now: float) -> bool:
        """Add a runtime key; False (nothing written) when its team already has a key of that name."""

    async def find_key(self, digest: str) -> KeyRecord | None: ...
    async def list_keys(self, team: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, team: str, name: str, now: float) -> KeyRecord | None:
        """Mark the key revoked from `now` on (a revoked one keeps its first time): the record, or None."""
