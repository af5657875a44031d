"""One contract suite for every ledger store (memory, SQLite, Redis): the same test functions, the
store as a parametrized fixture, as uvicorn runs one suite over its HTTP implementations.

The reference is the pure ledger: every store must make exactly the decisions of `ledger.admit` /
`ledger.check_growth` on the state it holds (`test_agrees_with_the_reference_book` runs random
operations in lockstep with the in-process Book). Redis runs against 127.0.0.1:6379, DB 13, each
test under a fresh key prefix deleted afterwards; without Redis the Redis cases skip, unless
BUDGET_PROXY_REQUIRE_REDIS is set (CI), when they fail. Redis-only behaviour (expiry, renewal,
outages, key lifetimes) is at the end. tests/test_dimensions.py runs the whole suite once more with
a dimension added to the declaration (proxy/dimensions.py): amounts are written with A(), which
gives any dimension past the standard five the steps' figure (the added one counts as steps do).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, AsyncIterator, Iterator

import pytest
import redis

from proxy.errors import StoreUnavailable
from proxy.ledger import ZERO, Admitted, Amounts, Ask, Denied, Limits, Scope, ScopeState, admit
from proxy.store import open_store
from tests.harness import require_redis as harness_require_redis
from proxy.store.base import Reservation, UsageRow
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore

REDIS_DB = 13
T0 = 1_718_000_000.0  # 2024-06-10 06:13:20 UTC, a Monday
HOUR, DAY = 3600.0, 86400.0
ids = (f"req_{i}" for i in itertools.count())


def require_redis() -> redis.Redis:
    return harness_require_redis(REDIS_DB)


@dataclass
class Namespace:
    """One test's keys in the test DB: a fresh prefix, deleted afterwards. (Not FLUSHDB: that would
    erase the keys of a test running at the same time in another process.)"""

    client: redis.Redis
    prefix: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:6379/{REDIS_DB}?prefix={self.prefix}"

    def key(self, suffix: str) -> str:
        return self.prefix + suffix


@pytest.fixture
def rns() -> Iterator[Namespace]:
    ns = Namespace(require_redis(), f"bp-test-{uuid.uuid4().hex[:12]}:")
    yield ns
    for k in ns.client.scan_iter(match=ns.prefix + "*", count=1000):
        ns.client.delete(k)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = MemoryStore()
    elif request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "ledger.db"))
    else:
        s = open_store(request.getfixturevalue("rns").url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def scope(kind: str, name: str, period: str = "none", **limits: int | float | None) -> Scope:
    return Scope(kind, name, f"{kind}:{name}", Limits(**limits), period)


def key(period: str = "none", **limits: int | float | None) -> Scope:
    return scope("key", "t/k", period, **limits)


def team(period: str = "none", **limits: int | float | None) -> Scope:
    return scope("team", "t", period, **limits)


def ask(input_tokens: int = 10, max_tokens: int = 100, input_cost: int = 0, rate: Decimal | str | int = 0) -> Ask:
    return Ask(input_tokens, input_cost, max_tokens, Decimal(rate))


def A(tokens: int = 0, input_tokens: int = 0, output_tokens: int = 0, cost_nanos: int = 0, steps: int = 0) -> Amounts:
    """Amounts in the standard dimensions; any dimension declared after them counts as steps do."""
    return Amounts(tokens, input_tokens, output_tokens, cost_nanos, steps, *[steps] * (len(Amounts._fields) - 5))


def amounts(tokens_in: int, tokens_out: int, cost: int = 0, steps: int = 1) -> Amounts:
    return A(tokens_in + tokens_out, tokens_in, tokens_out, cost, steps)


def row(request_id: str, now: float = T0, out: int = 0) -> UsageRow:
    return UsageRow(now, "t", "k", "claude-x", "/v1/messages", 10, 0, 0, 0, out, 0, 123, 1, 0.25, "completed",
                    request_id)


async def reserve(store: Any, scopes: list[Scope], a: Ask, now: float = T0) -> Reservation:
    res = await store.reserve(scopes, a, now, next(ids))
    assert isinstance(res, Reservation), res
    return res


async def charge(store: Any, res: Reservation, c: Amounts, now: float = T0) -> Reservation:
    """Charge and return the reservation as the store left it (Reservation is immutable)."""
    got = await store.charge(res, c, now)
    assert isinstance(got, Reservation), got
    return got


async def state(store: Any, s: Scope, now: float = T0) -> ScopeState:
    return (await store.states([s], now))[0]


# --- admission ---------------------------------------------------------------------------------------------------

async def test_admits_with_a_hold_of_input_plus_max_tokens(store: Any) -> None:
    k, t = key(tokens=10_000), team()
    res = await reserve(store, [k, t], ask(100, 500))
    assert res.admitted == Admitted(A(600, 100, 500, 0, 1), 500, False)
    assert res.hold == res.admitted.hold and res.charged == ZERO and not res.settled
    assert res.remaining == {"tokens": 9_400}
    for s in (k, t):
        assert await state(store, s) == ScopeState(ZERO, A(600, 100, 500, 0, 1), T0)


async def test_remaining_is_the_tightest_across_scopes_after_admission(store: Any) -> None:
    res = await reserve(store, [key(tokens=5_000, steps=9), team(tokens=1_000, cost_nanos=10**6)], ask(10, 100))
    assert res.remaining == {"tokens": 890, "steps": 8, "cost_usd": 10**6}


@pytest.mark.parametrize("limits, dim", [
    ({"tokens": 50, "input_tokens": 50, "output_tokens": 0, "cost_nanos": 0, "steps": 0}, "tokens"),
    ({"input_tokens": 50, "output_tokens": 0, "cost_nanos": 0, "steps": 0}, "input_tokens"),
    ({"output_tokens": 0, "cost_nanos": 0, "steps": 0}, "output_tokens"),
    ({"cost_nanos": 99, "steps": 0}, "cost_usd"),
    ({"steps": 0, "wall_clock": 0.0}, "steps"),
    ({"wall_clock": 0.0}, "wall_clock"),
])
async def test_within_a_scope_the_first_denying_dimension_in_spec_order_is_named(store: Any, limits: dict,
                                                                                  dim: str) -> None:
    k = key(**limits)
    denied = await store.reserve([k, team()], ask(100, 10, input_cost=100), T0, next(ids))
    assert isinstance(denied, Denied) and (denied.scope, denied.dimension) == (k, dim)


async def test_key_is_named_before_team_and_a_denial_changes_nothing(store: Any) -> None:
    k, t = key(steps=1), team(tokens=100)
    denied = await store.reserve([k, t], ask(200, 10), T0, next(ids))
    assert isinstance(denied, Denied) and denied.scope == t and denied.dimension == "tokens"
    assert (denied.limit, denied.used, denied.held, denied.needed) == (100, 0, 0, 201)
    await reserve(store, [k, team(tokens=1_000)], ask(10, 10))
    denied = await store.reserve([k, t], ask(200, 10), T0, next(ids))
    assert isinstance(denied, Denied) and denied.scope == k and denied.dimension == "steps"
    assert (denied.limit, denied.used, denied.held, denied.needed) == (1, 0, 1, 1)
    assert (await state(store, t)).held == A(20, 10, 10, 0, 1)  # only the admitted request holds


async def test_needs_the_input_plus_one_output_token(store: Any) -> None:
    k = key(tokens=101)
    assert isinstance(await store.reserve([k], ask(101, 10), T0, next(ids)), Denied)
    res = await reserve(store, [k], ask(100, 10))
    assert res.admitted == Admitted(A(101, 100, 1, 0, 1), 1, True)


@pytest.mark.parametrize("limits, the_ask", [
    ({"tokens": 1_000}, ask(100, 2_000)),
    ({"output_tokens": 333}, ask(100, 2_000)),
    ({"cost_nanos": 1_000_000}, ask(100, 10**6, input_cost=300, rate="3.75")),
    ({"cost_nanos": 7_777_777}, ask(10, 10**7, input_cost=31, rate="0.3")),
    ({"cost_nanos": 10**13 + 7}, ask(1, 10**12, input_cost=3, rate="15.000000001")),
    ({"cost_nanos": 5 * 10**14 + 3}, ask(0, 10**15, input_cost=0, rate="0.123456789")),
    ({"cost_nanos": 123_456}, ask(5, 10**6, input_cost=1, rate="0.000000007")),
    ({"cost_nanos": 500, "tokens": 90}, ask(5, 1_000, input_cost=0, rate="2.5")),
    ({"cost_nanos": 1_000}, ask(5, 1_000, input_cost=999, rate=0)),
])
async def test_clamps_exactly_like_the_ledger(store: Any, limits: dict, the_ask: Ask) -> None:
    k = key(**limits)
    expected = admit(the_ask, [(k, ScopeState())], T0)
    res = await reserve(store, [k], the_ask)
    assert res.admitted == expected
    if the_ask.output_nanos_per_token:
        rate = Fraction(the_ask.output_nanos_per_token)
        assert res.hold.cost_nanos == the_ask.input_cost_nanos + math.ceil(res.admitted.output_tokens * rate)


async def test_wall_clock_runs_from_the_first_request_of_the_period(store: Any) -> None:
    k = key(wall_clock=60.0)
    res = await reserve(store, [k], ask())
    assert res.deadline == T0 + 60
    assert (await reserve(store, [k], ask(), T0 + 59.5)).deadline == T0 + 60
    denied = await store.reserve([k], ask(), T0 + 60, next(ids))
    assert isinstance(denied, Denied) and denied.dimension == "wall_clock" and denied.used == 60.0


# --- charge ------------------------------------------------------------------------------------------------------

async def test_charges_within_the_hold_move_held_to_used(store: Any) -> None:
    k = key(tokens=1_000)
    res = await charge(store, await reserve(store, [k], ask(100, 400)), amounts(100, 50))
    assert res.hold == A(500, 100, 400, 0, 1) and res.charged == amounts(100, 50)
    assert await state(store, k) == ScopeState(amounts(100, 50), A(350, 0, 350, 0, 0), T0)


async def test_charges_past_the_hold_grow_it_when_every_scope_has_room(store: Any) -> None:
    k, t = key(tokens=1_000), team(tokens=700)
    res = await charge(store, await reserve(store, [k, t], ask(100, 400)), amounts(100, 550))
    assert res.hold == A(650, 100, 550, 0, 1) and res.charged == amounts(100, 550)
    for s in (k, t):
        assert await state(store, s) == ScopeState(amounts(100, 550), ZERO, T0)


async def test_growth_is_refused_without_changing_anything(store: Any) -> None:
    k, t = key(tokens=1_000), team(tokens=700)
    res = await reserve(store, [k, t], ask(100, 400))
    await reserve(store, [k, t], ask(100, 100))  # the team has 0 left
    before = await store.states([k, t], T0)
    denied = await store.charge(res, amounts(100, 401), T0)
    assert isinstance(denied, Denied) and denied.scope == t and denied.dimension == "tokens"
    assert (denied.limit, denied.used, denied.held, denied.needed) == (700, 0, 700, 1)
    assert await store.states([k, t], T0) == before
    grown = await charge(store, res, amounts(100, 400))  # within the hold: as if nothing had been refused
    assert grown.hold == A(500, 100, 400, 0, 1) and grown.charged == amounts(100, 400)


async def test_the_store_keeps_its_own_account_of_a_reservation(store: Any) -> None:
    """A caller holding a stale copy (an earlier charge's answer lost) never makes the store count twice."""
    k = key(tokens=1_000)
    first = await reserve(store, [k], ask(100, 400))
    await charge(store, first, amounts(100, 450))
    again = await charge(store, first, amounts(100, 460))  # from the copy of before the first charge
    assert again.hold == amounts(100, 460) and again.charged == amounts(100, 460)
    assert await state(store, k) == ScopeState(amounts(100, 460), ZERO, T0)
    await store.settle(first, amounts(100, 470), None)
    assert await state(store, k) == ScopeState(amounts(100, 470), ZERO, T0)


async def test_charge_after_settle_is_a_no_op(store: Any) -> None:
    k = key(tokens=1_000)
    res = await reserve(store, [k], ask(10, 10))
    done = await store.settle(res, amounts(10, 5), None)
    assert done == res.as_settled()
    assert await store.charge(done, amounts(500, 500), T0) == done
    assert await store.charge(res, amounts(500, 500), T0) == res  # (an unsettled copy: the store knows)
    assert (await state(store, k)).used == amounts(10, 5)


# --- settle ------------------------------------------------------------------------------------------------------

async def test_settle_charges_the_actual_usage_and_releases_the_rest(store: Any) -> None:
    k, t = key(tokens=1_000), team()
    res = await reserve(store, [k, t], ask(100, 400))
    res = await charge(store, res, amounts(100, 300, 7))
    res = await store.settle(res, amounts(90, 250, 5), row(res.id))
    assert res.settled
    for s in (k, t):
        assert await state(store, s) == ScopeState(amounts(90, 250, 5), ZERO, T0)


async def test_settle_is_exactly_once(store: Any) -> None:
    k = key(tokens=1_000)
    res = await reserve(store, [k], ask(100, 400))
    await store.settle(res, amounts(100, 10), row(res.id))
    await store.settle(res, amounts(100, 10), row(res.id))
    assert (await state(store, k)).used == amounts(100, 10)
    assert [r.request_id for r in await store.usage_log()] == [res.id]


async def test_release_settles_the_charges_so_far_without_a_row(store: Any) -> None:
    k = key(tokens=1_000)
    res = await charge(store, await reserve(store, [k], ask(100, 400)), amounts(100, 50))
    await store.release(res)
    await store.release(res)  # exactly once
    await store.settle(res, amounts(100, 90), row(res.id))  # and a settle after it changes nothing
    assert await state(store, k) == ScopeState(amounts(100, 50), ZERO, T0)
    assert await store.usage_log() == []
    await store.renew()  # nothing in flight: nothing to renew, on any store


async def test_usage_log_returns_the_newest_rows_oldest_first(store: Any) -> None:
    rows = []
    for i in range(5):
        res = await reserve(store, [key()], ask())
        rows.append(row(res.id, T0 + i, out=i))
        await store.settle(res, amounts(10, i), rows[-1])
    assert await store.usage_log(3) == rows[2:]
    assert await store.usage_log() == rows


# --- states, reset, periods ----------------------------------------------------------------------------------------

async def test_states_of_untouched_scopes_are_empty(store: Any) -> None:
    assert await store.states([key(tokens=5), team()], T0) == [ScopeState(), ScopeState()]


async def test_reset_zeroes_settled_usage_and_the_clock_while_requests_in_flight_keep_spending(store: Any) -> None:
    k = key(tokens=10_000, wall_clock=60.0)
    done = await reserve(store, [k], ask(100, 100))
    await store.settle(done, amounts(100, 100), None)
    live = await reserve(store, [k], ask(100, 400), T0 + 1)
    await store.charge(live, amounts(100, 50), T0 + 1)
    await store.reset(k, T0 + 2)
    assert await state(store, k, T0 + 2) == ScopeState(amounts(100, 50), A(350, 0, 350, 0, 0), None)
    await store.settle(live, amounts(100, 80), None)
    assert await state(store, k, T0 + 2) == ScopeState(amounts(100, 80), ZERO, None)
    assert (await reserve(store, [k], ask(), T0 + 100)).deadline == T0 + 160


@pytest.mark.parametrize("period, same, next_one", [
    ("hour", T0 + 1_000, T0 + 2 * HOUR), ("day", T0 + 17 * HOUR, T0 + DAY), ("week", T0 + 6 * DAY, T0 + 7 * DAY),
    ("month", T0 + 20 * DAY, T0 + 21 * DAY), ("none", T0 + 400 * DAY, None)])
async def test_a_period_starts_again_at_zero_and_keeps_its_history(store: Any, period: str, same: float,
                                                                   next_one: float | None) -> None:
    k = key(period, tokens=1_000)
    res = await reserve(store, [k], ask(10, 10))
    late = await reserve(store, [k], ask(10, 10))
    await store.settle(res, amounts(10, 10), None)
    assert (await state(store, k, same)).used == amounts(10, 10)
    if next_one is None:
        return
    assert await state(store, k, next_one) == ScopeState()
    await store.settle(late, amounts(10, 5), None)  # settles into the period it was reserved in
    assert await state(store, k, same) == ScopeState(amounts(20, 15, steps=2), ZERO, T0)
    assert await state(store, k, next_one) == ScopeState()
    fresh = await reserve(store, [k], ask(10, 2_000), next_one)
    assert fresh.admitted.output_tokens == 990


# --- the reference and concurrency -----------------------------------------------------------------------------------

RATES = [Decimal(0), Decimal("0.3"), Decimal("3.75"), Decimal(15), Decimal("0.000000123"), Decimal("1234.567890123")]


@pytest.mark.parametrize("seed", range(4))
async def test_agrees_with_the_reference_book(store: Any, seed: int) -> None:
    """Random reserve / charge / settle / reset / clock steps, in lockstep with the in-process Book."""
    rng = random.Random(seed)
    ref = MemoryStore()
    lim = lambda hi: rng.choice([None, rng.randint(1, hi)])  # noqa: E731
    keys = [Scope("key", f"k{i}", f"key:t/k{i}", Limits(lim(20_000), lim(10_000), lim(15_000), lim(4 * 10**6),
                                                       lim(60), rng.choice([None, 5_000.0])),
                  rng.choice(["none", "hour"])) for i in range(3)]
    t = Scope("team", "t", "team:t", Limits(lim(40_000), None, lim(30_000), lim(10**7), lim(120), None), "day")
    now, flights = T0, []
    for step in range(200):
        op = rng.random()
        if op < 0.4 or not flights:
            a = Ask(rng.randint(0, 400), rng.randint(0, 10**5), rng.randint(1, 1_500), rng.choice(RATES))
            scopes, rid = [rng.choice(keys), t], f"ref_{step}"
            got, want = await store.reserve(scopes, a, now, rid), await ref.reserve(scopes, a, now, rid)
            assert type(got) is type(want), step
            if isinstance(want, Denied):
                assert got == want, step
            else:
                assert (got.admitted, got.hold, got.deadline, got.remaining) == (
                    want.admitted, want.hold, want.deadline, want.remaining), step
                flights.append((got, want))
        elif op < 0.65:
            i = rng.randrange(len(flights))  # (as rng.choice(flights) would)
            got, want = flights[i]
            h = want.hold
            c = Amounts(*(max(0, x + rng.randint(-x // 2 - 1, x // 3 + 5)) for x in h.as_tuple()))
            got, want = await store.charge(got, c, now), await ref.charge(want, c, now)
            assert got == want, step
            if isinstance(want, Reservation):
                flights[i] = (got, want)
        elif op < 0.93:
            got, want = flights.pop(rng.randrange(len(flights)))
            actual = Amounts(*(max(0, x + rng.randint(-5, 5)) for x in want.charged.as_tuple()))
            await store.settle(got, actual, None)
            await ref.settle(want, actual, None)
        elif op < 0.96:
            s = rng.choice(keys + [t])
            await store.reset(s, now)
            await ref.reset(s, now)
        else:
            now += rng.choice([1.0, 600.0, 1_800.0])
        scopes = keys + [t]
        assert await store.states(scopes, now) == await ref.states(scopes, now), step


async def test_concurrent_reserves_never_take_more_than_the_limit(store: Any) -> None:
    k, t = key(steps=100), team(tokens=1_000, steps=10)
    results = await asyncio.gather(*(store.reserve([k, t], ask(10, 100), T0, next(ids)) for _ in range(60)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    assert len(admitted) == 9  # 9 x 110 tokens; 10 left cannot cover 10 input + 1 output
    assert all(isinstance(r, Denied) and r.scope == t for r in results if r not in admitted)
    assert (await state(store, t)).held == A(990, 90, 900, 0, 9)


async def test_concurrent_growth_never_takes_more_than_the_room(store: Any) -> None:
    t = team(tokens=2_000)
    flights = [await reserve(store, [key(), t], ask(0, 50)) for _ in range(20)]  # 1000 held, 1000 free
    results = await asyncio.gather(*(store.charge(r, amounts(0, 150), T0) for r in flights))
    assert sum(isinstance(r, Reservation) for r in results) == 10
    flights = [r if isinstance(r, Reservation) else f for f, r in zip(flights, results)]
    await asyncio.gather(*(store.settle(r, r.charged.max(amounts(0, 50)), None) for r in flights))
    assert await state(store, t) == ScopeState(A(2_000, 0, 2_000, 0, 20), ZERO, T0)


# --- Redis only --------------------------------------------------------------------------------------------------

async def opened(url: str, **kw: Any) -> RedisStore:
    s = RedisStore.from_url(url, **kw)
    await s.open()
    return s


async def until(check: Any, timeout: float = 10.0) -> float:
    """Poll an async predicate until it holds; the seconds it took (fails at the deadline)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, "condition not reached before the deadline"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_redis_url_options_and_key_namespace(rns: Namespace) -> None:
    prefix = rns.prefix + "xyz:"
    s = RedisStore.from_url(f"redis://127.0.0.1:6379/13?prefix={prefix}&hold_ttl=7&renew_every=2&log_max=50")
    assert (s.prefix, s.hold_ttl, s.renew_every, s.log_max) == (prefix, 7.0, 2.0, 50)
    await s.open()
    try:
        res = await reserve(s, [key("hour", tokens=10), team()], ask(1, 1))
        await s.settle(res, amounts(1, 1), row(res.id))
    finally:
        await s.close()
    assert rns.client.exists(prefix + "log", f"{prefix}q:{res.id}", prefix + "T:team:t@0") == 3
    assert not rns.client.exists(rns.prefix + "log")


async def test_redis_keys_have_bounded_lifetimes(rns: Namespace) -> None:
    s = await opened(rns.url, log_max=20)
    try:
        k, t = key("hour", tokens=10**6), team()
        for _ in range(300):
            res = await reserve(s, [k, t], ask(1, 1))
            await s.settle(res, amounts(1, 1), row(res.id))
    finally:
        await s.close()
    hour_end = 1_718_002_800 - T0  # 07:00 UTC
    ttl = rns.client.pttl(rns.key("T:key:t/k@1717999200")) / 1000
    assert abs(ttl - (hour_end + 35 * DAY)) < 60
    assert rns.client.pttl(rns.key("T:team:t@0")) == -1  # period none: one key per scope, kept
    assert 0 < rns.client.pttl(rns.key(f"q:{res.id}")) <= 600_000  # the settle tombstone
    assert rns.client.zcard(rns.key("x")) == 0  # nothing in flight
    assert rns.client.xlen(rns.key("log")) < 300 - 100  # MAXLEN ~ 20 trims whole stream nodes (100 rows)


async def test_redis_settle_of_any_copy_of_a_reservation_is_exactly_once(rns: Namespace) -> None:
    s = await opened(rns.url)
    try:
        k = key(tokens=1_000)
        res = await reserve(s, [k], ask(100, 400))
        await s.settle(res, amounts(100, 10), row(res.id))
        await s.settle(res._replace(settled=False), amounts(100, 10), row(res.id))  # e.g. a retry after a lost reply
        assert (await state(s, k)).used == amounts(100, 10)
        assert [r.request_id for r in await s.usage_log()] == [res.id]
    finally:
        await s.close()


async def test_redis_reserve_replayed_after_a_lost_reply_answers_the_same(rns: Namespace) -> None:
    s = await opened(rns.url)
    try:
        k = key(tokens=1_000)
        first = await s.reserve([k], ask(10, 100), T0, "same-id")
        again = await s.reserve([k], ask(10, 100), T0, "same-id")
        assert isinstance(first, Reservation) and isinstance(again, Reservation) and again.hold == first.hold
        assert (await state(s, k)).held == first.hold
    finally:
        await s.close()


async def test_redis_cost_clamp_is_exact_for_awkward_rates_and_large_amounts(rns: Namespace) -> None:
    """floor((room - input cost) / rate) and ceil(out x rate) in Lua equal Python's Decimal results."""
    rng = random.Random(7)
    s = await opened(rns.url)
    try:
        cases = []
        for i in range(400):
            rate = Decimal(rng.randint(1, 10**15)).scaleb(-rng.randint(0, 12))  # up to 1e15, 12 decimals
            limit = rng.randint(0, 2**50)
            a = ask(rng.randint(0, 10**6), rng.choice([10**3, 10**9, 10**12]), rng.randint(0, limit), rate)
            cases.append((scope("key", f"exact{i}", cost_nanos=limit), a))
        results = await asyncio.gather(*(s.reserve([k], a, T0, next(ids)) for k, a in cases))
        for (k, a), got in zip(cases, results):
            want = admit(a, [(k, ScopeState())], T0)
            assert (got if isinstance(got, Denied) else got.admitted) == want, (k, a)
        assert sum(isinstance(r, Reservation) and r.admitted.clamped for r in results) > 100
    finally:
        await s.close()


async def test_redis_scripts_reload_after_script_flush(rns: Namespace) -> None:
    s = await opened(rns.url)
    try:
        rns.client.script_flush()
        res = await reserve(s, [key(tokens=100)], ask(10, 10))
        await s.settle(res, amounts(10, 10), None)
        assert (await state(s, key(tokens=100))).used == amounts(10, 10)
    finally:
        await s.close()


async def test_redis_expired_hold_releases_the_rest_and_keeps_the_charges(rns: Namespace) -> None:
    dead = await opened(rns.url, hold_ttl=0.3, renew_every=3600)
    other = await opened(rns.url)
    k, t = key(tokens=10_000), team(tokens=10_000)
    try:
        res = await reserve(dead, [k, t], ask(100, 900))
        await dead.charge(res, amounts(100, 50), T0)
        took = await until(lambda: _held_zero(other, [k, t]))
        assert took < 5
        assert await other.states([k, t], T0) == [ScopeState(amounts(100, 50), ZERO, T0)] * 2
        assert [(r.outcome, r.output_tokens, r.request_id) for r in await other.usage_log()] == [
            ("hold_expired", 50, res.id)]
        cut = await dead.charge(res, amounts(100, 60), T0)  # its owner was alive after all: cut it
        assert isinstance(cut, Denied)
        await dead.settle(res, amounts(100, 70), row(res.id))  # ...and its settle corrects the total
        assert (await state(other, k)).used == amounts(100, 70)
    finally:
        await dead.close()
        await other.close()


async def _held_zero(s: RedisStore, scopes: list[Scope]) -> bool:
    return all(st.held == ZERO for st in await s.states(scopes, T0))


async def test_redis_renewal_keeps_holds_of_live_requests(rns: Namespace) -> None:
    s = await opened(rns.url, hold_ttl=1.0, renew_every=0.1)
    other = await opened(rns.url)
    k = key(tokens=1_000)
    try:
        res = await reserve(s, [k], ask(10, 100))
        score = rns.client.zscore(rns.key("x"), res.id)
        await asyncio.sleep(2.5)  # 2.5 TTLs: only renewals keep it
        assert (await state(other, k)).held == res.hold
        assert rns.client.zscore(rns.key("x"), res.id) > score
    finally:
        await s.close()
        await other.close()
    assert (await _closed_state(rns, k)).held == ZERO  # close() released what was still in flight


async def _closed_state(rns: Namespace, s: Scope) -> ScopeState:
    fresh = await opened(rns.url)
    try:
        return await state(fresh, s)
    finally:
        await fresh.close()


class Cuttable:
    """A TCP relay to Redis that a test can cut (connections dropped, port refusing) and restore."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", 6379)
        self.writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/{REDIS_DB}?prefix={prefix}"


async def test_redis_outage_fails_closed_and_recovers_without_restart(rns: Namespace,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="budget_proxy.store")
    relay = Cuttable()
    await relay.start()
    s = await opened(relay.url(rns.prefix), settle_backoff=0.05)
    k = key(tokens=10_000)
    try:
        await s.ping()
        res = await reserve(s, [k], ask(10, 100))
        await relay.cut()
        with pytest.raises(StoreUnavailable):
            await s.ping()
        with pytest.raises(StoreUnavailable):
            await s.reserve([k], ask(), T0, next(ids))
        with pytest.raises(StoreUnavailable):
            await s.charge(res, amounts(10, 5), T0)
        res = await s.settle(res, amounts(10, 20), row(res.id))  # deferred, not lost
        assert res.settled
        await relay.start()
        await until(lambda: _pings(s))
        await until(lambda: _used_is(s, k, amounts(10, 20)))
        assert (await reserve(s, [k], ask())).hold.tokens == 110
        assert "landed" in caplog.text
    finally:
        await s.close()
        await relay.cut()


async def _pings(s: RedisStore) -> bool:
    try:
        await s.ping()
        return True
    except StoreUnavailable:
        return False


async def _used_is(s: RedisStore, k: Scope, used: Amounts) -> bool:
    return (await state(s, k)).used == used


async def test_redis_unreachable_at_start_fails_fast_and_never_loses_a_settle_silently(
        rns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    relay = Cuttable()
    await relay.start()
    await relay.cut()  # a port nothing listens on
    s = await opened(relay.url(rns.prefix), settle_attempts=2, settle_backoff=0.01)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.ping()
        with pytest.raises(StoreUnavailable):
            await s.reserve([key()], ask(), T0, next(ids))
        assert time.monotonic() - started < 3
        k = key()
        fake = Reservation("req_lost", (k,), (0.0,), Admitted(ZERO, 0, False), ZERO)
        with caplog.at_level(logging.ERROR, logger="budget_proxy.store"):
            await s.settle(fake, amounts(10, 20), row("req_lost", out=20))
            await until(lambda: _logged(caplog, "UNSETTLED request req_lost"))
        record = next(r for r in caplog.records if "UNSETTLED" in r.msg)
        logged = json.loads(record.args[1])
        assert logged["row"]["output_tokens"] == 20 and logged["actual"]["tokens"] == 30
    finally:
        await s.close()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text
