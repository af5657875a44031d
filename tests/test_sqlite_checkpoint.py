"""SqliteStore's WAL checkpoints run on a thread of their own (proxy/store/sqlite_checkpoint.py): a
commit, which a settlement awaits before its response ends, no longer copies the WAL into the
database file and syncs both whenever the WAL passes SQLite's default 1,000 pages."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.ledger import Amounts, Ask, Limits, Scope
from proxy.store import sqlite_checkpoint
from proxy.store.base import Reservation, UsageRow
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_checkpoint import BACKSTOP_PAGES, Checkpointer

T0 = 1_718_000_000.0
KEY = Scope("key", "t/k", "key:t/k", Limits(tokens=10**12), "none")
ASK = Ask(10, 30, 100, Decimal(3))
SQLITE_DEFAULT_AUTOCHECKPOINT = 1000


def wal_frames(db_path: Path) -> int:
    """Frames the WAL file has room for (its size: a restarted WAL is overwritten from its start)."""
    wal = Path(str(db_path) + "-wal")
    db = sqlite3.connect(db_path)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return max(0, wal.stat().st_size - 32) // (page + 24) if wal.exists() else 0


async def settle_one_at_a_time(store: SqliteStore, n: int, first: int = 0) -> None:
    """n settlements, each committed before the next (one transaction each)."""
    for i in range(first, first + n):
        res = await store.reserve((KEY,), ASK, T0 + i, f"r{i}")
        assert isinstance(res, Reservation)
        row = UsageRow(T0 + i, "t", "k", "claude", "/v1/messages", 10, 0, 0, 0, 1, 0, 33, 1, 0.1,
                       "completed", f"r{i}")
        await store.settle(res, Amounts(11, 10, 1, 33, 1), row)


@pytest.fixture
def no_timed_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's timed passes out of the way: the test runs them itself."""
    monkeypatch.setattr(sqlite_checkpoint, "CHECKPOINT_EVERY_S", 3600.0)


async def test_commits_leave_the_checkpoint_to_the_thread(tmp_path: Path, no_timed_passes: None) -> None:
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        await settle_one_at_a_time(store, 600)
        frames = wal_frames(path)
        # Checkpointed by a commit at 1,000 pages, the WAL would have restarted from its start
        # and never grown much past that.
        assert SQLITE_DEFAULT_AUTOCHECKPOINT * 3 // 2 < frames < BACKSTOP_PAGES
        busy, logged, done = store._checkpointer.checkpoint()  # type: ignore[union-attr]
        assert (busy, done) == (0, logged) and logged >= frames - 10  # every frame copied on
        await settle_one_at_a_time(store, 1, first=600)
        # so the next commit restarts the WAL from its start: a handful of frames, not thousands
        assert store._checkpointer.checkpoint()[1] < 50  # type: ignore[union-attr]
        assert wal_frames(path) == frames  # (overwritten, not grown)
    finally:
        await store.close()


async def test_the_writer_checkpoints_itself_past_the_backstop(tmp_path: Path, no_timed_passes: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the thread fall behind, the WAL still cannot grow past the backstop."""
    monkeypatch.setattr("proxy.store.sqlite.BACKSTOP_PAGES", 300)
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        await settle_one_at_a_time(store, 600)
        assert 300 <= wal_frames(path) < SQLITE_DEFAULT_AUTOCHECKPOINT
    finally:
        await store.close()


async def test_the_thread_checkpoints_after_writes_and_stops_with_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_checkpoint, "CHECKPOINT_EVERY_S", 0.001)
    path = tmp_path / "l.db"
    store = SqliteStore(str(path))
    await store.open()
    checkpointer = store._checkpointer
    assert checkpointer is not None
    await settle_one_at_a_time(store, 50)
    deadline = time.monotonic() + 10
    while not (checkpointer.last and checkpointer.last[1] and checkpointer.last[1] == checkpointer.last[2]):
        assert time.monotonic() < deadline, checkpointer.last
        await asyncio.sleep(0.01)
    # idle, it makes no passes: it is woken by the writer's work, not by a timer
    await asyncio.sleep(0.05)  # (a wake from the last write, come during the pass above, is spent)
    passes = checkpointer.passes
    await asyncio.sleep(0.1)  # (a hundred intervals)
    assert checkpointer.passes == passes
    await store.close()
    assert not any(t.name == "sqlite-checkpoint" for t in threading.enumerate())
    assert not Path(str(path) + "-wal").exists()  # (the last connection closed checkpointed the rest)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM usage_log").fetchone()[0] == 50
    db.close()


async def test_a_ledger_in_memory_has_no_checkpointer() -> None:
    store = SqliteStore(":memory:")
    await store.open()
    try:
        assert store._checkpointer is None
        await settle_one_at_a_time(store, 3)
    finally:
        await store.close()


def test_a_failing_checkpoint_is_logged_once_per_run_of_failures(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "l.db"
    path.mkdir()  # (a directory: SQLite cannot open it)
    checkpointer = Checkpointer(path)
    with caplog.at_level(logging.ERROR, logger="budget_proxy.store"):
        assert checkpointer.checkpoint() is None
        assert checkpointer.checkpoint() is None
        assert caplog.text.count("ledger checkpoint failed") == 1
        path.rmdir()
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        assert checkpointer.checkpoint() is not None  # recovered
        path_dir = tmp_path / "gone"
        checkpointer.path, checkpointer._db = path_dir / "x.db", None
        assert checkpointer.checkpoint() is None
        assert caplog.text.count("ledger checkpoint failed") == 2  # a new run of failures
        db.close()
