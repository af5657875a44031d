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
    built every request, and a frozen dataclass of 9 fields is dearer to build."""

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
    dataclass of 16 fields is dearer to build."""

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
    run: str = ""                      # the run scope's id when the request was charged to one (x-budget-run)

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


class Tally(NamedTuple):
    """One hour of one team's (or one key's) usage log, summed: the unit of /admin/history
    (proxy/history.py). Counts settled requests; a denied request counts only in `denied`."""

    requests: int = 0
    input_tokens: int = 0     # the input_tokens dimension: uncached input + cache writes + cache reads
    output_tokens: int = 0
    cost_nanos: int = 0
    steps: int = 0
    denied: int = 0
    cut: int = 0              # settled with outcome "cut" (a budget ran out mid-stream)

    def __add__(self, other: Tally) -> Tally:  # type: ignore[override]
        return Tally(*(a + b for a, b in zip(self, other)))


def row_tally(row: UsageRow) -> Tally:
    """What one usage row adds to its hour."""
    return Tally(1, row.input_tokens + row.cache_write_5m_tokens + row.cache_write_1h_tokens + row.cache_read_tokens,
                 row.output_tokens, row.cost_nanos, row.steps, 0, 1 if row.outcome == "cut" else 0)


HOUR = 3600


def hour_of(t: float) -> int:
    """The start of the UTC hour holding `t` (epoch seconds)."""
    return int(t // HOUR) * HOUR


# Where usage_page() goes on from: opaque to the caller (None: from the start / no more rows).
Cursor = Any


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

    # The usage log's history (docs/http-api.md, "History"; proxy/history.py folds hours into buckets).
    def log_denial(self, team: str, key: str, now: float) -> None:
        """Count one denied request in the hour of `now` (team and key). Never raises, never waits:
        the count is written in the background (a denial has no usage row)."""

    async def usage_hours(self, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
        """The hours (start, epoch s) of [start, end) in which the team (or its key) has anything
        logged, each with its Tally; hours with nothing are absent."""

    async def usage_page(self, start: float, end: float, team: str | None, key: str | None,
                         after: Cursor, limit: int) -> tuple[list[UsageRow], Cursor]:
        """Up to `limit` usage rows with start <= time < end (and the team / key, when given), in the
        order they were logged, from `after` (None: the first): the rows and the cursor of the next
        page (None: no more)."""

    async def prune_log(self, before: float, limit: int) -> int:
        """Delete up to `limit` usage rows older than `before` (and the hourly tallies and denial
        counts of hours that ended by then): how many rows went (fewer than `limit`: done)."""

    def set_retention(self, seconds: float) -> None:
        """How long history is kept (store_retention_days; 0: for ever), for stores that expire it
        on their own (Redis: its hourly tallies' TTL)."""

    # Alerts (proxy/alerting.py): each event is sent once, by whichever replica claims it first.
    async def claim_alert(self, event_key: str, ttl: float) -> bool:
        """Claim the alert `event_key` (proxy/alerts.py event_key) for `ttl` seconds: True for the
        first claim (the caller sends the event), False while a claim of it lasts (Redis: SET NX PX,
        shared by every replica; SQLite: a row; memory: in the process)."""
