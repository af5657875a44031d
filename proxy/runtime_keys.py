"""Runtime keys on the auth path (docs/http-api.md, "Runtime keys").

Config keys are found first, in memory (proxy/auth.py KeyRing): their path never
awaits. A digest the config does not know is looked up here, in the store, through a per-process
cache whose entries live CACHE_SECONDS: a revocation made on any replica is seen by every replica
within CACHE_SECONDS plus one store read, well inside the 1 s the contract allows. Unknown digests
are cached too, in their own bounded map, and concurrent misses for one digest share one read: a
flood of wrong keys costs at most one store read per distinct digest per CACHE_SECONDS, and memory
stays bounded whatever is sent. Freshness runs on the monotonic clock (real time: how stale an
answer may be); expiry on the app's clock (the one budgets and tests use)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from proxy.auth import Caller
from proxy.budgets import limits_of
from proxy.config import Budget, key_digest
from proxy.errors import AuthenticationError, StoreUnavailable
from proxy.ledger import Scope
from proxy.periods import iso
from proxy.store.base import KeyRecord

log = logging.getLogger("budget_proxy")

CACHE_SECONDS = 0.5
CACHE_ENTRIES = 10_000  # per map: known keys, unknown digests


def key_scope(rec: KeyRecord) -> Scope:
    """The key scope of a runtime key: the id a config key of that name would have."""
    budget = Budget.model_validate(rec.budget)
    return Scope("key", rec.name, f"key:{rec.team}/{rec.name}", limits_of(budget), budget.period)


def caller_of(rec: KeyRecord) -> Caller:
    run = None if rec.run_budget is None else limits_of(Budget.model_validate(rec.run_budget))
    return Caller(rec.team, rec.name, rec.models, key_scope(rec), run, rec.runs == "required")


def refusal(rec: KeyRecord | None, runtime: Any, now: float) -> str | None:
    """Why this record's key may not call now (a 401's message), or None when it may."""
    if rec is None:
        return "Invalid proxy key."
    if rec.revoked_at is not None:
        return "This proxy key was revoked."
    if rec.expires_at is not None and now >= rec.expires_at:
        return f"This proxy key expired at {iso(rec.expires_at)}."
    if rec.team not in runtime.budgets.teams:
        return f"This proxy key's team '{rec.team}' is no longer in the config."
    if (rec.team, rec.name) in runtime.budgets.keys:  # a reload gave a config key its name
        return f"Team '{rec.team}' now has a config key named '{rec.name}'; this runtime key no longer works."
    return None


class BoundedMap:
    """digest -> (read at, record, caller), at most `size` entries, the least recently read dropped
    first. A stale entry stays until then: its Caller (and so its Scope, which the stores cache
    arguments by) is kept when the next read finds the same record."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[str, tuple[float, KeyRecord | None, Caller | None]] = {}

    def put(self, digest: str, entry: tuple[float, KeyRecord | None, Caller | None]) -> None:
        entries = self.entries
        entries.pop(digest, None)
        entries[digest] = entry  # (at the end: the dict is in the order entries were read)
        while len(entries) > self.size:
            del entries[next(iter(entries))]


class RuntimeKeys:
    """The per-process view of the store's runtime keys (module docstring)."""

    def __init__(self, store: Any, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.monotonic = monotonic
        self.known = BoundedMap(CACHE_ENTRIES)
        self.unknown = BoundedMap(CACHE_ENTRIES)
        self.reading: dict[str, asyncio.Future[tuple[float, KeyRecord | None, Caller | None]]] = {}

    async def caller(self, secret: str, runtime: Any, now: float) -> Caller:
        """The caller of a runtime key, or a 401 that says why not."""
        _, rec, caller = await self.entry(key_digest(secret))
        why = refusal(rec, runtime, now)
        if why is not None or caller is None:
            raise AuthenticationError(why or "Invalid proxy key.")
        return caller

    async def is_key(self, secret: str) -> bool:
        """Whether `secret` is a runtime key, working or not (an admin route answers it 403, not 401)."""
        try:
            return (await self.entry(key_digest(secret)))[1] is not None
        except StoreUnavailable:  # (refused either way)
            return False

    def forget(self, digest: str) -> None:
        """Drop what this process knows of `digest` (this replica sees its own revocation at once)."""
        self.known.entries.pop(digest, None)
        self.unknown.entries.pop(digest, None)

    async def entry(self, digest: str) -> tuple[float, KeyRecord | None, Caller | None]:
        now = self.monotonic()
        hit = self.known.entries.get(digest) or self.unknown.entries.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit
        reading = self.reading.get(digest)
        if reading is None:  # the first miss reads; the others wait for its answer
            reading = self.reading[digest] = asyncio.ensure_future(self.read(digest))
            reading.add_done_callback(lambda t: t.cancelled() or t.exception())  # (a failure nobody awaited)
        return await asyncio.shield(reading)

    async def read(self, digest: str) -> tuple[float, KeyRecord | None, Caller | None]:
        started = self.monotonic()  # the answer is at least this fresh
        try:
            rec = await self.store.find_key(digest)
        except StoreUnavailable:
            raise
        except Exception as exc:  # any store failure fails closed
            log.error("runtime key lookup failed: %s", exc.__class__.__name__)
            raise StoreUnavailable("The key store is unavailable.") from None
        finally:
            self.reading.pop(digest, None)
        return self.remember(digest, rec, started)

    def remember(self, digest: str, rec: KeyRecord | None, started: float) -> tuple[float, KeyRecord | None,
                                                                                   Caller | None]:
        old = self.known.entries.get(digest)
        caller = None
        if rec is not None:  # the same record keeps its Caller (BoundedMap)
            caller = old[2] if old is not None and old[1] == rec else self.build(rec)
        entry = (started, rec, caller)
        if rec is None:
            self.known.entries.pop(digest, None)
            self.unknown.put(digest, entry)
        else:
            self.unknown.entries.pop(digest, None)
            self.known.put(digest, entry)
        return entry

    @staticmethod
    def build(rec: KeyRecord) -> Caller | None:
        try:
            return caller_of(rec)
        except ValueError as exc:  # a record this version cannot read: refused, never guessed at
            log.error("runtime key %s/%s: unreadable record (%s)", rec.team, rec.name, exc.__class__.__name__)
            return None
