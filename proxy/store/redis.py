"""redis://HOST:PORT/DB[?prefix=...&hold_ttl=15&renew_every=5] — budgets shared by several replicas.

Every decision runs inside Redis as one Lua script (SCRIPT LOAD once, EVALSHA, reloaded on
NOSCRIPT), so reserve / charge / settle / release are atomic across all scopes of a request and
across replicas: N replicas keep exactly the single-node overshoot bound. Python never reads,
modifies and writes back. The scripts are `ledger.admit` / `ledger.check_growth` transcribed;
money stays integer nano-dollars, and the Decimal output rate travels as an exact integer
fraction (numerator / denominator) so that floor (the cost clamp) and ceil (the hold's output
cost) equal Python's. Exactness needs every amount and limit below 2**53 (Lua numbers are
doubles): limits above that are treated as 2**53-1 (9e15 tokens; $9,007,199 per scope and period).

Keys (P = prefix, default "budget-proxy:"; T = "<scope id>@<period start, epoch s>"):
  P t:T   hash   per scope and period: s1..s5 settled, c1..c5 charged by requests in flight,
                 h1..h5 held (sum of max(hold - charged, 0)), f first_request_at; dimensions
                 1..5 = tokens, input_tokens, output_tokens, cost (nanos), steps
  P x:T   zset   reservation ids in flight on that scope and period, scored by expiry (ms, Redis TIME)
  P r:ID  hash   one reservation: st (live | expired), n, t1..tn, x1..xn (the totals keys and their
                 expire-at), h1..h5 hold, c1..c5 charged, e expiry, out, at, team, key
  P d:ID  string settle tombstone (10 min): a second settle of ID is a no-op
  P log   stream usage-log rows, XADD MAXLEN ~ 100000 (configurable: log_max)

Expiry. A reservation expires HOLD_TTL (15 s) after its last renewal, measured on Redis' clock.
The store renews all of this process's reservations in one script call every RENEW_EVERY (5 s),
and each charge renews its own. Nothing runs on a timer in Redis: every script that touches a
scope (reserve, charge, settle, states, reset) first purges that scope's expired reservations,
so a replica killed with kill -9 has its holds gone within HOLD_TTL of its last renewal (at most
HOLD_TTL after the kill), as soon as anyone reserves or reads /budget on those scopes. An expired
reservation's in-flight `charged` amount is KEPT AS SETTLED (those tokens were generated and may
be billed); only the unused rest of its hold is released. A "hold_expired" usage-log row records
it. A reservation is only expired once a script purges it; until then it is fully counted, so a
late renewal or charge simply revives it. If its owner is alive after the purge (Redis was
unreachable longer than HOLD_TTL), its next charge is refused (the stream is cut) and its settle
corrects settled by (actual - charged at expiry): totals end exactly as if it had settled normally.

Growth. Totals of a period expire RETENTION (35 days) after the period ends (`period: none` totals
live on: one hash per scope); zsets expire with them; settle tombstones after 10 minutes, expired
reservations after a day; a live reservation lives as long as the totals it points to. The usage
log is a stream capped near log_max rows. Scripts touch keys they compute (another replica's
reservation spans other scopes), so this store needs a single Redis (or a primary with replicas /
Sentinel), not Redis Cluster.

Failures. Socket timeouts are short (0.5 s connect, 1 s read) and a failed call is retried once
(a pooled connection may be stale after Redis restarted); then StoreUnavailable: ping() -> /readyz
503, reserve -> 503 with nothing forwarded, charge -> raised to the relay. The client reconnects by
itself when Redis returns and scripts are reloaded on NOSCRIPT. Every script is idempotent (reserve
answers a replay with the same reservation; charge sets a running total; settle leaves a
tombstone), so a retry after a lost reply never counts twice. A settle that fails is retried in the
background (10 attempts, backoff 0.25 s doubling to 8 s: about a minute) until it lands; if it never
does, the full row is logged as unsettled, and the reservation's charges so far still count when
its hold expires.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import asdict, fields
from fractions import Fraction
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.errors import StoreUnavailable
from proxy.ledger import (DIMENSIONS, METERED, Admitted, Amounts, Ask, Denied, Scope, ScopeState, output_cost,
                          wall_clock_deadline)
from proxy.periods import period_bounds
from proxy.store.base import Reservation, UsageRow
from proxy.store.memory import tightest_remaining

log = logging.getLogger("budget_proxy.store")

MAX_EXACT = 2**53 - 1
RETENTION_S = 35 * 86400
SETTLED_TOMBSTONE_MS = 600_000
UNAVAILABLE = "The budget ledger is unavailable; nothing was forwarded."

_PRELUDE = r"""
local P, HOLD_TTL_MS, LOG_MAX = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local EXPIRED_KEEP_MS = 86400000
local TOTALS = {'s1','s2','s3','s4','s5','c1','c2','c3','c4','c5','h1','h2','h3','h4','h5','f'}

local function I(n) return string.format('%d', n) end
local function opt(s) if s == '' then return nil end return tonumber(s) end
local function push(t, ...) for _, v in ipairs({...}) do t[#t + 1] = v end return t end
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hgetall(key)
  local flat, h = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end
local function vec(h, tag)
  local v = {}
  for d = 1, 5 do v[d] = tonumber(h[tag .. d]) or 0 end
  return v
end
local function hincr(key, tag, v, sign)
  for d = 1, 5 do
    if v[d] ~= 0 then redis.call('HINCRBY', key, tag .. d, I(sign * v[d])) end
  end
end
local function free_of(hold, charged)
  local f = {}
  for d = 1, 5 do f[d] = math.max(hold[d] - charged[d], 0) end
  return f
end
local function expire_at(key, at)   -- absolute ms on the server's clock; '0' or nil: never
  if at and at ~= '0' then redis.call('PEXPIREAT', key, at) end
end
local function keep_until(keep_ms, now_ms)  -- a lifetime from the caller -> absolute on the server's clock
  if keep_ms == '0' then return '0' end
  return I(now_ms + tonumber(keep_ms))
end
local function read_state(t)
  local v = redis.call('HMGET', P .. 't:' .. t, unpack(TOTALS))
  local used, held = {}, {}
  for d = 1, 5 do
    used[d] = (tonumber(v[d]) or 0) + (tonumber(v[d + 5]) or 0)
    held[d] = tonumber(v[d + 10]) or 0
  end
  return {used = used, held = held, first = v[16]}
end
local function read_states(ts)
  local s = {}
  for j = 1, #ts do s[j] = read_state(ts[j]) end
  return s
end
local function flat_states(out, states)
  for _, s in ipairs(states) do
    for d = 1, 5 do out[#out + 1] = I(s.used[d]) end
    for d = 1, 5 do out[#out + 1] = I(s.held[d]) end
    out[#out + 1] = s.first or ''
  end
  return out
end
local function wall_clock_spent(state, limit, now)
  local used = 0
  if state.first then used = math.max(0, now - tonumber(state.first)) end
  return used >= limit
end

-- A live reservation leaves: its charges so far become settled, the rest of its hold is released.
local function drop(id, r)
  local hold, charged = vec(r, 'h'), vec(r, 'c')
  local free = free_of(hold, charged)
  for j = 1, tonumber(r.n) do
    local tk = P .. 't:' .. r['t' .. j]
    hincr(tk, 'c', charged, -1)
    hincr(tk, 'h', free, -1)
    hincr(tk, 's', charged, 1)
    expire_at(tk, r['x' .. j])
    redis.call('ZREM', P .. 'x:' .. r['t' .. j], id)
  end
end

local function secs(ms) return string.format('%d.%03d', math.floor(ms / 1000), ms % 1000) end

local function expire(id, now_ms)
  local rk = P .. 'r:' .. id
  local r = hgetall(rk)
  if r.st ~= 'live' then return end
  drop(id, r)
  redis.call('HSET', rk, 'st', 'expired')
  redis.call('PEXPIRE', rk, EXPIRED_KEEP_MS)
  local c = vec(r, 'c')
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*',
    'time', secs(now_ms), 'team', r.team or '', 'key', r.key or '', 'model', '', 'route', '',
    'input_tokens', I(c[2]), 'cache_write_5m_tokens', '0', 'cache_write_1h_tokens', '0',
    'cache_read_tokens', '0', 'output_tokens', I(c[3]), 'web_search_requests', '0',
    'cost_nanos', I(c[4]), 'steps', I(c[5]),
    'duration_s', string.format('%.3f', math.max(0, now_ms - (tonumber(r.at) or now_ms)) / 1000),
    'outcome', 'hold_expired', 'request_id', id)
end

local function purge(t, now_ms)
  local xk = P .. 'x:' .. t
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', xk, '-inf', now_ms)) do
    expire(id, now_ms)
    redis.call('ZREM', xk, id)
  end
end
local function purge_all(ts, now_ms)
  for j = 1, #ts do purge(ts[j], now_ms) end
end
"""

# Exact integer arithmetic for the output rate num/den: products of two integers < 2^53 as
# base-10^7 limbs (column sums stay below 2^53), compared exactly; float estimates corrected.
_EXACT = r"""
local BASE = 10000000
local function divmod(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q, r = q - 1, r + b elseif r >= b then q, r = q + 1, r - b end
  return q, r
end
local function limbs(a)
  local t, r = {}, 0
  repeat a, r = divmod(a, BASE); t[#t + 1] = r until a == 0
  return t
end
local function mul(a, b)
  local x, y, z = limbs(a), limbs(b), {}
  for k = 1, #x + #y do z[k] = 0 end
  for i = 1, #x do for j = 1, #y do z[i + j - 1] = z[i + j - 1] + x[i] * y[j] end end
  local carry = 0
  for k = 1, #z do
    local q, r = divmod(z[k] + carry, BASE)
    z[k], carry = r, q
  end
  while #z > 1 and z[#z] == 0 do z[#z] = nil end
  return z
end
local function cmp(x, y)
  if #x ~= #y then return #x < #y and -1 or 1 end
  for k = #x, 1, -1 do if x[k] ~= y[k] then return x[k] < y[k] and -1 or 1 end end
  return 0
end
-- min(lim, floor(spare * den / num)): the output tokens `spare` nanos buy, when fewer than lim
local function output_cap(spare, num, den, lim)
  local S = mul(spare, den)
  if cmp(mul(lim, num), S) <= 0 then return lim end
  local q = math.min(math.max(math.floor(spare * den / num), 0), lim - 1)
  while q > 0 and cmp(mul(q, num), S) > 0 do q = q - 1 end
  while cmp(mul(q + 1, num), S) <= 0 do q = q + 1 end
  return q
end
-- ceil(out * num / den): ledger.output_cost
local function out_cost(out, num, den)
  if num == 0 or out <= 0 then return 0 end
  local O = mul(out, num)
  local c = math.max(math.ceil(out * num / den), 0)
  while c > 0 and cmp(mul(c - 1, den), O) >= 0 do c = c - 1 end
  while cmp(mul(c, den), O) < 0 do c = c + 1 end
  return c
end
"""

# ARGV[4] id, [5] now, [6] input tokens, [7] input cost, [8] max_tokens, [9]/[10] output rate
# num/den, [11] team, [12] key, [13] n; per scope 8: totals key, keep ms, 6 limits ('' = none)
_RESERVE = r"""
local id, now_s = ARGV[4], ARGV[5]
local now, input, input_cost, max_tokens = tonumber(now_s), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local num, den, n = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[13])
local ts, xs, lims = {}, {}, {}
for j = 1, n do
  local b = 13 + (j - 1) * 8
  ts[j], xs[j], lims[j] = ARGV[b + 1], ARGV[b + 2], {}
  for d = 1, 6 do lims[j][d] = opt(ARGV[b + 2 + d]) end
end
local rk = P .. 'r:' .. id
local r = hgetall(rk)
if r.st == 'live' then
  return flat_states(push({'A', r.out}, unpack(vec(r, 'h'))), read_states(ts))
elseif r.st or redis.call('EXISTS', P .. 'd:' .. id) == 1 then
  return redis.error_reply('ERR reservation id already used')
end
local now_ms = server_ms()
for j = 1, n do xs[j] = keep_until(xs[j], now_ms) end
purge_all(ts, now_ms)
local states = read_states(ts)

local need_out = max_tokens >= 1 and 1 or 0
local out = max_tokens
for j = 1, n do
  local L, st = lims[j], states[j]
  for d = 1, 5 do
    if L[d] then
      local room = L[d] - st.used[d] - st.held[d]
      local fits
      if d == 2 then fits = room >= input
      elseif d == 5 then fits = room >= 1
      else
        local cap
        if d == 1 then cap = room - input
        elseif d == 3 then cap = room
        elseif num == 0 then
          if room < input_cost then cap = -1 end
        elseif room - input_cost < 0 then cap = -1
        else cap = output_cap(room - input_cost, num, den, math.max(out, 1)) end
        fits = cap == nil or cap >= need_out
        if cap ~= nil and cap < out then out = cap end
      end
      if not fits then return flat_states({'D', I(j), I(d)}, states) end
    end
  end
  if L[6] and wall_clock_spent(st, L[6], now) then return flat_states({'D', I(j), '6'}, states) end
end
out = math.max(out, 0)
local hold = {input + out, input, out, input_cost + out_cost(out, num, den), 1}
local e = I(now_ms + HOLD_TTL_MS)
local rec = {'st', 'live', 'n', I(n), 'out', I(out), 'e', e, 'at', I(now_ms), 'team', ARGV[11], 'key', ARGV[12]}
local keep = 0
for j = 1, n do
  local tk, xk = P .. 't:' .. ts[j], P .. 'x:' .. ts[j]
  hincr(tk, 'h', hold, 1)
  redis.call('HSETNX', tk, 'f', now_s)
  expire_at(tk, xs[j])
  redis.call('ZADD', xk, e, id)
  expire_at(xk, xs[j])
  push(rec, 't' .. j, ts[j], 'x' .. j, xs[j])
  if keep and xs[j] ~= '0' then keep = math.max(keep, tonumber(xs[j])) else keep = nil end
  for d = 1, 5 do states[j].held[d] = states[j].held[d] + hold[d] end
  states[j].first = states[j].first or now_s
end
for d = 1, 5 do push(rec, 'h' .. d, I(hold[d]), 'c' .. d, '0') end
redis.call('HSET', rk, unpack(rec))
if keep then redis.call('PEXPIREAT', rk, I(keep)) end
return flat_states(push({'A', I(out)}, unpack(hold)), states)
"""

# ARGV[4] id, [5] now, [6..10] charged so far (>= 0), [11] n; per scope 6 limits ('' = none)
_CHARGE = r"""
local id, now = ARGV[4], tonumber(ARGV[5])
local rk = P .. 'r:' .. id
local r = hgetall(rk)
if not r.st then return {'G'} end
local n, ts, now_ms = tonumber(r.n), {}, server_ms()
for j = 1, n do ts[j] = r['t' .. j] end
if r.st ~= 'live' then
  purge_all(ts, now_ms)
  return flat_states({'X'}, read_states(ts))
end
local e = I(now_ms + HOLD_TTL_MS)   -- renew first: the purge below must not expire a request that is alive
redis.call('HSET', rk, 'e', e)
for j = 1, n do redis.call('ZADD', P .. 'x:' .. ts[j], 'XX', e, id) end
purge_all(ts, now_ms)
local states = read_states(ts)
local hold, old, charged, new_hold, growth, grows = vec(r, 'h'), vec(r, 'c'), {}, {}, {}, false
for d = 1, 5 do
  charged[d] = tonumber(ARGV[5 + d])
  new_hold[d] = math.max(hold[d], charged[d])
  growth[d] = new_hold[d] - hold[d]
  if growth[d] ~= 0 then grows = true end
end
if grows then
  for j = 1, n do
    local b, st = 11 + (j - 1) * 6, states[j]
    for d = 1, 5 do
      local limit = opt(ARGV[b + d])
      if limit and growth[d] > 0 and st.used[d] + st.held[d] + growth[d] > limit then
        return flat_states({'D', I(j), I(d)}, states)
      end
    end
    local wc = opt(ARGV[b + 6])
    if wc and wall_clock_spent(st, wc, now) then return flat_states({'D', I(j), '6'}, states) end
  end
end
local old_free, new_free, dc, dh = free_of(hold, old), free_of(new_hold, charged), {}, {}
for d = 1, 5 do dc[d], dh[d] = charged[d] - old[d], new_free[d] - old_free[d] end
for j = 1, n do
  local tk = P .. 't:' .. ts[j]
  hincr(tk, 'c', dc, 1)
  hincr(tk, 'h', dh, 1)
  expire_at(tk, r['x' .. j])
end
local rec = {}
for d = 1, 5 do push(rec, 'h' .. d, I(new_hold[d]), 'c' .. d, I(charged[d])) end
redis.call('HSET', rk, unpack(rec))
local reply = {'OK'}
for d = 1, 5 do reply[#reply + 1] = I(new_hold[d]) end
return reply
"""

# ARGV[4] id, [5..9] actual, [10] n; per scope 2: totals key, keep ms (used only if the
# reservation is unknown); then usage-row field/value pairs
_SETTLE = r"""
local id = ARGV[4]
if redis.call('EXISTS', P .. 'd:' .. id) == 1 then return 'already' end
local rk = P .. 'r:' .. id
local r = hgetall(rk)
local actual = {}
for d = 1, 5 do actual[d] = tonumber(ARGV[4 + d]) end
local outcome, ts = 'settled', {}
if r.st == 'live' then
  local hold, charged = vec(r, 'h'), vec(r, 'c')
  local free = free_of(hold, charged)
  for j = 1, tonumber(r.n) do
    local tk = P .. 't:' .. r['t' .. j]
    hincr(tk, 'c', charged, -1)
    hincr(tk, 'h', free, -1)
    hincr(tk, 's', actual, 1)
    expire_at(tk, r['x' .. j])
    redis.call('ZREM', P .. 'x:' .. r['t' .. j], id)
    ts[j] = r['t' .. j]
  end
elseif r.st == 'expired' then   -- its charges at expiry were settled then: add the difference
  local charged, diff = vec(r, 'c'), {}
  for d = 1, 5 do diff[d] = actual[d] - charged[d] end
  for j = 1, tonumber(r.n) do
    hincr(P .. 't:' .. r['t' .. j], 's', diff, 1)
    expire_at(P .. 't:' .. r['t' .. j], r['x' .. j])
    ts[j] = r['t' .. j]
  end
  outcome = 'late'
else                             -- unknown here (its tombstone aged out): count it, never lose it
  for j = 1, tonumber(ARGV[10]) do
    local t, x = ARGV[9 + 2 * j], ARGV[10 + 2 * j]
    hincr(P .. 't:' .. t, 's', actual, 1)
    expire_at(P .. 't:' .. t, keep_until(x, server_ms()))
    ts[j] = t
  end
  outcome = 'missing'
end
redis.call('DEL', rk)
redis.call('SET', P .. 'd:' .. id, '1', 'PX', '""" + str(SETTLED_TOMBSTONE_MS) + r"""')
local row = 11 + 2 * tonumber(ARGV[10])
if #ARGV >= row then redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*', unpack(ARGV, row)) end
purge_all(ts, server_ms())
return outcome
"""

# ARGV[4] id
_RELEASE = r"""
local id = ARGV[4]
if redis.call('EXISTS', P .. 'd:' .. id) == 1 then return 'already' end
local rk = P .. 'r:' .. id
local r = hgetall(rk)
if not r.st then return 'missing' end
if r.st == 'live' then drop(id, r) end
redis.call('DEL', rk)
redis.call('SET', P .. 'd:' .. id, '1', 'PX', '""" + str(SETTLED_TOMBSTONE_MS) + r"""')
return 'released'
"""

# ARGV[4..] ids; answers the ids that are no longer live
_RENEW = r"""
local e, lost = I(server_ms() + HOLD_TTL_MS), {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local rk = P .. 'r:' .. id
  local r = hgetall(rk)
  if r.st == 'live' then
    redis.call('HSET', rk, 'e', e)
    for j = 1, tonumber(r.n) do redis.call('ZADD', P .. 'x:' .. r['t' .. j], 'XX', e, id) end
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV[4] n, then n totals keys
_STATES = r"""
local ts = {}
for j = 1, tonumber(ARGV[4]) do ts[j] = ARGV[4 + j] end
purge_all(ts, server_ms())
return flat_states({}, read_states(ts))
"""

# ARGV[4] totals key, [5] keep ms: settled := 0 and the wall clock restarts; requests in flight keep
# their holds and running charges (they are still spending) and settle normally
_RESET = r"""
local t, now_ms = ARGV[4], server_ms()
local tk = P .. 't:' .. t
purge(t, now_ms)
redis.call('HDEL', tk, 's1', 's2', 's3', 's4', 's5', 'f')
expire_at(tk, keep_until(ARGV[5], now_ms))
return 'ok'
"""

SCRIPTS = {name: _PRELUDE + body for name, body in (
    ("reserve", _EXACT + _RESERVE), ("charge", _CHARGE), ("settle", _SETTLE), ("release", _RELEASE),
    ("renew", _RENEW), ("states", _STATES), ("reset", _RESET))}

_ROW_TYPES = {f.name: {"float": float, "int": int}.get(str(f.type), str) for f in fields(UsageRow)}


def _num(v: int) -> str:
    return str(max(-MAX_EXACT, min(MAX_EXACT, v)))


def _opt(v: int | float | None) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else _num(v)


def _limits(scope: Scope) -> list[str]:
    return [_opt(scope.limits.get(d)) for d in DIMENSIONS]


def _totals_key(scope: Scope, start: float) -> str:
    return f"{scope.id}@{int(start)}"


def _keep_ms(scope: Scope, now: float) -> str:
    """How long the totals of `now`'s period are kept: until RETENTION after the period ends. Relative,
    so that Redis applies it on its own clock (callers' clocks may differ; tests pass past times)."""
    end = period_bounds(scope.period, now)[1]
    return "0" if end is None else str(max(1, int((end + RETENTION_S - now) * 1000)))


def _states(flat: Sequence[str]) -> list[ScopeState]:
    out = []
    for i in range(0, len(flat), 11):
        v = [int(x) for x in flat[i:i + 10]]
        out.append(ScopeState(Amounts(*v[:5]), Amounts(*v[5:10]), float(flat[i + 10]) if flat[i + 10] else None))
    return out


def _rate(ask: Ask) -> tuple[int, int]:
    rate = Fraction(ask.output_nanos_per_token)
    if rate < 0 or rate.numerator > MAX_EXACT or rate.denominator > MAX_EXACT:
        raise ValueError("output rate out of the exact range of the Redis store")
    return rate.numerator, rate.denominator


def _denied(scope: Scope, state: ScopeState, dim: str, needed: int, now: float) -> Denied:
    if dim == "wall_clock":
        wc = scope.limits.wall_clock or 0.0
        return Denied(scope, dim, wc, state.wall_clock_used(now), 0, 0)
    limit = scope.limits.get(dim)
    assert limit is not None
    return Denied(scope, dim, limit, state.used.get(dim), state.held.get(dim), needed)


def _admit_needed(dim: str, ask: Ask) -> int:
    """What `ledger.admit` reports as needed in a denied dimension."""
    need_out = 1 if ask.max_tokens >= 1 else 0
    return {"tokens": ask.input_tokens + need_out, "input_tokens": ask.input_tokens, "steps": 1,
            "output_tokens": need_out}.get(dim, ask.input_cost_nanos + output_cost(need_out, ask.output_nanos_per_token))


def _row_args(row: UsageRow | None) -> list[str]:
    if row is None:
        return []
    return [x for k, v in asdict(row).items() for x in (k, repr(v) if isinstance(v, float) else str(v))]


def _actual_of(settle_args: list[str]) -> dict[str, int]:
    return {d: int(v) for d, v in zip(METERED, settle_args[1:6])}


def _row(entry: dict[str, str]) -> UsageRow:
    return UsageRow(**{k: conv(entry.get(k, "0" if conv is not str else "")) for k, conv in _ROW_TYPES.items()})


class RedisStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "budget-proxy:",
                 hold_ttl: float = 15.0, renew_every: float = 5.0, log_max: int = 100_000,
                 settle_attempts: int = 10, settle_backoff: float = 0.25) -> None:
        self.url, self.prefix = url, prefix
        self.hold_ttl, self.renew_every, self.log_max = hold_ttl, renew_every, log_max
        self.settle_attempts, self.settle_backoff = settle_attempts, settle_backoff
        self._head = [prefix, str(int(hold_ttl * 1000)), str(log_max)]
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        self._client: aioredis.Redis | None = None
        self._live: dict[str, Reservation] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RedisStore:
        """redis://[user:pass@]host:port/db?prefix=..&hold_ttl=s&renew_every=s&log_max=n; other query
        parameters go to redis-py; keyword arguments override the URL's."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        kw = dict(kw)
        for name, conv in (("prefix", str), ("hold_ttl", float), ("renew_every", float), ("log_max", int)):
            if name in query:
                kw.setdefault(name, conv(query.pop(name)))
        return cls(urlunsplit(parts._replace(query=urlencode(query))), **kw)

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Never fails for an unreachable Redis: ping() says so, and calls reconnect when it returns."""
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=64, timeout=2.0, decode_responses=True, socket_timeout=1.0,
            socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
        self._client = aioredis.Redis(connection_pool=pool)
        try:
            for name, src in SCRIPTS.items():
                self._shas[name] = await self._client.script_load(src)
        except (RedisError, OSError) as exc:
            log.warning("redis store: scripts not loaded at start (%s); will load on first use",
                        exc.__class__.__name__)
        self._renewer = asyncio.ensure_future(self._renew_loop())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        if self._retries:
            await asyncio.wait(self._retries, timeout=5.0)
            for task in self._retries:
                task.cancel()   # its row is logged as unsettled on cancellation
            await asyncio.gather(*self._retries, return_exceptions=True)
        for res in [r for r in self._live.values() if not r.settled]:
            try:
                await self._call("release", [res.id])
                log.warning("redis store closed with request %s in flight: hold released, charges kept", res.id)
            except StoreUnavailable:
                pass  # its hold expires on its own
        self._live.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ping(self) -> None:
        if self._client is None:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(UNAVAILABLE) from exc

    async def _call(self, name: str, args: Sequence[str]) -> Any:
        if self._client is None:
            raise StoreUnavailable(UNAVAILABLE)
        argv = [*self._head, *args]
        try:
            try:
                return await self._client.evalsha(self._shas[name], 0, *argv)
            except NoScriptError:
                self._shas[name] = await self._client.script_load(SCRIPTS[name])
                return await self._client.evalsha(self._shas[name], 0, *argv)
        except (RedisError, OSError) as exc:
            log.error("redis store: %s failed: %s", name, exc.__class__.__name__)
            raise StoreUnavailable(UNAVAILABLE) from exc

    # --- the protocol --------------------------------------------------------------------
    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied:
        starts = [period_bounds(s.period, now)[0] for s in scopes]
        team = next((s.name for s in scopes if s.kind == "team"), "")
        key = next((s.name for s in scopes if s.kind == "key"), "")
        num, den = _rate(ask)
        args = [request_id, repr(float(now)), _num(ask.input_tokens), _num(ask.input_cost_nanos),
                _num(ask.max_tokens), str(num), str(den), team, key, str(len(scopes))]
        for s, start in zip(scopes, starts):
            args += [_totals_key(s, start), _keep_ms(s, now), *_limits(s)]
        reply = await self._call("reserve", args)
        if reply[0] == "D":
            j, dim = int(reply[1]) - 1, DIMENSIONS[int(reply[2]) - 1]
            return _denied(scopes[j], _states(reply[3:])[j], dim, _admit_needed(dim, ask), now)
        out, hold = int(reply[1]), Amounts(*(int(x) for x in reply[2:7]))
        states = _states(reply[7:])
        res = Reservation(
            id=request_id, scopes=tuple(scopes), period_starts=tuple(starts),
            admitted=Admitted(hold, out, out < ask.max_tokens), hold=hold,
            deadline=wall_clock_deadline(list(zip(scopes, states)), now),
            remaining=tightest_remaining(scopes, states))
        self._live[request_id] = res
        return res

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Denied | None:
        if res.settled:
            return None
        charged = charged.nonneg()
        args = [res.id, repr(float(now)), *(_num(v) for v in charged.as_tuple()), str(len(res.scopes))]
        for s in res.scopes:
            args += _limits(s)
        reply = await self._call("charge", args)
        if reply[0] == "OK":
            res.hold, res.charged = Amounts(*(int(x) for x in reply[1:6])), charged
            return None
        if reply[0] == "D":
            j, dim = int(reply[1]) - 1, DIMENSIONS[int(reply[2]) - 1]
            growth = res.hold.max(charged) - res.hold
            return _denied(res.scopes[j], _states(reply[3:])[j], dim, growth.get(dim) if dim in METERED else 0, now)
        if reply[0] == "X":  # its hold expired while it was alive: cut it (fail closed)
            log.warning("redis store: request %s charged after its hold expired; cutting it", res.id)
            states = _states(reply[1:])
            for s, st in zip(res.scopes, states):
                dim = next((d for d in DIMENSIONS if s.limits.get(d) is not None), None)
                if dim is not None:
                    return _denied(s, st, dim, 0, now)
        return None

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> None:
        if res.settled:
            return
        res.settled = True
        args = [res.id, *(_num(v) for v in actual.as_tuple()), str(len(res.scopes))]
        for s, start in zip(res.scopes, res.period_starts):
            args += [_totals_key(s, start), _keep_ms(s, start)]
        args += _row_args(row)
        try:
            outcome = await self._call("settle", args)
        except StoreUnavailable:
            log.warning("redis store: settle of %s deferred; retrying in the background", res.id)
            task = asyncio.ensure_future(self._retry_settle(res, args, row))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        self._settled(res, outcome)

    def _settled(self, res: Reservation, outcome: str) -> None:
        self._live.pop(res.id, None)
        if outcome == "late":
            log.warning("redis store: %s settled after its hold had expired; totals corrected", res.id)
        elif outcome == "missing":
            log.warning("redis store: %s settled without a reservation on record; counted as settled", res.id)

    async def _retry_settle(self, res: Reservation, args: list[str], row: UsageRow | None) -> None:
        delay = self.settle_backoff
        try:
            for attempt in range(1, self.settle_attempts + 1):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
                try:
                    outcome = await self._call("settle", args)
                except StoreUnavailable:
                    continue
                log.info("redis store: deferred settle of %s landed (attempt %d)", res.id, attempt)
                self._settled(res, outcome)
                return
        except asyncio.CancelledError:
            pass
        self._live.pop(res.id, None)
        log.error("redis store: UNSETTLED request %s (its charges so far count when its hold expires): %s",
                  res.id, json.dumps({"actual": _actual_of(args), "row": asdict(row) if row else None}))

    async def release(self, res: Reservation) -> None:
        """Drop a reservation without a usage row: its charges so far count as settled, the rest of
        its hold is released. Exactly once, like settle."""
        if res.settled:
            return
        res.settled = True
        await self._call("release", [res.id])
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

    # --- renewal ----------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            await self.renew()

    async def renew(self) -> None:
        """Extend the expiry of every reservation this process has in flight (one script call)."""
        ids = list(self._live)
        if not ids:
            return
        try:
            lost = await self._call("renew", ids)
        except StoreUnavailable:
            log.warning("redis store: could not renew %d holds", len(ids))
            return
        for rid in lost:
            res = self._live.get(rid)
            if res is not None and not res.settled:
                log.warning("redis store: the hold of %s expired while it was in flight", rid)
                self._live.pop(rid, None)
