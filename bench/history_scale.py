"""How /admin/history and /admin/usage.csv scale (docs/http-api.md, "History"): a usage log of
10 million synthetic rows over 30 days on SQLite, and the Redis store's hourly tallies.

    .venv/bin/python bench/history_scale.py [--rows 10000000] [--days 30] [--teams 20] [--keys 10]
        [--dir /tmp] [--redis redis://127.0.0.1:6379/14] [--redis-requests 50000] [--skip-sqlite]
        [--skip-redis] [--keep]

SQLite: the rows are generated (seeded, in time order, as the proxy writes them; team t00 holds 30%
of them, the others share the rest; 10 keys a team) and inserted with executemany into a temporary
ledger that has only the usage_log table (no index: the fastest load); then each index the ledger
has is created and timed ((time), and (team, time) for the history's CSV export), then the hourly
tables are filled from the rows (what sqlite_history.migrate does when it opens an old ledger).
Then the ledger is opened as the proxy opens it (SqliteStore) and the /admin/history-equivalent
call (admin_history.history_document, which the route answers) is timed for 30 days: the biggest
team and one of its keys, a small team and one of its keys, by hour and by day (the first call,
then the median of 5). For comparison, the same sums computed from the raw log through the
(team, time) index. Then a CSV export of one key (the route's pages of 1000 rows, CSV built), a
retention prune of the oldest day in the store's batches of 2000, and, on a separate ledger of 1
million rows, the write path's cost per usage row (transactions of 16 rows as a group commit's,
WAL, synchronous=NORMAL) with and without the history's trigger and indexes, interleaved rounds.

Redis: the Lua cost of the hourly tallies per request (redis-server's own time per EVALSHA, from
INFO commandstats, over N reserve+settle requests run one at a time through RedisStore: with the
tallies, and with the settle script's tally line removed; interleaved rounds), the cost of a
denial item, then history and CSV over --redis-requests real settlements spread over 30 days, then
the tallies' memory at the density 10 million rows leave (every team and key, every hour of 30
days, written directly: a history query reads one tally per hour, however many rows made it), the
history query over them, and a retention prune. The keys under the bench's prefix are deleted at
the end.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.admin_history import history_document  # noqa: E402
from proxy.history import CSV_HEADER, HistoryQuery, csv_chunk, csv_query  # noqa: E402
from proxy.ledger import Amounts, Ask, Limits, Scope  # noqa: E402
from proxy.store import sqlite as sqlite_store  # noqa: E402
from proxy.store import sqlite_history  # noqa: E402
from proxy.store.base import UsageRow  # noqa: E402

# The per-row trigger the SQLite store once kept its hourly history with (now summed per batch in the
# group commit, proxy/store/sqlite_history.py add_rows), for the "trigger" variant.
_HOUR = "CAST(NEW.time / 3600 AS INTEGER) * 3600"
_INPUT = "NEW.input_tokens + NEW.cache_write_5m_tokens + NEW.cache_write_1h_tokens + NEW.cache_read_tokens"
_VALUES = f"1, {_INPUT}, NEW.output_tokens, NEW.cost_nanos, NEW.steps, 0, NEW.outcome = 'cut'"
_COUNTS, _ADD = sqlite_history._COUNTS, sqlite_history._ADD
TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS usage_log_history AFTER INSERT ON usage_log BEGIN
  INSERT INTO history_team (team, hour, {_COUNTS}) VALUES (NEW.team, {_HOUR}, {_VALUES})
    ON CONFLICT (team, hour) DO UPDATE SET {_ADD};
  INSERT INTO history_key (team, key, hour, {_COUNTS}) VALUES (NEW.team, NEW.key, {_HOUR}, {_VALUES})
    ON CONFLICT (team, key, hour) DO UPDATE SET {_ADD};
END;
"""


DAY = 86400
MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "gpt-5", "gpt-5-mini"]
OUTCOMES = ["completed"] * 96 + ["cut", "client_disconnected", "upstream_5xx", "upstream_dropped"]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def db_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def teams_and_keys(teams: int, keys: int) -> tuple[list[str], list[float], dict[str, list[str]]]:
    names = [f"t{i:02d}" for i in range(teams)]
    weights = [0.3] + [0.7 / (teams - 1)] * (teams - 1) if teams > 1 else [1.0]
    return names, weights, {t: [f"{t}-k{j}" for j in range(keys)] for t in names}


# --- SQLite -----------------------------------------------------------------------------------
def generate(db: sqlite3.Connection, n: int, start: float, span: float, teams: list[str], weights: list[float],
             keys: dict[str, list[str]]) -> None:
    rnd = random.Random(19)
    step = span / n
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    last = len(teams) - 1
    insert = sqlite_store.INSERT_ROW
    chunk = 200_000
    t = start
    done = 0
    t0 = time.perf_counter()
    while done < n:
        m = min(chunk, n - done)
        rows = []
        for i in range(m):
            t += step
            team = teams[min(bisect.bisect_left(cum, rnd.random()), last)]
            key = keys[team][int(rnd.random() * len(keys[team]))]
            inp = 200 + int(rnd.random() * 4000)
            out = 10 + int(rnd.random() * 1500)
            cr = int(rnd.random() * 2000) if rnd.random() < 0.3 else 0
            rows.append((t, team, key, MODELS[int(rnd.random() * 5)], "/v1/messages", inp, 0, 0, cr, out, 0,
                         inp * 3000 + out * 15000 + cr * 300, 1, 0.2 + rnd.random() * 20,
                         OUTCOMES[int(rnd.random() * 100)], f"req_{done + i:012x}", ""))
        db.execute("BEGIN")
        db.executemany(insert, rows)
        db.execute("COMMIT")
        done += m
        if done % 2_000_000 == 0 or done == n:
            el = time.perf_counter() - t0
            print(f"  generated {done:,} rows in {el:,.1f} s ({done / el:,.0f} rows/s)", flush=True)


def raw_history_sql(key: bool, size: int) -> str:
    where = "team = ? AND key = ?" if key else "team = ?"
    return (f"SELECT CAST(time / {size} AS INTEGER), count(*), sum(input_tokens + cache_write_5m_tokens + "
            f"cache_write_1h_tokens + cache_read_tokens), sum(output_tokens), sum(cost_nanos), sum(steps), "
            f"sum(outcome = 'cut') FROM usage_log WHERE {where} AND time >= ? AND time < ? GROUP BY 1")


def median_time(fn: Callable[[], Any], repeat: int = 5) -> tuple[float, float, Any]:
    """(first run, median of the rest, result)."""
    first, out = timed(fn)
    rest = [timed(fn)[0] for _ in range(repeat)]
    return first, statistics.median(rest), out


async def sqlite_bench(args: argparse.Namespace) -> None:
    print(f"\n== SQLite: {args.rows:,} usage rows over {args.days} days ==", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="history-scale-", dir=args.dir))
    path = tmp / "ledger.db"
    teams, weights, keys = teams_and_keys(args.teams, args.keys)
    end = (int(time.time()) // DAY) * DAY  # the last bucket ends at today's midnight, UTC
    span = args.days * DAY
    start = end - span

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")  # 256 MiB
    db.executescript(sqlite_store.SCHEMA)
    db.execute("DROP INDEX usage_log_time")
    db.execute("ALTER TABLE usage_log ADD COLUMN run TEXT NOT NULL DEFAULT ''")
    gen_s, _ = timed(lambda: generate(db, args.rows, start, span, teams, weights, keys))
    size_rows = db_size(path)
    print(f"rows: {args.rows:,} in {gen_s:,.1f} s; db {mib(size_rows)} (table only)")
    for name, cols in (("usage_log_time", "time"), ("usage_log_team_time", "team, time")):
        s, _ = timed(lambda: db.execute(f"CREATE INDEX {name} ON usage_log ({cols})"))
        print(f"index {name} ({cols}): created in {s:,.1f} s; db now {mib(db_size(path))}", flush=True)
    size_indexed = db_size(path)
    s, _ = timed(lambda: sqlite_history.migrate(db))
    size_all = db_size(path)
    n_team = db.execute("SELECT count(*) FROM history_team").fetchone()[0]
    n_key = db.execute("SELECT count(*) FROM history_key").fetchone()[0]
    print(f"hourly tables filled from the log (migrate of an old ledger) in {s:,.1f} s: history_team {n_team:,} "
          f"rows, history_key {n_key:,} rows; db now {mib(size_all)} (+{mib(size_all - size_indexed)})")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("ANALYZE")
    db.close()

    store = sqlite_store.SqliteStore(str(path))
    s, _ = await atimed(store.open())
    print(f"SqliteStore.open() on it (schema and migration checks, recovery): {ms(s)}")
    heavy, light = teams[0], teams[-1]
    n_heavy = await store._run(lambda: store._db.execute(  # noqa: SLF001
        "SELECT count(*) FROM usage_log WHERE team = ? AND time >= ? AND time < ?", (heavy, start, end)).fetchone()[0])
    n_heavy_key = await store._run(lambda: store._db.execute(  # noqa: SLF001
        "SELECT count(*) FROM usage_log WHERE team = ? AND key = ? AND time >= ? AND time < ?",
        (heavy, keys[heavy][0], start, end)).fetchone()[0])
    print(f"\n/admin/history-equivalent (history_document: store.usage_hours + bucketing), {args.days} days; "
          f"first call, then the median of 5:")
    print(f"  team {heavy} holds {n_heavy:,} rows in the range, its key {keys[heavy][0]} {n_heavy_key:,}")
    pairs = ((heavy, None), (heavy, keys[heavy][0]), (light, None), (light, keys[light][0]))
    async for team, key, bucket, buckets, total, first, med in history_timings(store, pairs, start, end):
        print(f"  {team:>4} {key or '*':>8} by {bucket:<4}: {buckets:>4} buckets, {total:>9,} requests: "
              f"first {ms(first)}, median {ms(med)}")

    print("\nfor comparison: the same sums from the raw log through the (team, time) index (no hourly tables):")
    for team, key in ((heavy, None), (heavy, keys[heavy][0]), (light, None)):
        sql = raw_history_sql(key is not None, DAY)
        params = (team, key, start, end) if key else (team, start, end)
        plan = await store._run(lambda: sqlite_history.explain(store._db, sql, params))  # noqa: SLF001
        first, med, rows = await amedian(lambda: store._run(lambda: store._db.execute(sql, params).fetchall()),  # noqa: SLF001
                                         repeat=2)
        print(f"  {team:>4} {key or '*':>8} by day : {sum(r[1] for r in rows):>9,} requests: first {ms(first)}, "
              f"median {ms(med)}  [{'; '.join(plan)}]")

    print("\n/admin/usage.csv-equivalent (pages of 1000 rows, CSV bytes built):")
    q = csv_query([("team", heavy), ("key", keys[heavy][0]), ("from", "1970-01-01")], end)
    first_page, _ = await atimed(store.usage_page(q.start, q.end, q.team, q.key, None, 1000))
    t0 = time.perf_counter()
    n_rows, n_bytes, after = 0, len(CSV_HEADER), None
    while True:
        rows, after = await store.usage_page(q.start, q.end, q.team, q.key, after, 1000)
        n_rows += len(rows)
        n_bytes += len(csv_chunk(rows))
        if after is None:
            break
    el = time.perf_counter() - t0
    print(f"  first page {ms(first_page)}; the key's whole export: {n_rows:,} rows, {mib(n_bytes)} in {el:,.2f} s "
          f"({n_rows / el:,.0f} rows/s)")
    await store.close()

    # retention: the oldest day, in the store's batches
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    before = start + DAY
    batches = []
    total = 0
    while True:
        s, n = timed(lambda: sqlite_history.prune(db, before, 2000))
        batches.append(s)
        total += n
        if n < 2000:
            break
    print(f"\nretention: the oldest day ({total:,} records) pruned in {len(batches)} batches of up to 2000 "
          f"(one transaction each): median {ms(statistics.median(batches))}, max {ms(max(batches))}, "
          f"total {sum(batches):,.1f} s")
    db.close()
    write_path(tmp, teams, keys)
    if args.keep:
        print(f"(kept: {path})")
    else:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


WRITE_CONFIGS = {  # name: what the usage log has beside its time index
    "as before this change (time index only)": (),
    "+ the hourly tables' trigger": ("trigger",),
    "+ trigger + (team, time) index (as shipped)": ("trigger", "team_time"),
    "+ trigger + (team, time) + (team, key, time) (not shipped)": ("trigger", "team_time", "team_key_time"),
}


def write_path(tmp: Path, teams: list[str], keys: dict[str, list[str]], base_rows: int = 1_000_000,
               n: int = 8_000, rounds: int = 5) -> None:
    """Per usage row, on a ledger of `base_rows`: transactions of 16 rows (a group commit's), WAL,
    synchronous=NORMAL, rows of random teams and keys; each configuration `rounds` times, interleaved
    (the machine's noise falls on all alike), the median."""
    path = tmp / "write.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(sqlite_store.SCHEMA)
    db.execute("ALTER TABLE usage_log ADD COLUMN run TEXT NOT NULL DEFAULT ''")
    for stmt in sqlite_history.TABLES.split(";"):
        if stmt.strip():
            db.execute(stmt)
    rnd = random.Random(7)
    clock = [1.7e9]

    def rows(m: int, step: float) -> list[tuple[Any, ...]]:
        out = []
        for _ in range(m):
            clock[0] += step
            team = teams[int(rnd.random() * len(teams))]
            out.append((clock[0], team, keys[team][int(rnd.random() * len(keys[team]))], "claude-haiku-4-5",
                        "/v1/messages", 1000, 0, 0, 0, 200, 0, 6_000_000, 1, 1.0, "completed",
                        f"req_w_{uuid.uuid4().hex}", ""))
        return out

    db.execute("BEGIN")
    db.executemany(sqlite_store.INSERT_ROW, rows(base_rows, 0.25))
    db.execute("COMMIT")

    def configure(parts: tuple[str, ...]) -> None:
        db.execute("DROP TRIGGER IF EXISTS usage_log_history")
        db.execute("DROP INDEX IF EXISTS usage_log_team_time")
        db.execute("DROP INDEX IF EXISTS usage_log_team_key_time")
        if "team_time" in parts:
            db.execute("CREATE INDEX usage_log_team_time ON usage_log (team, time)")
        if "team_key_time" in parts:
            db.execute("CREATE INDEX usage_log_team_key_time ON usage_log (team, key, time)")
        if "trigger" in parts:
            db.execute(TRIGGER)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def write() -> float:
        batch = rows(n, 0.01)
        t0 = time.perf_counter()
        for i in range(0, n, 16):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(sqlite_store.INSERT_ROW, batch[i:i + 16])
            db.execute("COMMIT")
        return (time.perf_counter() - t0) / n

    got: dict[str, list[float]] = {name: [] for name in WRITE_CONFIGS}
    for _ in range(rounds):
        for name, parts in WRITE_CONFIGS.items():
            configure(parts)
            got[name].append(write())
    db.close()
    print(f"\nwrite path, per usage row ({base_rows:,}-row ledger, {n:,} rows in transactions of 16, WAL, "
          f"synchronous=NORMAL; median of {rounds} interleaved rounds):")
    for name, values in got.items():
        print(f"  {name:<58} {with_us(statistics.median(values)):>9}   [{', '.join(f'{v * 1e6:.0f}' for v in values)}]")


def with_us(s: float) -> str:
    return f"{s * 1e6:,.1f} us"


async def atimed(coro: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = await coro
    return time.perf_counter() - t0, out


async def amedian(make: Callable[[], Any], repeat: int = 5) -> tuple[float, float, Any]:
    first, out = await atimed(make())
    rest = [(await atimed(make()))[0] for _ in range(repeat)]
    return first, statistics.median(rest), out


async def history_timings(store: Any, pairs: Any, start: float, end: float) -> AsyncIterator[tuple]:
    """history_document (what /admin/history answers) for each (team, key), by day then by hour, timed
    with amedian: (team, key, bucket, buckets, requests, first, median) each."""
    for team, key in pairs:
        for bucket in ("day", "hour"):
            q = HistoryQuery(team, key, start, end, bucket)
            first, med, doc = await amedian(lambda: history_document(store, q))
            yield team, key, bucket, len(doc["series"]), sum(p["requests"] for p in doc["series"]), first, med


# --- Redis ------------------------------------------------------------------------------------
SCOPES = [Scope("key", "k", "key:bench/k", Limits(tokens=10**12, steps=10**9), "day"),
          Scope("team", "bench", "team:bench", Limits(cost_nanos=10**15), "month")]
ASK = Ask(1_200, 3_600, 1_024, Decimal(15_000))
ACTUAL = Amounts(1_500, 1_200, 300, 8_100_000, 1)


async def lua_cost(url: str, client: Any, with_tallies: bool, n: int) -> tuple[float, float]:
    """redis-server's microseconds per EVALSHA (reserve and settle: two per request), and per request."""
    import proxy.store.redis as redis_store
    from proxy.store.redis_scripts import SCRIPTS

    scripts = dict(SCRIPTS)
    if not with_tallies:
        line = "if #A > row + #ROW_FIELDS then pcall(hist_row, A, row) end"
        assert line in scripts["batch"]
        scripts["batch"] = scripts["batch"].replace(line, "")
    saved = redis_store.SCRIPTS
    redis_store.SCRIPTS = scripts
    try:
        store = redis_store.RedisStore.from_url(url)
        await store.open()
        try:
            for i in range(200):  # warm
                await one_request(store, f"warm-{uuid.uuid4().hex}", time.time())
            client.config_resetstat()
            for i in range(n):
                await one_request(store, f"r-{uuid.uuid4().hex}", time.time())
            stats = client.info("commandstats")["cmdstat_evalsha"]
        finally:
            await store.close()
    finally:
        redis_store.SCRIPTS = saved
    return stats["usec_per_call"], stats["usec"] / n


LOOP_LUA = """
local n, mode, base = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local vals = {'0', 't00', 'k', 'claude-haiku-4-5', '/v1/messages', '1200', '0', '0', '300', '300', '0', '8100000',
              '1', '0.5', 'completed', 'req_x', ''}
local A = {}
for i = 1, #vals do A[i] = vals[i] end
A[#vals + 1] = '7776000000'
local t0 = redis.call('TIME')
for i = 1, n do
  A[1] = string.format('%.3f', base + i * 0.25)   -- 4 requests a second: a new hour every 14400
  A[3] = 't00-k' .. (i % 10)
  if mode == 'tallies' then hist_row(A, 0)
  elseif mode == 'xadd' then
    local e = {}
    for j = 1, #vals do e[2 * j - 1], e[2 * j] = 'f' .. j, A[j] end
    redis.call('XADD', P .. 'log', 'MAXLEN', '~', '100000', '*', unpack(e))
  end
end
local t1 = redis.call('TIME')
return (tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2])
"""


def lua_loop_cost(client: Any, prefix: str, n: int = 20_000, rounds: int = 7) -> dict[str, list[float]]:
    """The tallies' Lua (hist_row: what the settle script runs a request) in a loop of n inside one
    script, timed with Redis' TIME: microseconds a request, per round; beside the same loop doing
    nothing, and doing the row's own XADD (what logging a row cost before)."""
    from proxy.store.redis_history import LUA

    sha = client.script_load("local P = ARGV[1]\n" + LUA + LOOP_LUA)
    got: dict[str, list[float]] = {"empty loop": [], "tallies (hist_row)": [], "the row's XADD": []}
    modes = {"empty loop": "empty", "tallies (hist_row)": "tallies", "the row's XADD": "xadd"}
    for _ in range(rounds):
        for name, mode in modes.items():
            got[name].append(client.evalsha(sha, 0, prefix + "loop:", n, mode, 1_764_547_200) / n)
    return got


async def one_request(store: Any, rid: str, t: float, team: str = "bench", key: str = "k", outcome: str = "completed",
                      scopes: list[Scope] = SCOPES) -> None:
    res = await store.reserve(scopes, ASK, time.time(), rid)
    row = UsageRow(t, team, key, "claude-haiku-4-5", "/v1/messages", 1_200, 0, 0, 0, 300, 0, 8_100_000, 1, 0.5,
                   outcome, rid)
    await store.settle(res, ACTUAL, row)


async def redis_bench(args: argparse.Namespace) -> None:
    import redis as redis_sync

    from proxy.store.redis import RedisStore
    from proxy.store.redis_history import HF, tally_name

    prefix = f"bench-history-{os.getpid()}:"
    url = f"{args.redis}?prefix={prefix}main:"
    base = args.redis.rsplit("/", 1)
    client = redis_sync.Redis.from_url(args.redis)
    print(f"\n== Redis ({args.redis}, prefix {prefix}) ==", flush=True)
    try:
        loop = lua_loop_cost(client, prefix)
        print("Lua cost a request, measured inside Redis (one script runs it 20,000 times between two TIME "
              "calls; 7 interleaved rounds):")
        for name, values in loop.items():
            print(f"  {name:<20} median {statistics.median(values):5.1f} us, min {min(values):5.1f} us  "
                  f"[{', '.join(f'{v:.1f}' for v in values)}]")
        n, rounds = 5_000, 5
        cost_url = f"{args.redis}?prefix={prefix}cost:"
        got: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for with_tallies in (False, True):
                got[with_tallies].append((await lua_cost(cost_url, client, with_tallies, n))[1])
        without_t, with_t = statistics.median(got[False]), statistics.median(got[True])
        print(f"end to end (redis-server's time per request from INFO commandstats: a reserve and a settle, "
              f"one request at a time, {n:,} requests a round, {rounds} interleaved rounds; noisy on a shared "
              f"machine):")
        print(f"  without the tallies: median {without_t:.1f} us a request, min {min(got[False]):.1f}  "
              f"[{', '.join(f'{v:.1f}' for v in got[False])}]")
        print(f"  with the tallies:    median {with_t:.1f} us a request, min {min(got[True]):.1f}  "
              f"[{', '.join(f'{v:.1f}' for v in got[True])}]")
        print(f"  difference: median +{with_t - without_t:.1f} us ({(with_t - without_t) / without_t:+.0%}), "
              f"min +{min(got[True]) - min(got[False]):.1f} us")

        store = RedisStore.from_url(url)
        await store.open()
        try:
            client.config_resetstat()
            for i in range(n):
                store.log_denial("bench", f"k{i % 7}", time.time())
                if i % 8 == 7:
                    await asyncio.sleep(0)
            await store._drain()  # noqa: SLF001
            st = client.info("commandstats")["cmdstat_evalsha"]
            print(f"  a denial (item 'd', in batches as they come): {st['usec'] / n:.1f} us of Lua each "
                  f"({st['calls']:,} EVALSHA for {n:,} denials)")

            # real settlements over 30 days
            teams, weights, keys = teams_and_keys(args.teams, args.keys)
            end = (int(time.time()) // DAY) * DAY
            start = end - args.days * DAY
            rnd = random.Random(3)
            m = args.redis_requests
            t0 = time.perf_counter()
            pending = []
            for i in range(m):
                team = rnd.choices(teams, weights)[0]
                key = keys[team][int(rnd.random() * len(keys[team]))]
                scopes = [Scope("key", key, f"key:{team}/{key}", Limits(tokens=10**12), "none"),
                          Scope("team", team, f"team:{team}", Limits(tokens=10**13), "none")]
                pending.append(one_request(store, f"h-{i}-{uuid.uuid4().hex[:6]}", start + (i + 0.5) * args.days * DAY / m,
                                           team, key, "cut" if i % 50 == 0 else "completed", scopes))
                if len(pending) == 16:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
            el = time.perf_counter() - t0
            print(f"\n{m:,} requests settled with times spread over {args.days} days in {el:,.1f} s "
                  f"(16 at a time)")
            heavy = teams[0]
            pairs = ((heavy, None), (heavy, keys[heavy][0]))
            async for team, key, bucket, buckets, total, first, med in history_timings(store, pairs, start, end):
                print(f"  history {team} {key or '*':>7} by {bucket:<4}: {buckets:>4} buckets, "
                      f"{total:>6,} requests: first {ms(first)}, median {ms(med)}")
            q = csv_query([("team", heavy), ("from", "1970-01-01")], end)
            t0 = time.perf_counter()
            n_rows, after = 0, None
            while True:
                rows, after = await store.usage_page(q.start, q.end, q.team, q.key, after, 1000)
                n_rows += len(rows)
                csv_chunk(rows)
                if after is None:
                    break
            el = time.perf_counter() - t0
            print(f"  usage.csv of team {heavy}: {n_rows:,} rows (of the stream's {m:,}) in {el:,.2f} s "
                  f"({m / el:,.0f} entries/s scanned)")

            # the tallies at 10-million-row density: every team and key, every hour
            mem0 = client.info("memory")["used_memory"]
            pipe = client.pipeline(transaction=False)
            hours = range(start, end, 3600)
            count = 0
            packed = HF.pack(14, 30000, 8000, 200_000_000, 14, 0, 0)
            for team in teams:
                for key in [None, *keys[team]]:
                    for h in hours:
                        name = tally_name(prefix + "dense:", team, key, h)
                        pipe.set(name, packed, px=90 * DAY * 1000)
                        pipe.zadd(prefix + "dense:Hi", {name: h})
                        count += 1
                    pipe.execute()
            mem1 = client.info("memory")["used_memory"]
            print(f"\ntallies at the density 10M rows leave ({len(teams)} teams + {len(teams) * args.keys} keys x "
                  f"{len(hours)} hours = {count:,} strings + their index): {mib(mem1 - mem0)} of Redis memory")
            dense = RedisStore.from_url(f"{args.redis}?prefix={prefix}dense:")
            await dense.open()
            try:
                pairs = ((heavy, None), (heavy, keys[heavy][0]))
                async for team, key, bucket, _, total, first, med in history_timings(dense, pairs, start, end):
                    print(f"  history {team} {key or '*':>7} by {bucket:<4}: {total:>10,} requests: "
                          f"first {ms(first)}, median {ms(med)}")
            finally:
                await dense.close()

            before = start + 15 * DAY
            t0 = time.perf_counter()
            total, batches = 0, 0
            while True:
                got = await store.prune_log(before, 2000)
                total += got
                batches += 1
                if got < 2000:
                    break
            print(f"\nretention: everything older than 15 days ({total:,} stream entries and tallies) pruned in "
                  f"{batches} batches in {time.perf_counter() - t0:,.2f} s")
        finally:
            await store.close()
    finally:
        names = list(client.scan_iter(match=prefix + "*", count=10_000))
        for i in range(0, len(names), 10_000):
            client.delete(*names[i:i + 10_000])
        print(f"(deleted {len(names):,} keys under {prefix}; db {base[-1]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--teams", type=int, default=20)
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where the temporary ledger goes (default: the system's temp dir)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--redis-requests", type=int, default=50_000)
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the SQLite ledger")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus")
    if not args.skip_sqlite:
        asyncio.run(sqlite_bench(args))
    if not args.skip_redis:
        asyncio.run(redis_bench(args))


if __name__ == "__main__":
    main()
