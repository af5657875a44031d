"""RedisStore's runtime keys (docs/http-api.md, "Runtime keys"), shared by every replica.

Keys (P = the store's prefix):
  P key:DIGEST  hash  rec: KeyRecord.to_json() as written at creation (never rewritten, so no
                      number goes through Lua's cjson), revoked_at: repr(epoch s) once revoked.
                      Expires KEY_RETENTION_S after the key is gone (revoked or expired).
  P keys        hash  '["TEAM","NAME"]' -> DIGEST: the names taken. A field whose record has
                      expired is free again (put overwrites it; list drops it).
Writes are Lua scripts (atomic: two replicas creating one name, one wins). They name keys they
compute, as the ledger's scripts do: one Redis, not Redis Cluster. Only admin routes and the
auth cache's misses (proxy/runtime_keys.py) come here, never the metered hot path."""
from __future__ import annotations

import json
from typing import Any

from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.store.base import KEY_RETENTION_S, KeyRecord

UNAVAILABLE = "The key store is unavailable."

PUT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and redis.call('EXISTS', ARGV[5] .. old) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'rec', ARGV[3])
if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return 1
"""

REVOKE = """
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return false end
local k = ARGV[2] .. d
if redis.call('EXISTS', k) == 0 then return false end
if redis.call('HSETNX', k, 'revoked_at', ARGV[3]) == 1 then
  local ttl = redis.call('PTTL', k)
  if ttl < 0 or ttl > tonumber(ARGV[4]) then redis.call('PEXPIRE', k, ARGV[4]) end
end
return redis.call('HMGET', k, 'rec', 'revoked_at')
"""

LIST = """
local out = {}
local index = redis.call('HGETALL', KEYS[1])
for i = 1, #index, 2 do
  local got = redis.call('HMGET', ARGV[1] .. index[i + 1], 'rec', 'revoked_at')
  if got[1] then
    out[#out + 1] = got[1]
    out[#out + 1] = got[2] or ''
  else
    redis.call('HDEL', KEYS[1], index[i])
  end
end
return out
"""


def _record(rec: str, revoked_at: str | None) -> KeyRecord:
    r = KeyRecord.from_json(rec)
    return r._replace(revoked_at=float(revoked_at)) if revoked_at else r


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


async def _run(client: Any, command: str, *args: Any) -> Any:
    if client is None:
        raise StoreUnavailable(UNAVAILABLE)
    try:
        return await getattr(client, command)(*args)
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(UNAVAILABLE) from exc


async def put(client: Any, prefix: str, rec: KeyRecord, now: float) -> bool:
    """Relative expiry (Redis applies it on its own clock): now is the caller's."""
    gone = rec.gone_at()
    keep = "0" if gone is None else _ms(gone + KEY_RETENTION_S - now)
    field = json.dumps([rec.team, rec.name])
    done = await _run(client, "eval", PUT, 2, prefix + "keys", prefix + "key:" + rec.digest,
                      field, rec.digest, rec.to_json(), keep, prefix + "key:")
    return int(done) == 1


async def find(client: Any, prefix: str, digest: str) -> KeyRecord | None:
    got = await _run(client, "hmget", prefix + "key:" + digest, ["rec", "revoked_at"])
    return None if not got or got[0] is None else _record(got[0], got[1])


async def listed(client: Any, prefix: str, team: str | None) -> list[KeyRecord]:
    flat = await _run(client, "eval", LIST, 1, prefix + "keys", prefix + "key:")
    recs = [_record(flat[i], flat[i + 1] or None) for i in range(0, len(flat), 2)]
    recs.sort(key=lambda r: (r.created_at, r.team, r.name))
    return [r for r in recs if team is None or r.team == team]


async def revoke(client: Any, prefix: str, team: str, name: str, now: float) -> KeyRecord | None:
    got = await _run(client, "eval", REVOKE, 1, prefix + "keys", json.dumps([team, name]), prefix + "key:",
                     repr(float(now)), _ms(KEY_RETENTION_S))
    return None if not got else _record(got[0], got[1])
