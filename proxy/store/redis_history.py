"""RedisStore's history (docs/http-api.md, "History"): hourly tallies kept by the settle script, what
/admin/history reads in O(buckets), and the retention that prunes them and the usage-log stream.

Keys (P = the store's prefix; HOUR = the UTC hour's start, epoch s; LEN = the team's length in bytes,
so that no team and key pair can spell another's):
  P Ht:HOUR:TEAM           string  a team's hour: 7 packed doubles (HF), in Tally's order:
  P Hk:HOUR:LEN:TEAMKEY    string  requests, input_tokens (incl. cache), output_tokens, cost_nanos,
                                   steps, denied, cut; a key's hour likewise
  P Hi                     zset    every tally's name, scored by its hour: what retention deletes
The settle script adds its usage row to the row's two hours (GET, unpack, add, pack, SET PX, and a
ZADD for a name new this hour; a tally read once and written once per batch, however many of its
items add to it), under pcall: a tally never fails a settlement. A denial is an item "d" of the
same batch script (the same two tallies, denied + 1).
Each tally expires store_retention_days after its hour ends (PX, relative to the row's own time, so
Redis' clock does not matter); prune() deletes deterministically by the caller's clock too: the
tallies of hours that ended before it (from P Hi) and the stream's entries older than it (XTRIM
MINID: entries are in the order they were logged).

A history query of N hours is one MGET of N names (in chunks of 1000), on the store's pipelined
connection: values are binary. The CSV export reads the stream in pages that a script filters inside Redis by the rows' own
time, team and key (the stream is capped near log_max entries anyway), answering one JSON string a
matching row. Retention's batches are a script too (no entry crosses to the client).

Rows logged by the purge of a dead replica's holds ("hold_expired", written inside the purge, which
has no row of the request) are in the stream, hence in the CSV, but not in the hourly tallies."""
from __future__ import annotations

import json
import math
import struct
from typing import Any

from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.store.base import HOUR, Tally, UsageRow
from proxy.store.resp import RespError

UNAVAILABLE = "The budget ledger is unavailable."
HF = struct.Struct("<7d")
MGET_CHUNK = 1000
DEFAULT_KEEP_MS = str(90 * 86400 * 1000)

_F = {name: i + 1 for i, name in enumerate(UsageRow._fields)}  # a row value's offset after the row's start
_NF = len(UsageRow._fields)

# Defined in the batch script before the operations (no '$': the script is a string.Template).
LUA = f"""
-- History (redis_history.py): per UTC hour, team and key, 7 counters packed as doubles.
-- A tally is read (GET) at most once per script call and written (SET, with the latest item's PX)
-- once, at its end (flush_hist), however many items of the batch add to it: they mostly share a
-- team, a key and an hour.
local HF, HI = '<ddddddd', P .. 'Hi'
local HIST = {{}}   -- tally name -> {{its 7 counters..., keep = ms}}
local function hist_bump(k, hour, keep, a1, a2, a3, a4, a5, a6, a7)
  local e = HIST[k]
  if not e then
    local b = redis.call('GET', k)
    local v1, v2, v3, v4, v5, v6, v7 = 0, 0, 0, 0, 0, 0, 0
    if b then v1, v2, v3, v4, v5, v6, v7 = struct.unpack(HF, b) else redis.call('ZADD', HI, hour, k) end
    e = {{v1, v2, v3, v4, v5, v6, v7}}
    HIST[k] = e
  end
  e[1], e[2], e[3], e[4], e[5], e[6], e[7] = e[1] + a1, e[2] + a2, e[3] + a3, e[4] + a4, e[5] + a5, e[6] + a6, e[7] + a7
  e.keep = keep
end
local function flush_hist()
  for k, e in pairs(HIST) do
    local packed = struct.pack(HF, e[1], e[2], e[3], e[4], e[5], e[6], e[7])
    if e.keep > 0 then redis.call('SET', k, packed, 'PX', e.keep) else redis.call('SET', k, packed) end
  end
  HIST = {{}}
end
-- the hour of an event at t (s), its two tallies' names, and how long they live (ms: until the hour
-- ends + retention ret; 0: for ever, ret '0'); nil when the event is older than the retention
local function hist_at(team, key, t, ret)
  local hour = math.floor(t / 3600) * 3600
  local keep = 0
  if ret ~= '0' then
    keep = math.floor((hour + 3600 - t) * 1000 + tonumber(ret))
    if keep <= 0 then return nil end
  end
  local h = string.format('%d', hour)
  return hour, keep, P .. 'Ht:' .. h .. ':' .. team, P .. 'Hk:' .. h .. ':' .. #team .. ':' .. team .. key
end
-- settle's usage row (its values from A[row + 1] on, in ROW_FIELDS order; then the retention, ms)
local function hist_row(A, row)
  local hour, keep, kt, kk = hist_at(A[row + {_F['team']}], A[row + {_F['key']}], tonumber(A[row + {_F['time']}]),
                                     A[row + {_NF + 1}])
  if not hour then return end
  local input = tonumber(A[row + {_F['input_tokens']}]) + tonumber(A[row + {_F['cache_write_5m_tokens']}])
    + tonumber(A[row + {_F['cache_write_1h_tokens']}]) + tonumber(A[row + {_F['cache_read_tokens']}])
  local out, cost, steps = tonumber(A[row + {_F['output_tokens']}]), tonumber(A[row + {_F['cost_nanos']}]),
                           tonumber(A[row + {_F['steps']}])
  local cut = 0
  if A[row + {_F['outcome']}] == 'cut' then cut = 1 end
  hist_bump(kt, hour, keep, 1, input, out, cost, steps, 0, cut)
  hist_bump(kk, hour, keep, 1, input, out, cost, steps, 0, cut)
end
"""

# The batch item "d": A[2] team, [3] key, [4] time (s), [5] retention (ms; '0': for ever).
DENIAL_LUA = """
local hour, keep, kt, kk = hist_at(A[2], A[3], tonumber(A[4]), A[5])
if hour then
  hist_bump(kt, hour, keep, 0, 0, 0, 0, 0, 1, 0)
  hist_bump(kk, hour, keep, 0, 0, 0, 0, 0, 1, 0)
end
return 'ok'
"""

def keep_ms(seconds: float) -> str:
    """A retention as the scripts take it: ms, '0' for ever."""
    return "0" if seconds <= 0 else str(int(seconds * 1000))


def tally_name(prefix: str, team: str, key: str | None, hour: int) -> bytes:
    if key is None:
        return f"{prefix}Ht:{hour}:{team}".encode()
    return f"{prefix}Hk:{hour}:{len(team.encode())}:{team}{key}".encode()


async def read_hours(pipe: Any, prefix: str, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
    """LedgerStore.usage_hours: one MGET per MGET_CHUNK hours, on the pipelined connection."""
    if pipe is None:
        raise StoreUnavailable(UNAVAILABLE)
    hours = list(range(math.ceil(start / HOUR) * HOUR, math.ceil(end / HOUR) * HOUR, HOUR))  # (starts in [start, end))
    out: dict[int, Tally] = {}
    try:
        for i in range(0, len(hours), MGET_CHUNK):
            chunk = hours[i:i + MGET_CHUNK]
            values = await pipe.call(b"MGET", *(tally_name(prefix, team, key, h) for h in chunk))
            if isinstance(values, RespError) or not isinstance(values, list):
                raise StoreUnavailable(UNAVAILABLE)
            for h, v in zip(chunk, values):
                if v is not None and len(v) == HF.size:
                    out[h] = Tally(*(int(x) for x in HF.unpack(v)))
    except (OSError, RespError) as exc:
        raise StoreUnavailable(UNAVAILABLE) from exc
    return out


# The CSV export's page, filtered inside Redis: the stream's entries after ARGV[1] ('-': from the
# first), at most ARGV[2] of them, those whose time is in [ARGV[3], ARGV[4]) and whose team / key is
# ARGV[6] / ARGV[8] when ARGV[5] / ARGV[7] is '1'. Answers the last entry's id when it read ARGV[2]
# (else ''), then each matching entry's field-value list as one JSON array: a few strings a page
# for the client to parse instead of 35 a row (redis-py parses each string in Python, slowly).
PAGE_LUA = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local s, e = tonumber(ARGV[3]), tonumber(ARGV[4])
local by_team, team, by_key, key = ARGV[5] == '1', ARGV[6], ARGV[7] == '1', ARGV[8]
local out = {''}
for _, en in ipairs(entries) do
  local f, m = en[2], {}
  for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
  local t = tonumber(m.time)
  if t and t >= s and t < e and (not by_team or m.team == team) and (not by_key or m.key == key) then
    out[#out + 1] = cjson.encode(f)
  end
end
if #entries == tonumber(ARGV[2]) then out[1] = entries[#entries][1] end
return out
"""

# Retention, one batch: the stream's head entries older than ARGV[1] (s), at most ARGV[2] of them
# (stopping at the first younger one: entries are in the order they were logged; one without a
# readable time goes too), trimmed with XTRIM MINID; then at most ARGV[2] tallies of hours that
# ended by then, from their index KEYS[2]. Answers how many went.
PRUNE_LUA = """
local before, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit)
local old, keep = 0, nil
for _, en in ipairs(entries) do
  local f, t = en[2], nil
  for i = 1, #f, 2 do if f[i] == 'time' then t = tonumber(f[i + 1]) break end end
  if t and t >= before then keep = en[1] break end
  old = old + 1
end
if old > 0 then
  if not keep then
    local ms, seq = string.match(entries[old][1], '^(%d+)-(%d+)$')
    keep = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  end
  redis.call('XTRIM', KEYS[1], 'MINID', keep)
end
local names = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', before - 3600, 'LIMIT', 0, limit)
for i = 1, #names, 500 do
  local j = math.min(i + 499, #names)
  redis.call('UNLINK', unpack(names, i, j))
  redis.call('ZREM', KEYS[2], unpack(names, i, j))
end
return old + #names
"""


async def read_page(client: Any, stream: str, row_of: Any, start: float, end: float, team: str | None,
                    key: str | None, after: str | None, limit: int) -> tuple[list[UsageRow], str | None]:
    """LedgerStore.usage_page: `limit` stream entries from `after` on, the rows among them that match
    (maybe none), and the id of the last entry read while there may be more."""
    if client is None:
        raise StoreUnavailable(UNAVAILABLE)
    try:
        reply = await client.register_script(PAGE_LUA)(
            keys=[stream], args=["-" if after is None else "(" + after, limit, repr(float(start)), repr(float(end)),
                                 "0" if team is None else "1", team or "", "0" if key is None else "1", key or ""])
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(UNAVAILABLE) from exc
    rows = []
    for entry in reply[1:]:
        f = json.loads(entry)
        rows.append(row_of(dict(zip(f[::2], f[1::2]))))
    return rows, (reply[0] or None)


async def prune(client: Any, prefix: str, before: float, limit: int) -> int:
    """LedgerStore.prune_log: one batch of PRUNE_LUA."""
    if client is None:
        raise StoreUnavailable(UNAVAILABLE)
    try:
        return int(await client.register_script(PRUNE_LUA)(keys=[prefix + "log", prefix + "Hi"],
                                                            args=[repr(float(before)), limit]))
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(UNAVAILABLE) from exc
