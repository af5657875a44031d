"""sqlite:///PATH — single node. Decisions are made on the in-process book; settled charges and
the usage log are committed (WAL) before the response ends; holds are never written, so a
restart or kill -9 leaves no stale hold. All SQLite work runs on one dedicated thread."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts, Ask, Denied, Scope
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


class SqliteStore(MemoryStore):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ledger")
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[list[tuple[str, tuple[Any, ...]]], asyncio.Future[None]]] = []
        self._flushing = False

    # --- the worker thread -------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            log.error("ledger store error: %s", exc.__class__.__name__)
            raise StoreUnavailable("The budget ledger is unavailable; nothing was forwarded.") from exc

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
                out.append(((scope_id, start), Amounts(), None))
            else:
                out.append(((scope_id, start), Amounts(*row[:5]), row[5]))
        return out

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        db = self._db_or_raise()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def _commit(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Group commit: settlements that arrive while a write is running go into the next
        transaction together, so the thread hop and the commit are paid once per batch. Each
        caller returns only once its own statements are committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((statements, done))
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        await asyncio.shield(done)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._run(self._write, [st for stmts, _ in batch for st in stmts])
                except StoreUnavailable as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
        finally:
            self._flushing = False

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
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(self._ping)

    async def _ensure_loaded(self, scopes: Sequence[Scope], now: float) -> None:
        missing = [k for s in scopes if not self.book.has(k := self.book.period_key(s, now))]
        if missing:
            for key, settled, first in await self._run(self._load_rows, missing):
                self.book.load(key, settled, first)

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        await self._ensure_loaded(scopes, now)
        return self.book.reserve(scopes, ask, now, request_id)

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> None:
        if not self.book.settle(res, actual):
            return
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for scope, start in zip(res.scopes, res.period_starts):
            first = self.book.totals[(scope.id, start)].first_request_at
            statements.append((UPSERT_ADD, (scope.id, start, *actual.as_tuple(), first)))
        if row is not None:
            statements.append((
                "INSERT INTO usage_log (time, team, key, model, route, input_tokens, cache_write_5m_tokens, "
                "cache_write_1h_tokens, cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, "
                "duration_s, outcome, request_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row.as_tuple()))
        await self._commit(statements)

    async def states(self, scopes: Sequence[Scope], now: float):  # type: ignore[override]
        await self._ensure_loaded(scopes, now)
        return await super().states(scopes, now)

    async def reset(self, scope: Scope, now: float) -> None:
        await self._ensure_loaded([scope], now)
        self.book.reset(scope, now)
        key = self.book.period_key(scope, now)
        t = self.book.totals[key]
        await self._commit([(UPSERT_SET, (key[0], key[1], *t.settled.as_tuple(), None))])

    async def usage_log(self, limit: int = 100) -> list[UsageRow]:
        return await self._run(self._read_log, limit)
