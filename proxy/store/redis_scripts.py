"""The Lua scripts of the Redis store (see redis.py for the key layout and the semantics).
Each runs atomically inside Redis: `ledger.admit` / `ledger.check_growth` transcribed. Reserve,
charge, settle and release are functions of one script, "batch", that runs a list of them in order."""

from proxy.store.base import UsageRow

SETTLED_TOMBSTONE_MS = 600_000  # a second settle of one reservation id within this is a no-op

_PRELUDE = r"""
local P, HOLD_TTL_MS, LOG_MAX = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local EXPIRED_KEEP_MS, PURGE_MAX = 86400000, 64
local TOTALS = {'s1','s2','s3','s4','s5','c1','c2','c3','c4','c5','h1','h2','h3','h4','h5','f'}
local ROW_FIELDS = {""" + ",".join(f"'{name}'" for name in UsageRow._fields) + r"""}
local XK = P .. 'x'

local function I(n) return string.format('%d', n) end
local function opt(s) if s == '' then return nil end return tonumber(s) end
local function push(t, ...) for _, v in ipairs({...}) do t[#t + 1] = v end return t end
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function nums(t)   -- a record's 5-vector of exact integer strings -> numbers
  return {tonumber(t[1]), tonumber(t[2]), tonumber(t[3]), tonumber(t[4]), tonumber(t[5])}
end
local function ints(v)   -- numbers as exact integer strings (tostring would give '1e+15')
  local t = {}
  for d = 1, #v do t[d] = I(v[d]) end
  return t
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

-- A reservation's record (one string, cjson): {st = live | expired | done, n, t = totals names,
-- x = their keep-until, h / c = hold / charged (5 integer strings), out, at, team, key}.
local function load(id)
  local v = redis.call('GET', P .. 'q:' .. id)
  if v then return cjson.decode(v) end
  return nil
end
local function save(id, r, ...)
  redis.call('SET', P .. 'q:' .. id, cjson.encode(r), ...)
end
local function tombstone(id)  -- a second settle or release of ID is a no-op
  redis.call('SET', P .. 'q:' .. id, '{"st":"done"}', 'PX', '""" + str(SETTLED_TOMBSTONE_MS) + r"""')
end

-- A scope's totals: one HMGET of every field (raw: as the reply sends them back); used = s + c.
-- Numbers are written as Lua numbers (Redis formats them, exact below 2^53; 7.2+ may use an
-- exponent: tonumber and the store's parser read both): string.format costs ~0.5 µs a number here.
local function read_state(t)
  local v = redis.call('HMGET', P .. 't:' .. t, unpack(TOTALS))
  local st = {raw = v, used = {}, held = {}, first = v[16] or nil}
  for d = 1, 5 do
    st.used[d] = (tonumber(v[d]) or 0) + (tonumber(v[d + 5]) or 0)
    st.held[d] = tonumber(v[d + 10]) or 0
  end
  return st
end
local function read_states(ts)
  local s = {}
  for j = 1, #ts do s[j] = read_state(ts[j]) end
  return s
end
-- Add the 5-vectors ds / dc / dh (nil: none) to a scope's settled / charged / held: one HMGET of the
-- fields that change (or `raw`, a read_state's HMGET), one HSET.
local function add(t, ds, dc, dh, raw)
  local tk, idx = P .. 't:' .. t, {}
  for k, delta in ipairs({ds or false, dc or false, dh or false}) do
    if delta then
      for d = 1, 5 do
        if delta[d] ~= 0 then idx[#idx + 1] = {(k - 1) * 5 + d, delta[d]} end
      end
    end
  end
  if #idx == 0 then return end
  local out, v = {}, raw
  if not v then
    local names = {}
    for n, x in ipairs(idx) do names[n] = TOTALS[x[1]] end
    local got = redis.call('HMGET', tk, unpack(names))
    v = {}
    for n, x in ipairs(idx) do v[x[1]] = got[n] end
  end
  for _, x in ipairs(idx) do
    out[#out + 1], out[#out + 2] = TOTALS[x[1]], (tonumber(v[x[1]]) or 0) + x[2]
  end
  redis.call('HSET', tk, unpack(out))
end
local function flat_states(out, states)   -- per scope its 16 fields as stored ('' = none)
  for _, s in ipairs(states) do
    local v = s.raw
    for i = 1, 16 do out[#out + 1] = v[i] or '' end
  end
  return out
end
local function wall_clock_spent(state, limit, now)
  local used = 0
  if state.first then used = math.max(0, now - tonumber(state.first)) end
  return used >= limit
end

-- A live reservation leaves: its charges so far become settled, the rest of its hold is released.
local function drop(r)
  local hold, charged = nums(r.h), nums(r.c)
  local free, minus = free_of(hold, charged), {}
  for d = 1, 5 do free[d], minus[d] = -free[d], -charged[d] end
  for j = 1, tonumber(r.n) do add(r.t[j], charged, minus, free) end
end

local function joined(t) return table.concat(t, ',') end  -- one bulk string: cheap to parse

local function secs(ms) return string.format('%d.%03d', math.floor(ms / 1000), ms % 1000) end

local function expire(id, now_ms)
  local r = load(id)
  if not r or r.st ~= 'live' then return end
  drop(r)
  r.st = 'expired'
  save(id, r, 'PX', EXPIRED_KEEP_MS)
  local c = nums(r.c)
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*',
    'time', secs(now_ms), 'team', r.team or '', 'key', r.key or '', 'model', '', 'route', '',
    'input_tokens', I(c[2]), 'cache_write_5m_tokens', '0', 'cache_write_1h_tokens', '0',
    'cache_read_tokens', '0', 'output_tokens', I(c[3]), 'web_search_requests', '0',
    'cost_nanos', I(c[4]), 'steps', I(c[5]),
    'duration_s', string.format('%.3f', math.max(0, now_ms - (tonumber(r.at) or now_ms)) / 1000),
    'outcome', 'hold_expired', 'request_id', id)
end

-- Expire the reservations (of any scope) whose hold has run out: up to `limit` of them, oldest first
-- (a decision that meets more than that sees the rest as still held: it errs towards denying).
local function purge(now_ms, limit)
  local ids = redis.call('ZRANGEBYSCORE', XK, '-inf', now_ms, 'LIMIT', 0, limit)
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
  if a < EXACT and b < EXACT then   -- both products exact as Lua numbers: no limbs needed (~5% of a batch)
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

# ARG[4] id, [5] now, [6] input tokens, [7] input cost, [8] max_tokens, [9]/[10] output rate
# num/den, [11] team, [12] key, [13] n; per scope 8: totals key, keep ms, 6 limits ('' = none)
_RESERVE = r"""
local id, now_s = ARG[4], ARG[5]
local now, input, input_cost, max_tokens = tonumber(now_s), tonumber(ARG[6]), tonumber(ARG[7]), tonumber(ARG[8])
local num, den, n = tonumber(ARG[9]), tonumber(ARG[10]), tonumber(ARG[13])
local ts, xs, lims = {}, {}, {}
for j = 1, n do
  local b = 13 + (j - 1) * 8
  ts[j], xs[j], lims[j] = ARG[b + 1], ARG[b + 2], {}
  for d = 1, 6 do lims[j][d] = opt(ARG[b + 2 + d]) end
end
local r = load(id)
if r and r.st == 'live' then   -- a replay: 'B', and the states as they are (its hold included)
  return joined(flat_states(push({'B', r.out}, unpack(r.h)), read_states(ts)))
elseif r then
  return '!ERR reservation id already used'
end
local now_ms = server_ms()
for j = 1, n do xs[j] = keep_until(xs[j], now_ms) end
purge(now_ms, PURGE_MAX)
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
      if not fits then return joined(flat_states({'D', I(j), I(d)}, states)) end
    end
  end
  if L[6] and wall_clock_spent(st, L[6], now) then return joined(flat_states({'D', I(j), '6'}, states)) end
end
out = math.max(out, 0)
local hold = {input + out, input, out, input_cost + out_cost(out, num, den), 1}
local keep = 0
for j = 1, n do
  local tk, st = P .. 't:' .. ts[j], states[j]
  local fields = {}
  for d = 1, 5 do
    if hold[d] ~= 0 then fields[#fields + 1], fields[#fields + 2] = TOTALS[10 + d], st.held[d] + hold[d] end
  end
  local fresh = not st.first   -- the period's first request (or the first since a reset)
  if fresh then fields[#fields + 1], fields[#fields + 2] = 'f', now_s end
  if #fields > 0 then redis.call('HSET', tk, unpack(fields)) end
  if fresh then expire_at(tk, xs[j]) end   -- (the totals' lifetime is fixed for their period)
  if keep and xs[j] ~= '0' then keep = math.max(keep, tonumber(xs[j])) else keep = nil end
end
redis.call('ZADD', XK, now_ms + HOLD_TTL_MS, id)
local rec = {st = 'live', n = n, t = ts, x = xs, h = ints(hold), c = {'0', '0', '0', '0', '0'}, out = I(out),
             at = I(now_ms), team = ARG[11], key = ARG[12]}
if keep and keep > 0 then save(id, rec, 'PXAT', I(keep)) else save(id, rec) end
-- 'A': the states as read before this hold (the caller adds it, and its own now as a first request)
return joined(flat_states(push({'A', I(out)}, unpack(rec.h)), states))
"""

# ARG[4] id, [5] now, [6..10] charged so far (>= 0), [11] n; per scope 6 limits ('' = none)
_CHARGE = r"""
local id, now = ARG[4], tonumber(ARG[5])
local r = load(id)
if not r or r.st == 'done' then return 'G' end
local n, ts, now_ms = tonumber(r.n), r.t, server_ms()
if r.st ~= 'live' then
  purge(now_ms, PURGE_MAX)
  return joined(flat_states({'X'}, read_states(ts)))
end
-- renew first: the purge below must not expire a request that is alive
redis.call('ZADD', XK, 'XX', now_ms + HOLD_TTL_MS, id)
purge(now_ms, PURGE_MAX)
local states = read_states(ts)
local hold, old, charged, new_hold, growth, grows = nums(r.h), nums(r.c), {}, {}, {}, false
for d = 1, 5 do
  charged[d] = tonumber(ARG[5 + d])
  new_hold[d] = math.max(hold[d], charged[d])
  growth[d] = new_hold[d] - hold[d]
  if growth[d] ~= 0 then grows = true end
end
if grows then
  for j = 1, n do
    local b, st = 11 + (j - 1) * 6, states[j]
    for d = 1, 5 do
      local limit = opt(ARG[b + d])
      if limit and growth[d] > 0 and st.used[d] + st.held[d] + growth[d] > limit then
        return joined(flat_states({'D', I(j), I(d)}, states))
      end
    end
    local wc = opt(ARG[b + 6])
    if wc and wall_clock_spent(st, wc, now) then return joined(flat_states({'D', I(j), '6'}, states)) end
  end
end
local old_free, new_free, dc, dh, changed = free_of(hold, old), free_of(new_hold, charged), {}, {}, false
for d = 1, 5 do
  dc[d], dh[d] = charged[d] - old[d], new_free[d] - old_free[d]
  if dc[d] ~= 0 or dh[d] ~= 0 then changed = true end
end
if changed then
  for j = 1, n do add(ts[j], nil, dc, dh, states[j].raw) end
  r.h, r.c = ints(new_hold), ints(charged)
  save(id, r, 'KEEPTTL')
end
return joined(push({'OK'}, unpack(ints(new_hold))))
"""

# ARG[4] id, [5..9] actual, [10] n; per scope 2: totals key, keep ms (used only if the
# reservation is unknown); then the usage row's values in ROW_FIELDS order (none: no row)
_SETTLE = r"""
local id = ARG[4]
local r = load(id)
if r and r.st == 'done' then return 'already' end
local actual = {}
for d = 1, 5 do actual[d] = tonumber(ARG[4 + d]) end
local outcome = 'settled'
if r and r.st == 'live' then
  local hold, charged = nums(r.h), nums(r.c)
  local free, minus = free_of(hold, charged), {}
  for d = 1, 5 do free[d], minus[d] = -free[d], -charged[d] end
  for j = 1, tonumber(r.n) do add(r.t[j], actual, minus, free) end
  redis.call('ZREM', XK, id)
elseif r then                    -- expired: its charges at expiry were settled then; add the difference
  local charged, diff = nums(r.c), {}
  for d = 1, 5 do diff[d] = actual[d] - charged[d] end
  for j = 1, tonumber(r.n) do add(r.t[j], diff) end
  outcome = 'late'
else                             -- unknown here (its record aged out): count it, never lose it
  local now_ms = server_ms()
  for j = 1, tonumber(ARG[10]) do
    local t, x = ARG[9 + 2 * j], ARG[10 + 2 * j]
    add(t, actual)
    expire_at(P .. 't:' .. t, keep_until(x, now_ms))
  end
  outcome = 'missing'
end
tombstone(id)
local row = 10 + 2 * tonumber(ARG[10])   -- the row's values follow, in ROW_FIELDS order
if #ARG > row then
  local entry = {}
  for i = 1, #ROW_FIELDS do entry[2 * i - 1], entry[2 * i] = ROW_FIELDS[i], ARG[row + i] end
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', LOG_MAX, '*', unpack(entry))
end
-- (no purge here: reserve, charge and states purge before they read, so no decision and no view
-- ever sees an expired hold)
return outcome
"""

# ARG[4] id
_RELEASE = r"""
local id = ARG[4]
local r = load(id)
if not r then return 'missing' end
if r.st == 'done' then return 'already' end
if r.st == 'live' then
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

# ARG[4] n, then n totals keys
_STATES = r"""
local ts = {}
for j = 1, tonumber(ARG[4]) do ts[j] = ARG[4 + j] end
purge(server_ms(), 1000)
return joined(flat_states({}, read_states(ts)))
"""

# ARG[4] totals key, [5] keep ms: settled := 0 and the wall clock restarts; requests in flight keep
# their holds and running charges (they are still spending) and settle normally
_RESET = r"""
local t, now_ms = ARG[4], server_ms()
local tk = P .. 't:' .. t
purge(now_ms, 1000)
redis.call('HDEL', tk, 's1', 's2', 's3', 's4', 's5', 'f')
expire_at(tk, keep_until(ARG[5], now_ms))
return 'ok'
"""


def _op(name: str, body: str) -> str:
    """One operation as a Lua function of its own ARG (ARGV[1..3], then the item's arguments)."""
    return f"local function {name}(ARG)\n{body}\nend\n"


# ARGV[4] is a JSON array of items [op, arguments...] (op r reserve, c charge, s settle, l release),
# run one after the other in this order, each exactly as it would run alone: item k sees what items
# 1..k-1 wrote. Answers the items' replies joined by ';' (none contains one); an item that fails
# answers '!' and the error (its own: the items after it still run; the reserve of a used id is one).
_BATCH = r"""
local OPS = {r = reserve, c = charge, s = settle, l = release}
local out = {}
for i, item in ipairs(cjson.decode(ARGV[4])) do
  local A = {ARGV[1], ARGV[2], ARGV[3]}
  for k = 2, #item do A[k + 2] = item[k] end
  local ok, reply = pcall(OPS[item[1]], A)
  if not ok then
    if type(reply) == 'table' then reply = reply.err end
    reply = '!' .. string.gsub(tostring(reply), ';', ',')
  end
  out[i] = reply
end
return table.concat(out, ';')
"""

SCRIPTS = {
    "batch": _PRELUDE + _EXACT + _op("reserve", _RESERVE) + _op("charge", _CHARGE) + _op("settle", _SETTLE)
    + _op("release", _RELEASE) + _BATCH,
    **{name: _PRELUDE + _FLAT + body for name, body in (("renew", _RENEW), ("states", _STATES), ("reset", _RESET))},
}
