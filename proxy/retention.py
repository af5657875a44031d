"""Retention of the usage log (docs/configuration.md, `store_retention_days`): rows older than that
many days are deleted, with the hourly tallies and denial counts of the hours that ended by then.

Off the hot path: tick() (every settlement calls it) only compares the clock with the next prune's
time; at most once an hour (PRUNE_EVERY_S, by the app's clock, which tests inject) it starts a
background task that deletes in batches of PRUNE_BATCH, pausing between them so that the store's
own writes (SQLite's group commits, on the same worker thread) go in between. A failure is logged
and tried again at the next prune; nothing here ever fails a request. 0 days: kept for ever."""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

log = logging.getLogger("budget_proxy")

DAY = 86400
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 2000
PRUNE_PAUSE_S = 0.05


class Retention:
    def __init__(self, state: Any) -> None:
        self.state = state
        self.next_at = -math.inf
        self.task: asyncio.Task[int] | None = None

    def days(self) -> int:
        return int(getattr(self.state.runtime.config, "store_retention_days", 90))

    def tick(self) -> None:
        """Start a prune if one is due (cheap when none is)."""
        now = self.state.clock()
        if now < self.next_at or (self.task is not None and not self.task.done()):
            return
        self.next_at = now + PRUNE_EVERY_S
        days = self.days()
        store = self.state.store
        try:
            store.set_retention(days * DAY)
        except Exception:
            pass
        if days > 0:
            self.task = asyncio.ensure_future(self.prune(store, now - days * DAY))

    async def prune(self, store: Any, before: float) -> int:
        """Delete everything older than `before`, batch by batch; how many rows went."""
        total = 0
        try:
            while True:
                n = await store.prune_log(before, PRUNE_BATCH)
                total += n
                if n < PRUNE_BATCH:
                    break
                await asyncio.sleep(PRUNE_PAUSE_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("retention: pruning the usage log failed (%s); retried at the next prune",
                        exc.__class__.__name__)
        if total:
            log.info("retention: %d usage-log records older than %d days pruned", total, self.days())
        return total
