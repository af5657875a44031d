"""[pure] The in-process ledger: per scope and period, settled + in-flight charges + holds.

Every method that decides is synchronous, so under asyncio a decision and its effect can
never interleave with another request's: atomic across all scopes of a request.
`MemoryStore` is this book with nothing persisted; `SqliteStore` persists around it.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

from proxy.ledger import (ZERO, Amounts, Ask, Denied, Scope, ScopeState, admit, check_growth, tightest_remaining,
                          wall_clock_deadline)
from proxy.periods import period_bounds
from proxy.store.base import KEY_RETENTION_S, KeyRecord, Reservation, UsageRow
from proxy.store.base import Cursor, Tally, hour_of, row_tally

PeriodKey = tuple[str, float]  # (scope id, period start)
RUN_FORGET_MAX = 16  # run scopes a reserve forgets at most (the rest wait for the next one)
RunEntry = tuple[str, ScopeState, float]  # a run scope's id, its state, when it is forgotten (epoch s)


def newest_runs(entries: list[RunEntry], limit: int) -> tuple[int, list[RunEntry]]:
    """(how many, the `limit` forgotten last, latest first)."""
    return len(entries), heapq.nlargest(max(0, limit), entries, key=lambda e: e[2])
_new = tuple.__new__  # a NamedTuple's keyword-handling constructor costs several times more; every request builds one


@dataclass(slots=True)
class Totals:
    settled: Amounts = ZERO
    charged: Amounts = ZERO       # sum of in-flight requests' charges so far
    held: Amounts = ZERO          # sum of in-flight max(hold - charged, 0)
    first_request_at: float | None = None

    def state(self) -> ScopeState:
        return ScopeState(self.settled + self.charged, self.held, self.first_request_at)


class Book:
    """The totals, and the reservations in flight as the book last left them (its own account:
    the caller's copy of a reservation may be stale, the book's never is)."""

    def __init__(self) -> None:
        self.totals: dict[PeriodKey, Totals] = {}
        self.in_flight: dict[str, Reservation] = {}
        # Run scopes (Scope.ttl), in the order of their last request: key -> (forget at, ttl). A run
        # is forgotten (its totals dropped) once `forget at` has passed and none of its requests is
        # in flight: exactly when it is next asked for, else by the reserves that find the oldest
        # due (at most RUN_FORGET_MAX each), so a request without a run pays one comparison.
        self.runs: OrderedDict[PeriodKey, tuple[float, float]] = OrderedDict()
        self.next_forget = math.inf  # when the oldest run falls due (inf: no run)
        self.on_forget: Callable[[PeriodKey], None] | None = None  # (SqliteStore: delete its row)

    @staticmethod
    def period_key(scope: Scope, now: float) -> PeriodKey:
        return scope.id, period_bounds(scope.period, now)[0]

    @staticmethod
    def period_keys(scopes: Sequence[Scope], now: float) -> list[PeriodKey]:
        return [(s.id, period_bounds(s.period, now)[0]) for s in scopes]

    def load(self, key: PeriodKey, settled: Amounts, first_request_at: float | None) -> None:
        if key not in self.totals:
            self.totals[key] = Totals(settled=settled, first_request_at=first_request_at)

    def _totals(self, key: PeriodKey) -> Totals:
        t = self.totals.get(key)
        if t is None:
            t = self.totals[key] = Totals()
        return t

    def state(self, scope: Scope, now: float) -> ScopeState:
        key = self.period_key(scope, now)
        if scope.ttl is not None:
            due = self.runs.get(key)
            if due is not None and due[0] <= now:
                self.forget(key, now)
        t = self.totals.get(key)  # (never created by a read: a run id asked about is no run)
        return ScopeState() if t is None else t.state()

    # --- run scopes (docs/budgets.md, "Runs") ---------------------------------------------------
    def forget(self, key: PeriodKey, now: float) -> bool:
        """Forget a run scope whose time is up, unless a request of it is in flight (then it is due
        again a ttl from now). True when forgotten."""
        t = self.totals.get(key)
        if t is not None and (t.held != ZERO or t.charged != ZERO):
            ttl = self.runs[key][1]
            self.runs[key] = (now + ttl, ttl)
            self.runs.move_to_end(key)
            return False
        self.runs.pop(key, None)
        self.totals.pop(key, None)
        if self.on_forget is not None:
            self.on_forget(key)
        return True

    def forget_due(self, now: float, limit: int = RUN_FORGET_MAX) -> None:
        """Forget up to `limit` of the runs due by `now`, oldest first."""
        runs = self.runs
        for _ in range(limit):
            if not runs:
                break
            key, (at, _) = next(iter(runs.items()))
            if at > now:
                break
            self.forget(key, now)
        self.next_forget = next(iter(runs.values()))[0] if runs else math.inf

    def _touch_runs(self, scopes: Sequence[Scope], keys: list[PeriodKey], now: float) -> None:
        """A request of these run scopes: each is due a ttl from now (one whose time was up is
        forgotten first: this request starts it again, its wall clock too)."""
        runs = self.runs
        for s, key in zip(scopes, keys):
            if s.ttl is None:
                continue
            due = runs.get(key)
            if due is not None:
                if due[0] <= now:
                    self.forget(key, now)
                if key in runs:
                    runs.move_to_end(key)
            runs[key] = (now + s.ttl, s.ttl)
        self.next_forget = next(iter(runs.values()))[0]

    def runs_of(self, prefix: str, now: float) -> list[tuple[str, ScopeState, float]]:
        """(scope id, state, forget at) of every run scope whose id starts with `prefix` and that
        is not yet forgotten (due, but with a request in flight, counts)."""
        out = []
        for key, (at, _) in self.runs.items():
            if key[0].startswith(prefix):
                t = self.totals.get(key)
                state = ScopeState() if t is None else t.state()
                if at > now or state.held != ZERO or t is not None and t.charged != ZERO:
                    out.append((key[0], state, at))
        return out

    def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        return self.reserve_in(scopes, self.period_keys(scopes, now), ask, now, request_id)

    def reserve_in(self, scopes: Sequence[Scope], keys: list[PeriodKey], ask: Ask, now: float,
                   request_id: str) -> Reservation | Denied:
        """reserve() in the periods `keys` (Book.period_keys(scopes, now)), for a caller that has them."""
        if self.next_forget <= now:
            self.forget_due(now)
        for s in scopes:
            if s.ttl is not None:  # a run's (denied or not, a request keeps its run alive)
                self._touch_runs(scopes, keys, now)
                break
        totals = [self._totals(k) for k in keys]
        states = [t.state() for t in totals]
        pairs = list(zip(scopes, states))
        decision = admit(ask, pairs, now)
        if isinstance(decision, Denied):
            return decision
        hold = decision.hold
        for t in totals:
            t.held = t.held + hold
            if t.first_request_at is None:
                t.first_request_at = now
        # a reservation changes no scope's used: only held needs reading again
        after = [ScopeState(st.used, t.held) for t, st in zip(totals, states)]
        res = _new(Reservation, (request_id, tuple(scopes), tuple([k[1] for k in keys]), decision, hold, ZERO,
                                 wall_clock_deadline(pairs, now), False, tightest_remaining(scopes, after)))
        self.in_flight[request_id] = res
        return res

    def _reserved_totals(self, res: Reservation) -> list[Totals]:
        return [self._totals((s.id, p)) for s, p in zip(res.scopes, res.period_starts)]

    def charge(self, res: Reservation, charged: Amounts, now: float) -> Reservation | Denied | None:
        """The reservation with `charged` as its running charge and its hold grown to cover it, or
        the denial of that growth (nothing changed); None when it is no longer in flight. Growth is
        decided on res's scopes (a reloaded config's limits), on the book's own hold and charge."""
        cur = self.in_flight.get(res.id)
        if cur is None or res.settled:
            return None
        charged = charged.nonneg()
        hold, before = cur.hold, cur.charged
        new_hold = hold.max(charged)
        growth = new_hold - hold
        totals = self._reserved_totals(res)
        if growth != ZERO:
            denied = check_growth(growth, [(s, t.state()) for s, t in zip(res.scopes, totals)], now)
            if denied is not None:
                return denied
        charged_delta = charged - before
        free_delta = (new_hold - charged).nonneg() - (hold - before).nonneg()
        for t in totals:
            t.charged = t.charged + charged_delta
            t.held = t.held + free_delta
        res = self.in_flight[res.id] = res.with_charge(new_hold, charged)
        return res

    def settle(self, res: Reservation, actual: Amounts) -> bool:
        """Replace the request's footprint by `actual`. False if it was already settled
        (by this object or another carrying the same reservation id)."""
        cur = None if res.settled else self.in_flight.pop(res.id, None)
        if cur is None:
            return False
        charged = cur.charged
        if charged == ZERO:  # nothing charged while in flight (every non-streamed request)
            free = cur.hold.nonneg()
            for t in self._reserved_totals(cur):
                t.held = t.held - free
                t.settled = t.settled + actual
        else:
            free = (cur.hold - charged).nonneg()
            for t in self._reserved_totals(cur):
                t.charged = t.charged - charged
                t.held = t.held - free
                t.settled = t.settled + actual
        return True

    def charged_so_far(self, res: Reservation) -> Amounts | None:
        """What the reservation has been charged while in flight; None when it is not in flight."""
        cur = self.in_flight.get(res.id)
        return None if cur is None else cur.charged

    def reset(self, scope: Scope, now: float) -> None:
        """Zero the current period's settled usage and restart its wall clock. Requests in flight
        keep their holds and running charges (they are still spending), and settle normally."""
        t = self._totals(self.period_key(scope, now))
        t.settled = ZERO
        t.first_request_at = None


class KeyBook:
    """Runtime keys by digest and by (team, name): memory://'s own, and the shape of the others'."""

    def __init__(self) -> None:
        self.by_digest: dict[str, KeyRecord] = {}
        self.by_name: dict[tuple[str, str], KeyRecord] = {}

    def put(self, rec: KeyRecord, now: float) -> bool:
        self.purge(now)
        if (rec.team, rec.name) in self.by_name or rec.digest in self.by_digest:
            return False
        self.by_digest[rec.digest] = self.by_name[(rec.team, rec.name)] = rec
        return True

    def purge(self, now: float) -> None:
        """Forget the keys gone longer than KEY_RETENTION_S (their names are free again)."""
        for rec in [r for r in self.by_digest.values()
                    if (gone := r.gone_at()) is not None and gone + KEY_RETENTION_S <= now]:
            del self.by_digest[rec.digest], self.by_name[(rec.team, rec.name)]

    def listed(self, team: str | None) -> list[KeyRecord]:
        return [r for r in self.by_digest.values() if team is None or r.team == team]

    def revoke(self, team: str, name: str, now: float) -> KeyRecord | None:
        rec = self.by_name.get((team, name))
        if rec is not None and rec.revoked_at is None:
            rec = self.by_digest[rec.digest] = self.by_name[(team, name)] = rec._replace(revoked_at=now)
        return rec


MEMORY_LOG_ROWS = 10_000  # memory:// keeps the usage log's most recent rows (between this and twice it)
ALERT_CLAIMS_MAX = 100_000  # memory:// remembers this many alert claims (proxy/alerting.py), the latest


class MemoryStore:
    """memory:// — for tests and trials; nothing survives a restart."""

    def __init__(self) -> None:
        self.book = Book()
        self.rows: list[UsageRow] = []
        self.keys = KeyBook()
        self.denials: list[tuple[float, str, str]] = []  # (time, team, key) of denied requests: history's

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        return self.book.reserve(scopes, ask, now, request_id)

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Reservation | Denied:
        got = self.book.charge(res, charged, now)
        return res if got is None else got

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> Reservation:
        if self.book.settle(res, actual) and row is not None:
            self.rows.append(row)
            if len(self.rows) > 2 * MEMORY_LOG_ROWS:  # bounded: a trial run must not grow without end
                del self.rows[:-MEMORY_LOG_ROWS]
        return res.as_settled()

    async def release(self, res: Reservation) -> None:
        """Settle the charges so far, with no usage row (LedgerStore.release)."""
        so_far = self.book.charged_so_far(res)
        if so_far is not None and not res.settled:
            await self.settle(res, so_far, None)

    async def renew(self) -> None:
        """Nothing to renew: holds here live as long as the process."""

    async def states(self, scopes: Sequence[Scope], now: float) -> list[ScopeState]:
        return [self.book.state(s, now) for s in scopes]

    async def reset(self, scope: Scope, now: float) -> None:
        self.book.reset(scope, now)

    async def usage_log(self, limit: int = 100) -> list[UsageRow]:
        return self.rows[-limit:]

    async def list_runs(self, prefix: str, now: float, limit: int) -> tuple[int, list[RunEntry]]:
        """LedgerStore.list_runs: how many run scopes under `prefix` are active, and the `limit`
        latest (forgotten last) of them."""
        return newest_runs(self.book.runs_of(prefix, now), limit)

    async def put_key(self, rec: KeyRecord, now: float) -> bool:
        return self.keys.put(rec, now)

    async def find_key(self, digest: str) -> KeyRecord | None:
        return self.keys.by_digest.get(digest)

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        return self.keys.listed(team)

    async def revoke_key(self, team: str, name: str, now: float) -> KeyRecord | None:
        return self.keys.revoke(team, name, now)

    # --- history (LedgerStore.usage_hours and the rest): a scan of the rows kept ------------------
    def log_denial(self, team: str, key: str, now: float) -> None:
        denials = self.denials
        denials.append((now, team, key))
        if len(denials) > 2 * MEMORY_LOG_ROWS:  # bounded as the rows are
            del denials[:-MEMORY_LOG_ROWS]

    async def usage_hours(self, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
        return scan_hours(self.rows, self.denials, team, key, start, end)

    async def usage_page(self, start: float, end: float, team: str | None, key: str | None,
                         after: Cursor, limit: int) -> tuple[list[UsageRow], Cursor]:
        """The cursor is the rest of the rows that matched at the first page (references to rows kept
        here anyway): a consistent snapshot, whatever is logged or pruned meanwhile."""
        rest = after if after is not None else [
            r for r in self.rows
            if start <= r.time < end and (team is None or r.team == team) and (key is None or r.key == key)]
        return rest[:limit], (rest[limit:] if len(rest) > limit else None)

    async def prune_log(self, before: float, limit: int) -> int:
        old = [i for i, r in enumerate(self.rows) if r.time < before][:limit]
        if old:
            gone = set(old)
            self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
        self.denials = [d for d in self.denials if hour_of(d[0]) + 3600 > before]
        return len(old)

    def set_retention(self, seconds: float) -> None:
        """Nothing expires here on its own: prune_log does it all."""

    async def claim_alert(self, event_key: str, ttl: float) -> bool:
        """LedgerStore.claim_alert, in this process only: a set of the keys claimed (bounded: an event
        key names its period, so the oldest are long past; `ttl` needs no clock here)."""
        claims: dict[str, None] | None = self.__dict__.get("_alert_claims")
        if claims is None:
            claims = self.__dict__["_alert_claims"] = {}
        if event_key in claims:
            return False
        claims[event_key] = None
        if len(claims) > ALERT_CLAIMS_MAX:
            del claims[next(iter(claims))]
        return True


def scan_hours(rows: Sequence[UsageRow], denials: Sequence[tuple[float, str, str]], team: str, key: str | None,
               start: float, end: float) -> dict[int, Tally]:
    """LedgerStore.usage_hours over rows and denials held in memory."""
    out: dict[int, Tally] = {}
    for r in rows:
        if start <= r.time < end and r.team == team and (key is None or r.key == key):
            h = hour_of(r.time)
            out[h] = out.get(h, Tally()) + row_tally(r)
    one = Tally(denied=1)
    for t, tm, k in denials:
        if start <= t < end and tm == team and (key is None or k == key):
            h = hour_of(t)
            out[h] = out.get(h, Tally()) + one
    return out
