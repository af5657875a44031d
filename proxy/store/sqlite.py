"""sqlite:///PATH — single node. Decisions are made on the in-process book; settled charges and
the usage log are committed (WAL) before the response ends; holds are never written, so a
restart or kill -9 leaves no stale hold. All SQLite work runs on one dedicated thread, fed by a
queue and answering on the event loop with call_soon_threadsafe."""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from proxy.errors import StoreUnavailable
from proxy.ledger import ZERO, Amounts, Ask, Denied, Scope
from proxy.store.base import Reservation, UsageRow
from proxy.store.memory import MemoryStore, PeriodKey

log = logging.getLogger("budget_proxy.store")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS totals (
  scope_id TEXT NOT NULL, period_start REAL NOT NULL,
  tokens INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0,
  output_tokens INTEGER NOT NULL DEFAULT 0, cost_nanos INTEGER NOT NULL DEFAULT 0,
  steps INTEGER NOT NULL DEFAULT 0, first_request_at REAL,
  PRIMARY KEY (scope_id, period_start));
CREATE TABLE IF NOT EXISTS usage_log (
  id INTEGER PRIMARY KEY, time REAL NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
  model TEXT NOT NULL, route TEXT NOT NULL, input_tokens INTEGER NOT NULL,
  cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
  cache_read_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  web_search_requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, steps INTEGER NOT NULL,
  duration_s REAL NOT NULL, outcome TEXT NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS usage_log_time ON usage_log (time);
"""

UPSERT_ADD = """
INSERT INTO totals (scope_id, period_start, tokens, input_tokens, output_tokens, cost_nanos, steps, first_request_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET
  tokens = tokens + excluded.tokens, input_tokens = input_tokens + excluded.input_tokens,
  output_tokens = output_tokens + excluded.output_tokens, cost_nanos = cost_nanos + excluded.cost_nanos,
  steps = steps + excluded.steps, first_request_at = COALESCE(first_request_at, excluded.first_request_at)
"""

UPSERT_SET = """
INSERT INTO totals (scope_id, period_start, tokens, input_tokens, output_tokens, cost_nanos, steps, first_request_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET
  tokens = excluded.tokens, input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
  cost_nanos = excluded.cost_nanos, steps = excluded.steps, first_request_at = excluded.first_request_at
"""


INSERT_ROW = (
    "INSERT INTO usage_log (time, team, key, model, route, input_tokens, cache_write_5m_tokens, "
    "cache_write_1h_tokens, cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, "
    "duration_s, outcome, request_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


class PendingTotal:
    """What the next transaction writes to one (scope, period) row: the settlements of the batch
    summed into one upsert. After a reset in the batch it overwrites the row instead of adding."""

    __slots__ = ("overwrite", "amounts", "first_request_at")

    def __init__(self, overwrite: bool, amounts: Amounts, first_request_at: float | None) -> None:
        self.overwrite = overwrite
        self.amounts = amounts
        self.first_request_at = first_request_at

    def add(self, amounts: Amounts, first_request_at: float | None) -> None:
        self.amounts = self.amounts + amounts
        # as UPSERT_ADD one statement at a time would: COALESCE(row, first, second, ...)
        if self.first_request_at is None:
            self.first_request_at = first_request_at

    def params(self, key: PeriodKey) -> tuple[Any, ...]:
        return (key[0], key[1], *self.amounts, self.first_request_at)


Job = tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], Callable[[Any, Any, BaseException | None], None], Any]


class SqliteStore(MemoryStore):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # group commit: what settles while a transaction is being written goes into the next one
        self._pending_totals: dict[PeriodKey, PendingTotal] = {}
        self._pending_rows: list[tuple[Any, ...]] = []
        self._pending_waiters: list[asyncio.Future[None]] = []
        self._writing = False
        self._drained: asyncio.Future[None] | None = None

    # --- the worker thread -------------------------------------------------------------
    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fn, args, done, token = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, who decides
                error = exc
            try:
                loop.call_soon_threadsafe(done, token, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, result, error

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                done: Callable[[Any, Any, BaseException | None], None], token: Any) -> None:
        if self._closed:
            raise sqlite3.OperationalError("store is closed")
        if self._thread is None:
            # a daemon: a store never closed must not keep the interpreter from exiting
            self._thread = threading.Thread(target=self._serve, name="sqlite-ledger", daemon=True)
            self._thread.start()
        self._jobs.put((asyncio.get_running_loop(), fn, args, done, token))

    @staticmethod
    def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():  # the caller was cancelled
            return
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    @staticmethod
    def _unavailable(exc: BaseException) -> BaseException:
        """Fail closed: a SQLite or OS error is StoreUnavailable to the caller."""
        if not isinstance(exc, (sqlite3.Error, OSError)):
            return exc
        log.error("ledger store error: %s", exc.__class__.__name__)
        unavailable = StoreUnavailable("The budget ledger is unavailable; nothing was forwarded.")
        unavailable.__cause__ = exc
        return unavailable

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            self._submit(fn, args, self._resolve, fut)
            return await fut
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(exc) from exc

    def _connect(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a killed process (the WAL is in the OS cache); only power loss can drop commits.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(SCHEMA)
        self._db = db

    def _db_or_raise(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("store is closed")
        return self._db

    def _load_rows(self, keys: list[PeriodKey]) -> list[tuple[PeriodKey, Amounts, float | None]]:
        db = self._db_or_raise()
        out = []
        for scope_id, start in keys:
            row = db.execute(
                "SELECT tokens, input_tokens, output_tokens, cost_nanos, steps, first_request_at "
                "FROM totals WHERE scope_id = ? AND period_start = ?", (scope_id, start)).fetchone()
            if row is None:
                out.append(((scope_id, start), ZERO, None))
            else:
                out.append(((scope_id, start), Amounts(*row[:5]), row[5]))
        return out

    def _write(self, totals: dict[PeriodKey, PendingTotal], rows: list[tuple[Any, ...]]) -> None:
        """One transaction: one upsert per (scope, period) touched, and the usage-log rows."""
        db = self._db_or_raise()
        adds = [p.params(key) for key, p in totals.items() if not p.overwrite]
        overwrites = [p.params(key) for key, p in totals.items() if p.overwrite]
        db.execute("BEGIN IMMEDIATE")
        try:
            if adds:
                db.executemany(UPSERT_ADD, adds)
            if overwrites:
                db.executemany(UPSERT_SET, overwrites)
            if rows:
                db.executemany(INSERT_ROW, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def _commit(self) -> None:
        """Group commit of what has been queued in _pending_*: settlements that arrive while a write
        is running go into the next transaction together, so the thread hop and the commit are paid
        once per batch. Each caller returns only once its own part is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_waiters.append(done)
        if not self._writing:
            # Begin the write two loop iterations from now, not at once: the settlements of replies
            # that arrive meanwhile join this transaction. At once, 3 in 4 transactions held one
            # row (the thread hop and the commit per row cost ~35 us at c=16); so, ~15 rows each.
            self._writing = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._write_pending)
        await done

    def _write_pending(self) -> None:
        totals, self._pending_totals = self._pending_totals, {}
        rows, self._pending_rows = self._pending_rows, []
        waiters, self._pending_waiters = self._pending_waiters, []
        self._writing = True
        try:
            self._submit(self._write, (totals, rows), self._written, waiters)
        except sqlite3.Error as exc:
            self._written(waiters, None, exc)

    def _written(self, waiters: list[asyncio.Future[None]], _: Any, error: BaseException | None) -> None:
        """On the loop, when a batch's transaction has committed (or failed: then all of it failed)."""
        failure = None if error is None else self._unavailable(error)
        for fut in waiters:
            if not fut.done():
                if failure is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(failure)
        if self._pending_waiters:
            self._write_pending()
            return
        self._writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _ping(self) -> None:
        self._db_or_raise().execute("SELECT 1").fetchone()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _read_log(self, limit: int) -> list[UsageRow]:
        rows = self._db_or_raise().execute(
            "SELECT time, team, key, model, route, input_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
            "cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, duration_s, outcome, "
            "request_id FROM usage_log ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [UsageRow(*r) for r in reversed(rows)]

    # --- the protocol --------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._connect)

    async def close(self) -> None:
        if self._closed:
            return
        if self._writing:  # let the settlements already accepted commit first
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)  # shared by concurrent close() calls
        try:
            await self._run(self._close)
        finally:
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    async def ping(self) -> None:
        await self._run(self._ping)

    async def _ensure_loaded(self, keys: list[PeriodKey]) -> None:
        totals = self.book.totals
        missing = [k for k in keys if k not in totals]
        if missing:
            for key, settled, first in await self._run(self._load_rows, missing):
                self.book.load(key, settled, first)

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        keys = self.book.period_keys(scopes, now)
        await self._ensure_loaded(keys)
        return self.book.reserve_in(scopes, keys, ask, now, request_id)

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> None:
        if not self.book.settle(res, actual):
            return
        totals, pending = self.book.totals, self._pending_totals
        for scope, start in zip(res.scopes, res.period_starts):
            key = (scope.id, start)
            first = totals[key].first_request_at
            p = pending.get(key)
            if p is None:
                pending[key] = PendingTotal(False, actual, first)
            else:
                p.add(actual, first)
        if row is not None:
            self._pending_rows.append(row.as_tuple())
        await self._commit()

    async def states(self, scopes: Sequence[Scope], now: float):  # type: ignore[override]
        await self._ensure_loaded(self.book.period_keys(scopes, now))
        return await super().states(scopes, now)

    async def reset(self, scope: Scope, now: float) -> None:
        key = self.book.period_key(scope, now)
        await self._ensure_loaded([key])
        self.book.reset(scope, now)
        t = self.book.totals[key]
        # replaces whatever this batch was going to add to the row; later settlements add on top
        self._pending_totals[key] = PendingTotal(True, t.settled, None)
        await self._commit()

    async def usage_log(self, limit: int = 100) -> list[UsageRow]:
        return await self._run(self._read_log, limit)
