"""[pure] The in-process ledger: per scope and period, settled + in-flight charges + holds.

Every method that decides is synchronous, so under asyncio a decision and its effect can
never interleave with another request's: atomic across all scopes of a request.
`MemoryStore` is this book with nothing persisted; `SqliteStore` persists around it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from proxy.ledger import ZERO, Amounts, Ask, Denied, Scope, ScopeState, admit, check_growth, wall_clock_deadline
from proxy.periods import period_bounds
from proxy.store.base import Reservation, UsageRow

PeriodKey = tuple[str, float]  # (scope id, period start)


@dataclass(slots=True)
class Totals:
    settled: Amounts = ZERO
    charged: Amounts = ZERO       # sum of in-flight requests' charges so far
    held: Amounts = ZERO          # sum of in-flight max(hold - charged, 0)
    first_request_at: float | None = None

    def state(self) -> ScopeState:
        return ScopeState(self.settled + self.charged, self.held, self.first_request_at)


class Book:
    def __init__(self) -> None:
        self.totals: dict[PeriodKey, Totals] = {}
        self.in_flight: dict[str, Reservation] = {}

    @staticmethod
    def period_key(scope: Scope, now: float) -> PeriodKey:
        return scope.id, period_bounds(scope.period, now)[0]

    @staticmethod
    def period_keys(scopes: Sequence[Scope], now: float) -> list[PeriodKey]:
        return [(s.id, period_bounds(s.period, now)[0]) for s in scopes]

    def has(self, key: PeriodKey) -> bool:
        return key in self.totals

    def load(self, key: PeriodKey, settled: Amounts, first_request_at: float | None) -> None:
        if key not in self.totals:
            self.totals[key] = Totals(settled=settled, first_request_at=first_request_at)

    def _totals(self, key: PeriodKey) -> Totals:
        t = self.totals.get(key)
        if t is None:
            t = self.totals[key] = Totals()
        return t

    def state(self, scope: Scope, now: float) -> ScopeState:
        return self._totals(self.period_key(scope, now)).state()

    def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        return self.reserve_in(scopes, self.period_keys(scopes, now), ask, now, request_id)

    def reserve_in(self, scopes: Sequence[Scope], keys: list[PeriodKey], ask: Ask, now: float,
                   request_id: str) -> Reservation | Denied:
        """reserve() in the periods `keys` (Book.period_keys(scopes, now)), for a caller that has them."""
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
        res = Reservation(
            id=request_id,
            scopes=tuple(scopes),
            period_starts=tuple([k[1] for k in keys]),
            admitted=decision,
            hold=hold,
            deadline=wall_clock_deadline(pairs, now),
            remaining=tightest_remaining(scopes, after),
        )
        self.in_flight[request_id] = res
        return res

    def _reserved_totals(self, res: Reservation) -> list[Totals]:
        return [self._totals((s.id, p)) for s, p in zip(res.scopes, res.period_starts)]

    def charge(self, res: Reservation, charged: Amounts, now: float) -> Denied | None:
        if res.settled:
            return None
        charged = charged.nonneg()
        new_hold = res.hold.max(charged)
        growth = new_hold - res.hold
        totals = self._reserved_totals(res)
        if growth != ZERO:
            denied = check_growth(growth, [(s, t.state()) for s, t in zip(res.scopes, totals)], now)
            if denied is not None:
                return denied
        charged_delta = charged - res.charged
        free_delta = (new_hold - charged).nonneg() - (res.hold - res.charged).nonneg()
        for t in totals:
            t.charged = t.charged + charged_delta
            t.held = t.held + free_delta
        res.hold, res.charged = new_hold, charged
        return None

    def settle(self, res: Reservation, actual: Amounts) -> bool:
        """Replace the request's footprint by `actual`. False if it was already settled
        (by this object or another carrying the same reservation id)."""
        if res.settled or res.id not in self.in_flight:
            return False
        res.settled = True
        charged = res.charged
        if charged == ZERO:  # nothing charged while in flight (every non-streamed request)
            free = res.hold.nonneg()
            for t in self._reserved_totals(res):
                t.held = t.held - free
                t.settled = t.settled + actual
        else:
            free = (res.hold - charged).nonneg()
            for t in self._reserved_totals(res):
                t.charged = t.charged - charged
                t.held = t.held - free
                t.settled = t.settled + actual
        del self.in_flight[res.id]
        return True

    def reset(self, scope: Scope, now: float) -> None:
        """Zero the current period's settled usage and restart its wall clock. Requests in flight
        keep their holds and running charges (they are still spending), and settle normally."""
        t = self._totals(self.period_key(scope, now))
        t.settled = ZERO
        t.first_request_at = None


def tightest_remaining(scopes: Sequence[Scope], states: Sequence[ScopeState]) -> dict[str, int]:
    """Per reported dimension (x-budget-remaining-*), the least limit - used - held across scopes, never below 0."""
    out: dict[str, int] = {}
    for scope, state in zip(scopes, states):
        used, held = state.used, state.held
        for dim, limit in scope.limits.metered():
            if dim in _REPORTED:
                room = limit - used.get(dim) - held.get(dim)
                if room < 0:
                    room = 0
                if dim not in out or room < out[dim]:
                    out[dim] = room
    return out


_REPORTED = frozenset(("tokens", "cost_usd", "steps"))


MEMORY_LOG_ROWS = 10_000  # memory:// keeps the usage log's most recent rows (between this and twice it)


class MemoryStore:
    """memory:// — for tests and trials; nothing survives a restart."""

    def __init__(self) -> None:
        self.book = Book()
        self.rows: list[UsageRow] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        return self.book.reserve(scopes, ask, now, request_id)

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Denied | None:
        return self.book.charge(res, charged, now)

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> None:
        if self.book.settle(res, actual) and row is not None:
            self.rows.append(row)
            if len(self.rows) > 2 * MEMORY_LOG_ROWS:  # bounded: a trial run must not grow without end
                del self.rows[:-MEMORY_LOG_ROWS]

    async def states(self, scopes: Sequence[Scope], now: float) -> list[ScopeState]:
        return [self.book.state(s, now) for s in scopes]

    async def reset(self, scope: Scope, now: float) -> None:
        self.book.reset(scope, now)

    async def usage_log(self, limit: int = 100) -> list[UsageRow]:
        return self.rows[-limit:]
