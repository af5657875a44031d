"""docs/budgets.md "Crash durability" at the store level: crash durability of running charges, and row isolation.

- SQLite keeps each reservation's running charge in `inflight`, written by the group commit without
  the caller waiting, and deleted in the transaction that settles it; open() folds what a dead
  process left into the totals (usage-log outcome "interrupted"), never what a live one holds.
- Redis counts a running charge in `used` as soon as charge() returns; a dead process's reservations
  expire with their charged part settled, never released like a hold.
- A usage row that cannot be written as it is (a lone surrogate in its model, a number beyond
  SQLite's range, a value of no SQL type, a null) never takes other tenants' rows or totals with it.

Processes are really killed (SIGKILL) where it matters: the kernel, not the test, drops their locks.
No sleep-based timing: every wait is a bounded poll on something observable.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from proxy.ledger import ZERO, Amounts, Ask, Limits, Scope, ScopeState
from proxy.store.base import Reservation, UsageRow
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore
from tests.test_redis_batching import record_batches
from tests.test_store_contract import Namespace, rns  # noqa: F401 (rns: the fixture)

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_718_000_000.0  # 2024-06-10 06:13:20 UTC
KEY = Scope("key", "k", "key:t/k", Limits(tokens=10**9), "day")
OTHER = Scope("key", "other", "key:t/other", Limits(tokens=10**9), "day")
TEAM = Scope("team", "t", "team:t", Limits(cost_nanos=10**15), "none")
ASK = Ask(100, 300, 1_000, Decimal(3))
SURROGATE_MODEL = "claude-haiku-4-5\udfff"


def amounts(inp: int, out: int, steps: int = 1) -> Amounts:
    return Amounts(inp + out, inp, out, inp * 3 + out * 5, steps)


def row(rid: str, model: Any = "claude-haiku-4-5", key: str = "other", cost: Any = 0) -> UsageRow:
    return UsageRow(T0, "t", key, model, "/v1/messages", 10, 0, 0, 0, 5, 0, cost, 1, 0.5, "completed", rid)


async def reserve(store: Any, scopes: tuple[Scope, ...], rid: str, now: float = T0) -> Reservation:
    res = await store.reserve(scopes, ASK, now, rid)
    assert isinstance(res, Reservation), res
    return res


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `check` (bounded) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def inflight_on_disk(path: Path) -> dict[str, tuple]:
    db = sqlite3.connect(path)
    try:
        return {r[0]: r[1:] for r in db.execute(
            "SELECT id, team, key, scopes, tokens, input_tokens, output_tokens, cost_nanos, steps FROM inflight")}
    finally:
        db.close()


def usage_on_disk(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT request_id, team, key, model, input_tokens, output_tokens, cost_nanos, steps, "
                          "outcome FROM usage_log ORDER BY id").fetchall()
    finally:
        db.close()


def lock_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(path.name + "-inflight-*.lock"))


# --- SQLite: running charges ---------------------------------------------------------------------------------------

async def test_a_running_charge_is_written_without_the_caller_waiting_and_deleted_with_its_settlement(
        tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        res = await reserve(store, (KEY, TEAM), "stream")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the store's writes wait
        try:
            # charge() answers from the book at once, although its row cannot be written yet
            res = await asyncio.wait_for(store.charge(res, amounts(100, 40), T0 + 1), 1.0)
            assert isinstance(res, Reservation) and res.charged == amounts(100, 40)
            res = await asyncio.wait_for(store.charge(res, amounts(100, 90), T0 + 2), 1.0)
            assert isinstance(res, Reservation) and res.charged == amounts(100, 90)
            assert inflight_on_disk(path) == {}
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        await until(lambda: inflight_on_disk(path) != {})
        await until(lambda: inflight_on_disk(path)["stream"][3:] == tuple(amounts(100, 90)))
        team, key, scopes = inflight_on_disk(path)["stream"][:3]
        assert (team, key) == ("t", "k")
        assert [s[:2] for s in json.loads(scopes)] == [[KEY.id, res.period_starts[0]], [TEAM.id, 0.0]]
        await store.settle(res, amounts(100, 95), row("stream", key="k"))
        assert inflight_on_disk(path) == {}  # gone in the transaction that settled it
        assert [r[0] for r in usage_on_disk(path)] == ["stream"]
    finally:
        await store.close()
    assert lock_files(path) == []  # a clean close leaves no owner lock behind


KILLED_PROCESS = textwrap.dedent("""
    import asyncio, os, signal, sys
    from decimal import Decimal
    from proxy.ledger import Amounts, Ask, Limits, Scope
    from proxy.store.base import UsageRow
    from proxy.store.sqlite import SqliteStore

    KEY = Scope("key", "k", "key:t/k", Limits(tokens=10**9), "day")
    TEAM = Scope("team", "t", "team:t", Limits(cost_nanos=10**15), "none")
    ASK = Ask(100, 300, 1_000, Decimal(3))
    T0 = 1_718_000_000.0

    async def main(path):
        s = SqliteStore(path)
        await s.open()
        a = await s.reserve((KEY, TEAM), ASK, T0, "stream-a")
        b = await s.reserve((KEY, TEAM), ASK, T0 + 1, "stream-b")
        done = await s.reserve((KEY, TEAM), ASK, T0 + 2, "done")
        await s.charge(a, Amounts(140, 100, 40, 500, 1), T0 + 3)
        await s.charge(b, Amounts(110, 100, 10, 350, 1), T0 + 3.5)
        await s.charge(a, Amounts(190, 100, 90, 750, 1), T0 + 4)   # the last push of a
        await s.settle(done, Amounts(120, 100, 20, 400, 1),
                       UsageRow(T0 + 5, "t", "k", "claude-haiku-4-5", "/v1/messages", 100, 0, 0, 0, 20, 0, 400, 1,
                                3.0, "completed", "done"))
        # settle() returned: its transaction is committed, and so is every running charge queued before it
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1]))
""")


def run_and_kill(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_PROCESS, str(path)], cwd=ROOT, capture_output=True,
                          timeout=60, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "ready\n", proc.stderr


async def test_kill_9_with_streams_in_flight_folds_their_running_charges_on_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    run_and_kill(path)
    assert set(inflight_on_disk(path)) == {"stream-a", "stream-b"}
    assert len(lock_files(path)) == 1  # the dead process's lock file; nobody holds its lock
    store = SqliteStore(str(path))
    await store.open()
    try:
        folded = Amounts(190, 100, 90, 750, 1) + Amounts(110, 100, 10, 350, 1)
        settled = Amounts(120, 100, 20, 400, 1)
        key_state, team_state = await store.states((KEY, TEAM), T0 + 10)
        assert key_state == team_state == ScopeState(settled + folded, ZERO, T0)  # no hold came back
        assert inflight_on_disk(path) == {}
        assert [r for r in usage_on_disk(path) if r[-1] == "interrupted"] == [
            ("stream-a", "t", "k", "", 100, 90, 750, 1, "interrupted"),
            ("stream-b", "t", "k", "", 100, 10, 350, 1, "interrupted")]
        assert len(lock_files(path)) == 1  # ours only: the dead one's was removed
    finally:
        await store.close()
    again = SqliteStore(str(path))  # folded once: a second open changes nothing
    await again.open()
    try:
        assert (await again.states((TEAM,), T0 + 10))[0].used == settled + folded
        assert len(usage_on_disk(path)) == 3
    finally:
        await again.close()


async def test_a_live_stores_running_charges_are_never_folded_by_another_open(tmp_path: Path) -> None:
    """E.g. `budget-proxy usage` while the proxy serves: the second store must not count them too."""
    path = tmp_path / "l.db"
    live = SqliteStore(str(path))
    await live.open()
    try:
        res = await reserve(live, (KEY, TEAM), "stream")
        await live.charge(res, amounts(100, 40), T0 + 1)
        await until(lambda: "stream" in inflight_on_disk(path))
        reader = SqliteStore(str(path))
        await reader.open()
        try:
            assert "stream" in inflight_on_disk(path)
            assert (await reader.states((TEAM,), T0 + 1))[0].used == ZERO
        finally:
            await reader.close()
        await live.settle(res, amounts(100, 45), row("stream", key="k"))
    finally:
        await live.close()
    reopened = SqliteStore(str(path))
    await reopened.open()
    try:
        assert (await reopened.states((TEAM,), T0 + 1))[0].used == amounts(100, 45)  # counted once
        assert [r[-1] for r in usage_on_disk(path)] == ["completed"]
    finally:
        await reopened.close()


async def test_a_store_closed_with_a_request_in_flight_leaves_its_charge_to_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    res = await reserve(store, (KEY, TEAM), "stream")
    await store.charge(res, amounts(100, 40), T0 + 1)
    await store.close()  # lets the queued running charge commit first
    assert "stream" in inflight_on_disk(path)
    reopened = SqliteStore(str(path))
    await reopened.open()
    try:
        assert await reopened.states((KEY, TEAM), T0 + 2) == [ScopeState(amounts(100, 40), ZERO, T0)] * 2
        assert [r[-1] for r in usage_on_disk(path)] == ["interrupted"]
    finally:
        await reopened.close()


# --- row isolation -------------------------------------------------------------------------------------------------

BAD_ROWS = {
    "surrogate": {"model": SURROGATE_MODEL},  # UnicodeEncodeError in sqlite3; '?' in Redis' payload
    "overflow": {"cost": 2**70},              # OverflowError: beyond SQLite's INTEGER
    "no-sql-type": {"model": object()},       # sqlite3.ProgrammingError; in Redis, its str()
    "null": {"model": None},                  # IntegrityError (NOT NULL); in Redis, a cjson null XADD refuses
}


async def settle_40_and_the_bad_ones(store: Any) -> tuple[list[Reservation], list[Reservation]]:
    good = [await reserve(store, (OTHER, TEAM), f"good-{i}", T0 + i) for i in range(40)]
    bad = [await reserve(store, (KEY, TEAM), f"bad-{name}", T0) for name in BAD_ROWS]
    settles = [store.settle(r, amounts(100, i), row(r.id)) for i, r in enumerate(good)]
    for r, (name, kw) in zip(bad, BAD_ROWS.items()):
        settles.insert(len(settles) // 2, store.settle(r, amounts(100, 7), row(r.id, key="k", **kw)))
    results = await asyncio.gather(*settles, return_exceptions=True)
    assert not [r for r in results if not (isinstance(r, Reservation) and r.settled)], results
    return good, bad


async def test_a_usage_row_that_cannot_be_written_takes_no_other_row_or_total_with_it_sqlite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    groups: list[int] = []
    write = store._write
    monkeypatch.setattr(store, "_write", lambda totals, rows, *rest: (groups.append(len(rows)),
                                                                      write(totals, rows, *rest))[1])
    try:
        good, bad = await settle_40_and_the_bad_ones(store)
    finally:
        await store.close()
    assert groups == [44]  # all in one group: the bad rows really shared the transaction
    reopened = SqliteStore(str(path))
    await reopened.open()
    try:
        other, team = await reopened.states((OTHER, TEAM), T0 + 50)
        assert other.used == sum((amounts(100, i) for i in range(40)), ZERO)
        assert team.used == other.used + sum((amounts(100, 7) for _ in bad), ZERO)
        assert (await reopened.states((KEY,), T0))[0].used == sum((amounts(100, 7) for _ in bad), ZERO)
        rows = {r.request_id: r for r in await reopened.usage_log(limit=100)}
    finally:
        await reopened.close()
    assert sorted(rows) == sorted(r.id for r in good + bad)  # every row, the bad ones made safe
    assert rows["bad-surrogate"].model == "claude-haiku-4-5\\udfff"
    assert rows["bad-overflow"].cost_nanos == 2**63 - 1
    assert rows["bad-no-sql-type"].model.startswith("<object object")
    assert rows["bad-null"].model == ""
    made_safe = [r.getMessage() for r in caplog.records if "made safe" in r.getMessage()]
    assert len(made_safe) == 4 and all("request_id=bad-" in m for m in made_safe)
    assert not any("udfff" in r.getMessage() or "\udfff" in r.getMessage() for r in caplog.records)


async def test_a_usage_row_that_cannot_be_written_takes_no_other_row_or_total_with_it_redis(rns: Namespace) -> None:
    store = RedisStore.from_url(rns.url)
    await store.open()
    sent = record_batches(store)
    try:
        good, bad = await settle_40_and_the_bad_ones(store)
        await store._drain()
        other, team = await store.states((OTHER, TEAM), T0 + 50)
        rows = {r.request_id: r for r in await store.usage_log(limit=100)}
    finally:
        await store.close()
    assert any(len(b) > 1 and any(c[1].startswith("bad-") for c in b) for b in sent)  # batched with others
    assert other == ScopeState(sum((amounts(100, i) for i in range(40)), ZERO), ZERO, T0)
    assert team.used == other.used + sum((amounts(100, 7) for _ in bad), ZERO) and team.held == ZERO
    assert sorted(rows) == sorted(r.id for r in good + bad)
    assert rows["bad-surrogate"].model == "claude-haiku-4-5?"
    assert rows["bad-overflow"].cost_nanos == 2**70  # (the stream keeps text: no range to exceed)
    assert rows["bad-no-sql-type"].model.startswith("<object object")
    assert rows["bad-null"].model == ""


# --- Redis: a dead process's running charges -----------------------------------------------------------------------

REDIS_KILLED_PROCESS = textwrap.dedent("""
    import asyncio, os, signal, sys
    from decimal import Decimal
    from proxy.ledger import Amounts, Ask, Limits, Scope
    from proxy.store.redis import RedisStore

    KEY = Scope("key", "k", "key:t/k", Limits(tokens=10**9), "day")
    TEAM = Scope("team", "t", "team:t", Limits(cost_nanos=10**15), "none")

    async def main(url):
        s = RedisStore.from_url(url)
        await s.open()
        res = await s.reserve((KEY, TEAM), Ask(100, 300, 1_000, Decimal(3)), 1_718_000_000.0, "stream")
        assert await s.charge(res, Amounts(140, 100, 40, 500, 1), 1_718_000_001.0) != res
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1]))
""")


async def test_redis_a_killed_processs_running_charge_stays_used_and_only_its_hold_goes(rns: Namespace) -> None:
    url = rns.url + "&hold_ttl=3"
    proc = subprocess.run([sys.executable, "-c", REDIS_KILLED_PROCESS, url], cwd=ROOT, capture_output=True,
                          timeout=60, text=True)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "ready\n", proc.stderr
    charged = Amounts(140, 100, 40, 500, 1)
    store = RedisStore.from_url(rns.url)
    await store.open()
    try:
        before = await store.states((KEY, TEAM), T0)
        assert [s.used for s in before] == [charged] * 2  # counted as soon as charge() returned (held: until expiry)

        async def hold_gone() -> bool:
            return all(s.held == ZERO for s in await store.states((KEY, TEAM), T0))

        await until(hold_gone)
        assert [s.used for s in await store.states((KEY, TEAM), T0)] == [charged] * 2
        assert [(r.outcome, r.team, r.key, r.input_tokens, r.output_tokens, r.cost_nanos, r.request_id)
                for r in await store.usage_log()] == [("hold_expired", "t", "k", 100, 40, 500, "stream")]
    finally:
        await store.close()
