"""SqliteStore's WAL checkpoints, off the commit path.

SQLite checkpoints the WAL inside the commit that takes it past `wal_autocheckpoint` pages
(1,000 by default): that commit also copies the pages into the database file and syncs both
files. A settlement awaits its commit before the response ends, so every such commit showed as a
request ten times slower than the median. Here a thread of its own checkpoints the WAL on a
connection of its own, PASSIVE (it never waits for, nor blocks, the writer), after the writer
has worked and at most every CHECKPOINT_EVERY_S; the writer's own automatic checkpoint is kept
only as a backstop, BACKSTOP_PAGES. The interval is a trade: a pass syncs what the WAL gained
since the last one, and a large sync slows the writer's own writes meanwhile (once a second, the
tail came back); but each pass copies again the pages written over and over (totals, running
charges), so passes much more often than SQLite's own cost CPU under many streams.
Durability is unchanged: the commits are the same; only who copies them on, and when, changed.

Under steady writes the WAL restarts from its start only after a checkpoint that no commit
overlapped: once a pass has seen RESTART_PAGES, the writer's thread runs one between two commits
(sqlite_writer.py, "The WAL's restart"; little is left to copy by then, this thread has copied the
rest), and BACKSTOP_PAGES remains should that not happen."""
from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("budget_proxy.store")

CHECKPOINT_EVERY_S = 0.1
BACKSTOP_PAGES = 10_000  # the writer's wal_autocheckpoint (a WAL of about 40 MB at 4 KiB pages)
RESTART_PAGES = 4_000  # a WAL this long is restarted by the writer (sqlite_writer.py)


class Checkpointer:
    """A daemon thread that checkpoints the WAL of the database at `path` after `wake()`, at most
    every CHECKPOINT_EVERY_S, until stopped: an idle ledger costs it nothing. `last` is the latest
    pass's (busy, WAL frames, frames checkpointed); `passes` counts them."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.every = CHECKPOINT_EVERY_S  # (read here, not bound as a default: tests set it)
        self.last: tuple[int, int, int] | None = None
        self.passes = 0
        self._stop = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="sqlite-checkpoint", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """The writer has worked: a pass is due (at once, or `every` after the last one)."""
        self._woken.set()

    def wal_frames(self) -> int | None:
        """The WAL's length in pages as the latest pass saw it (None: no pass yet, or it failed)."""
        last = self.last
        return None if last is None or self._failing else last[1]

    def restarting(self) -> None:
        """The writer has checkpointed the whole WAL: its next commit starts it again from its beginning."""
        self.last = (0, 0, 0)

    def stop(self) -> None:
        """Stop and join the thread (a pass in progress finishes first)."""
        self._stop.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        try:
            while self._woken.wait() and not self._stop.is_set():
                self._woken.clear()
                self.checkpoint()
                if self._stop.wait(self.every):
                    break
        finally:
            if self._db is not None:
                self._db.close()
                self._db = None

    def checkpoint(self) -> tuple[int, int, int] | None:
        """One PASSIVE pass: what it did, or None when it failed (logged once per run of failures;
        another process's checkpoint in progress is no failure: busy is then 1)."""
        try:
            if self._db is None:
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if not self._failing:
                log.error("ledger checkpoint failed (the writer's backstop checkpoints instead): %s",
                          exc.__class__.__name__)
            self._failing = True
            return None
        self._failing = False
        self.passes += 1
        self.last = (int(row[0]), int(row[1]), int(row[2]))
        return self.last
