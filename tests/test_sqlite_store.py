"""SqliteStore's group commit (proxy/store/sqlite.py): settlements that arrive while a transaction is
being written share the next one, summed into one upsert per (scope, period). What is on disk must be
what the same settlements would have written one statement at a time, all or nothing per batch (but
for a usage row that cannot be written: it never takes the others with it, test_store_durability.py),
and committed before settle() returns."""
from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.errors import StoreUnavailable
from proxy.ledger import ZERO, Amounts, Ask, Limits, Scope, ScopeState
from proxy.store.base import Reservation, UsageRow
from proxy.store.sqlite import SqliteStore

T0 = 1_718_000_000.0  # 2024-06-10 06:13:20 UTC
KEY = Scope("key", "t/k", "key:t/k", Limits(tokens=10**9), "day")
OTHER_KEY = Scope("key", "t/k2", "key:t/k2", Limits(), "hour")
TEAM = Scope("team", "t", "team:t", Limits(cost_nanos=10**15), "none")
ASK = Ask(10, 30, 100, Decimal(3))


def actual(i: int) -> Amounts:
    return Amounts(10 + i, 10, i, 30 + 3 * i, 1)


def row(rid: str) -> UsageRow:
    return UsageRow(T0, "t", "k", "claude", "/v1/messages", 10, 0, 0, 0, 1, 0, 33, 1, 0.1, "completed", rid)


def on_disk(path: Path) -> tuple[dict[tuple[str, float], tuple], list[str]]:
    db = sqlite3.connect(path)
    try:
        totals = {(r[0], r[1]): tuple(r[2:]) for r in db.execute(
            "SELECT scope_id, period_start, tokens, input_tokens, output_tokens, cost_nanos, steps, "
            "first_request_at FROM totals")}
        ids = [r[0] for r in db.execute("SELECT request_id FROM usage_log ORDER BY id")]
    finally:
        db.close()
    return totals, ids


async def reserve_many(store: SqliteStore, n: int, start: float = T0) -> list[Reservation]:
    out = []
    for i in range(n):
        scopes = (KEY if i % 3 else OTHER_KEY, TEAM)
        res = await store.reserve(scopes, ASK, start + i, f"r{i}")
        assert isinstance(res, Reservation)
        out.append(res)
    return out


async def test_a_batch_of_settlements_writes_what_one_statement_each_would(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "l.db"))
    await store.open()
    reservations = await reserve_many(store, 24)
    # all settle at once: they share one transaction
    await asyncio.gather(*(store.settle(res, actual(i), row(res.id)) for i, res in enumerate(reservations)))
    totals, ids = on_disk(tmp_path / "l.db")
    assert sorted(ids) == sorted(r.id for r in reservations)
    for s in (KEY, OTHER_KEY, TEAM):
        mine = [(i, r) for i, r in enumerate(reservations) if s in r.scopes]
        start = mine[0][1].period_starts[mine[0][1].scopes.index(s)]
        expected = sum((actual(i) for i, _ in mine), ZERO)
        # the clock of each scope started at its first request, not at a later one in the batch
        assert totals[(s.id, start)] == (*expected, T0 + mine[0][0]), s.id
    await store.close()


async def test_settlements_that_arrive_together_share_one_transaction(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The write begins a couple of loop iterations after the first settlement, so replies that
    settle in the same burst are committed together rather than one row per transaction."""
    store = SqliteStore(str(tmp_path / "l.db"))
    await store.open()
    batches: list[int] = []
    write = store._write
    monkeypatch.setattr(store, "_write", lambda totals, rows, *rest: (batches.append(len(rows)), write(totals, rows, *rest))[1])
    reservations = await reserve_many(store, 16)

    async def settle_after(res: Reservation, ticks: int) -> None:
        for _ in range(ticks):  # (as replies arriving in the next loop iteration would)
            await asyncio.sleep(0)
        await store.settle(res, actual(0), row(res.id))

    await asyncio.gather(*(settle_after(res, i % 2) for i, res in enumerate(reservations)))
    assert batches == [16]
    _, ids = on_disk(tmp_path / "l.db")
    assert sorted(ids) == sorted(r.id for r in reservations)
    await store.close()


async def test_a_reset_in_a_batch_replaces_earlier_settlements_and_keeps_later_ones(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "l.db"))
    await store.open()
    z = await store.reserve((KEY, TEAM), ASK, T0, "z")
    assert isinstance(z, Reservation)
    await store.settle(z, actual(4), row("z"))  # on disk before the reset
    a = await store.reserve((OTHER_KEY, TEAM), ASK, T0, "a")
    b = await store.reserve((KEY, TEAM), ASK, T0 + 1, "b")
    c = await store.reserve((KEY, TEAM), ASK, T0 + 2, "c")
    assert isinstance(a, Reservation) and isinstance(b, Reservation) and isinstance(c, Reservation)
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the store's first transaction waits
    first = asyncio.ensure_future(store.settle(a, actual(0), row("a")))
    for _ in range(10):  # until first's transaction has gone to the thread (it waits there for the lock)
        await asyncio.sleep(0)
        if store._writing and not store._pending_waiters:
            break
    assert store._writing and not store._pending_waiters
    queued = [asyncio.ensure_future(store.settle(b, actual(1), row("b"))),  # reset away below
              asyncio.ensure_future(store.reset(KEY, T0 + 10))]
    await asyncio.sleep(0)
    e = await store.reserve((KEY, TEAM), ASK, T0 + 20, "e")  # restarts KEY's clock
    assert isinstance(e, Reservation)
    queued += [asyncio.ensure_future(store.settle(c, actual(2), row("c"))),
               asyncio.ensure_future(store.settle(e, actual(3), row("e")))]
    await asyncio.sleep(0)
    assert len(store._pending_waiters) == 4  # all four share the second transaction
    other.execute("COMMIT")
    other.close()
    await asyncio.gather(first, *queued)

    totals, ids = on_disk(tmp_path / "l.db")
    # what UPSERT_SET for the reset, then one UPSERT_ADD per later settlement, would leave
    assert totals[(KEY.id, b.period_starts[0])] == (*(actual(2) + actual(3)), T0 + 20)
    team_total = actual(4) + actual(0) + actual(1) + actual(2) + actual(3)
    assert totals[(TEAM.id, 0.0)] == (*team_total, T0)
    assert ids == ["z", "a", "b", "c", "e"]
    expected = [ScopeState(actual(2) + actual(3), ZERO, T0 + 20), ScopeState(team_total, ZERO, T0)]
    assert await store.states((KEY, TEAM), T0 + 30) == expected
    await store.close()

    reopened = SqliteStore(str(tmp_path / "l.db"))
    await reopened.open()
    assert await reopened.states((KEY, TEAM), T0 + 30) == expected
    await reopened.close()


async def test_a_failed_batch_fails_every_settlement_in_it_and_writes_none_of_it(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "l.db"))
    await store.open()
    reservations = await reserve_many(store, 6)
    await store.settle(reservations[0], actual(0), row("r0"))
    other = sqlite3.connect(tmp_path / "l.db")
    other.execute("DROP TABLE totals")  # every upsert of the next transaction fails
    other.close()
    results = await asyncio.gather(*(store.settle(r, actual(i), row(r.id)) for i, r in enumerate(reservations[1:])),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    db = sqlite3.connect(tmp_path / "l.db")
    ids = [r[0] for r in db.execute("SELECT request_id FROM usage_log")]
    db.close()
    assert ids == ["r0"]  # the usage-log rows rolled back with the totals
    with pytest.raises(StoreUnavailable):
        await store.reserve((Scope("key", "new", "key:new", Limits(), "none"),), ASK, T0, "r-new")
    await store.close()


async def test_close_lets_accepted_settlements_commit_and_later_calls_fail_closed(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "l.db"))
    await store.open()
    reservations = await reserve_many(store, 8)
    settles = [asyncio.ensure_future(store.settle(r, actual(i), row(r.id))) for i, r in enumerate(reservations)]
    await asyncio.sleep(0)  # the first is being written; the rest are queued behind it
    await store.close()
    await asyncio.gather(*settles)
    _, ids = on_disk(tmp_path / "l.db")
    assert sorted(ids) == sorted(r.id for r in reservations)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    await store.close()  # twice is harmless
