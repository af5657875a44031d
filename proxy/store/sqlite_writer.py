"""SqliteStore's worker thread and group commit: every SQLite call runs on one dedicated thread, fed by
a queue and answering on the event loop; settlements queued while a transaction is being written go
together into the next one.

Row isolation. A group's transaction upserts the totals, writes the inflight rows and
inserts the usage rows in one statement each, and adds the usage rows to the hourly history (one
upsert per hour touched: sqlite_history.add_rows). If that fails it is rolled back and written again:
totals and inflight rows first, then each usage row in its own SAVEPOINT; a row that still fails
(a lone surrogate in its model, a number beyond SQLite's range, a missing field) is inserted once
more with its values made safe (text: backslash escapes for what UTF-8 cannot carry; numbers
coerced into range, else 0) and, failing that, skipped with an error log line that names only its
request id. No usage row can take another row, or any totals, with it; only a failure of the
totals themselves (the database is unwritable) fails the group.

Small groups on the loop. A group of at most two settlements' writes (INLINE_ROWS usage rows or
running charges, as many running charges deleted, INLINE_TOTALS totals rows, no forgotten run) is
written on the event loop itself when the worker thread is idle: handing it to the thread and back
costs two thread wake-ups, which at low concurrency cost more CPU than the transaction (bench.inproc
--concurrency 1: 130 µs of 375 µs per request). Such a write appends to the WAL in the OS cache
(synchronous=NORMAL: no sync), as the access log's writes on the loop already do; what could block
the loop longer never runs there: a lock held by another connection (busy_timeout 0 there:
SQLITE_BUSY hands the group to the thread, which waits for it) and the writer's backstop checkpoint
(wal_autocheckpoint 0 there; the thread's next commit does it, if still due). Only while the
checkpointer's last pass saw fewer than RESTART_PAGES in the WAL: a longer one is restarted first
(below).

The WAL's restart. Under steady writes every checkpointer pass overlaps a commit, so the WAL never
starts again from its beginning and grows to the backstop. Once a pass has seen RESTART_PAGES, the
next group goes to the thread, followed there by a checkpoint on the writer's own connection that no
commit can overlap (the loop writes only while the thread is idle): the next commit restarts the
WAL."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from typing import Any, Callable, Sequence, TypeVar

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts
from proxy.store import sqlite_history
from proxy.store.memory import PeriodKey
from proxy.store.sqlite_checkpoint import BACKSTOP_PAGES, RESTART_PAGES
from proxy.store.sqlite_rows import insert_rows_one_by_one
from proxy.store.sqlite_schema import DELETE_INFLIGHT, DELETE_TOTALS, INSERT_ROW, UPSERT_ADD, UPSERT_INFLIGHT, UPSERT_SET

log = logging.getLogger("budget_proxy.store")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000   # how long the worker thread's statements wait for another connection's lock
INLINE_ROWS = 2          # a group of at most this many rows may run on the loop (above)
INLINE_TOTALS = 6        # ... and at most this many totals rows (a settlement's key, team and run)
# WAL pages such a write adds, about: 12-33 measured for two rows of three scopes each on a ledger of
# 20,000 scopes and 200,000 rows. With a stalled checkpointer the loop's writes can take the WAL
# somewhat past the backstop (to about 14,000 pages at 33 each), never further: then the thread's.
INLINE_PAGES = 20

Job = tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], Callable[[Any, Any, BaseException | None], None], Any]


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


def transaction(db: sqlite3.Connection, work: Callable[[], Any]) -> None:
    """work() in one IMMEDIATE transaction: committed, or rolled back and its error raised."""
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class GroupWriter:
    """SqliteStore's worker thread and group commit (a mixin: the store's state is its own)."""

    # jobs handed to the thread, and those it has run: equal when it is idle (the loop may then use
    # the connection itself); `_finished` is written by the thread only
    _submitted = 0
    _finished = 0
    _restart_queued = False  # a checkpoint that restarts the WAL waits on the thread
    _backstop = BACKSTOP_PAGES  # the writer's wal_autocheckpoint (set by the store when it connects)
    _inline_pass = -1  # the checkpointer's pass the loop's writes are counted since, and how many
    _inline_writes = 0

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
            self._finished += 1
            try:
                loop.call_soon_threadsafe(done, token, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            if self._checkpointer is not None:  # (after the answer: the WAL has grown, maybe)
                self._checkpointer.wake()
            del job, result, error

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                done: Callable[[Any, Any, BaseException | None], None], token: Any) -> None:
        if self._closed:
            raise sqlite3.OperationalError("store is closed")
        if self._thread is None:
            # a daemon: a store never closed must not keep the interpreter from exiting
            self._thread = threading.Thread(target=self._serve, name="sqlite-ledger", daemon=True)
            self._thread.start()
        self._submitted += 1
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

    # --- the group commit ----------------------------------------------------------------
    def _write(self, totals: dict[PeriodKey, PendingTotal], rows: list[tuple[Any, ...]],
               upserts: Sequence[tuple[Any, ...]] = (), deletes: Sequence[tuple[str]] = (),
               forget: Sequence[PeriodKey] = ()) -> None:
        """One transaction: forgotten runs' rows deleted, one upsert per (scope, period) touched, the
        running charges in flight (written, or deleted once settled), the usage-log rows and their
        hours. If it fails with usage rows, once more with each row on its own (row isolation)."""
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

        def all_at_once() -> None:
            totals_and_inflight()
            if rows:
                db.executemany(INSERT_ROW, rows)
                sqlite_history.add_rows(db, rows)

        def one_by_one() -> None:
            totals_and_inflight()  # (if these fail again, the group fails: the database refuses writes)
            sqlite_history.add_rows(db, insert_rows_one_by_one(db, rows))

        try:
            transaction(db, all_at_once)
            return
        except Exception:
            if not rows:
                raise
        transaction(db, one_by_one)

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
        job = (totals, rows, upserts, gone, forget)
        if self._inline_ready(job):
            try:
                written = self._write_inline(job)
            except Exception as exc:
                self._written(work, None, exc)
                return
            if written:
                self._written(work, None, None)
                return
        try:
            self._submit(self._write, job, self._written, work)
            self._restart_wal_if_due()
        except sqlite3.Error as exc:
            self._written(work, None, exc)

    def _inline_ready(self, job: tuple[Any, ...]) -> bool:
        """Whether the group `job` (_write's arguments) is small and may be written on the loop now
        (module docstring). Between two checkpointer passes the loop writes at most as many groups
        as keep the WAL near the backstop even from RESTART_PAGES (INLINE_PAGES): a stalled
        checkpointer cannot let it grow unchecked."""
        totals, rows, upserts, gone, forget = job
        checkpointer = self._checkpointer
        if (checkpointer is None or len(rows) + len(upserts) > INLINE_ROWS or len(gone) > INLINE_ROWS
                or len(totals) > INLINE_TOTALS or forget or self._submitted != self._finished):
            return False
        frames = checkpointer.wal_frames()
        if frames is None or frames >= RESTART_PAGES:
            return False
        if checkpointer.passes != self._inline_pass:
            self._inline_pass, self._inline_writes = checkpointer.passes, 0
        return self._inline_writes < (self._backstop - RESTART_PAGES) // INLINE_PAGES

    def _write_inline(self, job: tuple[Any, ...]) -> bool:
        """_write(*job) on the loop, never waiting for a lock: False (nothing written) when another
        connection holds it."""
        db = self._db_or_raise()
        try:
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA wal_autocheckpoint=0")
            self._write(*job)
        except sqlite3.OperationalError as exc:
            # (the extended code: SQLITE_BUSY_RECOVERY, another process recovering the WAL, is a
            # wait for the thread too)
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            return False
        finally:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute(f"PRAGMA wal_autocheckpoint={self._backstop}")
        self._inline_writes += 1
        assert self._checkpointer is not None
        self._checkpointer.wake()
        return True

    def _restart_wal_if_due(self) -> None:
        """After a group handed to the thread: a checkpoint behind it there, once the WAL is long."""
        frames = None if self._checkpointer is None else self._checkpointer.wal_frames()
        if frames is not None and frames >= RESTART_PAGES and not self._restart_queued:
            self._restart_queued = True
            self._submit(self._checkpoint_here, (), self._checkpointed, None)

    def _checkpoint_here(self) -> None:
        """On the thread, between commits: a PASSIVE checkpoint on the writer's connection."""
        row = self._db_or_raise().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if row[0] == 0 and row[1] == row[2] and self._checkpointer is not None:
            self._checkpointer.restarting()

    def _checkpointed(self, _: Any, __: Any, error: BaseException | None) -> None:
        self._restart_queued = False
        if error is not None:
            log.warning("ledger store: WAL checkpoint failed: %s", error.__class__.__name__)

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
