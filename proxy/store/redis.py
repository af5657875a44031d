"""redis://HOST:PORT/DB[?prefix=...&hold_ttl=15&renew_every=5] — budgets shared by several replicas.
Also rediss://[user:password@]HOST:PORT/DB[?ssl_ca_certs=PATH] (TLS; an ACL user) and
redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB: see _connections.

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

Keys (P = prefix, default "budget-proxy:"; T = "<scope id>@<period start, epoch s>"; N dimensions,
ledger.DIMS: tokens, input_tokens, output_tokens, cost (nanos), steps):
  P T:T   string per scope and period, 3N + 1 packed doubles: s1..sN settled, c1..cN charged by
                 requests in flight, h1..hN held (sum of max(hold - charged, 0)), f first_request_at
                 (-1: none). Totals of another N (a dimension added since) are read by position.
  P x     zset   every reservation in flight (any scope), scored by its expiry (ms, Redis TIME)
  P q:ID  string one reservation, packed: st (live | expired | done; + 4N when N is not 5: records of
                 any N are read by position), its hold and charged, out, at, its totals names and
                 their expire-at, team, key; st done is the settle tombstone (10 min): a second
                 settle of ID is a no-op
  P log   stream usage-log rows, XADD MAXLEN ~ 100000 (configurable: log_max)
  P Ht:.. P Hk:.. P Hi   the history's hourly tallies per team and key, and their index (redis_history.py)
  P R:TEAM/KEY  zset  the key's runs not yet forgotten (run ids, scored by when each is, ms): /admin/runs
Packed strings because a redis.call and every number parsed or formatted as text cost far more in
Lua than the command itself (redis_scripts.py has the figures).

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

Row isolation. A usage row never fails its settlement or the batch: _payload sends a lone
surrogate as '?' (cjson refuses it, as it refuses a \\udfff escape) and anything that is not a string
as its str() or null; the settle script writes its totals and tombstone before the row, runs each
item under pcall, and if XADD refuses a value (a null) writes the row again with such values as ''.

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
import json
import logging
import struct
from fractions import Fraction
from typing import Any, Sequence, get_type_hints
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.dimensions import spelled
from proxy.ledger import (DIMENSIONS, DIMS, METERED, ZERO, Admitted, Amounts, Ask, Denied, Limits, Scope, ScopeState,
                          needed_to_admit, tightest_remaining, wall_clock_deadline)
from proxy.periods import period_bounds
from proxy.store import redis_history, redis_keys
from proxy.store.base import KeyRecord, Reservation, UsageRow
from proxy.store.base import Cursor, Tally
from proxy.store.redis_scripts import NO_FIRST_REQUEST, SCRIPTS
from proxy.store.resp import RespClient, RespError, encode_command

log = logging.getLogger("budget_proxy.store")

MAX_EXACT = 2**53 - 1
RETENTION_S = 35 * 86400
UNAVAILABLE = "The budget ledger is unavailable; nothing was forwarded."
SENTINEL_CHECK_S = 0.5  # how often a Sentinel store asks which server is the primary

_ROW_TYPES = {name: t if t in (float, int) else str for name, t in get_type_hints(UsageRow).items()}


def _num(v: int) -> str:
    return str(v) if -MAX_EXACT <= v <= MAX_EXACT else str(MAX_EXACT if v > 0 else -MAX_EXACT)


def _opt(v: int | float | None) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else _num(v)


# Script arguments that depend only on config objects are built once per object, not per call: the
# config's Limits live until a reload (the cache holds each one, so its id is not reused meanwhile).
_LIMIT_ARGS: dict[int, tuple[Limits, tuple[str, ...]]] = {}
_RATE_ARGS: dict[Any, tuple[str, str]] = {}
_CACHE_MAX = 4096


def _limits(scope: Scope) -> tuple[str, ...]:
    """The scope's limits as script arguments, DIMENSIONS' order ('' = none)."""
    lim = scope.limits
    hit = _LIMIT_ARGS.get(id(lim))
    if hit is not None and hit[0] is lim:
        return hit[1]
    if len(_LIMIT_ARGS) >= _CACHE_MAX:
        _LIMIT_ARGS.clear()
    args = tuple(_opt(lim.get(d)) for d in DIMENSIONS)
    _LIMIT_ARGS[id(lim)] = (lim, args)
    return args


def _totals_key(scope: Scope, start: float) -> str:
    return f"{scope.id}@{int(start)}"


def _keep_ms(scope: Scope, now: float) -> str:
    """How long the totals of `now`'s period are kept: until RETENTION after the period ends. Relative,
    so that Redis applies it on its own clock (callers' clocks may differ; tests pass past times)."""
    return _keep_ms_until(period_bounds(scope.period, now)[1], now)


def _keep_ms_until(end: float | None, now: float) -> str:
    return "0" if end is None else str(max(1, int((end + RETENTION_S - now) * 1000)))


def _run_keep(scope: Scope) -> str:
    """A run scope's keep: '-TTL' (ms), which the scripts read as "TTL past each request" (slides)."""
    return "-%d" % max(1, int(scope.ttl * 1000))  # type: ignore[operator]


_SETTLE_KEEP: dict[tuple[str, float], str] = {}


def _settle_keep_ms(scope: Scope, start: float) -> str:
    """_keep_ms(scope, start): a settle measures its period's lifetime from the period's start, the
    same figure for every request of the period, so it is worked out once per period."""
    k = (scope.period, start)
    hit = _SETTLE_KEEP.get(k)
    if hit is None:
        if len(_SETTLE_KEEP) >= _CACHE_MAX:
            _SETTLE_KEEP.clear()
        hit = _SETTLE_KEEP[k] = _keep_ms(scope, start)
    return hit


# The scripts' packed replies (redis_scripts.py): a scope's totals are 3N + 1 doubles for N
# dimensions, s1..sN settled, c1..cN charged, h1..hN held, f first request (NO_FIRST_REQUEST: none);
# integers below 2**53 exact.
_N = len(DIMS)
_TOTALS = struct.Struct(f"<{3 * _N + 1}d")
_ADMITTED = struct.Struct(f"<{_N + 1}d")  # out, hold
_HOLD = struct.Struct(f"<{_N}d")
_tuple = tuple.__new__


def _unpack_source(n: int) -> str:
    """_states and _admitted, unrolled over the n dimensions (a loop is measurably slower: every reserve reads
    two scopes' totals and a hold)."""
    s, c, h = spelled("s{i}", n), spelled("c{i}", n), spelled("h{i}", n)
    return f"""
def _admitted(buf):
    out, {h} = _ADMITTED.unpack_from(buf, 1)
    return int(out), _tuple(Amounts, ({spelled("int(h{i})", n)},))

def _states(buf, pos=0):
    out = []
    unpack = _TOTALS.unpack_from
    for off in range(pos, len(buf), _TOTALS.size):
        {s}, {c}, {h}, first = unpack(buf, off)
        out.append(_tuple(ScopeState, (
            _tuple(Amounts, ({spelled("int(s{i}) + int(c{i})", n)},)),
            _tuple(Amounts, ({spelled("int(h{i})", n)},)),
            None if first == NO_FIRST_REQUEST else first)))
    return out
"""


# _states(buf, pos=0) -> list[ScopeState]: the scopes' totals packed from buf[pos:] on; _admitted(buf):
# a reserve's out and hold. Built as tuples directly (a NamedTuple's keyword-handling constructor costs
# several times as much).
_generated: dict[str, Any] = {"_TOTALS": _TOTALS, "_ADMITTED": _ADMITTED, "_tuple": _tuple, "ScopeState": ScopeState,
                              "Amounts": Amounts, "NO_FIRST_REQUEST": NO_FIRST_REQUEST}
exec(_unpack_source(_N), _generated)
_states, _admitted = _generated["_states"], _generated["_admitted"]


def _rate(ask: Ask) -> tuple[str, str]:
    """The output rate (nanos per token) as an exact fraction: numerator, denominator."""
    hit = _RATE_ARGS.get(ask.output_nanos_per_token)
    if hit is not None:
        return hit
    rate = Fraction(ask.output_nanos_per_token)
    if rate < 0 or rate.numerator > MAX_EXACT or rate.denominator > MAX_EXACT:
        raise ValueError("output rate out of the exact range of the Redis store")
    if len(_RATE_ARGS) >= _CACHE_MAX:
        _RATE_ARGS.clear()
    hit = _RATE_ARGS[ask.output_nanos_per_token] = (str(rate.numerator), str(rate.denominator))
    return hit


def _denied(scope: Scope, state: ScopeState, dim: str, needed: int, now: float) -> Denied:
    if dim == "wall_clock":
        wc = scope.limits.wall_clock or 0.0
        return Denied(scope, dim, wc, state.wall_clock_used(now), 0, 0)
    limit = scope.limits.get(dim)
    assert limit is not None
    return Denied(scope, dim, limit, state.used.get(dim), state.held.get(dim), needed)


_ROW_IS_TEXT = tuple(t is str for t in _ROW_TYPES.values())


def _row_args(row: UsageRow | None) -> list[str]:
    """The row's values in UsageRow's field order (the script names them: ROW_FIELDS); numbers by repr."""
    if row is None:
        return []
    return [v if text else repr(v) for v, text in zip(row, _ROW_IS_TEXT)]


_quote = json.encoder.encode_basestring  # (in C) one str as a JSON string, non-ASCII kept as is


def _payload(args: Sequence[str | list[str]]) -> bytes:
    """A script's arguments (strings, or lists of strings: a batch's items) as the one JSON array its
    ARGV[4] carries. A lone surrogate (a client's JSON may carry one, e.g. in the model name)
    becomes '?': Lua's cjson refuses it (and would refuse a \\udfff escape too). Joined here rather
    than by json.dumps: a third cheaper. Never fails: a value that is not a string (a usage row
    built wrong) goes as its str(), or as null (None), which the settle script writes as ''."""
    try:
        text = "[" + ",".join([_quote(a) if type(a) is str else "[" + ",".join(map(_quote, a)) + "]"
                               for a in args]) + "]"
    except TypeError:  # (not only strings)
        text = json.dumps(args, ensure_ascii=False, separators=(",", ":"), default=_as_text)
    return text.encode("utf-8", "replace")


def _as_text(v: Any) -> str:
    try:
        return str(v)
    except Exception:
        return ""



def _actual_of(settle_args: list[str]) -> dict[str, int]:
    return {d: int(v) for d, v in zip(METERED, settle_args[1:1 + _N])}


def _row(entry: dict[str, str]) -> UsageRow:
    """A usage-log entry as a UsageRow; a field missing or unreadable is 0 or '' (one odd entry must not
    make the whole log unreadable)."""
    values: dict[str, Any] = {}
    for k, conv in _ROW_TYPES.items():
        try:
            values[k] = conv(entry.get(k, "0" if conv is not str else ""))
        except (TypeError, ValueError, OverflowError):
            values[k] = conv()
    return UsageRow(**values)


def _denial_done(fut: asyncio.Future[bytes]) -> None:
    """A denial's count landed, or not: said in the log, never raised (nobody awaits it)."""
    if fut.cancelled():
        return
    exc = fut.exception()
    reply = None if exc is not None else fut.result()
    if exc is not None or reply[:1] == b"!":
        log.warning("redis store: a denial was not counted in the history")


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


class RedisTarget:
    """A store URL's connection parts (parse_redis_url). Its repr names no password."""

    __slots__ = ("scheme", "host", "port", "db", "username", "password", "query", "sentinels", "service")

    def __init__(self, scheme: str, host: str, port: int, db: int, username: str | None, password: str | None,
                 query: dict[str, str], sentinels: list[tuple[str, int]] | None = None, service: str = "") -> None:
        self.scheme, self.host, self.port, self.db = scheme, host, port, db
        self.username, self.password, self.query = username, password, query
        self.sentinels, self.service = sentinels, service

    def __repr__(self) -> str:
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels) if self.sentinels else f"{self.host}:{self.port}"
        return f"RedisTarget({self.scheme}://{where}/{self.service + '/' if self.service else ''}{self.db})"

    @property
    def sentinel_auth(self) -> dict[str, str]:
        """sentinel_password= (and sentinel_username=) in the query: the sentinels' own AUTH."""
        auth = {}
        if "sentinel_password" in self.query:
            auth["password"] = self.query["sentinel_password"]
            if "sentinel_username" in self.query:
                auth["username"] = self.query["sentinel_username"]
        return auth

    def ssl_context(self) -> Any:
        """rediss://: the SSLContext redis-py would build from the same query parameters (CA checked,
        hostname too unless ssl_check_hostname=false); None for redis://."""
        if self.scheme != "rediss":
            return None
        from redis.asyncio.connection import RedisSSLContext

        q = self.query
        check = q.get("ssl_check_hostname", "true").lower() not in ("0", "false", "no", "off")
        return RedisSSLContext(keyfile=q.get("ssl_keyfile"), certfile=q.get("ssl_certfile"),
                               cert_reqs=q.get("ssl_cert_reqs", "required"), ca_certs=q.get("ssl_ca_certs"),
                               ca_path=q.get("ssl_ca_path"), check_hostname=check).get()


def parse_redis_url(url: str) -> RedisTarget:
    """redis://[user:password@]HOST[:PORT][/DB], rediss://... (TLS), or
    redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]. ValueError (naming no
    password) when malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "redis+sentinel"):
        raise ValueError("store URL must be redis://, rediss:// or redis+sentinel://")
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else (unquote(user) if user else None)
        if not colon:  # (redis://PASSWORD@host, as redis-py reads it: a password alone)
            username = None
    query = dict(parse_qsl(query_text))

    def hostport(text: str, default: int) -> tuple[str, int]:
        if text.startswith("["):  # [v6]:port
            host, _, port = text[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        if not host:
            raise ValueError("store URL: a host is missing")
        try:
            return host, int(port) if port else default
        except ValueError:
            raise ValueError("store URL: a port is not a number") from None

    parts = [p for p in path.split("/") if p]
    try:
        if scheme == "redis+sentinel":
            sentinels = [hostport(h, 26379) for h in hosts.split(",") if h]
            if not sentinels or not parts:
                raise ValueError("store URL: redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB")
            db = int(parts[1]) if len(parts) > 1 else 0
            return RedisTarget(scheme, sentinels[0][0], sentinels[0][1], db, username, password, query,
                               sentinels, unquote(parts[0]))
        host, port = hostport(hosts, 6379)
        db = int(parts[0]) if parts else int(query.get("db", 0))
    except ValueError as exc:
        if "store URL" in str(exc):
            raise
        raise ValueError("store URL: the DB is not a number") from None
    return RedisTarget(scheme, host, port, db, username, password, query)


class RedisStore:
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
        """redis-py's client (the rest) and the pipelined one (the hot path) for self.url:
        redis:// and rediss:// ([user:password@]host:port/db, TLS options as redis-py's query
        parameters: ssl_ca_certs, ssl_cert_reqs, ssl_check_hostname, ssl_certfile, ssl_keyfile), or
        redis+sentinel://[user:password@]H:P[,H:P...]/SERVICE/DB (both follow the primary the
        sentinels name: redis-py's SentinelConnectionPool, and resp.py asking on every connect)."""
        opts = dict(decode_responses=True, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
        target = parse_redis_url(self.url)
        if target.sentinels is not None:
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(target.sentinels, socket_timeout=0.5, socket_connect_timeout=0.5,
                                sentinel_kwargs={"socket_timeout": 0.5, "socket_connect_timeout": 0.5,
                                                 **target.sentinel_auth})
            client = sentinel.master_for(target.service, redis_class=aioredis.Redis, db=target.db,
                                         username=target.username, password=target.password, **opts)

            async def primary() -> tuple[str, int]:
                host, port = await sentinel.discover_master(target.service)
                return str(host), int(port)

            pipe = RespClient(target.sentinels[0][0], target.sentinels[0][1], target.db, target.username,
                              target.password, connect_timeout=0.5, read_timeout=1.0, resolve=primary,
                              min_backoff=0.05, max_backoff=1.0)
            return client, pipe
        pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=8, timeout=2.0, **opts)
        client = aioredis.Redis(connection_pool=pool)
        pipe = RespClient(target.host, target.port, target.db, target.username, target.password,
                          connect_timeout=0.5, read_timeout=1.0, ssl=target.ssl_context())
        return client, pipe

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
