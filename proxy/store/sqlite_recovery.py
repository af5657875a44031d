"""SqliteStore's running charges on disk (the `inflight` table), its owner lock, and the crash
recovery that folds a dead process's running charges into the totals.

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
input_tokens; model and route empty until a Reservation carries them; counted in the hourly history
like any other row), and deletes them, all in one transaction. Only charges are written, never holds.

Owners. Every open store holds an exclusive flock on its own lock file, PATH-inflight-<owner>.lock
(locked before it takes that name), and tags its inflight rows with <owner>. A row is folded only
when its owner's lock can be taken (or its file is gone): the kernel drops the lock of a process
that dies, however it dies, while a live proxy keeps it. So another process opening the same
ledger (`budget-proxy usage` while the proxy serves) never folds, and so never double counts, the
streams of a live one. A store that closes unlinks its file; its rows left in flight (none after a
clean shutdown) are folded by the next open. A lock file left by a dead owner is removed by the
next open. (Without flock, on Windows, a dead owner's rows stay in flight: never counted twice.)"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # (Windows: no flock; a dead process's running charges then stay in flight, never doubled)
    fcntl = None  # type: ignore[assignment]

from proxy.ledger import ZERO, Amounts
from proxy.store import sqlite_history
from proxy.store.base import ROW_AMOUNTS, Reservation
from proxy.store.sqlite_rows import insert_rows_one_by_one, safe_float, safe_int, safe_text
from proxy.store.sqlite_schema import DELETE_INFLIGHT, SELECT_INFLIGHT, UPSERT_ADD
from proxy.store.sqlite_writer import transaction

log = logging.getLogger("budget_proxy.store")

INTERRUPTED = "interrupted"  # the usage-log outcome of a charge folded in from a dead process
OWNER_RE = re.compile(r"[0-9a-f]{32}")


class Running:
    """A reservation whose running charge SqliteStore keeps on disk (a row of `inflight`)."""

    __slots__ = ("res", "started", "at", "fixed", "written")

    def __init__(self, res: Reservation, now: float) -> None:
        self.res = res                        # as its latest charge left it
        self.started = self.at = now          # its first push, and its latest
        self.fixed: tuple[Any, ...] | None = None  # UPSERT_INFLIGHT's first 8 parameters, once written
        self.written = False                  # a write has carried it: its settlement deletes the row


class InflightRecovery:
    """SqliteStore's running charges, owner lock and recovery (a mixin: the store's state is its own)."""

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

    # --- owners (on the worker thread) --------------------------------------------------------
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

    def _release_claims(self, claimed: dict[str, int | None]) -> None:
        """Remove the lock files of the dead owners claimed, and let go of them."""
        for owner, fd in claimed.items():
            if fd is not None:
                try:
                    self._lock_path(owner).unlink(missing_ok=True)
                except OSError:
                    pass
                os.close(fd)

    # --- recovery (on the worker thread) ---------------------------------------------------------
    def _recover(self) -> int:
        """Fold the running charges that dead stores left in `inflight` into the totals (one
        transaction), and remove their lock files. Returns how many requests were folded."""
        if not self._on_disk():
            return 0
        db = self._db_or_raise()
        with_rows = {o for (o,) in db.execute("SELECT DISTINCT owner FROM inflight")}
        claimed: dict[str, int | None] = {}
        folded = [0]
        try:
            for owner in sorted((with_rows | self._owners_on_disk()) - {self._owner}):
                gone, fd = self._claim(owner)
                if gone:
                    claimed[owner] = fd
            dead = [o for o in claimed if o in with_rows]
            if dead:
                def fold_all() -> None:
                    for owner in dead:
                        folded[0] += self._fold(db, owner)
                transaction(db, fold_all)
        finally:
            self._release_claims(claimed)
        if folded[0]:
            log.warning("ledger store: %d request(s) were in flight when a previous process died; their charges "
                        "so far are now settled (usage-log outcome %r)", folded[0], INTERRUPTED)
        return folded[0]

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
        sqlite_history.add_rows(db, insert_rows_one_by_one(db, usage))
        return len(usage)
