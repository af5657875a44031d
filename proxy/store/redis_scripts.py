"""The Lua scripts of the Redis store (see redis.py for the key layout and the semantics).
Each runs atomically inside Redis: `ledger.admit` / `ledger.check_growth` transcribed. Reserve,
charge, settle and release are functions of one script, "batch", that runs a list of them in order.

What costs here is crossing between Lua and Redis, and strings: a scope's totals are one string of
3N + 1 packed doubles for N dimensions (GET + struct.unpack costs several times fewer instructions
than an HMGET or HSET of the same fields, measured under callgrind), a reservation
is one packed string too, and the replies are packed (the store unpacks them with struct): no
number is formatted or parsed as text on the hot path. Amounts are integers held exactly in
doubles (below 2^53).

The layouts follow the dimensions (ledger.DIMS, declared in proxy/dimensions.py): the scripts are
written with $-placeholders ($N dimensions, their offsets, formats and unrolled lists) that
`layout` fills in once, at import; the loops run `for d = 1, $N`. Amounts are packed by position:
totals or a reservation written with fewer (or more) dimensions are read as 0 in those they lack."""
from __future__ import annotations

from string import Template

from proxy.ledger import DIMS
from proxy.store.base import ROW_AMOUNTS, UsageRow
from proxy.store.redis_history import DENIAL_LUA, LUA as HISTORY_LUA

NO_FIRST_REQUEST = -1.0  # f of a scope's totals with no request in the period yet
# Reservations written before the dimensions were declared have 5 and say nothing of it; a layout of
# another count adds 4 x its count to the state byte (MARK), so that any can be read.
LEGACY_DIMS = 5

_PRELUDE = r"""
local P, HOLD_TTL_MS, LOG_MAX = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local EXPIRED_KEEP_MS, PURGE_MAX = 86400000, 64
local TOMBSTONE_MS = 600000  -- a second settle of one reservation id within this is a no-op
local ROW_FIELDS = {""" + ",".join(f"'{name}'" for name in UsageRow._fields) + r"""}
local XK = P .. 'x'
local TF = '$TF'  -- totals: s1..s$N settled, c1..c$N charged, h1..h$N held, f first request
local TOTALS_BYTES = $TB
local NONE = """ + repr(NO_FIRST_REQUEST) + r"""
local LIVE, EXPIRED, DONE = 1, 2, 3
local RF = '$RF'  -- record: st + MARK, n, h1..h$N hold, c1..c$N charged, out, at (then per scope, team, key)
local MARK, LEGACY = $MARK, """ + str(LEGACY_DIMS) + r"""
local PER = {$PER}  -- per dimension, what each output token adds: 0 nothing, 1 one, 2 its price (num/den)

local function I(n) return string.format('%d', n) end
local function opt(s) if s == '' then return nil end return tonumber(s) end
local NOW_MS   -- one clock reading per script call: every operation of a batch runs at that instant
local function server_ms()
  if not NOW_MS then
    local t = redis.call('TIME')
    NOW_MS = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW_MS
end
local function free_of(hold, charged)
  local f = {}
  for d = 1, $N do f[d] = math.max(hold[d] - charged[d], 0) end
  return f
end
local function keep_until(keep_ms, now_ms)  -- a lifetime from the caller -> absolute on the server's clock
  if keep_ms == '0' then return 0 end
  local k = tonumber(keep_ms)
  if k < 0 then return now_ms - k, true end   -- '-TTL': a run's totals, kept TTL past each request (slides)
  return now_ms + k
end
-- A run's totals 'run:TEAM/KEY/RUN@0' are listed in their key's index of runs, P R:TEAM/KEY (a zset
-- of run ids scored by when each is forgotten, ms): /admin/runs reads it, newest first.
local function index_run(t, at, now_ms)
  local base, run = string.match(t, '^run:(.*)/([^/@]*)@')  -- (a run id has neither '/' nor '@')
  if not base then return end
  local z = P .. 'R:' .. base
  redis.call('ZADD', z, at, run)
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now_ms)   -- (the runs forgotten since: their totals expired)
  redis.call('PEXPIREAT', z, at)
end

-- A record written with another number of dimensions (its state byte says how many: 0 LEGACY).
local function load_other(b, code)
  local k = math.floor(code / 4)
  if k == 0 then k = LEGACY end
  local v = {struct.unpack('<BB' .. string.rep('d', 2 * k + 2), b)}
  local r = {st = code % 4, n = v[2], h = {}, c = {}, out = v[2 * k + 3], at = v[2 * k + 4], t = {}, x = {}}
  for d = 1, $N do
    r.h[d], r.c[d] = d <= k and v[2 + d] or 0, d <= k and v[2 + k + d] or 0
  end
  return r, v[2 * k + 5]
end
-- A reservation's record: RF, then per scope its totals name and keep-until, then team and key.
local function load(id)
  local b = redis.call('GET', P .. 'q:' .. id)
  if not b then return nil end
  local code, r, pos = string.byte(b)
  if code >= MARK and code <= MARK + DONE then
    local st, n, $HL, $CL, out, at, p = struct.unpack(RF, b)
    r, pos = {st = st - MARK, n = n, h = {$HL}, c = {$CL}, out = out, at = at, t = {}, x = {}}, p
  else
    r, pos = load_other(b, code)
  end
  if r.st == DONE then return r end
  for j = 1, r.n do r.t[j], r.x[j], pos = struct.unpack('<Ic0d', b, pos) end
  r.team, r.key = struct.unpack('<Ic0Ic0', b, pos)
  return r
end
local function save(id, r, ...)
  local h, c = r.h, r.c
  local parts = {struct.pack(RF, r.st + MARK, r.n, $HV, $CV, r.out, r.at)}
  for j = 1, r.n do parts[j + 1] = struct.pack('<Ic0d', #r.t[j], r.t[j], r.x[j]) end
  parts[#parts + 1] = struct.pack('<Ic0Ic0', #r.team, r.team, #r.key, r.key)
  redis.call('SET', P .. 'q:' .. id, table.concat(parts), ...)
end
local function tombstone(id)  -- a second settle or release of ID is a no-op
  redis.call('SET', P .. 'q:' .. id, struct.pack(RF, DONE + MARK, 0, $ZR), 'PX', TOMBSTONE_MS)
end

-- A scope's totals (P T:T): 3N + 1 numbers, and the bytes they came from (the replies carry those).
local function pack_totals(v)
  return struct.pack(TF, $VALL)
end
local function zero_totals() return {$ZT, NONE} end
local ZERO_TOTALS = pack_totals(zero_totals())
-- Totals written with another number of dimensions (k): by position, 0 in those they lack.
local function widen(b)
  local k = (#b / 8 - 1) / 3
  local w, v = {struct.unpack('<' .. string.rep('d', 3 * k + 1), b)}, {}
  for d = 1, $N do
    local kept = d <= k
    v[d], v[$N + d], v[$N2 + d] = kept and w[d] or 0, kept and w[k + d] or 0, kept and w[2 * k + d] or 0
  end
  v[$F] = w[3 * k + 1]
  return v
end
-- Each scope's totals are read (GET) at most once per script call and written (SET) once, at its
-- end (flush_totals), however many operations of a batch touch them: a batch's requests mostly
-- share a key and a team, and each redis.call pays a Lua-to-Redis crossing. Readers
-- get a copy; write_totals commits one, as a SET did (an operation that fails after it keeps it).
local TOT = {}   -- totals name -> {v = numbers, raw = their bytes (nil: pack when asked), dirty, at = expire-at ms}
local function read_totals(t)
  local e = TOT[t]
  if not e then
    local b = redis.call('GET', P .. 'T:' .. t)
    local v
    if not b then v, b = zero_totals(), ZERO_TOTALS
    elseif #b == TOTALS_BYTES then v = {struct.unpack(TF, b)}
    else v = widen(b); b = pack_totals(v) end
    e = {v = v, raw = b}
    TOT[t] = e
  elseif not e.raw then
    e.raw = pack_totals(e.v)
  end
  local v = e.v
  return {$VALL}, e.raw
end
local function write_totals(t, v)
  local e = TOT[t]
  if not e then e = {}; TOT[t] = e end
  e.v, e.raw, e.dirty = v, nil, true
end
local function expire_totals(t, at)   -- absolute ms on the server's clock; 0 or nil: never
  if at and at > 0 then TOT[t].at = at end
end
local function flush_totals()
  for t, e in pairs(TOT) do
    if e.dirty then redis.call('SET', P .. 'T:' .. t, e.raw or pack_totals(e.v), 'KEEPTTL') end
    if e.at then redis.call('PEXPIREAT', P .. 'T:' .. t, e.at) end
  end
  TOT = {}
end
local function read_state(t)
  local v, b = read_totals(t)
  return {v = v, raw = b, used = {$USED}, held = {$HELD}, first = v[$F] ~= NONE and v[$F] or nil}
end
local function read_states(ts)
  local s = {}
  for j = 1, #ts do s[j] = read_state(ts[j]) end
  return s
end
-- Add the N-vectors ds / dc / dh (nil: none) to a scope's settled / charged / held totals (v: as
-- read already in this script, if they were).
local function add(t, ds, dc, dh, v)
  if not v then v = read_totals(t) end
  for d = 1, $N do
    if ds then v[d] = v[d] + ds[d] end
    if dc then v[$N + d] = v[$N + d] + dc[d] end
    if dh then v[$N2 + d] = v[$N2 + d] + dh[d] end
  end
  write_totals(t, v)
end
local function flat_states(out, states)   -- per scope its totals' bytes as read
  for _, s in ipairs(states) do out[#out + 1] = s.raw end
  return table.concat(out)
end
-- reserve's denial by scope j, dimension d. A denial writes no totals: the runs' that exist (slides:
-- their scopes, nil: none) are kept alive here, as an admission would.
local function deny(j, d, states, slides, ts, xs, now_ms)
  if slides then
    for k in pairs(slides) do
      if redis.call('PEXPIREAT', P .. 'T:' .. ts[k], xs[k]) == 1 then index_run(ts[k], xs[k], now_ms) end
    end
  end
  return flat_states({'D', struct.pack('<BB', j, d)}, states)
end
local function wall_clock_spent(state, limit, now)
  local used = 0
  if state.first then used = math.max(0, now - state.first) end
  return used >= limit
end

-- A live reservation leaves: its charges so far become settled, the rest of its hold is released.
local function drop(r)
  local free, minus = free_of(r.h, r.c), {}
  for d = 1, $N do free[d], minus[d] = -free[d], -r.c[d] end
  for j = 1, r.n do add(r.t[j], r.c, minus, free) end
end

local function secs(ms) return string.format('%d.%03d', math.floor(ms / 1000), ms % 1000) end

local function expire(id, now_ms)
  local r = load(id)
  if not r or r.st ~= LIVE then return end
  drop(r)
  r.st = EXPIRED
  save(id, r, 'PX', EXPIRED_KEEP_MS)
  local c = r.c
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*',
    'time', secs(now_ms), 'team', r.team or '', 'key', r.key or '', 'model', '', 'route', '',
    $ROWC,
    'duration_s', string.format('%.3f', math.max(0, now_ms - r.at) / 1000),
    'outcome', 'hold_expired', 'request_id', id)
end

-- Expire the reservations (of any scope) whose hold has run out: up to `limit` of them, oldest first
-- (a decision that meets more than that sees the rest as still held: it errs towards denying).
-- (at the one instant of a script call, a purge that found fewer than its limit left nothing for a
-- later one to find)
local PURGED_AT
local function purge(now_ms, limit)
  if PURGED_AT == now_ms then return end
  local ids = redis.call('ZRANGEBYSCORE', XK, '-inf', now_ms, 'LIMIT', 0, limit)
  if #ids < limit then PURGED_AT = now_ms end
  if #ids == 0 then return end
  for _, id in ipairs(ids) do expire(id, now_ms) end
  redis.call('ZREM', XK, unpack(ids))
end
"""

# ARGV[4] is a JSON array of strings (one argument instead of dozens: cheaper for the client to
# send); ARG is ARGV with it spread out, so the scripts below index ARG[4..] as separate arguments
_FLAT = r"""
local ARG = {ARGV[1], ARGV[2], ARGV[3]}
if ARGV[4] then for i, v in ipairs(cjson.decode(ARGV[4])) do ARG[3 + i] = v end end
"""

# Exact integer arithmetic for the output rate num/den: products of two integers < 2^53 as
# base-10^7 limbs (column sums stay below 2^53), compared exactly; float estimates corrected.
_EXACT = r"""
local BASE = 10000000
local EXACT = 9007199254740992  -- 2^53: below it a Lua number holds every integer
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
  local a, b = lim * num, spare * den
  if a < EXACT and b < EXACT then   -- both products exact as Lua numbers: no limbs needed (the common, cheap case)
    if a <= b then return lim end
    local q = math.min(math.max(math.floor(b / num), 0), lim - 1)
    while q > 0 and q * num > b do q = q - 1 end
    while (q + 1) * num <= b do q = q + 1 end
    return q
  end
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
  local o = out * num
  if o + den < EXACT then   -- exact as Lua numbers, and so is every product below (see output_cap)
    local c = math.max(math.ceil(o / den), 0)
    while c > 0 and (c - 1) * den >= o do c = c - 1 end
    while c * den < o do c = c + 1 end
    return c
  end
  local O = mul(out, num)
  local c = math.max(math.ceil(out * num / den), 0)
  while c > 0 and cmp(mul(c - 1, den), O) >= 0 do c = c - 1 end
  while cmp(mul(c, den), O) < 0 do c = c + 1 end
  return c
end
"""

# The batch's operations take their item A = {op, arguments...} as it came.

# A[2] id, [3] now, [4] input tokens, [5] input cost, [6] max_tokens, [7]/[8] output rate num/den,
# [9] team, [10] key, [11] n; per scope N + 3: totals name, keep ms, N + 1 limits ('' = none; the
# last is the wall clock's). Answers 'A' (admitted now; the states as read before its hold), 'B' (a
# replay: the states as they are), each with out and the hold packed (AF); or 'D', scope and
# dimension '<BB': denied. Per dimension, room must cover `base` (what the request needs before any
# output); where output counts (PER), what the rest covers caps the hold's output.
_RESERVE = r"""
local id, now_s = A[2], A[3]
local now, input, input_cost, max_tokens = tonumber(now_s), tonumber(A[4]), tonumber(A[5]), tonumber(A[6])
local num, den, n = tonumber(A[7]), tonumber(A[8]), tonumber(A[11])
local ts, xs, lims = {}, {}, {}
for j = 1, n do
  local b = 11 + (j - 1) * $RS
  ts[j], xs[j], lims[j] = A[b + 1], A[b + 2], {}
  for d = 1, $N1 do lims[j][d] = opt(A[b + 2 + d]) end
end
local r = load(id)
if r and r.st == LIVE then
  local h = r.h
  return flat_states({'B', struct.pack('$AF', r.out, $HV)}, read_states(ts))
elseif r then
  return '!ERR reservation id already used'
end
local now_ms = server_ms()
local slides   -- the run scopes ('-TTL' keep): their totals live TTL past each request, denied or not
for j = 1, n do
  local at, slide = keep_until(xs[j], now_ms)
  xs[j] = at
  if slide then slides = slides or {}; slides[j] = true end
end
purge(now_ms, PURGE_MAX)
local states = read_states(ts)

local need_out = max_tokens >= 1 and 1 or 0
local out = max_tokens
local base = {$BASE}
for j = 1, n do
  local L, st = lims[j], states[j]
  for d = 1, $N do
    if L[d] then
      local room, kind, fits = L[d] - st.used[d] - st.held[d] - base[d], PER[d]
      if kind == 0 then fits = room >= 0
      else
        local cap
        if kind == 1 then cap = room
        elseif num == 0 then
          if room < 0 then cap = -1 end
        elseif room < 0 then cap = -1
        else cap = output_cap(room, num, den, math.max(out, 1)) end
        fits = cap == nil or cap >= need_out
        if cap ~= nil and cap < out then out = cap end
      end
      if not fits then return deny(j, d, states, slides, ts, xs, now_ms) end
    end
  end
  if L[$N1] and wall_clock_spent(st, L[$N1], now) then
    return deny(j, $N1, states, slides, ts, xs, now_ms)
  end
end
out = math.max(out, 0)
local hold = {$HOLD}
local keep = 0
for j = 1, n do
  local v = states[j].v
  for d = 1, $N do v[$N2 + d] = v[$N2 + d] + hold[d] end
  local fresh = v[$F] == NONE   -- the period's first request (or the first since a reset)
  if fresh then v[$F] = now end
  write_totals(ts[j], v)
  if fresh then expire_totals(ts[j], xs[j]) end   -- (the totals' lifetime is fixed for their period)
  if keep and xs[j] ~= 0 then keep = math.max(keep, xs[j]) else keep = nil end
end
if slides then   -- a run's: from this request on (its first one made it: index it)
  for j in pairs(slides) do
    expire_totals(ts[j], xs[j])
    index_run(ts[j], xs[j], now_ms)
  end
end
redis.call('ZADD', XK, now_ms + HOLD_TTL_MS, id)
local rec = {st = LIVE, n = n, t = ts, x = xs, h = hold, c = {$ZN}, out = out, at = now_ms,
             team = A[9], key = A[10]}
if keep and keep > 0 then save(id, rec, 'PXAT', keep) else save(id, rec) end
return flat_states({'A', struct.pack('$AF', out, $HOLDV)}, states)
"""

# A[2] id, [3] now, [4..N + 3] charged so far (>= 0), [N + 4] n; per scope N + 1 limits ('' = none).
# Answers 'K' and the hold (KF); 'D' as reserve; 'X' and the states (its hold had expired); 'G' (gone).
_CHARGE = r"""
local id, now = A[2], tonumber(A[3])
local r = load(id)
if not r or r.st == DONE then return 'G' end
local n, ts, now_ms = r.n, r.t, server_ms()
if r.st ~= LIVE then
  purge(now_ms, PURGE_MAX)
  return flat_states({'X'}, read_states(ts))
end
-- renew first: the purge below must not expire a request that is alive
redis.call('ZADD', XK, 'XX', now_ms + HOLD_TTL_MS, id)
purge(now_ms, PURGE_MAX)
local states = read_states(ts)
local hold, old, charged, new_hold, growth, grows = r.h, r.c, {}, {}, {}, false
for d = 1, $N do
  charged[d] = tonumber(A[3 + d])
  new_hold[d] = math.max(hold[d], charged[d])
  growth[d] = new_hold[d] - hold[d]
  if growth[d] ~= 0 then grows = true end
end
if grows then
  for j = 1, n do
    local b, st = $CB + (j - 1) * $N1, states[j]
    for d = 1, $N do
      local limit = opt(A[b + d])
      if limit and growth[d] > 0 and st.used[d] + st.held[d] + growth[d] > limit then
        return flat_states({'D', struct.pack('<BB', j, d)}, states)
      end
    end
    local wc = opt(A[b + $N1])
    if wc and wall_clock_spent(st, wc, now) then return flat_states({'D', struct.pack('<BB', j, $N1)}, states) end
  end
end
local old_free, new_free, dc, dh, changed = free_of(hold, old), free_of(new_hold, charged), {}, {}, false
for d = 1, $N do
  dc[d], dh[d] = charged[d] - old[d], new_free[d] - old_free[d]
  if dc[d] ~= 0 or dh[d] ~= 0 then changed = true end
end
if changed then
  for j = 1, n do add(ts[j], nil, dc, dh, states[j].v) end
  r.h, r.c = new_hold, charged
  save(id, r, 'KEEPTTL')
end
return 'K' .. struct.pack('$KF', $NEWHOLDV)
"""

# A[2] id, [3..N + 2] actual, [N + 3] n (-n: a run scope is among them); per scope 2: totals name, keep ms
# (used only if the reservation is unknown, and a run's '-TTL' always); then the usage row's values in
# ROW_FIELDS order (none: no row), then the history's retention in ms (redis_history.py)
_SETTLE = r"""
local id = A[2]
local r = load(id)
if r and r.st == DONE then return 'already' end
local actual = {$ACTUAL}
local n = tonumber(A[$SN])
local slides = n < 0   -- -n: a run's totals among them ('-TTL' keep), kept TTL past this request's end too
if slides then n = -n end
local outcome = 'settled'
if r and r.st == LIVE then
  local free, minus = free_of(r.h, r.c), {}
  for d = 1, $N do free[d], minus[d] = -free[d], -r.c[d] end
  for j = 1, r.n do add(r.t[j], actual, minus, free) end
  redis.call('ZREM', XK, id)
elseif r then                    -- expired: its charges at expiry were settled then; add the difference
  local diff = {}
  for d = 1, $N do diff[d] = actual[d] - r.c[d] end
  for j = 1, r.n do add(r.t[j], diff) end
  outcome = 'late'
else                             -- unknown here (its record aged out): count it, never lose it
  local now_ms = server_ms()
  for j = 1, n do
    local t = A[$SN - 1 + 2 * j]
    add(t, actual)
    expire_totals(t, keep_until(A[$SN + 2 * j], now_ms))
  end
  outcome = 'missing'
end
if slides then
  local now_ms = server_ms()
  for j = 1, n do
    local t, keep = A[$SN - 1 + 2 * j], A[$SN + 2 * j]
    if string.byte(keep) == 45 and TOT[t] then   -- ('-': read and written above, under this name)
      local at = now_ms - tonumber(keep)
      expire_totals(t, at)
      index_run(t, at, now_ms)
    end
  end
end
tombstone(id)
local row = $SN + 2 * n   -- the row's values follow, in ROW_FIELDS order
if #A > row then
  local entry = {}
  for i = 1, #ROW_FIELDS do entry[2 * i - 1], entry[2 * i] = ROW_FIELDS[i], A[row + i] end
  if not pcall(redis.call, 'XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*', unpack(entry)) then
    -- a value XADD refuses (a JSON null, a missing field): the row with those as '', never a failed
    -- settlement (its totals and tombstone are written above)
    for i = 1, #ROW_FIELDS do
      local v = A[row + i]
      if type(v) == 'number' then v = tostring(v) elseif type(v) ~= 'string' then v = '' end
      entry[2 * i] = v
    end
    redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*', unpack(entry))
  end
end
-- the row's hourly tallies (redis_history.py; the retention follows the row's values): never a failed settlement
if #A > row + #ROW_FIELDS then pcall(hist_row, A, row) end
-- (no purge here: reserve, charge and states purge before they read, so no decision and no view
-- ever sees an expired hold)
return outcome
"""

# A[2] id
_RELEASE = r"""
local id = A[2]
local r = load(id)
if not r then return 'missing' end
if r.st == DONE then return 'already' end
if r.st == LIVE then
  drop(r)
  redis.call('ZREM', XK, id)
end
tombstone(id)
return 'released'
"""

# ARG[4..] ids; answers the ids that are no longer live (a live reservation is in the zset, and only then)
_RENEW = r"""
local e, lost = server_ms() + HOLD_TTL_MS, {}
for i = 4, #ARG do
  if redis.call('ZADD', XK, 'XX', 'CH', e, ARG[i]) == 0 and not redis.call('ZSCORE', XK, ARG[i]) then
    lost[#lost + 1] = ARG[i]
  end
end
return lost
"""

# ARG[4] n, then n totals names; answers their totals' bytes
_STATES = r"""
local ts = {}
for j = 1, tonumber(ARG[4]) do ts[j] = ARG[4 + j] end
purge(server_ms(), 1000)
local out = flat_states({}, read_states(ts))
flush_totals()
return out
"""

# ARG[4] totals name, [5] keep ms: settled := 0 and the wall clock restarts; requests in flight keep
# their holds and running charges (they are still spending) and settle normally
_RESET = r"""
local t, now_ms = ARG[4], server_ms()
purge(now_ms, 1000)
local v = read_totals(t)
for d = 1, $N do v[d] = 0 end
v[$F] = NONE
write_totals(t, v)
expire_totals(t, keep_until(ARG[5], now_ms))
flush_totals()
return 'ok'
"""

# ARG[4] 'TEAM/KEY' (its index of runs, P R:TEAM/KEY), [5] how many to list; answers the number of
# runs not yet forgotten, then per listed run (latest first): its id, its totals' bytes, when it is
# forgotten (ms)
_RUNS = r"""
local base, now_ms = ARG[4], server_ms()
local z = P .. 'R:' .. base
purge(now_ms, 1000)
redis.call('ZREMRANGEBYSCORE', z, '-inf', now_ms)
local out = {redis.call('ZCARD', z)}
local limit = tonumber(ARG[5])
if limit >= 1 then
  local ids = redis.call('ZREVRANGE', z, 0, limit - 1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    local _, raw = read_totals('run:' .. base .. '/' .. ids[i] .. '@0')
    out[#out + 1] = ids[i]
    out[#out + 1] = raw
    out[#out + 1] = ids[i + 1]
  end
end
flush_totals()
return out
"""


def _op(name: str, body: str) -> str:
    """One operation as a Lua function of its item A = {op, arguments...}."""
    return f"local function {name}(A)\n{body}\nend\n"


# ARGV[4] is a JSON array of items [op, arguments...] (op r reserve, c charge, s settle, l release,
# d a denial counted in the history: redis_history.py),
# run one after the other in this order, each exactly as it would run alone: item k sees what items
# 1..k-1 wrote. Answers an array of the items' replies; an item that fails answers '!' and the error
# (its own: the items after it still run; the reserve of a used id is one).
_BATCH = r"""
local OPS = {r = reserve, c = charge, s = settle, l = release, d = denial}
local out = {}
for i, item in ipairs(cjson.decode(ARGV[4])) do
  local ok, reply = pcall(OPS[item[1]], item)
  if not ok then
    if type(reply) == 'table' then reply = reply.err end
    reply = '!' .. tostring(reply)
  end
  out[i] = reply
end
flush_totals()
pcall(flush_hist)   -- (the tallies never fail the batch: its settlements are written above)
return out
"""

def layout(n: int) -> dict[str, str]:
    """The placeholders' values for n dimensions: counts, offsets, struct formats, unrolled lists."""
    ones = range(1, n + 1)
    lua_base = {"input_tokens": "input", "input_cost_nanos": "input_cost", "one": "1", "zero": "0"}
    lua_per = {"token": "out", "rate": "out_cost(out, num, den)", "zero": "0"}
    hold = [" + ".join(x for x in (lua_base[d.base], lua_per[d.per_output]) if x != "0") or "0" for d in DIMS]
    return {
        "N": str(n), "N1": str(n + 1), "N2": str(2 * n), "F": str(3 * n + 1), "TB": str(8 * (3 * n + 1)),
        "RS": str(n + 3), "CB": str(n + 4), "SN": str(n + 3),
        "MARK": str(0 if n == LEGACY_DIMS else 4 * n),
        "TF": "<" + "d" * (3 * n + 1), "RF": "<BB" + "d" * (2 * n + 2), "AF": "<" + "d" * (n + 1), "KF": "<" + "d" * n,
        "HL": ", ".join(f"h{d}" for d in ones), "CL": ", ".join(f"c{d}" for d in ones),
        "HV": ", ".join(f"h[{d}]" for d in ones), "CV": ", ".join(f"c[{d}]" for d in ones),
        "HOLDV": ", ".join(f"hold[{d}]" for d in ones), "NEWHOLDV": ", ".join(f"new_hold[{d}]" for d in ones),
        "VALL": ", ".join(f"v[{i}]" for i in range(1, 3 * n + 2)),
        "USED": ", ".join(f"v[{d}] + v[{n + d}]" for d in ones), "HELD": ", ".join(f"v[{2 * n + d}]" for d in ones),
        "ZT": ", ".join(["0"] * (3 * n)), "ZN": ", ".join(["0"] * n), "ZR": ", ".join(["0"] * (2 * n + 2)),
        "ACTUAL": ", ".join(f"tonumber(A[{2 + d}])" for d in ones),
        "PER": ", ".join(str(("zero", "token", "rate").index(d.per_output)) for d in DIMS),
        "BASE": ", ".join(lua_base[d.base] for d in DIMS), "HOLD": ", ".join(hold),
        "ROWC": ", ".join(f"'{f}', " + ("'0'" if i is None else f"I(c[{i + 1}])") for f, i in ROW_AMOUNTS),
    }


def _scripts(n: int) -> dict[str, str]:
    fill = layout(n)
    sources = {
        "batch": _PRELUDE + _EXACT + HISTORY_LUA + _op("reserve", _RESERVE) + _op("charge", _CHARGE)
        + _op("settle", _SETTLE) + _op("release", _RELEASE) + _op("denial", DENIAL_LUA) + _BATCH,
        **{name: _PRELUDE + _FLAT + body for name, body in (("renew", _RENEW), ("states", _STATES), ("reset", _RESET),
                                                                    ("runs", _RUNS))},
    }
    return {name: Template(src).substitute(fill) for name, src in sources.items()}


SCRIPTS = _scripts(len(DIMS))
