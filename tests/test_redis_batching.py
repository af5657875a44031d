"""The Redis store's batching: calls made while a batch is in flight go to Redis together, as one
script call that runs them in arrival order. Each item must answer exactly what it would have
answered alone, in that order (the reference: MemoryStore fed the same calls one by one).

Every test records the batches the store sends, and asserts they really held several items: a
test that passes because nothing was batched proves nothing. Real Redis (DB 13, fresh prefix).
"""
from __future__ import annotations

import asyncio
import json
import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.errors import StoreUnavailable
from proxy.ledger import ZERO, Amounts, Ask, Denied, Limits, Scope, ScopeState
from proxy.store.base import Reservation, Tally
from proxy.store.memory import MemoryStore
from proxy.store.redis import MAX_BATCH, RedisStore, _payload
from tests.test_store_contract import (DAY, T0, Cuttable, Namespace, amounts, ask, ids, key, opened, row,  # noqa: F401
                                       rns, scope, state, team, until)


class Sent(list):  # type: ignore[type-arg]
    """Every batch a store sends: a list of calls [op, arguments...] (r reserve, c charge, s settle, l release)."""

    def ops(self) -> list[list[str]]:
        return [[c[0] for c in batch] for batch in self]


def record_batches(s: RedisStore) -> Sent:
    sent = Sent()
    inner = s._call_batch

    async def spy(calls: list[list[str]]) -> list[bytes]:
        sent.append([list(c) for c in calls])
        return await inner(calls)

    s._call_batch = spy  # type: ignore[method-assign]
    return sent


async def test_a_lone_call_is_sent_at_once_as_a_batch_of_one(rns: Namespace) -> None:
    s = await opened(rns.url)
    sent = record_batches(s)
    try:
        res = await reserve_one(s, [key(tokens=1_000)], ask(10, 10))
        await s.settle(res, amounts(10, 5), row(res.id))
        assert sent.ops() == [["r"], ["s"]]
    finally:
        await s.close()


async def reserve_one(s: Any, scopes: list[Scope], a: Ask) -> Reservation:
    res = await s.reserve(scopes, a, T0, next(ids))
    assert isinstance(res, Reservation), res
    return res


async def test_one_batch_admits_in_arrival_order_and_a_denied_item_changes_nothing(rns: Namespace) -> None:
    s = await opened(rns.url)
    sent = record_batches(s)
    k, t = key(input_tokens=100), team(steps=4)
    try:
        # input 40, 50 fit the key's 100; 20 does not (90 held); 10 does; the 5th request is past the team's 4 steps
        asks = [ask(40, 1), ask(50, 1), ask(20, 1), ask(10, 1), ask(0, 1), ask(0, 1)]
        got = await asyncio.gather(*(s.reserve([k, t], a, T0, f"arrival-{i}") for i, a in enumerate(asks)))
        assert sent.ops() == [["r"] * 6]
        assert [isinstance(r, Reservation) for r in got] == [True, True, False, True, True, False]
        assert isinstance(got[2], Denied) and (got[2].scope, got[2].dimension, got[2].held) == (k, "input_tokens", 90)
        assert isinstance(got[5], Denied) and (got[5].scope, got[5].dimension, got[5].held) == (t, "steps", 4)
        held = Amounts(104, 100, 4, 0, 4)
        assert await s.states([k, t], T0) == [ScopeState(ZERO, held, T0)] * 2  # both scopes or neither
    finally:
        await s.close()


async def test_a_settle_batch_with_a_duplicate_id_counts_it_once(rns: Namespace) -> None:
    s = await opened(rns.url)
    k = key(tokens=10_000)
    try:
        flights = [await reserve_one(s, [k], ask(100, 100)) for _ in range(3)]
        sent = record_batches(s)
        twin = flights[1]._replace()  # another copy of the same reservation (a retry)
        await asyncio.gather(s.settle(flights[0], amounts(100, 10), row(flights[0].id)),
                             s.settle(flights[1], amounts(100, 20), row(flights[1].id)),
                             s.settle(twin, amounts(100, 20), row(flights[1].id)),
                             s.settle(flights[2], amounts(100, 30), row(flights[2].id)))
        assert sent.ops() == [["s"] * 4]
        assert await state(s, k) == ScopeState(Amounts(360, 300, 60, 0, 3), ZERO, T0)
        assert [r.request_id for r in await s.usage_log()] == [f.id for f in flights]
        assert not s._live
    finally:
        await s.close()


async def test_a_used_id_fails_only_its_own_item(rns: Namespace) -> None:
    s = await opened(rns.url)
    k = key(tokens=10_000)
    try:
        old = await reserve_one(s, [k], ask(10, 10))
        await s.settle(old, amounts(10, 10), None)
        sent = record_batches(s)
        got = await asyncio.gather(s.reserve([k], ask(10, 10), T0, "fresh-1"),
                                   s.reserve([k], ask(10, 10), T0, old.id),
                                   s.reserve([k], ask(10, 10), T0, "fresh-2"), return_exceptions=True)
        assert sent.ops() == [["r"] * 3]
        assert isinstance(got[0], Reservation) and isinstance(got[2], Reservation)
        assert isinstance(got[1], StoreUnavailable)
        assert (await state(s, k)).held == Amounts(40, 20, 20, 0, 2)
    finally:
        await s.close()


RATES = [Decimal(0), Decimal("0.3"), Decimal("3.75"), Decimal("0.000000123")]


@pytest.mark.parametrize("seed", range(3))
async def test_concurrent_calls_answer_exactly_what_one_by_one_calls_answer(rns: Namespace, seed: int) -> None:
    """Rounds of concurrent reserves, charges, settles (some duplicated) on shared scopes with binding
    limits, against MemoryStore fed the same calls one by one in the same order."""
    rng = random.Random(seed)
    s, ref = await opened(rns.url), MemoryStore()
    sent = record_batches(s)
    keys = [Scope("key", f"k{i}", f"key:t/k{i}", Limits(rng.randint(2_000, 20_000), None, None,
                                                       rng.randint(10**5, 10**6), rng.randint(10, 60)), "none")
            for i in range(3)]
    t = Scope("team", "t", "team:t", Limits(30_000, None, 20_000, 2 * 10**6, 100), "day")
    flights: list[tuple[Reservation, Reservation]] = []
    try:
        for rnd in range(12):
            calls: list[tuple[Any, Any, str]] = []  # (redis call, reference call, op), issued in this order
            busy: set[str] = set()
            for i in range(rng.randint(8, 30)):  # (with duplicated settles at most 60)
                op = rng.random()
                free = [f for f in flights if f[0].id not in busy]
                if op < 0.5 or not free:
                    a = Ask(rng.randint(0, 400), rng.randint(0, 10**4), rng.randint(1, 1_500), rng.choice(RATES))
                    scopes, rid = [rng.choice(keys), t], f"b{seed}_{rnd}_{i}"
                    calls.append((s.reserve(scopes, a, T0, rid), ref.reserve(scopes, a, T0, rid), "r"))
                    continue
                got, want = free[rng.randrange(len(free))]
                busy.add(got.id)
                if op < 0.7:
                    c = Amounts(*(max(0, x + rng.randint(-x // 2 - 1, x // 3 + 5)) for x in want.hold.as_tuple()))
                    calls.append((s.charge(got, c, T0), ref.charge(want, c, T0), "c"))
                else:
                    actual = Amounts(*(max(0, x + rng.randint(-5, 5)) for x in want.charged.as_tuple()))
                    calls.append((s.settle(got, actual, row(got.id)), ref.settle(want, actual, row(got.id)), "s"))
                    if op > 0.9:  # the same settle again from another copy, in the same batch
                        calls.append((s.settle(got._replace(), actual, row(got.id)), _nothing(), "s"))
                    flights.remove((got, want))
            before = len(sent)
            got_all = await asyncio.gather(*(c[0] for c in calls))
            want_all = [await c[1] for c in calls]
            # queued at once, they go out in order: one flusher, batch after batch of at most MAX_BATCH
            assert [len(b) for b in sent[before:]] == [min(MAX_BATCH, len(calls) - k)
                                                      for k in range(0, len(calls), MAX_BATCH)], rnd
            for i, (got, want, (_, _, op)) in enumerate(zip(got_all, want_all, calls)):
                if op == "s":  # (a settle answers the reservation, settled: the states below say what it did)
                    continue
                assert type(got) is type(want), (rnd, i)
                if not isinstance(want, Reservation):
                    assert got == want, (rnd, i)
                elif op == "r":
                    assert (got.admitted, got.hold, got.deadline, got.remaining) == (
                        want.admitted, want.hold, want.deadline, want.remaining), (rnd, i)
                    flights.append((got, want))
                else:  # a charge answers the reservation as it is now
                    assert (got.hold, got.charged) == (want.hold, want.charged), (rnd, i)
                    flights = [(got, want) if f[0].id == got.id else f for f in flights]
            scopes = keys + [t]
            assert await s.states(scopes, T0) == await ref.states(scopes, T0), rnd
        assert [r.request_id for r in await s.usage_log(1_000)] == [r.request_id for r in await ref.usage_log(1_000)]
    finally:
        await s.close()


async def _nothing() -> None:
    return None


async def test_a_settle_whose_caller_is_cancelled_still_lands(rns: Namespace) -> None:
    s = await opened(rns.url)
    k = key(tokens=10_000)
    try:
        flights = [await reserve_one(s, [k], ask(100, 100)) for _ in range(4)]
        sent = record_batches(s)
        tasks = [asyncio.ensure_future(s.settle(f, amounts(100, 50), row(f.id))) for f in flights]
        await asyncio.sleep(0)  # each task has queued its settle
        for task in tasks[1:3]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await s._drain()
        assert sent.ops() == [["s"] * 4]
        assert (await state(s, k)).used == Amounts(600, 400, 200, 0, 4)
    finally:
        await s.close()


async def test_a_reserve_whose_caller_is_cancelled_before_its_batch_is_not_sent(rns: Namespace) -> None:
    s = await opened(rns.url)
    k = key(tokens=10_000)
    try:
        sent = record_batches(s)
        first = asyncio.ensure_future(s.reserve([k], ask(10, 10), T0, "in-flight"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the flusher has sent the first reserve; the next ones wait for it
        assert sent.ops() == [["r"]]
        waiting = [asyncio.ensure_future(s.reserve([k], ask(10, 10), T0, f"waiting-{i}")) for i in range(3)]
        await asyncio.sleep(0)
        waiting[1].cancel()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        await s._drain()
        assert sent.ops() == [["r"], ["r", "r"]]
        assert (await state(s, k)).held == Amounts(60, 30, 30, 0, 3)
    finally:
        await s.close()


async def test_a_failed_batch_defers_each_settle_and_each_lands_once(rns: Namespace) -> None:
    relay = Cuttable()
    await relay.start()
    s = await opened(relay.url(rns.prefix), settle_backoff=0.05)
    k = key(tokens=100_000)
    try:
        flights = [await reserve_one(s, [k], ask(100, 100)) for _ in range(5)]
        await relay.cut()
        sent = record_batches(s)
        done = await asyncio.gather(*(s.settle(f, amounts(100, 10 * i), row(f.id)) for i, f in enumerate(flights)))
        assert sent.ops()[0] == ["s"] * 5 and all(f.settled for f in done)
        assert len(s._retries) == 5
        await relay.start()
        await until(lambda: _used_is(s, k, Amounts(600, 500, 100, 0, 5)))
    finally:
        await s.close()  # waits for the retries
        await relay.cut()
    assert sorted(r.request_id for r in await _log(rns)) == sorted(f.id for f in flights)
    assert (await _final_state(rns, k)) == ScopeState(Amounts(600, 500, 100, 0, 5), ZERO, T0)


async def _used_is(s: RedisStore, k: Scope, used: Amounts) -> bool:
    return (await state(s, k)).used == used


async def _log(rns: Namespace) -> list[Any]:
    fresh = await opened(rns.url)
    try:
        return await fresh.usage_log(100)
    finally:
        await fresh.close()


async def _final_state(rns: Namespace, k: Scope) -> ScopeState:
    fresh = await opened(rns.url)
    try:
        return await state(fresh, k)
    finally:
        await fresh.close()


async def test_a_batch_writes_each_scopes_totals_once_with_their_lifetime(rns: Namespace) -> None:
    """A batch reads and writes a scope's totals once, at its end: what every item did is in them,
    and a period's first request still gives them the period's lifetime."""
    s = await opened(rns.url)
    k, t = key("hour", tokens=10_000), team(tokens=10_000)
    try:
        sent = record_batches(s)
        rns.client.config_resetstat()
        got = await asyncio.gather(*(s.reserve([k, t], ask(10, 10), T0, f"first-{i}") for i in range(5)))
        assert sent.ops() == [["r"] * 5] and all(isinstance(r, Reservation) for r in got)
        sets = rns.client.info("commandstats")["cmdstat_set"]["calls"]
        assert sets == 5 + 2  # each reservation's record, and the two scopes' totals once
        hour_end = 1_718_002_800 - T0
        assert abs(rns.client.pttl(rns.key("T:key:t/k@1717999200")) / 1000 - (hour_end + 35 * DAY)) < 60
        assert rns.client.pttl(rns.key("T:team:t@0")) == -1
        await asyncio.gather(*(s.settle(r, amounts(10, 5), row(r.id)) for r in got))
        assert await s.states([k, t], T0) == [ScopeState(amounts(50, 25, steps=5), ZERO, T0)] * 2
    finally:
        await s.close()


async def test_a_whole_batch_replayed_after_a_lost_reply_changes_nothing(rns: Namespace) -> None:
    """The store resends a call once when its connection dropped: the batch may run twice."""
    s = await opened(rns.url)
    k, t = key(tokens=10_000), team(tokens=10_000)
    try:
        old = await reserve_one(s, [k, t], ask(100, 100))
        await s.charge(old, amounts(100, 20), T0)
        sent = record_batches(s)
        calls = await asyncio.gather(s.reserve([k, t], ask(10, 10), T0, "replayed"),
                                     s.settle(old, amounts(100, 30), row(old.id)))
        fresh = calls[0]
        assert isinstance(fresh, Reservation) and sent.ops() == [["r", "s"]]
        before = await s.states([k, t], T0)
        log_before = await s.usage_log()
        replies = await s._call_batch(sent[0])  # the same script call again
        assert replies[0][:1] == b"B" and replies[1] == b"already"  # B: a replay of the reservation
        assert await s.states([k, t], T0) == before and await s.usage_log() == log_before
        assert before == [ScopeState(amounts(100, 30), fresh.hold, T0)] * 2
    finally:
        await s.close()


async def test_an_unexpected_error_in_a_batch_fails_its_calls_instead_of_leaving_them_waiting(rns: Namespace) -> None:
    s = await opened(rns.url, settle_attempts=1, settle_backoff=0.01)
    k = key(tokens=10_000)
    try:
        res = await reserve_one(s, [k], ask(10, 10))
        inner = s._call

        async def broken(name: str, args: Any) -> Any:
            if name == "batch" and args[0][0] == "r":
                raise RuntimeError("a bug")
            return await inner(name, args)

        s._call = broken  # type: ignore[method-assign]
        got = await asyncio.wait_for(asyncio.gather(s.reserve([k], ask(10, 10), T0, "broken-1"),
                                                    s.reserve([k], ask(10, 10), T0, "broken-2"),
                                                    return_exceptions=True), 5)
        assert [type(g) for g in got] == [StoreUnavailable, StoreUnavailable]
        await s.settle(res, amounts(10, 5), None)  # a batch of its own, which works
        assert (await state(s, k)) == ScopeState(amounts(10, 5), ZERO, T0)
    finally:
        await s.close()


ANY_TEXT = st.text(st.characters(blacklist_categories=()))  # lone surrogates included


PLAIN_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e))  # the usual arguments: digits, names


@given(st.lists(ANY_TEXT | st.lists(ANY_TEXT | PLAIN_TEXT, max_size=5), max_size=6))
@example([["s", "claude-\ud800", 'a"b\\c\n\x00', "é→😀"], "plain"])
@example([["r", "req_1", "1718000000.25", "team a", ""], [], ["c", 'one "quoted"', "2"], ["x\x7f"]])
def test_a_batch_payload_is_the_json_of_its_calls_with_lone_surrogates_as_question_marks(calls: list[Any]) -> None:
    """The payload is joined by hand (cheaper than json.dumps): it must say exactly what json.dumps
    would, quotes, backslashes, control and non-ASCII characters included. A lone surrogate, which
    Lua's cjson refuses, becomes '?'."""
    def fixed(s: str) -> str:
        return s.encode("utf-8", "replace").decode()

    want = [fixed(c) if isinstance(c, str) else [fixed(x) for x in c] for c in calls]
    assert json.loads(_payload(calls)) == want
    assert _payload(calls) == json.dumps(calls, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def test_a_batch_payload_never_fails_on_a_value_that_is_not_a_string() -> None:
    """A usage row built wrong (None, bytes, an object in a text field) must not fail the whole batch's
    script call, and with it other tenants' reserves, charges and settles: such values go as null or
    their str(), and the settle script writes a null as ''."""
    calls = [["s", "id-1", "claude\udfff"], ["s", "id-2", None, b"x\xff", 5, object()]]
    got = json.loads(_payload(calls))
    assert got[0] == ["s", "id-1", "claude?"]
    assert got[1][:5] == ["s", "id-2", None, "b'x\\xff'", 5] and got[1][5].startswith("<object object")


async def test_a_batch_of_settles_writes_each_hourly_tally_once_with_every_row(rns: Namespace) -> None:
    """The history's tallies, like the totals, are read and written once per batch: the key's and
    the team's hour each get one SET, and count every row of the batch."""
    s = await opened(rns.url)
    k = key(tokens=10_000)
    try:
        got = await asyncio.gather(*(s.reserve([k], ask(10, 10), T0, f"hourly-{i}") for i in range(5)))
        sent = record_batches(s)
        rns.client.config_resetstat()
        await asyncio.gather(*(s.settle(r, amounts(10, 5), row(r.id, out=5)) for r in got))
        assert sent.ops() == [["s"] * 5]
        sets = rns.client.info("commandstats")["cmdstat_set"]["calls"]
        assert sets == 5 + 1 + 2  # each settle's tombstone, the key's totals, the two tallies of the hour
        for who in ("k", None):
            hours = await s.usage_hours("t", who, T0 - 3600, T0 + 3600)
            assert list(hours.values()) == [Tally(requests=5, input_tokens=50, output_tokens=25, cost_nanos=615,
                                                  steps=5)]
    finally:
        await s.close()
