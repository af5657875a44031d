"""The in-process Book (proxy/store/memory.py) as a state machine, and MemoryStore around it.

Hypothesis examples (each stateful example is up to 60 steps):
  BookMachine              250  reserve / charge / settle (actual may exceed the hold) / reset / time, 2-3 keys + team
  WithinHoldsMachine       150  the same, but every settlement stays within the request's final hold
  test_last_of_a_budget    300  two back-to-back reserves for the last of a budget: exactly one is admitted

Properties checked after every step of both machines:
  - never overspent by admission or growth (docs/budgets.md "Overshoot bound"): for every scope, period and
    limited dimension  used + held <= limit + sum over settled requests of max(0, actual - final hold);
    in WithinHoldsMachine that sum is 0, so used + held <= limit always; used is never negative
  - a refused charge() changes nothing; an accepted one grows the footprint by exactly its growth and
    keeps used + held <= limit in every dimension that grew; a denied reserve() changes nothing
  - every admission/denial and every growth decision agrees with a reference (input + 1 output token
    must fit, key before team, dimension order), and the output hold is the largest every scope covers
  - per scope and period, charged and held equal the sums over the reservations in flight; settled
    equals the sum of settled usage unless the period was reset
  - settle is idempotent and charge() after settle is a no-op; settling everything leaves held and
    charged at zero in every scope
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxy.ledger import ZERO, Amounts, Ask, Denied, Limits, Scope, ScopeState
from proxy.store.base import Reservation, UsageRow
from proxy.store.memory import MEMORY_LOG_ROWS, Book, MemoryStore, Totals
from tests.test_ledger import first_denial, fits  # the ledger's reference model: where an amount does not fit

T0 = 1_718_000_000.0  # 2024-06-10 06:13:20 UTC, a Monday
HOUR = 3600.0
RATES = [Decimal(0), Decimal(1), Decimal("0.3"), Decimal("2.5"), Decimal("3.75"), Decimal(15)]


def scope(kind: str, name: str, period: str = "none", **limits: int | float | None) -> Scope:
    return Scope(kind, name, f"{kind}:{name}", Limits(**limits), period)


def ask(input_tokens: int = 10, max_tokens: int = 100, in_rate: Decimal | int = 0, out_rate: Decimal | int = 0) -> Ask:
    return Ask(input_tokens, math.ceil(Fraction(Decimal(in_rate)) * input_tokens), max_tokens, Decimal(out_rate))


def usage(input_tokens: int, output_tokens: int, in_rate: Decimal | int = 0, out_rate: Decimal | int = 0,
          steps: int = 1) -> Amounts:
    cost = math.ceil(Fraction(Decimal(in_rate)) * input_tokens) + math.ceil(Fraction(Decimal(out_rate)) * output_tokens)
    return Amounts(input_tokens + output_tokens, input_tokens, output_tokens, cost, steps)


def hold_for(a: Ask, out: int) -> Amounts:
    out_cost = math.ceil(Fraction(a.output_nanos_per_token) * out)
    return Amounts(a.input_tokens + out, a.input_tokens, out, a.input_cost_nanos + out_cost, 1)


def snapshot(book: Book) -> dict:
    """Everything the book knows, with untouched (all-zero) period totals left out."""
    totals = {k: (t.settled, t.charged, t.held, t.first_request_at)
              for k, t in book.totals.items() if (t.settled, t.charged, t.held, t.first_request_at) != (
                  ZERO, ZERO, ZERO, None)}
    flights = {i: (r.hold, r.charged, r.settled) for i, r in book.in_flight.items()}
    return {"totals": totals, "in_flight": flights}


def res_fields(res: Reservation) -> tuple:
    return (res.hold, res.charged, res.settled)


# --- the state machine -------------------------------------------------------------------------------------------

def opt(lo: int, hi: int) -> st.SearchStrategy[int | None]:
    """Unlimited, or a limit that a few requests (up to 400 input + 600 output tokens) share."""
    return st.none() | st.integers(lo, hi)


limits_st = st.builds(Limits, tokens=opt(300, 6000), input_tokens=opt(200, 4000), output_tokens=opt(100, 3000),
                      cost_nanos=opt(1000, 30_000), steps=opt(1, 20),
                      wall_clock=st.none() | st.sampled_from([60.0, 1800.0, 5400.0]))
period_st = st.sampled_from(["none", "hour", "day"])


@dataclass
class Flight:
    """The test's own view of a reservation in flight."""

    res: Reservation
    keys: list[tuple[str, float]]      # (scope id, period start) it is booked in
    in_rate: Decimal
    out_rate: Decimal


@dataclass
class Model:
    settled: dict[tuple[str, float], Amounts] = field(default_factory=dict)
    excess: dict[tuple[str, float], Amounts] = field(default_factory=dict)
    reset: set[tuple[str, float]] = field(default_factory=set)


class BookMachine(RuleBasedStateMachine):
    """Random interleavings of reserve, charge, settle, reset and the clock on 2-3 keys sharing a team."""

    within_holds = False  # WithinHoldsMachine: every settlement charges at most the request's final hold

    def __init__(self) -> None:
        super().__init__()
        self.book = Book()
        self.now = T0
        self.keys: list[Scope] = []
        self.team: Scope = scope("team", "t")
        self.by_id: dict[str, Scope] = {}
        self.flights: dict[str, Flight] = {}
        self.done: list[Flight] = []
        self.model = Model()
        self.n = 0

    @initialize(team_limits=limits_st, team_period=period_st,
                key_specs=st.lists(st.tuples(limits_st, period_st), min_size=2, max_size=3))
    def setup(self, team_limits: Limits, team_period: str, key_specs: list[tuple[Limits, str]]) -> None:
        self.team = Scope("team", "t", "team:t", team_limits, team_period)
        self.keys = [Scope("key", f"k{i}", f"key:t/k{i}", lim, per) for i, (lim, per) in enumerate(key_specs)]
        self.by_id = {s.id: s for s in [*self.keys, self.team]}

    # helpers

    def pairs(self, scopes: tuple[Scope, ...], keys: list[tuple[str, float]]) -> list[tuple[Scope, ScopeState]]:
        return [(s, self.book.totals[k].state() if k in self.book.totals else ScopeState())
                for s, k in zip(scopes, keys)]

    def pick(self, i: int) -> Flight:
        return list(self.flights.values())[i % len(self.flights)]

    def amounts_for(self, f: Flight, in_extra: int, out: int, steps: int, cap_at_hold: bool) -> Amounts:
        a = f.res.admitted
        base_in = max(0, a.hold.input_tokens + in_extra)
        amount = usage(base_in, out, f.in_rate, f.out_rate, steps)
        if cap_at_hold:
            amount = Amounts(*(min(x, h) for x, h in zip(amount.as_tuple(), f.res.hold.as_tuple())))
        return amount

    # rules

    @rule(k=st.integers(0, 2), input_tokens=st.integers(0, 400), max_tokens=st.integers(1, 600),
          in_rate=st.sampled_from(RATES), out_rate=st.sampled_from(RATES))
    def reserve(self, k: int, input_tokens: int, max_tokens: int, in_rate: Decimal, out_rate: Decimal) -> None:
        key_scope = self.keys[k % len(self.keys)]
        scopes = (key_scope, self.team)
        keys = [Book.period_key(s, self.now) for s in scopes]
        a = ask(input_tokens, max_tokens, in_rate, out_rate)
        before_pairs = self.pairs(scopes, keys)
        before = snapshot(self.book)
        self.n += 1
        rid = f"r{self.n}"
        result = self.book.reserve(scopes, a, self.now, rid)

        # the reference decision: input + one output token must fit in every scope, in order
        minimal = hold_for(a, 1)
        expected = first_denial(before_pairs, minimal, self.now)
        if isinstance(result, Denied):
            assert expected == (result.scope, result.dimension)
            assert snapshot(self.book) == before  # a denial changes nothing
            return
        assert expected is None
        # largest output hold every scope covers, and no larger
        out = result.admitted.output_tokens
        assert result.hold == result.admitted.hold == hold_for(a, out)
        assert 1 <= out <= max_tokens and result.admitted.clamped == (out < max_tokens)
        for s, state in before_pairs:
            assert fits(s, state, result.hold) is None
        if out < max_tokens:
            assert any(fits(s, state, hold_for(a, out + 1)) is not None for s, state in before_pairs)
        for (s, state), key in zip(before_pairs, keys):
            after = self.book.totals[key].state()
            assert after.used == state.used and after.held == state.held + result.hold
            assert after.first_request_at == (state.first_request_at or self.now)
        assert result.charged == ZERO and not result.settled
        assert tuple(result.period_starts) == tuple(start for _, start in keys)
        self.flights[rid] = Flight(result, keys, in_rate, out_rate)

    @precondition(lambda self: self.flights)
    @rule(i=st.integers(0, 50), in_extra=st.integers(-20, 60), out=st.integers(0, 700), steps=st.integers(0, 1))
    def charge(self, i: int, in_extra: int, out: int, steps: int) -> None:
        f = self.pick(i)
        res = f.res
        charged = self.amounts_for(f, in_extra, out, steps, cap_at_hold=False)
        pairs = self.pairs(res.scopes, f.keys)
        before, before_res = snapshot(self.book), res_fields(res)
        growth = res.hold.max(charged) - res.hold

        got = self.book.charge(res, charged, self.now)

        expected = first_denial(pairs, growth, self.now, growth=True) if growth != ZERO else None
        if isinstance(got, Denied):
            assert expected == (got.scope, got.dimension)
            assert snapshot(self.book) == before  # refused: nothing changes
            return
        assert expected is None and isinstance(got, Reservation) and res_fields(res) == before_res
        assert got.hold == before_res[0].max(charged) and got.charged == charged and not got.settled
        assert self.book.in_flight[res.id] == got
        f.res = got
        for (s, state), key in zip(pairs, f.keys):
            after = self.book.totals[key].state()
            footprint_before = state.used + state.held
            assert after.used + after.held == footprint_before + growth
            for dim, limit in s.limits.metered():
                if growth.get(dim) > 0:  # an accepted growth fits under the limit
                    assert after.used.get(dim) + after.held.get(dim) <= limit

    @precondition(lambda self: self.flights)
    @rule(i=st.integers(0, 50), in_extra=st.integers(-20, 60), out=st.integers(0, 700), steps=st.integers(0, 1))
    def settle(self, i: int, in_extra: int, out: int, steps: int) -> None:
        f = self.pick(i)
        res = f.res
        actual = self.amounts_for(f, in_extra, out, steps, cap_at_hold=self.within_holds)
        pairs = self.pairs(res.scopes, f.keys)
        final_hold = res.hold
        assert self.book.settle(res, actual) is True
        assert res.id not in self.book.in_flight
        for (s, state), key in zip(pairs, f.keys):
            after = self.book.totals[key].state()
            assert after.used + after.held == state.used + state.held + actual - final_hold
            self.model.settled[key] = self.model.settled.get(key, ZERO) + actual
            self.model.excess[key] = self.model.excess.get(key, ZERO) + (actual - final_hold).nonneg()
        del self.flights[res.id]
        self.done.append(f)

    @precondition(lambda self: self.done)
    @rule(i=st.integers(0, 50), out=st.integers(0, 700))
    def settle_or_charge_again(self, i: int, out: int) -> None:
        f = self.done[i % len(self.done)]
        before, before_res = snapshot(self.book), res_fields(f.res)
        assert self.book.settle(f.res, usage(5, out)) is False
        assert self.book.charge(f.res, usage(5, out), self.now) is None
        assert snapshot(self.book) == before and res_fields(f.res) == before_res

    @precondition(lambda self: self.n > 0)
    @rule(which=st.integers(0, 3))
    def reset(self, which: int) -> None:
        s = ([*self.keys, self.team])[which % (len(self.keys) + 1)]
        key = Book.period_key(s, self.now)
        before = snapshot(self.book)
        in_flight = [f.res for f in self.flights.values() if key in f.keys]
        self.book.reset(s, self.now)
        after = self.book.state(s, self.now)
        # settled usage zeroed and the clock stopped; requests in flight keep their charges and holds
        assert after == ScopeState(sum((r.charged for r in in_flight), ZERO),
                                   sum(((r.hold - r.charged).nonneg() for r in in_flight), ZERO), None)
        others = {k: v for k, v in snapshot(self.book)["totals"].items() if k != key}
        assert others == {k: v for k, v in before["totals"].items() if k != key}
        self.model.reset.add(key)

    @rule(dt=st.sampled_from([1.0, 59.0, 61.0, 900.0, HOUR, 6 * HOUR, 86_400.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.flights)
    @rule()
    def settle_everything(self) -> None:
        for f in list(self.flights.values()):
            self.settle_with_charges(f)
        self.check_quiescent()

    def settle_with_charges(self, f: Flight) -> None:
        actual = f.res.charged
        for key in f.keys:
            self.model.settled[key] = self.model.settled.get(key, ZERO) + actual
            self.model.excess[key] = self.model.excess.get(key, ZERO) + (actual - f.res.hold).nonneg()
        assert self.book.settle(f.res, actual) is True
        del self.flights[f.res.id]
        self.done.append(f)

    def check_quiescent(self) -> None:
        assert self.book.in_flight == {}
        for t in self.book.totals.values():
            assert t.held == ZERO and t.charged == ZERO

    # invariants

    @invariant()
    def never_overspent_by_admission_or_growth(self) -> None:
        for (sid, start), t in self.book.totals.items():
            s = self.by_id[sid]
            state = t.state()
            excess = self.model.excess.get((sid, start), ZERO)
            for dim, limit in s.limits.metered():
                assert state.used.get(dim) + state.held.get(dim) <= limit + excess.get(dim), (sid, start, dim)
                if self.within_holds:
                    assert excess.get(dim) == 0
            assert all(x >= 0 for x in state.used.as_tuple()), (sid, start, state.used)

    @invariant()
    def in_flight_accounting_matches_the_reservations(self) -> None:
        charged: dict[tuple[str, float], Amounts] = {}
        free: dict[tuple[str, float], Amounts] = {}
        for f in self.flights.values():
            r = f.res
            assert r.hold == r.hold.max(r.charged) == r.hold.max(r.admitted.hold)  # footprint never shrinks
            for key in f.keys:
                charged[key] = charged.get(key, ZERO) + r.charged
                free[key] = free.get(key, ZERO) + (r.hold - r.charged).nonneg()
        assert set(self.book.in_flight) == set(self.flights)
        for key, t in self.book.totals.items():
            assert t.charged == charged.get(key, ZERO), key
            assert t.held == free.get(key, ZERO), key

    @invariant()
    def settled_totals_are_the_sum_of_settled_usage(self) -> None:
        for key, t in self.book.totals.items():
            if key not in self.model.reset:
                assert t.settled == self.model.settled.get(key, ZERO), key


class WithinHoldsMachine(BookMachine):
    within_holds = True


BookMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=60, deadline=None)
WithinHoldsMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestBook = BookMachine.TestCase
TestBookWithinHolds = WithinHoldsMachine.TestCase


# --- the last of a budget ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(dim=st.sampled_from(["tokens", "input_tokens", "output_tokens", "cost_usd", "steps"]),
       tight=st.sampled_from(["key", "team"]), same_key=st.booleans(),
       input_tokens=st.integers(0, 500), used=st.integers(0, 5000), held=st.integers(0, 5000),
       max_tokens=st.integers(1, 4096), in_rate=st.sampled_from(RATES), out_rate=st.sampled_from(RATES[1:]))
def test_last_of_a_budget(dim: str, tight: str, same_key: bool, input_tokens: int, used: int, held: int,
                          max_tokens: int, in_rate: Decimal, out_rate: Decimal) -> None:
    """With room for exactly one request's input + 1 output token, of two back-to-back reserves exactly one wins."""
    a = ask(input_tokens, max_tokens, in_rate, out_rate)
    need = hold_for(a, 1).get(dim)
    if dim == "input_tokens":
        a = Ask(max(1, a.input_tokens), a.input_cost_nanos, a.max_tokens, a.output_nanos_per_token)
        need = a.input_tokens
    field_name = "cost_nanos" if dim == "cost_usd" else dim
    t = scope("team", "t", **({field_name: used + held + need} if tight == "team" else {}))
    k1 = scope("key", "k1", **({field_name: used + held + need} if tight == "key" else {}))
    k2 = k1 if same_key or tight == "key" else scope("key", "k2")
    book = Book()
    tight_scope = t if tight == "team" else k1
    # earlier traffic: settled `used`, and another request in flight holding `held`
    book.totals[Book.period_key(tight_scope, T0)] = Totals(
        settled=Amounts(**{field_name: used}), held=Amounts(**{field_name: held}))
    first = book.reserve((k1, t), a, T0, "first")
    second = book.reserve((k2, t), a, T0, "second")
    assert isinstance(first, Reservation)
    assert isinstance(second, Denied) and (second.scope, second.dimension) == (tight_scope, dim)
    state = book.state(tight_scope, T0)
    assert state.used.get(dim) + state.held.get(dim) == used + held + need == tight_scope.limits.get(dim)
    assert first.hold.get(dim) == need


def test_one_token_less_of_room_admits_neither() -> None:
    k = scope("key", "k", tokens=10)
    book = Book()
    assert isinstance(book.reserve((k,), ask(10, 100), T0, "a"), Denied)
    assert isinstance(book.reserve((k,), ask(10, 100), T0, "b"), Denied)
    assert book.in_flight == {} and book.state(k, T0) == ScopeState()


# --- charge ----------------------------------------------------------------------------------------------------------

def charged(book: Book, res: Reservation, amounts: Amounts, now: float = T0) -> Reservation:
    """Charge, and the reservation as the book left it (Reservation is immutable)."""
    got = book.charge(res, amounts, now)
    assert isinstance(got, Reservation), got
    return got


def test_a_charge_below_the_hold_does_not_grow_it() -> None:
    k, t = scope("key", "k", tokens=1000), scope("team", "t", tokens=5000)
    book = Book()
    res = book.reserve((k, t), ask(100, 200), T0, "r")
    assert isinstance(res, Reservation) and res.hold == usage(100, 200)
    res = charged(book, res, usage(100, 50))
    assert res.hold == usage(100, 200) and res.charged == usage(100, 50)
    for s in (k, t):
        state = book.state(s, T0)
        assert state.used == usage(100, 50)
        assert state.held == usage(100, 200) - usage(100, 50)
        assert state.used + state.held == usage(100, 200)
    # charges are running totals: a later one replaces, never adds to, the earlier
    assert charged(book, res, usage(100, 120)).charged == usage(100, 120)
    assert book.state(k, T0).used == usage(100, 120) and book.state(k, T0).held == usage(0, 80, steps=0)


def test_a_charge_beyond_the_hold_grows_the_footprint_when_every_scope_has_room() -> None:
    k, t = scope("key", "k", tokens=1000), scope("team", "t", tokens=400)
    book = Book()
    res = book.reserve((k, t), ask(100, 200), T0, "r")
    assert isinstance(res, Reservation)
    res = charged(book, res, usage(100, 300))  # +100: the team's 400 is exactly full
    assert res.hold == usage(100, 300)
    for s in (k, t):
        assert book.state(s, T0) == ScopeState(usage(100, 300), ZERO, T0)


def test_a_charge_beyond_the_hold_is_refused_when_one_scope_lacks_room_and_changes_nothing() -> None:
    k, t = scope("key", "k", tokens=1000), scope("team", "t", tokens=399)
    book = Book()
    res = book.reserve((k, t), ask(100, 200), T0, "r")
    assert isinstance(res, Reservation)
    res = charged(book, res, usage(100, 150))
    before, before_res = snapshot(book), res_fields(res)
    denied = book.charge(res, usage(100, 300), T0)
    assert denied == Denied(t, "tokens", 399, 250, 50, 100)
    assert snapshot(book) == before and res_fields(res) == before_res


def test_growth_of_one_request_takes_room_from_the_others() -> None:
    t = scope("team", "t", output_tokens=300)
    a, b = scope("key", "a"), scope("key", "b")
    book = Book()
    r1 = book.reserve((a, t), ask(0, 100), T0, "r1")
    r2 = book.reserve((b, t), ask(0, 100), T0, "r2")
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    charged(book, r1, usage(0, 200))  # grows to 200: team now 200 + 100 = 300
    assert isinstance(book.charge(r2, usage(0, 101), T0), Denied)
    assert isinstance(book.reserve((a, t), ask(0, 100), T0, "r3"), Denied)


def test_growth_is_refused_once_the_wall_clock_is_spent() -> None:
    k = scope("key", "k", wall_clock=60.0)
    book = Book()
    res = book.reserve((k,), ask(10, 10), T0, "r")
    assert isinstance(res, Reservation) and res.deadline == T0 + 60
    charged(book, res, usage(10, 10), T0 + 60)        # within the hold: no decision needed
    charged(book, res, usage(10, 11), T0 + 59.5)
    assert book.charge(res, usage(10, 12), T0 + 60) == Denied(k, "wall_clock", 60.0, 60.0, 0, 0)


# --- settle ----------------------------------------------------------------------------------------------------------

def test_settle_replaces_the_footprint_by_the_actual_usage_and_is_idempotent() -> None:
    k, t = scope("key", "k", tokens=1000), scope("team", "t")
    book = Book()
    res = book.reserve((k, t), ask(100, 200), T0, "r")
    assert isinstance(res, Reservation)
    book.charge(res, usage(100, 50), T0)
    assert book.settle(res, usage(120, 80)) is True
    for s in (k, t):
        assert book.state(s, T0) == ScopeState(usage(120, 80), ZERO, T0)
    before = snapshot(book)
    assert book.settle(res, usage(500, 500)) is False
    assert snapshot(book) == before and book.in_flight == {}


def test_a_failed_call_settles_nothing_and_releases_the_hold() -> None:
    k = scope("key", "k", tokens=301, steps=1)
    book = Book()
    res = book.reserve((k,), ask(100, 200), T0, "r")
    assert isinstance(res, Reservation) and res.hold.tokens == 300
    assert book.reserve((k,), ask(0, 1), T0, "r2") == Denied(k, "steps", 1, 0, 1, 1)  # the step is held
    book.settle(res, ZERO)
    assert book.state(k, T0) == ScopeState(ZERO, ZERO, T0)
    assert isinstance(book.reserve((k,), ask(100, 200), T0, "r3"), Reservation)


def test_non_cuttable_usage_beyond_the_hold_is_the_only_overshoot() -> None:
    k = scope("key", "k", tokens=300)
    book = Book()
    res = book.reserve((k,), ask(100, 1000), T0, "r")
    assert isinstance(res, Reservation) and res.hold.tokens == 300
    book.settle(res, usage(130, 200))  # the input estimate was 30 low
    assert book.state(k, T0).used.tokens == 330
    assert isinstance(book.reserve((k,), ask(0, 1), T0, "r2"), Denied)


# --- wall clock ----------------------------------------------------------------------------------------------------

def test_the_wall_clock_starts_at_the_first_admitted_request() -> None:
    k = scope("key", "k", wall_clock=100.0, tokens=50)
    book = Book()
    assert isinstance(book.reserve((k,), ask(60, 10), T0, "denied"), Denied)
    assert book.state(k, T0).first_request_at is None  # a denied request starts no clock
    res = book.reserve((k,), ask(10, 10), T0 + 5, "r1")
    assert isinstance(res, Reservation) and res.deadline == T0 + 105
    assert book.state(k, T0 + 5).first_request_at == T0 + 5
    book.settle(res, usage(10, 10))
    res2 = book.reserve((k,), ask(1, 1), T0 + 50, "r2")
    assert isinstance(res2, Reservation) and res2.deadline == T0 + 105  # the clock does not restart
    assert book.state(k, T0 + 50).first_request_at == T0 + 5


def test_requests_are_denied_once_the_wall_clock_is_spent() -> None:
    k, t = scope("key", "k"), scope("team", "t", wall_clock=100.0)
    book = Book()
    assert isinstance(book.reserve((k, t), ask(), T0, "r1"), Reservation)
    assert isinstance(book.reserve((k, t), ask(), T0 + 99.99, "r2"), Reservation)
    assert book.reserve((k, t), ask(), T0 + 100, "r3") == Denied(t, "wall_clock", 100.0, 100.0, 0, 0)
    assert book.reserve((k, t), ask(), T0 + 500, "r4") == Denied(t, "wall_clock", 100.0, 500.0, 0, 0)


def test_the_wall_clock_restarts_with_the_period() -> None:
    k = scope("key", "k", "hour", wall_clock=600.0)
    book = Book()
    start = 1_718_002_800.0  # 07:00:00 UTC
    assert isinstance(book.reserve((k,), ask(), start + 10, "r1"), Reservation)
    assert isinstance(book.reserve((k,), ask(), start + 610, "r2"), Denied)
    assert isinstance(book.reserve((k,), ask(), start + HOUR, "r3"), Reservation)
    assert book.state(k, start + HOUR).first_request_at == start + HOUR


# --- reset -------------------------------------------------------------------------------------------------------------

def test_reset_zeroes_settled_usage_and_keeps_requests_in_flight_spending() -> None:
    k, t = scope("key", "k", tokens=1000, wall_clock=60.0), scope("team", "t", tokens=10_000)
    book = Book()
    done = book.reserve((k, t), ask(100, 300), T0, "done")
    assert isinstance(done, Reservation)
    book.settle(done, usage(100, 300))
    res = book.reserve((k, t), ask(100, 200), T0 + 10, "live")
    assert isinstance(res, Reservation)
    book.charge(res, usage(100, 50), T0 + 10)
    assert book.state(k, T0 + 10) == ScopeState(usage(200, 350, steps=2), usage(0, 150, steps=0), T0)

    book.reset(k, T0 + 70)
    # the settled 400 tokens are gone; the live request's 150 charged and 150 held stay
    assert book.state(k, T0 + 70) == ScopeState(usage(100, 50), usage(0, 150, steps=0), None)
    assert book.state(t, T0 + 70).used == usage(200, 350, steps=2)  # the team is untouched
    assert isinstance(book.reserve((k, t), ask(100, 100), T0 + 70, "after"), Reservation)  # clock restarted
    assert book.state(k, T0 + 70).first_request_at == T0 + 70

    book.charge(res, usage(100, 120), T0 + 70)
    book.settle(res, usage(100, 130))  # it settles normally: its whole actual usage counts
    assert book.state(k, T0 + 70).used == usage(100, 130)
    book.settle(book.in_flight["after"], usage(100, 100))
    assert book.state(k, T0 + 70) == ScopeState(usage(200, 230, steps=2), ZERO, T0 + 70)
    assert book.state(t, T0 + 70) == ScopeState(usage(300, 530, steps=3), ZERO, T0)


def test_reset_of_a_scope_without_history() -> None:
    k = scope("key", "k", "day", tokens=10)
    book = Book()
    book.reset(k, T0)
    assert book.state(k, T0) == ScopeState()


def test_reset_touches_only_the_current_period() -> None:
    k = scope("key", "k", "hour", tokens=1000)
    book = Book()
    start = 1_718_002_800.0  # 07:00:00 UTC
    old = book.reserve((k,), ask(10, 10), start - 10, "old")
    assert isinstance(old, Reservation)
    book.settle(old, usage(10, 10))
    book.reset(k, start + 10)
    assert book.state(k, start - 10) == ScopeState(usage(10, 10), ZERO, start - 10)


def test_settling_below_the_running_charge_after_a_reset_never_makes_used_negative() -> None:
    """A reset must not set settled = -charged: a request in flight across the reset that settled below
    its running (estimated) charge would leave `used` negative and let a later request past the limit."""
    k = scope("key", "k", tokens=100)
    book = Book()
    res = book.reserve((k,), ask(10, 90), T0, "r1")
    assert isinstance(res, Reservation)
    book.charge(res, usage(10, 50), T0)     # live estimate: 60 tokens
    book.reset(k, T0)
    book.settle(res, usage(10, 30))         # the provider reports 40: less than the estimate
    assert book.state(k, T0).used.tokens == 40
    nxt = book.reserve((k,), ask(10, 1000), T0, "r2")
    assert isinstance(nxt, Reservation) and nxt.hold.tokens == 60


def test_resets_never_let_admission_overspend() -> None:
    k = scope("key", "k", tokens=100)
    book = Book()
    res = book.reserve((k,), ask(10, 90), T0, "r1")
    assert isinstance(res, Reservation)
    book.charge(res, usage(10, 50), T0)
    book.reset(k, T0)
    book.settle(res, usage(10, 30))          # within its hold of 100
    big = book.reserve((k,), ask(10, 1000), T0, "r2")
    assert isinstance(big, Reservation)
    book.reset(k, T0)
    state = book.state(k, T0)
    assert state.used.tokens + state.held.tokens <= 100


# --- periods -------------------------------------------------------------------------------------------------------------

def test_period_rollover_gives_fresh_totals_and_old_requests_settle_in_their_period() -> None:
    k, t = scope("key", "k", "hour", tokens=600), scope("team", "t", "day", tokens=10_000)
    book = Book()
    start = 1_718_002_800.0  # 07:00:00 UTC
    res = book.reserve((k, t), ask(100, 400), start + 3000, "old")
    assert isinstance(res, Reservation) and res.period_starts == (start, 1_717_977_600.0)
    assert isinstance(book.reserve((k, t), ask(100, 1), start + 3599, "no-room"), Denied)

    later = start + HOUR + 1
    assert book.state(k, later) == ScopeState()  # a new hour: nothing used, held or started
    fresh = book.reserve((k, t), ask(100, 400), later, "new")
    assert isinstance(fresh, Reservation) and not fresh.admitted.clamped

    charged(book, res, usage(100, 450), later)  # grows in its own hour: 500 + 50 <= 600
    book.settle(res, usage(100, 450))
    assert book.state(k, start) == ScopeState(usage(100, 450), ZERO, start + 3000)
    assert book.state(k, later) == ScopeState(ZERO, usage(100, 400), later)
    assert book.state(t, later) == ScopeState(usage(100, 450), usage(100, 400), start + 3000)  # same day


def test_a_growth_in_the_old_period_is_checked_against_the_old_period() -> None:
    k = scope("key", "k", "hour", tokens=500)
    book = Book()
    start = 1_718_002_800.0
    res = book.reserve((k,), ask(100, 400), start + 10, "old")
    assert isinstance(res, Reservation)
    later = start + HOUR + 10
    assert isinstance(book.reserve((k,), ask(100, 400), later, "new"), Reservation)
    assert book.charge(res, usage(100, 401), later) == Denied(k, "tokens", 500, 0, 500, 1)


# --- MemoryStore --------------------------------------------------------------------------------------------------

def row(rid: str) -> UsageRow:
    return UsageRow(T0, "t", "k", "claude", "/v1/messages", 1, 0, 0, 0, 1, 0, 0, 1, 0.1, "completed", rid)


async def test_memory_store_mirrors_the_book() -> None:
    k, t = scope("key", "k", "day", tokens=2000), scope("team", "t", tokens=5000)
    store, book = MemoryStore(), Book()
    await store.open()
    await store.ping()

    # grows past its hold; grows in input only; within its hold; denied (room 915 < 1001)
    steps = [(ask(100, 800), usage(100, 900)), (ask(50, 800), usage(60, 10)), (ask(10, 5), usage(10, 5)),
             (ask(1000, 10), usage(0, 0))]
    for i, (a, charged) in enumerate(steps):
        got = await store.reserve((k, t), a, T0, f"r{i}")
        want = book.reserve((k, t), a, T0, f"r{i}")
        assert type(got) is type(want)
        if isinstance(want, Denied):
            assert got == want
            continue
        assert isinstance(got, Reservation)
        assert (got.hold, got.admitted, got.deadline, got.remaining) == (
            want.hold, want.admitted, want.deadline, want.remaining)
        assert await store.charge(got, charged, T0) == book.charge(want, charged, T0)
        assert await store.states((k, t), T0) == [book.state(k, T0), book.state(t, T0)]
        await store.settle(got, charged, row(f"r{i}"))
        book.settle(want, charged)
        await store.settle(got, charged, row(f"r{i}-again"))  # settled once, logged once
        assert await store.states((k, t), T0) == [book.state(k, T0), book.state(t, T0)]

    await store.reset(k, T0)
    book.reset(k, T0)
    assert await store.states((k, t), T0) == [book.state(k, T0), book.state(t, T0)]
    assert [r.request_id for r in await store.usage_log()] == ["r0", "r1", "r2"]
    assert [r.request_id for r in await store.usage_log(limit=2)] == ["r1", "r2"]
    await store.close()


async def test_memory_store_settle_without_a_row_logs_nothing() -> None:
    store = MemoryStore()
    res = await store.reserve((scope("key", "k"),), ask(), T0, "r")
    assert isinstance(res, Reservation)
    res = await store.settle(res, ZERO, None)
    assert await store.usage_log() == [] and res.settled
    assert await store.states((scope("key", "k"),), T0) == [ScopeState(ZERO, ZERO, T0)]


async def test_memory_store_keeps_a_bounded_usage_log_of_the_latest_rows() -> None:
    store = MemoryStore()
    k = scope("key", "k")
    total = 2 * MEMORY_LOG_ROWS + 5
    for i in range(total):
        res = await store.reserve((k,), ask(), T0, f"r{i}")
        assert isinstance(res, Reservation)
        await store.settle(res, ZERO, row(f"r{i}"))
    assert MEMORY_LOG_ROWS <= len(store.rows) <= 2 * MEMORY_LOG_ROWS
    assert [r.request_id for r in await store.usage_log(3)] == [f"r{total - 3}", f"r{total - 2}", f"r{total - 1}"]
    assert (await store.states((k,), T0))[0].used.steps == 0  # (ZERO settled: nothing charged, rows still logged)
