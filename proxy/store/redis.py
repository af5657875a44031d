"""redis://HOST:PORT/DB[?prefix=...&hold_ttl=15&renew_every=5] — budgets shared by several replicas.
Also rediss://[user:password@]HOST:PORT/DB[?ssl_ca_certs=PATH] (TLS; an ACL user) and
redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB: see redis_url.py.

Every decision runs inside Redis as one Lua script (SCRIPT LOAD once, EVALSHA, reloaded on
NOSCRIPT), so reserve / charge / settle / release are atomic across all scopes of a request and
across replicas: N replicas keep exactly the single-node overshoot bound. Python never reads,
modifies and writes back. The scripts are `ledger.admit` / `ledger.check_growth` transcribed;
money stays integer nano-dollars, and the Decimal output rate travels as an exact integer
fraction (numerator / denominator) so that floor (the cost clamp) and ceil (the hold's output
cost) equal Python's. Exactness needs every amount and limit below 2**53 (Lua numbers are
doubles): limits above that are treated as 2**53-1 (9e15 tokens; $9,007,199 per scope and period).
A call is EVALSHA with four arguments (prefix, hold TTL, log cap, then every other argument as one
JSON array the script decodes with cjson), sent on the store's own pipelined connection (resp.py:
redis-py's pool, timeouts and parser cost more CPU per call than the rest of the store); replies
are packed binary (struct), unpacked here without parsing text. redis-py serves the rest (ping,
script loading at start, the usage log).

RedisStore is the protocol; its parts, each a module: redis_url (the URL, and the connections it
names), redis_layout (the scripts' keys, arguments and packed replies), redis_batch (batches of
script calls, settles' retries), redis_scripts (the Lua), resp (the pipelined connection),
redis_history and redis_keys (the hourly history, runtime keys).

Expiry. A reservation expires HOLD_TTL (15 s) after its last renewal, measured on Redis' clock. The
store renews all of this process's reservations in one script call every RENEW_EVERY (5 s), and each
charge renews its own. Nothing runs on a timer in Redis: reserve, charge, states and reset first
purge expired reservations (any scope's, oldest first; up to 64 a call in reserve and charge, which
err towards denying while more than that wait; a batch runs at one instant of Redis' clock, so once a
purge leaves none, later items skip theirs), so a replica killed with kill -9 has its holds gone
within HOLD_TTL of its last renewal (at most HOLD_TTL after the kill), as soon as anyone reserves or
reads /budget on those scopes. An expired reservation's in-flight `charged` amount is KEPT AS
SETTLED (those tokens were generated and may be billed); only the unused rest of its hold is
released. A "hold_expired" usage-log row records it. A reservation is only expired once a script
purges it; until then it is fully counted, so a late renewal or charge simply revives it. If its
owner is alive after the purge (Redis was unreachable longer than HOLD_TTL), its next charge is
refused (the stream is cut) and its settle corrects settled by (actual - charged at expiry): totals
end exactly as if it had settled normally. A settle that finds no reservation at all (its expired
record aged out after a day) adds its whole actual to the scopes it names: it may count the charges
at expiry twice, never zero times.

Crash durability (docs/budgets.md "Crash durability"). Nothing of a request in flight lives only in
the process: each charge() (the relay pushes a stream's running charge about once a second) is a
script call that sets the reservation's charged amounts in its record and moves them from held to
charged (c1..cN) in every scope's totals, so `used` (settled + charged) counts them at once, on
every replica. A kill -9 loses at most what each stream generated after its last push. The dead
process's reservations then expire as above: their charged part becomes settled (never released like
the unused hold), with a "hold_expired" usage-log row (team and key from the record; the store is
told no model or route). A live record is kept as long as the longest-lived totals it points to
(PXAT), so it cannot vanish before a purge has settled its charges; an expired one is kept a day for
a late settle to correct.

Growth. Totals of a period expire RETENTION (35 days) after the period ends (`period: none` totals
live on: one key per scope), a run's (Scope.ttl, docs/budgets.md "Runs") run_ttl after its last request:
reserve sends its keep as '-TTL' and the script sets PEXPIREAT to now + TTL at every request of the
run (admitted or denied), and settle (its scope count sent negative, so that a request without a run
costs the scripts nothing more) again at its end; the run's entry in P R:TEAM/KEY likewise, and
that index expires with its latest run. Settle tombstones after 10 minutes, expired reservations after a day; a
live reservation lives as long as the totals it points to. The usage log is a stream capped near
log_max rows. Scripts touch keys they compute (another replica's reservation spans other scopes), so
this store needs a single Redis (or a primary with replicas / Sentinel), not Redis Cluster.

Failures. Socket timeouts are short (0.5 s connect, 1 s read) and a failed call is retried once on
a new connection (one may be stale after Redis restarted; for a batch: the whole batch); then
StoreUnavailable: ping() -> /readyz 503, reserve -> 503 with nothing forwarded, charge -> raised to
the relay. The client reconnects by itself when Redis returns and scripts are reloaded on NOSCRIPT.
Every script is idempotent (reserve answers a replay with the same reservation; charge sets a
running total; settle and release leave a tombstone), so a retry after a lost reply, a whole batch
run twice included, never counts twice. A settle that fails (its batch, or its own item) is retried
alone in the background (10 attempts, backoff 0.25 s doubling to 8 s: about 50 s) until it lands; if
it never does, the full row is logged as unsettled (ERROR), and the reservation's charges so far
still count when its hold expires. Tested with Redis 7.0 (needs >= 6.2: SET PXAT and KEEPTTL;
scripts read TIME before writing).

Upgrading from a layout before 2026-12 (P r:ID / P x:T; totals as a hash at P t:T, which are no
longer read): go through a version of 2026-12 first, which moves totals on first use. A dimension
appended to the declaration needs nothing: amounts are kept by position (0 in one added since).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.ledger import (DIMENSIONS, METERED, ZERO, Admitted, Amounts, Ask, Denied, Scope, ScopeState,
                          needed_to_admit, tightest_remaining, wall_clock_deadline)
from proxy.periods import period_bounds
from proxy.store import redis_history, redis_keys
from proxy.store.base import KeyRecord, Reservation, UsageRow
from proxy.store.base import Cursor, Tally
from proxy.store.redis_batch import MAX_BATCH, UNAVAILABLE, ScriptBatcher, _Item
from proxy.store.redis_layout import (_ADMITTED, _HOLD, _N, _admitted, _denied, _keep_ms, _keep_ms_until, _limits,
                                      _num, _payload, _rate, _row, _row_args, _run_keep, _settle_keep_ms, _states,
                                      _totals_key, _tuple)
from proxy.store.redis_scripts import SCRIPTS
from proxy.store.redis_url import RedisTarget, connections, parse_redis_url
from proxy.store.resp import RespClient, RespError

# (names this module had before its parts moved out, still imported from here)
__all__ = ["MAX_BATCH", "RedisStore", "RedisTarget", "SCRIPTS", "UNAVAILABLE", "_payload", "parse_redis_url"]

log = logging.getLogger("budget_proxy.store")

SENTINEL_CHECK_S = 0.5  # how often a Sentinel store asks which server is the primary


def _denial_done(fut: asyncio.Future[bytes]) -> None:
    """A denial's count landed, or not: said in the log, never raised (nobody awaits it)."""
    if fut.cancelled():
        return
    exc = fut.exception()
    reply = None if exc is not None else fut.result()
    if exc is not None or reply[:1] == b"!":
        log.warning("redis store: a denial was not counted in the history")


class RedisStore(ScriptBatcher):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "budget-proxy:",
                 hold_ttl: float = 15.0, renew_every: float = 5.0, log_max: int = 100_000,
                 settle_attempts: int = 10, settle_backoff: float = 0.25) -> None:
        self.url, self.prefix = url, prefix
        self.hold_ttl, self.renew_every, self.log_max = hold_ttl, renew_every, log_max
        self.settle_attempts, self.settle_backoff = settle_attempts, settle_backoff
        self._head = [x.encode() for x in (prefix, str(int(hold_ttl * 1000)), str(log_max))]
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        self._evalsha_heads: dict[str, bytes] = {}
        self._client: aioredis.Redis | None = None
        self._pipe: RespClient | None = None  # the batches' own connection (resp.py): the hot path
        self._live: dict[str, Reservation] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._connector: asyncio.Task[None] | None = None  # retries a store unreachable at start
        self._watcher: asyncio.Task[None] | None = None    # Sentinel: notices a failover (_watch_primary)
        self._retries: set[asyncio.Task[None]] = set()
        # reserve / charge / settle / release calls waiting for the next batch, and the task sending them
        self._queue: list[_Item] = []
        self._flushers: set[asyncio.Task[None]] = set()  # (for _drain)
        self._flushing = 0  # flushers that have not yet found the queue empty
        self._sending = 0   # batches awaiting Redis

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RedisStore:
        """redis://[user:pass@]host:port/db?prefix=..&hold_ttl=s&renew_every=s&log_max=n (or rediss://,
        redis+sentinel://: parse_redis_url); other query parameters go to redis-py (ssl_ca_certs, ...);
        keyword arguments override the URL's."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        kw = dict(kw)
        for name, conv in (("prefix", str), ("hold_ttl", float), ("renew_every", float), ("log_max", int)):
            if name in query:
                kw.setdefault(name, conv(query.pop(name)))
        return cls(urlunsplit(parts._replace(query=urlencode(query))), **kw)

    # --- lifecycle ---------------------------------------------------------------------
    def _connections(self) -> tuple[aioredis.Redis, RespClient]:
        """The connections self.url names (redis_url.connections)."""
        return connections(self.url)

    async def open(self) -> None:
        """Never fails for an unreachable Redis (or refused credentials): ping() says so (/readyz 503,
        metered requests 503), a background task keeps trying with backoff, and calls reconnect when
        Redis returns."""
        self._client, self._pipe = self._connections()
        try:
            await self._pipe.connect()
            await self._load_scripts()
        except (RedisError, OSError, RespError) as exc:
            log.warning("redis store: not reachable at start (%s); retrying in the background",
                        self._pipe.last_error or exc.__class__.__name__)
            self._connector = asyncio.ensure_future(self._connect_loop())
        if self._pipe.resolve is not None:
            self._watcher = asyncio.ensure_future(self._watch_primary())
        self._renewer = asyncio.ensure_future(self._renew_loop())

    async def _watch_primary(self) -> None:
        """Sentinel: every SENTINEL_CHECK_S, the sentinels are asked for the primary; a connection to
        another server is dropped (the next call connects to the new primary). A connection that fails,
        or a READONLY reply, re-resolves at once without waiting for this."""
        while self._pipe is not None:
            await asyncio.sleep(SENTINEL_CHECK_S)
            if self._pipe is not None:
                await self._pipe.recheck()

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD every script on the pipelined connection (else on first use, on NOSCRIPT)."""
        assert self._pipe is not None
        for name, src in SCRIPTS.items():
            sha = await self._pipe.call(b"SCRIPT", b"LOAD", src)
            self._shas[name] = sha.decode() if isinstance(sha, bytes) else str(sha)

    async def _connect_loop(self) -> None:
        """Until the store's connection opens: backoff 0.25 s doubling to 5 s; logged once a minute at most."""
        delay, said = 0.25, 0.0
        loop = asyncio.get_running_loop()
        while self._pipe is not None:
            await asyncio.sleep(delay)
            pipe = self._pipe
            if pipe is None:
                return
            try:
                await pipe.connect()
                await self._load_scripts()
            except (OSError, RespError) as exc:
                if loop.time() - said > 60:
                    said = loop.time()
                    log.warning("redis store: still unreachable (%s)", pipe.last_error or exc.__class__.__name__)
                delay = min(5.0, delay * 2)
                continue
            log.info("redis store: connected")
            return

    async def close(self) -> None:
        for task in (self._connector, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._connector = self._watcher = None
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        await self._drain()  # the settlements already accepted land first
        if self._retries:
            await asyncio.wait(self._retries, timeout=5.0)
            for task in self._retries:
                task.cancel()   # its row is logged as unsettled on cancellation
            await asyncio.gather(*self._retries, return_exceptions=True)
        for res in [r for r in self._live.values() if not r.settled]:
            try:
                await self.release(res)
                log.warning("redis store closed with request %s in flight: hold released, charges kept", res.id)
            except StoreUnavailable:
                pass  # its hold expires on its own
        await self._drain()
        self._live.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def ping(self) -> None:
        """PING on the connection the requests use (resp.py's), not redis-py's pool."""
        if self._pipe is None:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            await self._pipe.call(b"PING")
        except (OSError, RespError) as exc:
            raise StoreUnavailable(UNAVAILABLE) from None

    # --- the protocol --------------------------------------------------------------------
    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        bounds = [period_bounds(s.period, now) for s in scopes]
        starts = [b[0] for b in bounds]
        team = key = ""
        for s in scopes:
            if s.kind == "team":
                team = team or s.name
            elif s.kind == "key":
                key = key or s.name
        num, den = _rate(ask)
        args = [request_id, repr(float(now)), _num(ask.input_tokens), _num(ask.input_cost_nanos),
                _num(ask.max_tokens), num, den, team, key, str(len(scopes))]
        for s, (start, end) in zip(scopes, bounds):
            args += [_totals_key(s, start), _keep_ms_until(end, now) if s.ttl is None else _run_keep(s), *_limits(s)]
        reply = await self._one("r", args)
        if reply[:1] == b"D":
            j, dim = reply[1] - 1, DIMENSIONS[reply[2] - 1]
            return _denied(scopes[j], _states(reply, 3)[j], dim, needed_to_admit(dim, ask), now)
        out, hold = _admitted(reply)
        states = _states(reply, 1 + _ADMITTED.size)
        if reply[:1] == b"A":  # admitted now: the states as read before its hold was added
            states = [ScopeState(st.used, st.held + hold,
                                 float(now) if st.first_request_at is None else st.first_request_at) for st in states]
        res = _tuple(Reservation, (request_id, tuple(scopes), tuple(starts), Admitted(hold, out, out < ask.max_tokens),
                                   hold, ZERO, wall_clock_deadline(list(zip(scopes, states)), now), False,
                                   tightest_remaining(scopes, states)))
        self._live[request_id] = res
        return res

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Reservation | Denied:
        if res.settled:
            return res
        charged = charged.nonneg()
        args = [res.id, repr(float(now)), *(_num(v) for v in charged.as_tuple()), str(len(res.scopes))]
        for s in res.scopes:
            args += _limits(s)
        reply = await self._one("c", args)
        tag = reply[:1]
        if tag == b"K":
            res = res.with_charge(_tuple(Amounts, map(int, _HOLD.unpack_from(reply, 1))), charged)
            live = self._live.get(res.id)
            if live is not None and not live.settled:  # (a settle queued after this charge keeps its mark)
                self._live[res.id] = res
            return res
        if tag == b"D":
            j, dim = reply[1] - 1, DIMENSIONS[reply[2] - 1]
            hold = self._live.get(res.id, res).hold  # (the latest this process knows: what the script grew from)
            growth = hold.max(charged) - hold
            return _denied(res.scopes[j], _states(reply, 3)[j], dim, growth.get(dim) if dim in METERED else 0, now)
        if tag == b"X":  # its hold expired while it was alive: cut it (fail closed)
            log.warning("redis store: request %s charged after its hold expired; cutting it", res.id)
            states = _states(reply, 1)
            for s, st in zip(res.scopes, states):
                dim = next((d for d in DIMENSIONS if s.limits.get(d) is not None), None)
                if dim is not None:
                    return _denied(s, st, dim, 0, now)
        return res

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> Reservation:
        if res.settled:
            return res
        done = res.as_settled()
        if res.id in self._live:  # (renewed until the settle lands; never released by close())
            self._live[res.id] = done
        args = [res.id, *map(_num, actual), str(len(res.scopes))]
        runs = False
        for s, start in zip(res.scopes, res.period_starts):
            if s.ttl is None:
                args += [_totals_key(s, start), _settle_keep_ms(s, start)]
            else:  # a run's: its totals live run_ttl past this request's end too
                args += [_totals_key(s, start), _run_keep(s)]
                runs = True
        if runs:
            args[1 + _N] = str(-len(res.scopes))  # (-n: the script looks for '-TTL' keeps)
        args += _row_args(row)
        if row is not None:  # the row's hourly tallies live this long (redis_history.py)
            args.append(self._history_keep)
        # landed or deferred by the flusher, even if this caller is cancelled meanwhile
        await self._submit("s", args, res, row)
        return done

    async def release(self, res: Reservation) -> None:
        """Drop a reservation without a usage row: its charges so far count as settled, the rest of
        its hold is released. Exactly once, like settle."""
        if res.settled:
            return
        if res.id in self._live:
            self._live[res.id] = res.as_settled()
        await self._one("l", [res.id])
        self._live.pop(res.id, None)

    async def states(self, scopes: Sequence[Scope], now: float) -> list[ScopeState]:
        keys = [_totals_key(s, period_bounds(s.period, now)[0]) for s in scopes]
        return _states(await self._call("states", [str(len(keys)), *keys]))

    async def reset(self, scope: Scope, now: float) -> None:
        await self._call("reset", [_totals_key(scope, period_bounds(scope.period, now)[0]), _keep_ms(scope, now)])

    async def usage_log(self, limit: int = 100) -> list[UsageRow]:
        if self._client is None:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            entries = await self._client.xrevrange(self.prefix + "log", count=limit)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(UNAVAILABLE) from exc
        return [_row(fields_) for _, fields_ in reversed(entries)]

    async def list_runs(self, prefix: str, now: float, limit: int) -> tuple[int, list[tuple[str, ScopeState, float]]]:
        """LedgerStore.list_runs, from the key's index of runs (P R:TEAM/KEY, kept by reserve and
        settle): `prefix` is "run:TEAM/KEY/"; forgotten-at times are Redis' clock."""
        base = prefix.removeprefix("run:").removesuffix("/")
        reply = await self._call("runs", [base, str(max(0, limit))])
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailable(UNAVAILABLE)
        entries = []
        for i in range(1, len(reply) - 2, 3):
            run, raw, at = reply[i], reply[i + 1], reply[i + 2]
            entries.append((f"{prefix}{run.decode()}", _states(raw)[0], float(at) / 1000))
        return int(reply[0]), entries

    # --- runtime keys (proxy/store/redis_keys.py) ---------------------------------------------
    async def put_key(self, rec: KeyRecord, now: float) -> bool:
        return await redis_keys.put(self._client, self.prefix, rec, now)

    async def find_key(self, digest: str) -> KeyRecord | None:
        return await redis_keys.find(self._client, self.prefix, digest)

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        return await redis_keys.listed(self._client, self.prefix, team)

    async def revoke_key(self, team: str, name: str, now: float) -> KeyRecord | None:
        return await redis_keys.revoke(self._client, self.prefix, team, name, now)

    # --- alert claims (proxy/alerting.py): P alert:EVENT_KEY, SET NX PX, one replica wins -------------
    async def claim_alert(self, event_key: str, ttl: float) -> bool:
        if self._client is None:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            won = await self._client.set(self.prefix + "alert:" + event_key, "1", nx=True,
                                         px=max(1, int(ttl * 1000)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(UNAVAILABLE) from exc
        return bool(won)

    # --- history (proxy/store/redis_history.py) -----------------------------------------------
    _history_keep = redis_history.DEFAULT_KEEP_MS  # the hourly tallies' retention, ms ('0': for ever)

    def set_retention(self, seconds: float) -> None:
        self._history_keep = redis_history.keep_ms(seconds)

    def log_denial(self, team: str, key: str, now: float) -> None:
        """An item "d" of the next batch; nobody waits for it (its failure is logged, never raised)."""
        try:
            fut = self._submit("d", [team, key, repr(float(now)), self._history_keep])
            fut.add_done_callback(_denial_done)
        except Exception as exc:
            log.warning("redis store: denial not counted: %s", exc.__class__.__name__)

    async def usage_hours(self, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
        return await redis_history.read_hours(self._pipe, self.prefix, team, key, start, end)

    async def usage_page(self, start: float, end: float, team: str | None, key: str | None,
                         after: Cursor, limit: int) -> tuple[list[UsageRow], Cursor]:
        return await redis_history.read_page(self._client, self.prefix + "log", _row, start, end, team, key,
                                             after, limit)

    async def prune_log(self, before: float, limit: int) -> int:
        return await redis_history.prune(self._client, self.prefix, before, limit)

    # --- renewal ----------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await self.renew()
            except Exception:  # the loop must outlive any one failure: holds depend on it
                log.exception("redis store: renewal failed")

    async def renew(self) -> None:
        """Extend the expiry of every reservation this process has in flight (one script call)."""
        ids, lost = list(self._live), []
        try:
            for i in range(0, len(ids), 500):  # short scripts: Redis serves nobody else while one runs
                lost += [rid.decode() for rid in await self._call("renew", ids[i:i + 500])]
        except StoreUnavailable:
            log.warning("redis store: could not renew %d holds", len(ids))
        for rid in lost:
            res = self._live.get(rid)
            if res is not None and not res.settled:
                log.warning("redis store: the hold of %s expired while it was in flight", rid)
                self._live.pop(rid, None)
