"""How RedisStore's data is laid out for its scripts: the arguments it sends them (amounts, limits,
totals names, keeps, the JSON payload) and the packed replies it reads back (redis_scripts.py writes
them). Pure functions, no I/O.

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

Row isolation. A usage row never fails its settlement or the batch: _payload sends a lone
surrogate as '?' (cjson refuses it, as it refuses a \\udfff escape) and anything that is not a string
as its str() or null; the settle script writes its totals and tombstone before the row, runs each
item under pcall, and if XADD refuses a value (a null) writes the row again with such values as ''.
"""
from __future__ import annotations

import json
import struct
from fractions import Fraction
from typing import Any, Sequence, get_type_hints

from proxy.dimensions import spelled
from proxy.ledger import DIMENSIONS, DIMS, METERED, Amounts, Ask, Denied, Limits, Scope, ScopeState
from proxy.periods import period_bounds
from proxy.store.base import UsageRow
from proxy.store.redis_scripts import NO_FIRST_REQUEST

MAX_EXACT = 2**53 - 1
RETENTION_S = 35 * 86400

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
