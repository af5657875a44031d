"""sqlite:///PATH — single node. Decisions are made on the in-process book; settled charges and
the usage log are committed (WAL) before the response ends; holds are never written, so a
restart or kill -9 leaves no stale hold.

SqliteStore is the protocol; its parts, each a module:
  sqlite_schema    the tables, statements and migrations of the ledger file
  sqlite_writer    the worker thread every SQLite call runs on, and the group commit (row isolation)
  sqlite_checkpoint  the WAL checkpoints, on a thread of their own (off the commit path)
  sqlite_recovery  running charges on disk, the owner lock, crash recovery (crash durability)
  sqlite_rows      usage-log values made safe to store
  sqlite_history, sqlite_keys, sqlite_alerts   the hourly history, runtime keys, alert claims
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from proxy.ledger import ZERO, Amounts, Ask, Denied, Scope, ScopeState
from proxy.store import sqlite_history, sqlite_keys, sqlite_schema
from proxy.store.base import KeyRecord, Reservation, UsageRow
from proxy.store.base import Cursor, Tally, hour_of
from proxy.store.memory import MemoryStore, PeriodKey, RunEntry, newest_runs
from proxy.store.sqlite_checkpoint import BACKSTOP_PAGES, Checkpointer
from proxy.store.sqlite_recovery import INTERRUPTED, InflightRecovery, Running
from proxy.store.sqlite_rows import insert_rows_one_by_one, safe_float, safe_int, safe_row, safe_text
from proxy.store.sqlite_schema import INSERT_ROW, RUN_SWEEP_MAX, SCHEMA, SELECT_EXPIRED_RUNS, SELECT_LOG, SELECT_RUNS, SELECT_TOTALS
from proxy.store.sqlite_writer import BUSY_TIMEOUT_MS, GroupWriter, Job, PendingTotal

# (names this module had before its parts moved out, still imported from here)
__all__ = ["INSERT_ROW", "INTERRUPTED", "SCHEMA", "SqliteStore", "insert_rows_one_by_one", "safe_float", "safe_int",
           "safe_row", "safe_text"]

log = logging.getLogger("budget_proxy.store")
T = TypeVar("T")

RUN_SWEEP_EVERY_S = 600.0  # how often reserve looks on disk for runs no request has asked for since their expiry


class SqliteStore(GroupWriter, InflightRecovery, MemoryStore):
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
        # running charges: every reservation that has pushed one (until it settles), the ids whose
        # latest the next transaction writes, and the rows it deletes (their reservations settled)
        self._inflight: dict[str, Running] = {}
        self._pending_running: set[str] = set()
        self._pending_gone: list[tuple[str]] = []
        # run scopes forgotten (docs/budgets.md, "Runs"): their rows, deleted by the next transaction
        self._pending_forget: list[PeriodKey] = []
        self.book.on_forget = self._forget_row
        self._sweep_at = -math.inf  # when reserve next looks on disk for runs due (RUN_SWEEP_EVERY_S)
        self._owner = secrets.token_hex(16)
        self._lock_fd: int | None = None
        self._checkpointer: Checkpointer | None = None
        self._writing = False
        self._drained: asyncio.Future[None] | None = None

    def _connect(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a killed process (the WAL is in the OS cache); only power loss can drop commits.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        sqlite_schema.create(db)
        self._db = db
        if self._on_disk():
            self._lock_owner()
            self._backstop = BACKSTOP_PAGES
            db.execute(f"PRAGMA wal_autocheckpoint={self._backstop}")  # (the checkpointer's backstop)
            self._checkpointer = Checkpointer(self.path)
            self._checkpointer.start()

    def _on_disk(self) -> bool:
        name = str(self.path)
        return name != ":memory:" and not name.startswith("file:")

    def _db_or_raise(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("store is closed")
        return self._db

    def _load_rows(self, keys: list[PeriodKey]) -> list[tuple[PeriodKey, Amounts, float | None, float | None]]:
        """(key, settled, first_request_at, expires_at) of each key's row (ZERO, None, None: none)."""
        db = self._db_or_raise()
        out = []
        for scope_id, start in keys:
            row = db.execute(SELECT_TOTALS, (scope_id, start)).fetchone()
            if row is None:
                out.append(((scope_id, start), ZERO, None, None))
            else:
                out.append(((scope_id, start), Amounts(*row[:-2]), row[-2], row[-1]))
        return out

    def _expired_runs(self, now: float) -> list[PeriodKey]:
        return [(sid, start) for sid, start in self._db_or_raise().execute(SELECT_EXPIRED_RUNS, (now, RUN_SWEEP_MAX))]

    def _read_runs(self, prefix: str, now: float) -> list[tuple[PeriodKey, Amounts, float | None, float]]:
        """Every run row under `prefix` not expired by `now`: (key, settled, first_request_at, expires_at)."""
        # ids under the prefix sort between it and the prefix with its last character's successor
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return [((sid, start), Amounts(*rest[:-2]), rest[-2], rest[-1])
                for sid, start, *rest in self._db_or_raise().execute(SELECT_RUNS, (prefix, upper, now))]

    def _ping(self) -> None:
        self._db_or_raise().execute("SELECT 1").fetchone()

    def _close(self) -> None:
        if self._checkpointer is not None:  # (first: the last connection closed checkpoints the rest)
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None
        self._unlock_owner()

    def _read_log(self, limit: int) -> list[UsageRow]:
        rows = self._db_or_raise().execute(SELECT_LOG, (limit,)).fetchall()
        return [UsageRow(*r) for r in reversed(rows)]

    # --- the protocol --------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._connect)
        await self._run(self._recover)

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

    async def _ensure_loaded(self, keys: list[PeriodKey], now: float = -math.inf) -> None:
        totals = self.book.totals
        missing = [k for k in keys if k not in totals]
        if missing:
            for key, settled, first, expires in await self._run(self._load_rows, missing):
                if expires is not None and expires <= now:  # a run forgotten on disk: it starts again
                    settled, first = ZERO, None
                    if key not in totals:
                        self._forget_row(key)
                self.book.load(key, settled, first)

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        keys = self.book.period_keys(scopes, now)
        if now >= self._sweep_at:
            self._sweep(now)
        await self._ensure_loaded(keys, now)
        got = self.book.reserve_in(scopes, keys, ask, now, request_id)
        if type(got) is Denied and any(s.ttl is not None for s in scopes):
            self._keep_runs(scopes, keys)
        return got

    def _keep_runs(self, scopes: Sequence[Scope], keys: list[PeriodKey]) -> None:
        """A denied request keeps its run alive (Book._touch_runs): on disk too, so that a restart
        does not forget it sooner. (An admitted one's settlement writes its expiry.)"""
        pending = self._pending_totals
        for s, key in zip(scopes, keys):
            due = self.book.runs.get(key) if s.ttl is not None else None
            if due is not None:
                p = pending.get(key)
                if p is None:
                    t = self.book.totals.get(key)
                    p = pending[key] = PendingTotal(False, ZERO, None if t is None else t.first_request_at)
                p.expires_at = due[0]
        self._schedule()

    # --- run scopes (docs/budgets.md, "Runs") ---------------------------------------------------
    # The book forgets a run (Book.forget) and its row goes with the next transaction. A run that no
    # request asks for again after a restart is only on disk: reserve sweeps for those every
    # RUN_SWEEP_EVERY_S (RUN_SWEEP_MAX rows a time, on the worker thread), and a row read for a
    # request or /budget after its expiry counts as nothing.
    def _forget_row(self, key: PeriodKey) -> None:
        self._pending_totals.pop(key, None)  # (the forgotten run's settlements not yet written go with it)
        self._pending_forget.append(key)
        if not self._closed:
            self._schedule()

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + RUN_SWEEP_EVERY_S
        try:
            self._submit(self._expired_runs, (now,), self._swept, now)
        except sqlite3.Error:
            pass  # (closed)

    def _swept(self, now: float, keys: list[PeriodKey] | None, error: BaseException | None) -> None:
        if error is not None:
            log.warning("ledger store: sweep for expired runs failed: %s", error.__class__.__name__)
            return
        totals, pending = self.book.totals, set(self._pending_forget)
        forgotten = [k for k in keys or () if k not in totals and k not in pending]  # (the book's own: its word)
        for key in forgotten:
            self._forget_row(key)
        if len(keys or ()) >= RUN_SWEEP_MAX and forgotten:
            self._sweep_at = now  # more to come: the next reserve sweeps again

    async def list_runs(self, prefix: str, now: float, limit: int) -> tuple[int, list[RunEntry]]:
        """LedgerStore.list_runs: the book's runs under `prefix`, and those only on disk."""
        in_book = self.book.runs_of(prefix, now)  # (read before the await: the book's word wins)
        seen = {sid for sid, _, _ in in_book}
        rows = await self._run(self._read_runs, prefix, now)
        totals = self.book.totals
        entries = list(in_book) + [(key[0], ScopeState(settled, ZERO, first), expires)
                                   for key, settled, first, expires in rows
                                   if key[0] not in seen and key not in totals]
        return newest_runs(entries, limit)

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Reservation | Denied:
        got = self.book.charge(res, charged, now)
        if got is None:  # no longer in flight
            return res
        if not isinstance(got, Denied):
            self._push_running(got, now)
        return got

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> Reservation:
        if not self.book.settle(res, actual):
            return res.as_settled()
        totals, pending = self.book.totals, self._pending_totals
        for scope, start in zip(res.scopes, res.period_starts):
            key = (scope.id, start)
            first = totals[key].first_request_at
            p = pending.get(key)
            if p is None:
                p = pending[key] = PendingTotal(False, actual, first)
            else:
                p.add(actual, first)
            if scope.ttl is not None:  # a run's row says when it is forgotten
                due = self.book.runs.get(key)
                if due is not None:
                    p.expires_at = due[0]
        if row is not None:
            self._pending_rows.append(row.as_tuple())
        if self._inflight:
            r = self._inflight.pop(res.id, None)
            if r is not None:
                self._pending_running.discard(res.id)
                if r.written:  # its running charge may be on disk: deleted in this settlement's transaction
                    self._pending_gone.append(r.fixed[:1])  # type: ignore[index]
        await self._commit()
        return res.as_settled()

    async def states(self, scopes: Sequence[Scope], now: float):  # type: ignore[override]
        keys = self.book.period_keys(scopes, now)
        totals = self.book.totals
        # A run's row is read, not kept in the book, unless the book has the run (a run id asked
        # about is not a run: only requests make one).
        runs = [k for s, k in zip(scopes, keys) if s.ttl is not None and k not in totals]
        await self._ensure_loaded([k for s, k in zip(scopes, keys) if s.ttl is None], now)
        read = {}
        if runs:
            for key, settled, first, expires in await self._run(self._load_rows, runs):
                if expires is None or expires > now:
                    read[key] = ScopeState(settled, ZERO, first)
        return [self.book.state(s, now) if k in totals or s.ttl is None else read.get(k, ScopeState())
                for s, k in zip(scopes, keys)]

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

    # --- runtime keys: on disk only (proxy/store/sqlite_keys.py), never in the memory book ----------
    def _on_db(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._db_or_raise(), *args)

    async def put_key(self, rec: KeyRecord, now: float) -> bool:
        return await self._run(self._on_db, sqlite_keys.put, rec, now)

    async def find_key(self, digest: str) -> KeyRecord | None:
        return await self._run(self._on_db, sqlite_keys.find, digest)

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        return await self._run(self._on_db, sqlite_keys.listed, team)

    async def revoke_key(self, team: str, name: str, now: float) -> KeyRecord | None:
        return await self._run(self._on_db, sqlite_keys.revoke, team, name, now)

    # --- history (proxy/store/sqlite_history.py) ------------------------------------------------
    # Denial counts wait here, {(team, key, hour): n}, for one write job at a time on the worker
    # thread (its own short transaction between the group commits); those that come meanwhile go
    # with the next. Nobody waits for it: a denial answers at once.
    _denials: dict[tuple[str, str, int], int] | None = None
    _denials_busy = False

    def _history_db(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._db_or_raise(), *args)

    def log_denial(self, team: str, key: str, now: float) -> None:
        try:
            if self._denials is None:
                self._denials = {}
            k = (team, key, hour_of(now))
            self._denials[k] = self._denials.get(k, 0) + 1
            if not self._denials_busy:
                self._write_denials()
        except Exception as exc:  # (never the request's failure)
            log.warning("ledger store: denial not counted: %s", exc.__class__.__name__)

    def _write_denials(self) -> None:
        counts, self._denials = self._denials, {}
        if not counts or self._closed:
            self._denials_busy = False
            return
        self._denials_busy = True
        try:
            self._submit(self._history_db, (sqlite_history.write_denials, counts), self._denials_written, len(counts))
        except Exception as exc:
            self._denials_written(len(counts), None, exc)

    def _denials_written(self, n: int, _: Any, error: BaseException | None) -> None:
        if error is not None:
            log.warning("ledger store: %d denial count(s) not written: %s", n, error.__class__.__name__)
        self._write_denials()  # (those that came meanwhile; none: idle)

    async def usage_hours(self, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
        return await self._run(self._history_db, sqlite_history.read_hours, team, key, start, end)

    async def usage_page(self, start: float, end: float, team: str | None, key: str | None,
                         after: Cursor, limit: int) -> tuple[list[UsageRow], Cursor]:
        return await self._run(self._history_db, sqlite_history.read_page, start, end, team, key, after, limit)

    async def prune_log(self, before: float, limit: int) -> int:
        return await self._run(self._history_db, sqlite_history.prune, before, limit)

    def set_retention(self, seconds: float) -> None:
        """Nothing expires on its own here: prune_log does it all."""

    async def claim_alert(self, event_key: str, ttl: float) -> bool:
        """LedgerStore.claim_alert: a row in the ledger's file (proxy/store/sqlite_alerts.py), so a
        restart does not send a period's events again."""
        from proxy.store import sqlite_alerts

        return await self._run(self._on_db, sqlite_alerts.claim, event_key, ttl)
