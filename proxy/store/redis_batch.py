"""RedisStore's batching of script calls (a mixin: the store's state is its own), and the settles the
batches finish: landed, or retried in the background until they do.

Batching (group commit, as SqliteStore's). Reserve, charge, settle and release are functions of one
script, "batch", whose JSON argument is a list of calls [op, arguments...] run one after the other
in that order; it answers an array of their replies. A call made while no batch is in flight is sent
at once (nothing waits on a timer: alone, a request pays one round trip per call); calls
made while batches are in flight queue and go together in the next (at most MAX_BATCH), in arrival
order, with up to BATCHES_IN_FLIGHT batches awaiting Redis at a time. Each call runs exactly as it
would alone: the script is atomic, and call k reads what calls 1..k-1 wrote (a reserve is decided on
the state after every earlier call, never on a stale one; a second settle of an id in the same batch
finds the first one's tombstone). A call that fails inside the script answers '!' and its error and
fails alone (StoreUnavailable; e.g. a reserve of a used id); a batch that fails as a whole fails
every call in it, each as it would have failed alone. Settles are finished by the batch, not by
their callers: a settle lands (or goes to the background retry, per item) even if its caller is
cancelled; a reserve or charge whose caller has gone before its batch is sent is dropped. close()
lets the queued calls land first.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Sequence

from proxy.errors import StoreUnavailable
from proxy.store.base import Reservation, UsageRow
from proxy.store.redis_layout import _actual_of, _as_text, _payload
from proxy.store.redis_scripts import SCRIPTS
from proxy.store.resp import RespError, encode_command

log = logging.getLogger("budget_proxy.store")

UNAVAILABLE = "The budget ledger is unavailable; nothing was forwarded."

# Batches are sent while others await their replies (each script is atomic, and a request's own
# calls follow one another): the proxy works on while Redis answers, instead of idling a round trip.
# Small batches, several in flight: every item waits for its whole batch's Lua, and under
# concurrency the proxy on Redis is bound by that wait, not by CPU. 8 x 4 in flight is where the
# bench's JSON throughput peaks (bench.ab compares sizes): larger batches wait longer, smaller ones
# cost proxy CPU.
MAX_BATCH = 8
BATCHES_IN_FLIGHT = 4


class _Item:
    """One reserve / charge / settle / release waiting for its batch. A settle (res set) is finished by
    the flusher itself, whatever becomes of its caller: landed, or handed to the background retry."""

    __slots__ = ("call", "args", "fut", "res", "row")

    def __init__(self, op: str, args: list[str], fut: asyncio.Future[bytes],
                 res: Reservation | None = None, row: UsageRow | None = None) -> None:
        self.call, self.args, self.fut, self.res, self.row = [op, *args], args, fut, res, row


class ScriptBatcher:
    """RedisStore's batches of reserve / charge / settle / release calls, and its settles' retries."""

    # --- script calls ----------------------------------------------------------------------
    async def _call(self, name: str, args: Sequence[Any]) -> Any:
        """Run a script on the pipelined connection (resp.py: replies as bytes, binary-safe). A
        connection that fails is replaced and the call made once more: every script is idempotent."""
        pipe = self._pipe
        if pipe is None:
            raise StoreUnavailable(UNAVAILABLE)
        payload = _payload(args)  # one argument: cheaper to send than dozens
        failure: Exception | None = None
        command = self._evalsha_head(name) + b"$%d\r\n%s\r\n" % (len(payload), payload)
        for _ in range(2):
            try:
                try:
                    reply = await pipe.call_encoded(command)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    self._shas[name] = (await pipe.call(b"SCRIPT", b"LOAD", SCRIPTS[name])).decode()
                    reply = await pipe.call(b"EVALSHA", self._shas[name], b"0", *self._head, payload)
                return reply
            except OSError as exc:  # the connection: refused, lost, timed out, or garbled
                failure = exc
            except RespError as exc:
                failure = exc
                break
        log.error("redis store: %s failed: %s", name, failure.__class__.__name__)
        raise StoreUnavailable(UNAVAILABLE) from failure

    def _evalsha_head(self, name: str) -> bytes:
        """EVALSHA of a script with its fixed arguments, in RESP, for a last argument to follow: the
        same bytes every call, encoded once."""
        sha = self._shas[name]
        head = self._evalsha_heads.get(sha)
        if head is None:  # (the array's count already counts the last argument: an empty one, cut off)
            head = encode_command([b"EVALSHA", sha, b"0", *self._head, b""])[:-len(b"$0\r\n\r\n")]
            self._evalsha_heads[sha] = head
        return head

    # --- batching ------------------------------------------------------------------------
    # As SqliteStore's group commit: a call made while nothing is in flight is sent at once (no timer);
    # calls made while a batch is in flight wait and go together in the next one, one script call
    # running them in arrival order. Up to BATCHES_IN_FLIGHT batches await Redis at a time.
    def _submit(self, op: str, args: list[str], res: Reservation | None = None,
                row: UsageRow | None = None) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(op, args, fut, res, row))
        flushing = self._flushing
        if flushing == 0 or (flushing == self._sending and flushing < BATCHES_IN_FLIGHT):
            self._flushing += 1  # (counted here: a flusher that has not started yet takes this call)
            task = asyncio.ensure_future(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return fut

    async def _one(self, op: str, args: list[str]) -> str:
        """The reply of one reserve / charge / release; StoreUnavailable if its batch or the item failed."""
        reply = await self._submit(op, args)
        if reply[:1] == b"!":
            log.error("redis store: %s failed: %s", op, reply[1:].decode(errors="replace"))
            raise StoreUnavailable(UNAVAILABLE)
        return reply

    async def _flush(self) -> None:
        batch: list[_Item] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                # a reserve or charge whose caller has gone (cancelled) is not sent; settles and releases are
                batch = [it for it in batch if it.call[0] in ("s", "l") or not it.fut.done()]
                if batch:
                    self._sending += 1
                    try:
                        replies = await self._call_batch([it.call for it in batch])
                    except Exception as exc:  # anything else too: no caller may be left waiting
                        if not isinstance(exc, StoreUnavailable):
                            log.exception("redis store: batch failed")
                        for it in batch:
                            self._answer(it, None, StoreUnavailable(UNAVAILABLE))
                    else:
                        if any(isinstance(r, bytes) and r[:1] == b"!" and b"READONLY" in r for r in replies) and self._pipe is not None:
                            self._pipe.close()  # a demoted primary (failover): the next connect asks anew
                        for it, reply in zip(batch, replies):
                            self._answer(it, reply, None)
                    finally:
                        self._sending -= 1
                    batch = []
                # one loop turn: the callers just answered queue their next call (a reserve's settle)
                # into the next batch instead of each starting one; nothing waits on a timer
                await asyncio.sleep(0)
        except asyncio.CancelledError:  # the loop is going away: fail what has not been answered
            for it in batch + self._queue:
                self._answer(it, None, StoreUnavailable(UNAVAILABLE), retry=False)
            self._queue = []
            raise
        finally:
            self._flushing -= 1  # at once, not in a done callback: a call queued now starts a flusher

    def _answer(self, it: _Item, reply: bytes | None, error: StoreUnavailable | None, retry: bool = True) -> None:
        if it.res is not None:  # a settle: finished here
            if reply is not None and reply[:1] != b"!":
                self._settled(it.res, reply)
            elif retry:
                if reply is not None:
                    log.error("redis store: settle failed: %s", reply[1:].decode(errors="replace"))
                self._defer_settle(it.res, it.args, it.row)
            else:
                self._unsettled(it.res, it.args, it.row)
            if not it.fut.done():
                it.fut.set_result(b"")
        elif not it.fut.done():
            if reply is not None:
                it.fut.set_result(reply)
            else:
                it.fut.set_exception(error or StoreUnavailable(UNAVAILABLE))

    async def _drain(self) -> None:
        while self._flushers:
            await asyncio.wait(list(self._flushers))

    async def _call_batch(self, calls: list[list[str]]) -> list[str]:
        replies = await self._call("batch", calls)
        if not isinstance(replies, list) or len(replies) != len(calls):
            log.error("redis store: batch of %d answered %d replies", len(calls), len(replies))
            raise StoreUnavailable(UNAVAILABLE)
        return replies

    # --- settles: landed, deferred, or logged as unsettled ----------------------------------
    def _defer_settle(self, res: Reservation, args: list[str], row: UsageRow | None) -> None:
        log.warning("redis store: settle of %s deferred; retrying in the background", res.id)
        task = asyncio.ensure_future(self._retry_settle(res, args, row))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _settled(self, res: Reservation, outcome: bytes) -> None:
        self._live.pop(res.id, None)
        if outcome == b"late":
            log.warning("redis store: %s settled after its hold had expired; totals corrected", res.id)
        elif outcome == b"missing":
            log.warning("redis store: %s settled without a reservation on record; counted as settled", res.id)

    async def _retry_settle(self, res: Reservation, args: list[str], row: UsageRow | None) -> None:
        delay = self.settle_backoff
        try:
            for attempt in range(1, self.settle_attempts + 1):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
                try:
                    outcome = (await self._call_batch([["s", *args]]))[0]
                except StoreUnavailable:
                    continue
                except Exception:  # (never let one settlement's retry die before it is logged as unsettled)
                    log.exception("redis store: settle retry failed")
                    continue
                if outcome[:1] == b"!":
                    log.error("redis store: settle failed: %s", outcome[1:].decode(errors="replace"))
                    continue
                log.info("redis store: deferred settle of %s landed (attempt %d)", res.id, attempt)
                self._settled(res, outcome)
                return
        except asyncio.CancelledError:
            pass
        self._unsettled(res, args, row)

    def _unsettled(self, res: Reservation, args: list[str], row: UsageRow | None) -> None:
        self._live.pop(res.id, None)
        log.error("redis store: UNSETTLED request %s (its charges so far count when its hold expires): %s",
                  res.id, json.dumps({"actual": _actual_of(args), "row": row._asdict() if row else None},
                                     default=_as_text))
