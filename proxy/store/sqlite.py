"""sqlite:///PATH — single node. Decisions are made on the in-process book; settled charges and
the usage log are committed (WAL) before the response ends; holds are never written, so a
restart or kill -9 leaves no stale hold. All SQLite work runs on one dedicated thread, fed by a
queue and answering on the event loop with call_soon_threadsafe.

Crash durability (docs/budgets.md "Crash durability"). The relay pushes a stream's running charge to
charge() at most about once a second (and when it outgrows its hold). charge() decides on the book
at once; as a side effect it queues the reservation's running charge as a row of `inflight` (its id,
the owning process, team, key, model, route, its scopes with their period starts, the amounts
charged) for the next group commit: the same transaction as the settlements around it, no commit of
its own, and the caller never waits for it. settle() deletes that row in the transaction that adds
the settlement to the totals, so once written a charge is on disk either in flight or settled, never
both. A kill -9 therefore loses at most what each stream generated after its last push. open() folds
the rows that a dead process left into the totals as settled charges, writes a usage-log row for
each (outcome "interrupted"; its time the last push, its duration since the first; all input as
input_tokens; model and route empty until a Reservation carries them), and deletes them, all in one
transaction. Only charges are written, never holds.

Owners. Every open store holds an exclusive flock on its own lock file, PATH-inflight-<owner>.lock
(locked before it takes that name), and tags its inflight rows with <owner>. A row is folded only
when its owner's lock can be taken (or its file is gone): the kernel drops the lock of a process
that dies, however it dies, while a live proxy keeps it. So another process opening the same
ledger (`budget-proxy usage` while the proxy serves) never folds, and so never double counts, the
streams of a live one. A store that closes unlinks its file; its rows left in flight (none after a
clean shutdown) are folded by the next open. A lock file left by a dead owner is removed by the
next open. (Without flock, on Windows, a dead owner's rows stay in flight: never counted twice.)

Row isolation. A group's transaction upserts the totals, writes the inflight rows and
inserts the usage rows in one statement each. If that fails it is rolled back and written again:
totals and inflight rows first, then each usage row in its own SAVEPOINT; a row that still fails
(a lone surrogate in its model, a number beyond SQLite's range, a missing field) is inserted once
more with its values made safe (text: backslash escapes for what UTF-8 cannot carry; numbers
coerced into range, else 0) and, failing that, skipped with an error log line that names only its
request id. No usage row can take another row, or any totals, with it; only a failure of the
totals themselves (the database is unwritable) fails the group.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import queue
import re
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, get_type_hints

try:
    import fcntl
except ImportError:  # (Windows: no flock; a dead process's running charges then stay in flight, never doubled)
    fcntl = None  # type: ignore[assignment]

from proxy.errors import StoreUnavailable
from proxy.ledger import FIELDS, ZERO, Amounts, Ask, Denied, Scope, ScopeState
from proxy.store import sqlite_history, sqlite_keys
from proxy.store.base import ROW_AMOUNTS, KeyRecord, Reservation, UsageRow
from proxy.store.base import Cursor, Tally, hour_of
from proxy.store.memory import MemoryStore, PeriodKey, RunEntry, newest_runs

log = logging.getLogger("budget_proxy.store")
T = TypeVar("T")


def _columns(template: str, sep: str = ", ") -> str:
    """`template` for each dimension's column ({c}), joined: the statements below follow the declaration."""
    return sep.join(template.format(c=c) for c in FIELDS)


_AMOUNT_COLUMNS = _columns("{c} INTEGER NOT NULL DEFAULT 0")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS totals (
  scope_id TEXT NOT NULL, period_start REAL NOT NULL, {_AMOUNT_COLUMNS}, first_request_at REAL,
  expires_at REAL,  -- a run scope's: forgotten from then on (its last request + run_ttl); else NULL
  PRIMARY KEY (scope_id, period_start));
CREATE TABLE IF NOT EXISTS usage_log (
  id INTEGER PRIMARY KEY, time REAL NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
  model TEXT NOT NULL, route TEXT NOT NULL, input_tokens INTEGER NOT NULL,
  cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
  cache_read_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  web_search_requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, steps INTEGER NOT NULL,
  duration_s REAL NOT NULL, outcome TEXT NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS usage_log_time ON usage_log (time);
CREATE TABLE IF NOT EXISTS inflight (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
  model TEXT NOT NULL, route TEXT NOT NULL,
  scopes TEXT NOT NULL,  -- JSON [[scope id, period start, first_request_at(, a run's expires_at)], ...]
  started REAL NOT NULL, updated REAL NOT NULL, {_AMOUNT_COLUMNS});
"""
AMOUNT_TABLES = ("totals", "inflight")  # the tables with a column per dimension (_add_dimension_columns)
_PARAMS = ",".join("?" * len(FIELDS))

UPSERT_ADD = f"""
INSERT INTO totals (scope_id, period_start, {_columns("{c}")}, first_request_at, expires_at)
VALUES (?, ?, {_PARAMS}, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET {_columns("{c} = {c} + excluded.{c}")},
  first_request_at = COALESCE(first_request_at, excluded.first_request_at),
  expires_at = MAX(COALESCE(expires_at, excluded.expires_at), COALESCE(excluded.expires_at, expires_at))
"""

UPSERT_SET = f"""
INSERT INTO totals (scope_id, period_start, {_columns("{c}")}, first_request_at, expires_at)
VALUES (?, ?, {_PARAMS}, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET {_columns("{c} = excluded.{c}")},
  first_request_at = excluded.first_request_at, expires_at = excluded.expires_at
"""
SELECT_TOTALS = (f"SELECT {_columns('{c}')}, first_request_at, expires_at FROM totals "
                 "WHERE scope_id = ? AND period_start = ?")

# Run scopes (docs/budgets.md, "Runs"): a forgotten run's row is deleted before the upserts of the
# transaction that carries the deletion (a run started again in it adds to no old amounts); rows
# that no request asks for again are found by the sweep, RUN_SWEEP_MAX at a time.
DELETE_TOTALS = "DELETE FROM totals WHERE scope_id = ? AND period_start = ?"
SELECT_EXPIRED_RUNS = ("SELECT scope_id, period_start FROM totals WHERE expires_at <= ? "
                       "ORDER BY expires_at LIMIT ?")
SELECT_RUNS = (f"SELECT scope_id, period_start, {_columns('{c}')}, first_request_at, expires_at FROM totals "
               "WHERE scope_id >= ? AND scope_id < ? AND expires_at > ?")
RUN_SWEEP_EVERY_S = 600.0  # how often reserve looks on disk for runs no request has asked for since their expiry
RUN_SWEEP_MAX = 1000


def _add_run_expiry(db: sqlite3.Connection) -> None:
    """A ledger written before run scopes gains totals.expires_at (NULL: no expiry) and its index."""
    if "expires_at" not in {row[1] for row in db.execute("PRAGMA table_info(totals)")}:
        db.execute("ALTER TABLE totals ADD COLUMN expires_at REAL")
    db.execute("CREATE INDEX IF NOT EXISTS totals_expires_at ON totals (expires_at) WHERE expires_at IS NOT NULL")


INSERT_ROW = (
    "INSERT INTO usage_log (time, team, key, model, route, input_tokens, cache_write_5m_tokens, "
    "cache_write_1h_tokens, cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, "
    "duration_s, outcome, request_id, run) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")  # (run: sqlite_history.migrate)

# A reservation's running charge: (id, owner, team, key, model, route, scopes, started) are written
# once; later pushes change only `updated` and the amounts.
UPSERT_INFLIGHT = f"""
INSERT INTO inflight (id, owner, team, key, model, route, scopes, started, updated, {_columns("{c}")})
VALUES (?,?,?,?,?,?,?,?,?, {_PARAMS})
ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, {_columns("{c} = excluded.{c}")}
"""
DELETE_INFLIGHT = "DELETE FROM inflight WHERE id = ?"
SELECT_INFLIGHT = (f"SELECT id, team, key, model, route, scopes, started, updated, {_columns('{c}')} FROM inflight "
                   "WHERE owner = ? ORDER BY started, id")


def _add_dimension_columns(db: sqlite3.Connection) -> None:
    """A ledger written before a dimension was declared (proxy/dimensions.py) gains its column, 0 in
    every row so far: CREATE TABLE IF NOT EXISTS leaves an existing table as it is."""
    for table in AMOUNT_TABLES:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in FIELDS:
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


INTERRUPTED = "interrupted"  # the usage-log outcome of a charge folded in from a dead process
OWNER_RE = re.compile(r"[0-9a-f]{32}")

# --- values SQLite can always store ------------------------------------------------------------
INT64_MAX = 2**63 - 1
_ROW_KINDS = tuple(t if t in (int, float) else str for t in get_type_hints(UsageRow).values())


def safe_text(v: Any) -> str:
    """v as text sqlite3 can encode: what UTF-8 cannot carry (a lone surrogate) as a backslash escape."""
    if not isinstance(v, str):
        if v is None:
            return ""
        try:
            v = str(v)
        except Exception:
            return ""
    return v if v.isascii() else v.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_int(v: Any) -> int:
    try:
        i = int(v)
    except Exception:  # None, NaN, infinities, text
        return 0
    return max(-INT64_MAX, min(INT64_MAX, i))


def safe_float(v: Any) -> float:
    try:
        f = float(v)
    except Exception:
        return 0.0
    return f if f == f else 0.0  # (SQLite would store NaN as NULL)


def safe_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """A usage-log row that INSERT_ROW cannot refuse: every column present, each of its column's type."""
    values = list(row[:len(_ROW_KINDS)]) + [None] * (len(_ROW_KINDS) - len(row))
    return tuple(safe_int(v) if kind is int else safe_float(v) if kind is float else safe_text(v)
                 for v, kind in zip(values, _ROW_KINDS))


def insert_rows_one_by_one(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert usage rows inside an open transaction, each on its own: one that cannot be written as
    it is is written made safe (safe_row), or skipped with an error log; it never fails the others."""
    for row in rows:
        db.execute("SAVEPOINT usage_row")
        try:
            db.execute(INSERT_ROW, row)
        except Exception as exc:
            db.execute("ROLLBACK TO usage_row")
            rid = safe_text(row[15]) if len(row) > 15 else "?"
            try:
                db.execute(INSERT_ROW, safe_row(row))
            except Exception as again:
                db.execute("ROLLBACK TO usage_row")
                log.error("usage row skipped: request_id=%s error=%s", rid, again.__class__.__name__)
            else:
                log.warning("usage row written with its values made safe: request_id=%s error=%s", rid,
                            exc.__class__.__name__)
        db.execute("RELEASE usage_row")


class PendingTotal:
    """What the next transaction writes to one (scope, period) row: the settlements of the batch
    summed into one upsert. After a reset in the batch it overwrites the row instead of adding."""

    __slots__ = ("overwrite", "amounts", "first_request_at", "expires_at")

    def __init__(self, overwrite: bool, amounts: Amounts, first_request_at: float | None) -> None:
        self.overwrite = overwrite
        self.amounts = amounts
        self.first_request_at = first_request_at
        self.expires_at: float | None = None  # a run scope's (the latest settlement's word)

    def add(self, amounts: Amounts, first_request_at: float | None) -> None:
        self.amounts = self.amounts + amounts
        # as UPSERT_ADD one statement at a time would: COALESCE(row, first, second, ...)
        if self.first_request_at is None:
            self.first_request_at = first_request_at

    def params(self, key: PeriodKey) -> tuple[Any, ...]:
        return (key[0], key[1], *self.amounts, self.first_request_at, self.expires_at)


class Running:
    """A reservation whose running charge SqliteStore keeps on disk (a row of `inflight`)."""

    __slots__ = ("res", "started", "at", "fixed", "written")

    def __init__(self, res: Reservation, now: float) -> None:
        self.res = res                        # as its latest charge left it
        self.started = self.at = now          # its first push, and its latest
        self.fixed: tuple[Any, ...] | None = None  # UPSERT_INFLIGHT's first 8 parameters, once written
        self.written = False                  # a write has carried it: its settlement deletes the row


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
        db.executescript(sqlite_keys.SCHEMA)
        _add_dimension_columns(db)
        _add_run_expiry(db)
        sqlite_history.migrate(db)  # the usage log's run column, indexes and hourly tables
        self._db = db
        if self._on_disk():
            self._lock_owner()

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

    def _write(self, totals: dict[PeriodKey, PendingTotal], rows: list[tuple[Any, ...]],
               upserts: Sequence[tuple[Any, ...]] = (), deletes: Sequence[tuple[str]] = (),
               forget: Sequence[PeriodKey] = ()) -> None:
        """One transaction: the rows of forgotten runs deleted, then one upsert per (scope, period)
        touched, the running charges of requests in
        flight (written, or deleted once settled), and the usage-log rows. If it fails and there are
        usage rows, once more with each row on its own (insert_rows_one_by_one): a row that cannot be
        written never takes the totals or the other rows with it."""
        db = self._db_or_raise()
        adds = [p.params(key) for key, p in totals.items() if not p.overwrite]
        overwrites = [p.params(key) for key, p in totals.items() if p.overwrite]

        def totals_and_inflight() -> None:
            if forget:  # (first: a run started again since adds to no old amounts)
                db.executemany(DELETE_TOTALS, forget)
            if adds:
                db.executemany(UPSERT_ADD, adds)
            if overwrites:
                db.executemany(UPSERT_SET, overwrites)
            if upserts:
                db.executemany(UPSERT_INFLIGHT, upserts)
            if deletes:
                db.executemany(DELETE_INFLIGHT, deletes)

        db.execute("BEGIN IMMEDIATE")
        try:
            totals_and_inflight()
            if rows:
                db.executemany(INSERT_ROW, rows)
            db.execute("COMMIT")
            return
        except Exception:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not rows:
                raise
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("BEGIN IMMEDIATE")
        try:
            totals_and_inflight()  # (if these fail again, the group fails: the database refuses writes)
            insert_rows_one_by_one(db, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _schedule(self) -> None:
        """Start a group write unless one is running (then what is pending joins the next)."""
        if not self._writing:
            # Begin the write two loop iterations from now, not at once: the settlements of replies
            # that arrive meanwhile join this transaction. At once, most transactions would hold one
            # row and pay the thread hop and the commit for it alone; so, many rows each.
            self._writing = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._write_pending)

    async def _commit(self) -> None:
        """Group commit of what has been queued in _pending_*: settlements that arrive while a write
        is running go into the next transaction together, so the thread hop and the commit are paid
        once per batch. Each caller returns only once its own part is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_waiters.append(done)
        self._schedule()
        await done

    def _write_pending(self) -> None:
        totals, self._pending_totals = self._pending_totals, {}
        rows, self._pending_rows = self._pending_rows, []
        running, self._pending_running = self._pending_running, set()
        gone, self._pending_gone = self._pending_gone, []
        upserts = []
        for rid in running:
            r = self._inflight.get(rid)
            if r is not None:
                if r.fixed is None:  # (built here, not at each charge: a request that settles first never pays)
                    r.fixed = self._inflight_fixed(r.res, r.started)
                r.written = True
                upserts.append((*r.fixed, float(r.at), *r.res.charged))
        waiters, self._pending_waiters = self._pending_waiters, []
        forget, self._pending_forget = self._pending_forget, []
        self._writing = True
        work = (waiters, running, forget)
        try:
            self._submit(self._write, (totals, rows, upserts, gone, forget), self._written, work)
        except sqlite3.Error as exc:
            self._written(work, None, exc)

    def _written(self, work: tuple[list[asyncio.Future[None]], set[str], list[PeriodKey]], _: Any,
                 error: BaseException | None) -> None:
        """On the loop, when a batch's transaction has committed (or failed: then all of it failed)."""
        waiters, running, forget = work
        failure = None
        if error is not None:
            failure = self._unavailable(error)
            if not waiters:
                log.error("ledger store: running charges not persisted: %s", error.__class__.__name__)
            # the running charges of requests still in flight go with the next write; a settled one's
            # row stays (its settlement failed with this batch: folded at the next start, it counts
            # what was charged rather than nothing)
            self._pending_running.update(rid for rid in running if rid in self._inflight)
            # forgotten runs' rows go with the next write (first in it, as in this one)
            self._pending_forget[:0] = forget
        for fut in waiters:
            if not fut.done():
                if failure is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(failure)
        # (after a failure, requeued running charges wait for the next settle or charge: no retry loop)
        if self._pending_waiters or (failure is None and (self._pending_running or self._pending_forget)):
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
        self._unlock_owner()

    def _read_log(self, limit: int) -> list[UsageRow]:
        rows = self._db_or_raise().execute(
            "SELECT time, team, key, model, route, input_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
            "cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, duration_s, outcome, "
            "request_id FROM usage_log ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [UsageRow(*r) for r in reversed(rows)]

    # --- owners and recovery (on the worker thread) -----------------------------------------
    def _lock_path(self, owner: str) -> Path:
        return self.path.with_name(f"{self.path.name}-inflight-{owner}.lock")

    def _lock_owner(self) -> None:
        """Hold this store's owner lock for as long as it is open: the kernel drops it when we die. The
        file is locked under a temporary name and then renamed, so that no other store ever finds it
        unlocked (and would take this live store for a dead one)."""
        path = self._lock_path(self._owner)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._lock_fd = fd

    def _unlock_owner(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                self._lock_path(self._owner).unlink(missing_ok=True)  # (while still locked)
            except OSError:
                pass
            os.close(fd)

    def _claim(self, owner: str) -> tuple[bool, int | None]:
        """Whether `owner` is gone, and then its lock file's descriptor, locked (None: no file)."""
        if not OWNER_RE.fullmatch(owner):
            return True, None  # no store names itself so: nobody can be holding it
        try:
            fd = os.open(self._lock_path(owner), os.O_RDWR)
        except FileNotFoundError:
            return True, None
        except OSError as exc:
            log.warning("ledger store: owner lock unreadable (%s); its charges stay in flight", exc.__class__.__name__)
            return False, None
        try:
            if fcntl is None:
                raise BlockingIOError  # no way to tell: alive
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that store is alive
            os.close(fd)
            return False, None
        return True, fd

    def _owners_on_disk(self) -> set[str]:
        prefix = self.path.name + "-inflight-"
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return set()
        return {n[len(prefix):-len(".lock")] for n in names
                if n.startswith(prefix) and n.endswith(".lock") and OWNER_RE.fullmatch(n[len(prefix):-len(".lock")])}

    def _recover(self) -> int:
        """Fold the running charges that dead stores left in `inflight` into the totals (one
        transaction), and remove their lock files. Returns how many requests were folded."""
        if not self._on_disk():
            return 0
        db = self._db_or_raise()
        with_rows = {o for (o,) in db.execute("SELECT DISTINCT owner FROM inflight")}
        claimed: dict[str, int | None] = {}
        folded = 0
        try:
            for owner in sorted((with_rows | self._owners_on_disk()) - {self._owner}):
                gone, fd = self._claim(owner)
                if gone:
                    claimed[owner] = fd
            dead = [o for o in claimed if o in with_rows]
            if dead:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for owner in dead:
                        folded += self._fold(db, owner)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        finally:
            for owner, fd in claimed.items():
                if fd is not None:
                    try:
                        self._lock_path(owner).unlink(missing_ok=True)
                    except OSError:
                        pass
                    os.close(fd)
        if folded:
            log.warning("ledger store: %d request(s) were in flight when a previous process died; their charges "
                        "so far are now settled (usage-log outcome %r)", folded, INTERRUPTED)
        return folded

    @staticmethod
    def _fold(db: sqlite3.Connection, owner: str) -> int:
        usage: list[tuple[Any, ...]] = []
        for rid, team, key, model, route, scopes, started, updated, *amounts in db.execute(
                SELECT_INFLIGHT, (owner,)).fetchall():
            db.execute("SAVEPOINT fold")
            try:
                charged = Amounts(*map(safe_int, amounts))
                for scope_id, start, first, *expires in json.loads(scopes):  # (a run's: its expiry)
                    db.execute(UPSERT_ADD, (scope_id, start, *charged, first, expires[0] if expires else None))
                db.execute(DELETE_INFLIGHT, (rid,))
            except Exception as exc:  # (a row this version cannot read: left for an operator)
                db.execute("ROLLBACK TO fold")
                db.execute("RELEASE fold")
                log.error("ledger store: in-flight charge not folded: request_id=%s error=%s", safe_text(rid),
                          exc.__class__.__name__)
                continue
            db.execute("RELEASE fold")
            usage.append((updated, team, key, model, route, *(0 if i is None else charged[i] for _, i in ROW_AMOUNTS),
                          max(0.0, safe_float(updated) - safe_float(started)), INTERRUPTED, rid, ""))
        insert_rows_one_by_one(db, usage)
        return len(usage)

    # --- running charges -------------------------------------------------------------------
    def _inflight_fixed(self, res: Reservation, now: float) -> tuple[Any, ...]:
        """What the inflight row of `res` keeps from its first push on (UPSERT_INFLIGHT's first 8)."""
        team = key = ""
        for s in res.scopes:
            if s.kind == "team" and not team:
                team = s.name
            elif s.kind == "key" and not key:
                key = s.name
        totals = self.book.totals
        scopes = []
        for s, start in zip(res.scopes, res.period_starts):
            t = totals.get((s.id, start))
            scopes.append([s.id, start, None if t is None else t.first_request_at])
            due = self.book.runs.get((s.id, start)) if s.ttl is not None else None
            if due is not None:  # a run's: folded with the expiry it had (docs/budgets.md, "Runs")
                scopes[-1].append(due[0])
        # (the relay tells the store no model or route; read them should a Reservation carry them)
        return (safe_text(res.id), self._owner, safe_text(team), safe_text(key),
                safe_text(getattr(res, "model", "")), safe_text(getattr(res, "route", "")), json.dumps(scopes),
                float(now))

    def _push_running(self, res: Reservation, now: float) -> None:
        """Queue res's running charge for the next group write; nobody waits for it."""
        if self._closed:
            return
        r = self._inflight.get(res.id)
        if r is None:
            if res.charged == ZERO:
                return
            r = self._inflight[res.id] = Running(res, now)
        r.res, r.at = res, now
        self._pending_running.add(res.id)
        self._schedule()

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
