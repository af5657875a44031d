"""Small group commits run on the event loop, not on SqliteStore's worker thread
(proxy/store/sqlite_writer.py, "Small groups on the loop" and "The WAL's restart"): what may run
there, what never does (a wait for another connection's lock, the backstop checkpoint), and how
the WAL is kept short."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts, Limits, Scope
from proxy.store import sqlite_checkpoint, sqlite_writer
from proxy.store.base import Reservation, UsageRow
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_checkpoint import BACKSTOP_PAGES, RESTART_PAGES
from proxy.store.sqlite_writer import BUSY_TIMEOUT_MS, INLINE_PAGES, INLINE_TOTALS
from tests.test_sqlite_checkpoint import ASK, KEY, T0, wal_frames


@pytest.fixture
def no_timed_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpointer's passes only when a test runs them."""
    monkeypatch.setattr(sqlite_checkpoint, "CHECKPOINT_EVERY_S", 3600.0)


@pytest.fixture
async def store(tmp_path: Path, no_timed_passes: None):
    s = SqliteStore(str(tmp_path / "l.db"))
    await s.open()
    await settle(s, -1)  # (the scope's first request reads its row on the thread)
    checkpointer = s._checkpointer
    assert checkpointer is not None
    # its one timed pass (woken by the writes so far) comes first; then it sleeps, and the tests
    # make the passes they need themselves
    for _ in range(5000):
        if checkpointer.passes:
            break
        await asyncio.sleep(0.001)
    assert checkpointer.passes == 1
    checkpointer.checkpoint()
    yield s
    await s.close()


def row(i: int) -> UsageRow:
    return UsageRow(T0 + i, "t", "k", "claude", "/v1/messages", 10, 0, 0, 0, 1, 0, 33, 1, 0.1, "completed", f"r{i}")


async def settle(store: SqliteStore, i: int) -> None:
    res = await store.reserve((KEY,), ASK, T0 + i, f"r{i}")
    assert isinstance(res, Reservation)
    await store.settle(res, Amounts(11, 10, 1, 33, 1), row(i))


def rows_on_disk(store: SqliteStore) -> list[str]:
    """The usage rows' request ids as another connection reads them: committed, not just queued."""
    db = sqlite3.connect(store.path)
    try:
        return [r[0] for r in db.execute("SELECT request_id FROM usage_log ORDER BY id")]
    finally:
        db.close()


def pragma(store: SqliteStore, name: str) -> int:
    assert store._db is not None
    return int(store._db.execute(f"PRAGMA {name}").fetchone()[0])


async def test_a_lone_settlement_commits_on_the_loop(store: SqliteStore) -> None:
    jobs = store._submitted
    await settle(store, 1)
    assert store._submitted == jobs  # nothing was handed to the worker thread
    assert rows_on_disk(store)[-1:] == ["r1"]  # and it is committed when settle returns
    # the loop's settings are its own: the thread's connection waits for locks and checkpoints again
    assert pragma(store, "busy_timeout") == BUSY_TIMEOUT_MS
    assert pragma(store, "wal_autocheckpoint") == BACKSTOP_PAGES


async def test_a_large_group_goes_to_the_thread(store: SqliteStore) -> None:
    jobs = store._submitted
    await asyncio.gather(*(settle(store, i) for i in range(8)))
    assert store._submitted == jobs + 1  # one transaction, on the thread
    assert sorted(rows_on_disk(store)[1:]) == [f"r{i}" for i in range(8)]


async def test_a_lock_held_elsewhere_hands_the_group_to_the_thread(store: SqliteStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
    jobs = store._submitted
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.ensure_future(settle(store, 1))
    # the loop is not blocked by the wait: this test's own coroutine goes on while it lasts
    for _ in range(10_000):
        if store._submitted > jobs:
            break
        await asyncio.sleep(0)
    assert store._submitted == jobs + 1 and not task.done()  # waiting on the thread, for the lock
    # (had the loop itself waited for the lock, it would have stood still for the busy timeout)
    assert loop.time() - started < BUSY_TIMEOUT_MS / 1000 / 2
    other.execute("COMMIT")
    other.close()
    await task
    assert rows_on_disk(store) == ["r-1", "r1"]  # written once, by the thread
    assert pragma(store, "busy_timeout") == BUSY_TIMEOUT_MS


async def test_a_long_wal_is_restarted_behind_a_group_on_the_thread(store: SqliteStore,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_writer, "RESTART_PAGES", 40)
    checkpointer = store._checkpointer
    assert checkpointer is not None
    for i in range(10):
        await settle(store, i)
    frames = checkpointer.checkpoint()[1]  # type: ignore[index]
    assert frames >= 40
    jobs = store._submitted
    await settle(store, 10)
    assert store._submitted == jobs + 2  # the group, then a checkpoint, on the thread
    for _ in range(5000):
        if not store._restart_queued:
            break
        await asyncio.sleep(0.001)
    assert not store._restart_queued
    assert checkpointer.wal_frames() == 0  # (the writer's checkpoint was whole: the next commit restarts it)
    await settle(store, 11)
    assert store._submitted == jobs + 2  # on the loop again
    assert checkpointer.checkpoint()[1] < frames  # type: ignore[index]
    assert wal_frames(store.path) <= frames + 1  # overwritten from its start, not grown
    assert len(rows_on_disk(store)) == 13


async def test_a_stalled_checkpointer_leaves_the_loop_few_writes(store: SqliteStore) -> None:
    """With no pass to say how long the WAL is, the loop's writes stop where the WAL they add, at
    most INLINE_PAGES each from RESTART_PAGES, would reach the backstop; the thread's commits then
    keep the backstop."""
    cap = (BACKSTOP_PAGES - RESTART_PAGES) // INLINE_PAGES
    jobs = store._submitted
    for i in range(cap + 5):
        await settle(store, i)
    assert store._inline_writes == cap
    assert store._submitted == jobs + 5
    assert wal_frames(store.path) < BACKSTOP_PAGES


async def test_a_failed_write_on_the_loop_fails_its_settlement(store: SqliteStore) -> None:
    assert store._db is not None
    store._db.execute("DROP TABLE totals")  # the totals cannot be written: the group fails
    jobs = store._submitted
    with pytest.raises(StoreUnavailable):
        await settle(store, 1)
    assert store._submitted == jobs  # it failed on the loop, not on the thread
    assert rows_on_disk(store) == ["r-1"]  # nothing of it was committed
    assert pragma(store, "busy_timeout") == BUSY_TIMEOUT_MS
    assert pragma(store, "wal_autocheckpoint") == BACKSTOP_PAGES


async def test_a_group_of_many_totals_goes_to_the_thread_even_without_rows(store: SqliteStore) -> None:
    """Small is every write of the group, not only its usage rows: settlements without a row on
    seven scopes are seven totals rows."""
    scopes = [Scope("key", f"t/k{i}", f"key:t/k{i}", Limits(tokens=10**12), "none") for i in range(INLINE_TOTALS + 1)]
    held = [await store.reserve((s,), ASK, T0, f"m{i}") for i, s in enumerate(scopes)]
    assert all(isinstance(r, Reservation) for r in held)
    jobs = store._submitted
    await asyncio.gather(*(store.settle(r, Amounts(11, 10, 1, 33, 1), None) for r in held))  # type: ignore[arg-type]
    assert store._submitted == jobs + 1
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("SELECT COUNT(*) FROM totals WHERE scope_id LIKE 'key:t/k_'").fetchone()[0] == len(scopes)
    finally:
        db.close()
