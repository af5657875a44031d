"""Unit tests of the pure budget decisions in proxy/ledger.py and the period arithmetic in proxy/periods.py.

A request is admitted (docs/budgets.md "Admission") only if every scope (key, then team) can cover its estimated
input plus one output token; its output hold is max_tokens clamped to what every scope can
cover (for cost: whole tokens the spare nanos buy at the output rate). A request in flight
may grow its footprint only when every scope has room for the growth.

Hypothesis examples: test_admit_matches_reference 600, test_check_growth_matches_reference 400,
test_period_bounds_contain_now 300.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ledger import (
    DIMENSIONS,
    METERED,
    ZERO,
    Admitted,
    Amounts,
    Ask,
    Denied,
    Limits,
    Scope,
    ScopeState,
    admit,
    check_growth,
    output_cost,
    remaining,
    wall_clock_deadline,
)
from proxy.periods import period_bounds
from proxy.usage import Usage

NOW = 1_700_000_000.0
LIMIT_FIELD = {"tokens": "tokens", "input_tokens": "input_tokens", "output_tokens": "output_tokens",
               "cost_usd": "cost_nanos", "steps": "steps", "wall_clock": "wall_clock"}


def key(**limits: int | float | None) -> Scope:
    return Scope("key", "ci-bot", "key:research/ci-bot", Limits(**limits), "none")


def team(**limits: int | float | None) -> Scope:
    return Scope("team", "research", "team:research", Limits(**limits), "none")


def amounts(dim: str, n: int) -> Amounts:
    return Amounts(**{("cost_nanos" if dim == "cost_usd" else dim): n})


def ask(input_tokens: int = 10, max_tokens: int = 100, input_cost: int = 0, rate: Decimal | str | int = 0) -> Ask:
    return Ask(input_tokens, input_cost, max_tokens, Decimal(rate))


def hold(input_tokens: int, out: int, input_cost: int = 0, rate: Decimal | str | int = 0, steps: int = 1) -> Amounts:
    """The hold docs/budgets.md "Admission" describes, in exact fractions (independently of ledger.output_cost)."""
    out_cost = math.ceil(Fraction(Decimal(rate)) * out)
    return Amounts(input_tokens + out, input_tokens, out, input_cost + out_cost, steps)


# --- admission: each dimension denies alone --------------------------------------------------------------

# (dimension, the ask, what it needs in that dimension)
SINGLE = [
    ("tokens", ask(input_tokens=30, max_tokens=500), 31),
    ("input_tokens", ask(input_tokens=30, max_tokens=500), 30),
    ("output_tokens", ask(input_tokens=30, max_tokens=500), 1),
    ("cost_usd", ask(input_tokens=30, max_tokens=500, input_cost=700, rate="2.5"), 703),  # 700 + ceil(2.5)
    ("steps", ask(input_tokens=30, max_tokens=500), 1),
]


@pytest.mark.parametrize(("dim", "the_ask", "need"), SINGLE, ids=[s[0] for s in SINGLE])
def test_each_metered_dimension_denies_alone_with_its_facts(dim: str, the_ask: Ask, need: int) -> None:
    used, held = 1000, 200
    scope = key(**{LIMIT_FIELD[dim]: used + held + need - 1})
    state = ScopeState(used=amounts(dim, used), held=amounts(dim, held))
    assert admit(the_ask, [(scope, state)], NOW) == Denied(scope, dim, used + held + need - 1, used, held, need)


@pytest.mark.parametrize(("dim", "the_ask", "need"), SINGLE, ids=[s[0] for s in SINGLE])
def test_each_metered_dimension_admits_when_room_is_exactly_the_need(dim: str, the_ask: Ask, need: int) -> None:
    used, held = 1000, 200
    scope = key(**{LIMIT_FIELD[dim]: used + held + need})
    state = ScopeState(used=amounts(dim, used), held=amounts(dim, held))
    decision = admit(the_ask, [(scope, state)], NOW)
    assert isinstance(decision, Admitted)
    if dim in ("input_tokens", "steps"):  # output does not count there: no clamp
        assert decision == Admitted(hold(30, 500, the_ask.input_cost_nanos, the_ask.output_nanos_per_token), 500, False)
    else:  # the room covers exactly one output token
        assert decision == Admitted(hold(30, 1, the_ask.input_cost_nanos, the_ask.output_nanos_per_token), 1, True)


def test_wall_clock_denies_once_elapsed_reaches_the_limit() -> None:
    scope = key(wall_clock=60.0)
    state = ScopeState(first_request_at=NOW - 60.0)
    assert admit(ask(), [(scope, state)], NOW) == Denied(scope, "wall_clock", 60.0, 60.0, 0, 0)
    assert admit(ask(), [(scope, state)], NOW + 5) == Denied(scope, "wall_clock", 60.0, 65.0, 0, 0)


def test_wall_clock_admits_just_before_the_limit_and_when_unstarted() -> None:
    scope = key(wall_clock=60.0)
    assert isinstance(admit(ask(), [(scope, ScopeState(first_request_at=NOW - 59.999))], NOW), Admitted)
    assert isinstance(admit(ask(), [(scope, ScopeState())], NOW), Admitted)


def test_wall_clock_of_zero_denies_even_an_unstarted_clock() -> None:
    scope = key(wall_clock=0.0)
    assert admit(ask(), [(scope, ScopeState())], NOW) == Denied(scope, "wall_clock", 0.0, 0.0, 0, 0)


def test_a_used_amount_already_past_the_limit_denies() -> None:
    scope = key(tokens=100)
    state = ScopeState(used=Amounts(tokens=130))
    assert admit(ask(input_tokens=0), [(scope, state)], NOW) == Denied(scope, "tokens", 100, 130, 0, 1)


def test_held_amounts_count_like_used_ones() -> None:
    scope = key(tokens=100)
    assert isinstance(admit(ask(input_tokens=9), [(scope, ScopeState(used=Amounts(tokens=90)))], NOW), Admitted)
    assert isinstance(admit(ask(input_tokens=9), [(scope, ScopeState(held=Amounts(tokens=90)))], NOW), Admitted)
    both = ScopeState(used=Amounts(tokens=45), held=Amounts(tokens=46))
    assert admit(ask(input_tokens=9), [(scope, both)], NOW) == Denied(scope, "tokens", 100, 45, 46, 10)


# --- admission: cost -----------------------------------------------------------------------------------------

def test_cost_denies_when_the_input_alone_does_not_fit() -> None:
    scope = key(cost_nanos=1000)
    decision = admit(ask(input_cost=1001, rate="0.5"), [(scope, ScopeState())], NOW)
    assert decision == Denied(scope, "cost_usd", 1000, 0, 0, 1002)  # input + ceil(0.5)


def test_cost_denies_when_the_spare_nanos_do_not_buy_one_output_token() -> None:
    scope = key(cost_nanos=1000)
    # spare = 1000 - 996 = 4 nanos; one output token costs 4.5
    decision = admit(ask(input_cost=996, rate="4.5"), [(scope, ScopeState())], NOW)
    assert decision == Denied(scope, "cost_usd", 1000, 0, 0, 1001)


def test_cost_clamps_to_the_floor_of_spare_over_rate() -> None:
    scope = key(cost_nanos=1000)
    # spare = 1000 - 100 - 50 = 850 nanos at 2.5 nanos/token buys exactly 340 tokens
    state = ScopeState(used=Amounts(cost_nanos=100), held=Amounts(cost_nanos=50))
    assert admit(ask(input_cost=0, rate="2.5", max_tokens=10_000), [(scope, state)], NOW) == Admitted(
        hold(10, 340, 0, "2.5"), 340, True)
    # a 1-nano remainder does not buy another token: 851 // 2.5 = 340
    state = ScopeState(used=Amounts(cost_nanos=99), held=Amounts(cost_nanos=50))
    decision = admit(ask(input_cost=0, rate="2.5", max_tokens=10_000), [(scope, state)], NOW)
    assert isinstance(decision, Admitted) and decision.output_tokens == 340


@pytest.mark.parametrize(("rate", "spare", "out"), [
    ("0.3", 10, 33),        # 33 x 0.3 = 9.9, 34 x 0.3 = 10.2
    ("3.75", 30, 8),        # exactly 30
    ("3.75", 29, 7),
    ("15000", 44_999, 2),   # Opus-like: $15/MTok
    ("0.000000001", 1, 10**9),       # a very cheap model: 1 nano buys 10^9 tokens
])
def test_cost_clamp_with_fractional_rates(rate: str, spare: int, out: int) -> None:
    scope = key(cost_nanos=500 + spare)
    decision = admit(ask(input_cost=500, rate=rate, max_tokens=10**10), [(scope, ScopeState())], NOW)
    assert decision == Admitted(hold(10, out, 500, rate), out, True)
    assert decision.hold.cost_nanos <= 500 + spare


def test_cost_clamp_does_not_exceed_max_tokens() -> None:
    scope = key(cost_nanos=10**9)
    assert admit(ask(input_cost=5, rate="3", max_tokens=64), [(scope, ScopeState())], NOW) == Admitted(
        hold(10, 64, 5, "3"), 64, False)


def test_unpriced_output_does_not_clamp_but_input_cost_still_must_fit() -> None:
    scope = key(cost_nanos=1000)
    assert admit(ask(input_cost=1000, rate=0, max_tokens=4096), [(scope, ScopeState())], NOW) == Admitted(
        hold(10, 4096, 1000, 0), 4096, False)
    assert admit(ask(input_cost=1001, rate=0), [(scope, ScopeState())], NOW) == Denied(
        scope, "cost_usd", 1000, 0, 0, 1001)


def test_unpriced_request_is_denied_when_cost_is_already_overspent() -> None:
    scope = key(cost_nanos=1000)
    state = ScopeState(used=Amounts(cost_nanos=1001))
    assert admit(ask(input_cost=0, rate=0), [(scope, state)], NOW) == Denied(scope, "cost_usd", 1000, 1001, 0, 0)


# --- admission: clamping and hold amounts ---------------------------------------------------------------------

def test_hold_is_input_plus_max_tokens_when_nothing_is_limited() -> None:
    decision = admit(ask(input_tokens=7, max_tokens=50, input_cost=123, rate="1.5"), [(key(), ScopeState())], NOW)
    assert decision == Admitted(Amounts(57, 7, 50, 123 + 75, 1), 50, False)


def test_hold_cost_rounds_the_output_cost_up() -> None:
    decision = admit(ask(input_tokens=7, max_tokens=10, input_cost=1, rate="0.333"), [(key(), ScopeState())], NOW)
    assert decision == Admitted(Amounts(17, 7, 10, 1 + 4, 1), 10, False)  # ceil(3.33) = 4


def test_unlimited_scopes_admit_whatever_is_used() -> None:
    huge = ScopeState(used=Amounts(10**12, 10**12, 10**12, 10**12, 10**6), held=Amounts(10**12, 0, 0, 0, 0),
                      first_request_at=0.0)
    decision = admit(ask(max_tokens=4096), [(key(), huge), (team(), huge)], NOW)
    assert decision == Admitted(hold(10, 4096), 4096, False)


def test_no_scopes_admits_unclamped() -> None:
    assert admit(ask(max_tokens=8), [], NOW) == Admitted(hold(10, 8), 8, False)


def test_tokens_room_clamps_output_to_room_minus_input() -> None:
    decision = admit(ask(input_tokens=100, max_tokens=1000), [(key(tokens=400), ScopeState())], NOW)
    assert decision == Admitted(hold(100, 300), 300, True)


def test_output_tokens_room_clamps_output() -> None:
    state = ScopeState(used=Amounts(output_tokens=70), held=Amounts(output_tokens=20))
    decision = admit(ask(input_tokens=100, max_tokens=1000), [(key(output_tokens=100), state)], NOW)
    assert decision == Admitted(hold(100, 10), 10, True)


def test_input_and_steps_room_never_clamp_output() -> None:
    decision = admit(ask(input_tokens=100, max_tokens=1000), [(key(input_tokens=100, steps=1), ScopeState())], NOW)
    assert decision == Admitted(hold(100, 1000), 1000, False)


def test_exactly_max_tokens_of_room_is_not_clamped() -> None:
    decision = admit(ask(input_tokens=10, max_tokens=90), [(key(tokens=100), ScopeState())], NOW)
    assert decision == Admitted(hold(10, 90), 90, False)


def test_clamp_takes_the_tightest_dimension_across_all_scopes() -> None:
    the_ask = ask(input_tokens=100, max_tokens=1000, input_cost=200, rate="2")
    scopes = [
        (key(tokens=900, output_tokens=700), ScopeState()),                       # caps 800 and 700
        (team(cost_nanos=200 + 2 * 650 + 1, tokens=10**6), ScopeState()),          # cap 650
    ]
    assert admit(the_ask, scopes, NOW) == Admitted(hold(100, 650, 200, "2"), 650, True)
    # the key is the tighter one when its output room is lower
    scopes[0] = (key(tokens=900, output_tokens=600), ScopeState())
    assert admit(the_ask, scopes, NOW) == Admitted(hold(100, 600, 200, "2"), 600, True)


def test_admission_needs_input_plus_one_output_token() -> None:
    scope = key(tokens=50)
    assert admit(ask(input_tokens=49, max_tokens=4096), [(scope, ScopeState())], NOW) == Admitted(
        hold(49, 1), 1, True)
    assert admit(ask(input_tokens=50, max_tokens=4096), [(scope, ScopeState())], NOW) == Denied(
        scope, "tokens", 50, 0, 0, 51)


# --- admission: deny order ---------------------------------------------------------------------------------------

def all_spent(scope_fn) -> tuple[Scope, ScopeState]:
    """A scope where every one of the six dimensions denies on its own."""
    scope = scope_fn(tokens=100, input_tokens=100, output_tokens=100, cost_nanos=100, steps=3, wall_clock=60.0)
    state = ScopeState(used=Amounts(100, 100, 100, 100, 3), first_request_at=NOW - 61)
    return scope, state


@pytest.mark.parametrize("first", range(len(DIMENSIONS)), ids=list(DIMENSIONS))
def test_within_a_scope_the_first_denying_dimension_in_spec_order_is_named(first: int) -> None:
    scope, state = all_spent(key)
    lifted = {LIMIT_FIELD[d]: None for d in DIMENSIONS[:first]}
    scope = Scope(scope.kind, scope.name, scope.id,
                  Limits(**{**{LIMIT_FIELD[d]: scope.limits.get(d) for d in DIMENSIONS}, **lifted}), scope.period)
    decision = admit(ask(input_cost=1, rate="1"), [(scope, state)], NOW)
    assert isinstance(decision, Denied)
    assert decision.dimension == DIMENSIONS[first]


def test_key_scope_is_named_before_team_scope() -> None:
    k, ks = all_spent(key)
    t, ts = all_spent(team)
    decision = admit(ask(), [(k, ks), (t, ts)], NOW)
    assert isinstance(decision, Denied) and (decision.scope, decision.dimension) == (k, "tokens")


def test_a_later_key_dimension_wins_over_an_earlier_team_dimension() -> None:
    k = key(steps=3)
    t = team(tokens=5)
    decision = admit(ask(), [(k, ScopeState(used=Amounts(steps=3))), (t, ScopeState())], NOW)
    assert decision == Denied(k, "steps", 3, 3, 0, 1)


def test_key_wall_clock_wins_over_team_tokens() -> None:
    k = key(wall_clock=10.0)
    t = team(tokens=5)
    decision = admit(ask(), [(k, ScopeState(first_request_at=NOW - 10)), (t, ScopeState())], NOW)
    assert decision == Denied(k, "wall_clock", 10.0, 10.0, 0, 0)


def test_team_denies_when_the_key_admits() -> None:
    k = key(tokens=10**6)
    t = team(tokens=100)
    decision = admit(ask(input_tokens=10), [(k, ScopeState()), (t, ScopeState(used=Amounts(tokens=90)))], NOW)
    assert decision == Denied(t, "tokens", 100, 90, 0, 11)


def test_a_key_clamp_that_the_team_cannot_cover_still_denies_on_the_team() -> None:
    k = key(tokens=500)
    t = team(output_tokens=0)
    decision = admit(ask(input_tokens=10), [(k, ScopeState()), (t, ScopeState())], NOW)
    assert decision == Denied(t, "output_tokens", 0, 0, 0, 1)


# --- admission: a reference model -------------------------------------------------------------------------------

RATES = [Decimal(0), Decimal(1), Decimal("0.3"), Decimal("2.5"), Decimal("3.75"), Decimal(15), Decimal("0.001")]


def opt(lo: int, hi: int) -> st.SearchStrategy[int | None]:
    return st.none() | st.integers(lo, hi)


limits_st = st.builds(Limits, tokens=opt(0, 3000), input_tokens=opt(0, 2000), output_tokens=opt(0, 2000),
                      cost_nanos=opt(0, 20_000), steps=opt(0, 5),
                      wall_clock=st.none() | st.sampled_from([0.0, 30.0, 60.0, 3600.0]))
amounts_st = st.builds(Amounts, st.integers(0, 2000), st.integers(0, 1500), st.integers(0, 1500),
                       st.integers(0, 15_000), st.integers(0, 5))
state_st = st.builds(ScopeState, amounts_st, amounts_st, st.none() | st.sampled_from([NOW, NOW - 30, NOW - 3600]))
ask_st = st.builds(Ask, st.integers(0, 1500), st.integers(0, 5000), st.integers(0, 3000), st.sampled_from(RATES))


def fits(scope: Scope, state: ScopeState, amount: Amounts, growth: bool = False) -> str | None:
    """The first metered dimension (in dimension order) of `scope` in which `amount` does not fit, if any.
    For growth, a dimension that does not grow is not checked (it may already be over from settlements)."""
    for dim in METERED:
        limit = scope.limits.get(dim)
        if growth and amount.get(dim) <= 0:
            continue
        if limit is not None and state.used.get(dim) + state.held.get(dim) + amount.get(dim) > limit:
            return dim
    return None


def clock_spent(scope: Scope, state: ScopeState, now: float) -> bool:
    """Spent once the time since the period's first request reaches the limit (an unstarted clock is at 0)."""
    wc = scope.limits.wall_clock
    elapsed = 0.0 if state.first_request_at is None else max(0.0, now - state.first_request_at)
    return wc is not None and elapsed >= wc


def first_denial(pairs: list[tuple[Scope, ScopeState]], amount: Amounts, now: float,
                 growth: bool = False) -> tuple[Scope, str] | None:
    """The first scope (in order) that refuses `amount`, and the dimension: a metered one it does not
    fit in, else wall_clock where the scope's clock is spent."""
    for scope, state in pairs:
        dim = fits(scope, state, amount, growth)
        if dim is None and clock_spent(scope, state, now):
            dim = "wall_clock"
        if dim is not None:
            return scope, dim
    return None


def needed(amount: Amounts, dim: str) -> int:
    """What a denial on `dim` reports as needed (nothing for the wall clock)."""
    return 0 if dim == "wall_clock" else amount.get(dim)


def reference_admit(a: Ask, pairs: list[tuple[Scope, ScopeState]], now: float) -> tuple:
    """('denied', scope, dim, needed) or ('admitted', out): largest out <= max_tokens whose hold fits everywhere."""
    need_out = min(1, a.max_tokens)
    minimal = hold(a.input_tokens, need_out, a.input_cost_nanos, a.output_nanos_per_token)
    denial = first_denial(pairs, minimal, now)
    if denial is not None:
        return ("denied", *denial, needed(minimal, denial[1]))
    lo, hi = need_out, a.max_tokens  # fits(lo) holds; find the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        h = hold(a.input_tokens, mid, a.input_cost_nanos, a.output_nanos_per_token)
        if all(fits(s, st_, h) is None for s, st_ in pairs):
            lo = mid
        else:
            hi = mid - 1
    return ("admitted", lo)


@settings(max_examples=400, deadline=None)
@given(a=ask_st, key_limits=limits_st, key_state=state_st, team_limits=limits_st, team_state=state_st,
       with_team=st.booleans())
def test_admit_matches_reference(a: Ask, key_limits: Limits, key_state: ScopeState, team_limits: Limits,
                                 team_state: ScopeState, with_team: bool) -> None:
    pairs = [(Scope("key", "k", "key:t/k", key_limits, "none"), key_state)]
    if with_team:
        pairs.append((Scope("team", "t", "team:t", team_limits, "none"), team_state))
    expected = reference_admit(a, pairs, NOW)
    decision = admit(a, pairs, NOW)
    if expected[0] == "denied":
        _, scope, dim, needed = expected
        assert isinstance(decision, Denied)
        assert (decision.scope, decision.dimension) == (scope, dim)
        assert decision.limit == scope.limits.get(dim)
        state = dict(pairs)[scope]
        if dim == "wall_clock":
            assert (decision.used, decision.held, decision.needed) == (state.wall_clock_used(NOW), 0, 0)
        else:
            assert (decision.used, decision.held, decision.needed) == (state.used.get(dim), state.held.get(dim), needed)
    else:
        out = expected[1]
        assert decision == Admitted(hold(a.input_tokens, out, a.input_cost_nanos, a.output_nanos_per_token),
                                    out, out < a.max_tokens)
        for scope, state in pairs:  # never overspent by admission
            assert fits(scope, state, decision.hold) is None


def test_output_cost_is_the_ceiling() -> None:
    assert output_cost(0, Decimal("2.5")) == 0
    assert output_cost(3, Decimal("2.5")) == 8
    assert output_cost(4, Decimal("2.5")) == 10
    assert output_cost(10, Decimal(0)) == 0


# --- growth of a request in flight ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", METERED)
def test_each_dimension_refuses_growth_alone(dim: str) -> None:
    scope = key(**{LIMIT_FIELD[dim]: 100})
    state = ScopeState(used=amounts(dim, 60), held=amounts(dim, 30))
    assert check_growth(amounts(dim, 11), [(scope, state)], NOW) == Denied(scope, dim, 100, 60, 30, 11)
    assert check_growth(amounts(dim, 10), [(scope, state)], NOW) is None  # exactly fills the limit


def test_growth_in_dimensions_not_growing_is_not_checked() -> None:
    scope = key(tokens=100, input_tokens=5)
    state = ScopeState(used=Amounts(tokens=50, input_tokens=500))  # input already overspent
    assert check_growth(Amounts(tokens=10, input_tokens=0), [(scope, state)], NOW) is None
    assert check_growth(Amounts(tokens=10, input_tokens=-3), [(scope, state)], NOW) is None


def test_growth_deny_order_key_before_team_and_spec_order_within() -> None:
    k = key(tokens=10, cost_nanos=10, steps=1)
    t = team(tokens=10, input_tokens=10)
    full = ScopeState(used=Amounts(10, 10, 10, 10, 1))
    g = Amounts(1, 1, 1, 1, 1)
    assert check_growth(g, [(k, full), (t, full)], NOW) == Denied(k, "tokens", 10, 10, 0, 1)
    assert check_growth(Amounts(cost_nanos=1, steps=1, input_tokens=1), [(k, full), (t, full)], NOW) == Denied(
        k, "cost_usd", 10, 10, 0, 1)
    assert check_growth(Amounts(input_tokens=1), [(k, full), (t, full)], NOW) == Denied(
        t, "input_tokens", 10, 10, 0, 1)


def test_growth_refused_by_team_when_key_has_room() -> None:
    k, t = key(tokens=1000), team(tokens=100)
    state = ScopeState(used=Amounts(tokens=95))
    assert check_growth(Amounts(tokens=6), [(k, state), (t, state)], NOW) == Denied(t, "tokens", 100, 95, 0, 6)


def test_growth_refused_once_wall_clock_is_spent() -> None:
    scope = key(wall_clock=30.0)
    assert check_growth(Amounts(tokens=1), [(scope, ScopeState(first_request_at=NOW - 30))], NOW) == Denied(
        scope, "wall_clock", 30.0, 30.0, 0, 0)
    assert check_growth(Amounts(tokens=1), [(scope, ScopeState(first_request_at=NOW - 29))], NOW) is None


def test_growth_is_unbounded_in_unlimited_scopes() -> None:
    big = Amounts(10**9, 10**9, 10**9, 10**12, 10)
    assert check_growth(big, [(key(), ScopeState(used=big)), (team(), ScopeState(held=big))], NOW) is None


growth_st = st.builds(Amounts, st.integers(-50, 500), st.integers(-50, 500), st.integers(-50, 500),
                      st.integers(-50, 5000), st.integers(-1, 1))


@settings(max_examples=400, deadline=None)
@given(g=growth_st, key_limits=limits_st, key_state=state_st, team_limits=limits_st, team_state=state_st)
def test_check_growth_matches_reference(g: Amounts, key_limits: Limits, key_state: ScopeState,
                                        team_limits: Limits, team_state: ScopeState) -> None:
    pairs = [(Scope("key", "k", "key:t/k", key_limits, "none"), key_state),
             (Scope("team", "t", "team:t", team_limits, "none"), team_state)]
    positive = g.nonneg()
    denial = first_denial(pairs, positive, NOW, growth=True)
    expected = None if denial is None else (*denial, needed(positive, denial[1]))
    denied = check_growth(g, pairs, NOW)
    if expected is None:
        assert denied is None
        for scope, state in pairs:  # accepted growth keeps used + held <= limit where it grows
            assert fits(scope, state, positive, growth=True) is None
    else:
        assert denied is not None
        assert (denied.scope, denied.dimension, denied.needed) == expected


# --- deadlines and remaining ------------------------------------------------------------------------------------

def test_wall_clock_deadline_is_the_earliest_across_scopes() -> None:
    k, t = key(wall_clock=100.0), team(wall_clock=50.0)
    assert wall_clock_deadline([(k, ScopeState(first_request_at=NOW - 10)), (t, ScopeState())], NOW) == NOW + 50
    assert wall_clock_deadline([(k, ScopeState(first_request_at=NOW - 80)), (t, ScopeState())], NOW) == NOW + 20
    assert wall_clock_deadline([(key(), ScopeState()), (team(tokens=5), ScopeState())], NOW) is None


def test_remaining_never_goes_below_zero() -> None:
    scope = key(tokens=100, cost_nanos=50, wall_clock=60.0)
    state = ScopeState(used=Amounts(tokens=70, cost_nanos=60), held=Amounts(tokens=20), first_request_at=NOW - 70)
    assert remaining(scope, state, NOW) == {"tokens": 10, "cost_usd": 0, "wall_clock": 0.0}
    assert remaining(key(), ScopeState(), NOW) == {}


def test_amounts_arithmetic() -> None:
    a, b = Amounts(5, 1, 4, 10, 1), Amounts(3, 2, 1, 20, 0)
    assert a + b == Amounts(8, 3, 5, 30, 1)
    assert a - b == Amounts(2, -1, 3, -10, 1)
    assert a.max(b) == Amounts(5, 2, 4, 20, 1)
    assert (a - b).nonneg() == Amounts(2, 0, 3, 0, 1)
    assert ZERO == Amounts() == (0,) * len(Amounts._fields) and a.within(a + b) and not (a + b).within(a)
    assert Amounts.of_usage(Usage(input_tokens=7, output_tokens=3), 10, 1) == Amounts(10, 7, 3, 10, 1)
    assert a.get("cost_usd") == 10


# --- periods ------------------------------------------------------------------------------------------------------

def ts(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(("period", "now", "start", "end"), [
    ("hour", ts(2024, 3, 10, 13, 45, 12), ts(2024, 3, 10, 13), ts(2024, 3, 10, 14)),
    ("hour", ts(2024, 12, 31, 23, 59, 59), ts(2024, 12, 31, 23), ts(2025, 1, 1)),
    ("day", ts(2024, 3, 10, 13, 45), ts(2024, 3, 10), ts(2024, 3, 11)),
    ("day", ts(2024, 2, 28, 23, 59), ts(2024, 2, 28), ts(2024, 2, 29)),  # leap day follows
    ("week", ts(2024, 5, 15, 9), ts(2024, 5, 13), ts(2024, 5, 20)),   # Wednesday -> Monday
    ("week", ts(2024, 5, 13), ts(2024, 5, 13), ts(2024, 5, 20)),      # Monday 00:00 starts its own week
    ("week", ts(2024, 5, 19, 23, 59, 59), ts(2024, 5, 13), ts(2024, 5, 20)),  # Sunday night
    ("week", ts(2024, 12, 31, 12), ts(2024, 12, 30), ts(2025, 1, 6)),  # across the new year
    ("month", ts(2024, 5, 15, 9), ts(2024, 5, 1), ts(2024, 6, 1)),
    ("month", ts(2023, 12, 31, 23, 59, 59), ts(2023, 12, 1), ts(2024, 1, 1)),  # December -> January
    ("month", ts(2024, 2, 29, 12), ts(2024, 2, 1), ts(2024, 3, 1)),   # leap February: 29 days
    ("month", ts(2023, 2, 14), ts(2023, 2, 1), ts(2023, 3, 1)),       # ordinary February: 28 days
    ("month", ts(2024, 1, 31, 23), ts(2024, 1, 1), ts(2024, 2, 1)),
])
def test_period_bounds(period: str, now: float, start: float, end: float) -> None:
    assert period_bounds(period, now) == (start, end)


def test_leap_and_ordinary_february_lengths() -> None:
    s, e = period_bounds("month", ts(2024, 2, 10))
    assert e - s == 29 * 86400
    s, e = period_bounds("month", ts(2023, 2, 10))
    assert e - s == 28 * 86400
    s, e = period_bounds("month", ts(2100, 2, 10))  # divisible by 100, not 400: not a leap year
    assert e - s == 28 * 86400


@pytest.mark.parametrize("period", ["hour", "day", "week", "month"])
def test_the_end_of_a_period_belongs_to_the_next(period: str) -> None:
    start, end = period_bounds(period, ts(2024, 12, 31, 23, 30))
    assert end is not None
    assert period_bounds(period, end)[0] == end
    assert period_bounds(period, end - 0.001) == (start, end)


def test_period_none_is_forever() -> None:
    assert period_bounds("none", NOW) == (0.0, None)


def test_unknown_period_is_an_error() -> None:
    with pytest.raises(ValueError, match="fortnight"):
        period_bounds("fortnight", NOW)


@settings(max_examples=300, deadline=None)
@given(micros=st.integers(0, 4_102_444_800 * 10**6) | st.integers(1, 1_139_568).map(lambda h: h * 3600 * 10**6),
       period=st.sampled_from(["hour", "day", "week", "month"]),
       jitter=st.sampled_from([0.0, 1e-7, -1e-7, 0.4e-6, -0.4e-6]))
def test_period_bounds_contain_now(micros: int, period: str, jitter: float) -> None:
    # any instant, or one near an hour boundary (every period starts on one) give or take < 1 us
    now = max(0.0, micros / 10**6 + jitter)
    start, end = period_bounds(period, now)
    assert end is not None and start <= now < end
    s = datetime.fromtimestamp(start, timezone.utc)
    assert (s.minute, s.second, s.microsecond) == (0, 0, 0)
    if period != "hour":
        assert s.hour == 0
    if period == "week":
        assert s.weekday() == 0 and end - start == 7 * 86400
    if period == "month":
        assert s.day == 1 and 28 * 86400 <= end - start <= 31 * 86400


@pytest.mark.parametrize("period", ["hour", "day", "week", "month"])
def test_a_timestamp_just_before_a_boundary_is_in_the_earlier_period(period: str) -> None:
    """fromtimestamp rounds to the nearest microsecond: an instant < 0.5 us before a boundary must not
    be put in the next period."""
    boundary = ts(2024, 1, 1)  # a Monday: every period starts here
    now = math.nextafter(boundary, 0.0)  # about 2e-7 s earlier
    start, end = period_bounds(period, now)
    assert start <= now < end == boundary
