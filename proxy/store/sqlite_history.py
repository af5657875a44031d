"""SqliteStore's history (docs/http-api.md, "History"): what /admin/history and /admin/usage.csv read,
and the retention that prunes it. Every function runs on the store's worker thread with its
connection.

  usage_log      the log itself (sqlite.py), one row per settled request; gains a `run` column and
                 an index (team, time), so that the CSV export of one team pages through its own
                 rows in order (time, id) without a sort (a key's: its team's rows, filtered). No
                 (team, key, time) index: history does not need one, and it would make every usage row
                 markedly dearer to write (bench/history_scale.py measures each index's cost).
  history_team   per team and UTC hour: requests, input_tokens (incl. cache), output_tokens,
  history_key    cost_nanos, steps, denied, cut; per team, key and hour likewise. Both are kept
                 by add_rows, in the transaction that inserts the usage rows (the group commit's,
                 the crash recovery's, the one-by-one path's): the batch's rows summed per hour, one
                 upsert per hour touched (no trigger: one per row cost the writer thread more than
                 the row itself); and by the denial counts (a denied request has no usage row). Rows
                 written to usage_log by anything else are not counted. A history query is a
                 primary-key range of at most one row per hour: O(buckets), whatever the log holds
                 (bench/history_scale.py measures 10 million rows).
A ledger written before this version gets the column, the indexes and the tables at its next open,
the tables filled from the rows it already has (once: in the transaction that creates them).
Retention deletes in bounded batches, each its own short transaction, so the group commits of
settling requests interleave with a long prune."""
from __future__ import annotations

import sqlite3
from operator import add
from typing import Any, Sequence

from proxy.store.base import Tally, UsageRow

_COUNTS = "requests, input_tokens, output_tokens, cost_nanos, steps, denied, cut"
_COUNT_COLUMNS = ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in _COUNTS.split(", "))
_ADD = ", ".join(f"{c} = {c} + excluded.{c}" for c in _COUNTS.split(", "))

TABLES = f"""
CREATE TABLE IF NOT EXISTS history_team (
  team TEXT NOT NULL, hour INTEGER NOT NULL, {_COUNT_COLUMNS},
  PRIMARY KEY (team, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_team_hour ON history_team (hour);
CREATE TABLE IF NOT EXISTS history_key (
  team TEXT NOT NULL, key TEXT NOT NULL, hour INTEGER NOT NULL, {_COUNT_COLUMNS},
  PRIMARY KEY (team, key, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_key_hour ON history_key (hour);
"""

INDEXES = """
CREATE INDEX IF NOT EXISTS usage_log_team_time ON usage_log (team, time);
"""

# The per-row trigger an older version created: migrate drops it (add_rows does its work once per
# hour and batch).
TRIGGER_NAME = "usage_log_history"

_SUMS = ("count(*), sum(input_tokens + cache_write_5m_tokens + cache_write_1h_tokens + cache_read_tokens), "
         "sum(output_tokens), sum(cost_nanos), sum(steps), 0, sum(outcome = 'cut')")
ADD_TEAM = (f"INSERT INTO history_team (team, hour, {_COUNTS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (team, hour) DO UPDATE SET {_ADD}")
ADD_KEY = (f"INSERT INTO history_key (team, key, hour, {_COUNTS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
           f"ON CONFLICT (team, key, hour) DO UPDATE SET {_ADD}")
# A row whose values are not plain numbers (never one the store builds) is added as the trigger did,
# by SQLite's own arithmetic: (team, key, time, input_tokens, the three cache counts, output_tokens,
# cost_nanos, steps, outcome).
_ODD_HOUR = "CAST(CAST(?3 AS REAL) / 3600 AS INTEGER) * 3600"
_ODD_VALUES = "1, ?4 + ?5 + ?6 + ?7, ?8, ?9, ?10, 0, ?11 = 'cut'"
ODD_TEAM = (f"INSERT INTO history_team (team, hour, {_COUNTS}) VALUES (?1, {_ODD_HOUR}, {_ODD_VALUES}) "
            f"ON CONFLICT (team, hour) DO UPDATE SET {_ADD}")
ODD_KEY = (f"INSERT INTO history_key (team, key, hour, {_COUNTS}) VALUES (?1, ?2, {_ODD_HOUR}, {_ODD_VALUES}) "
           f"ON CONFLICT (team, key, hour) DO UPDATE SET {_ADD}")

BACKFILL = (
    f"INSERT INTO history_key (team, key, hour, {_COUNTS}) "
    f"SELECT team, key, CAST(time / 3600 AS INTEGER) * 3600 AS h, {_SUMS} FROM usage_log GROUP BY team, key, h",
    f"INSERT INTO history_team (team, hour, {_COUNTS}) "
    f"SELECT team, hour, {', '.join(f'sum({c})' for c in _COUNTS.split(', '))} FROM history_key GROUP BY team, hour",
)

DENIED_TEAM = (f"INSERT INTO history_team (team, hour, denied) VALUES (?, ?, ?) "
               "ON CONFLICT (team, hour) DO UPDATE SET denied = denied + excluded.denied")
DENIED_KEY = (f"INSERT INTO history_key (team, key, hour, denied) VALUES (?, ?, ?, ?) "
              "ON CONFLICT (team, key, hour) DO UPDATE SET denied = denied + excluded.denied")

HOURS_TEAM = f"SELECT hour, {_COUNTS} FROM history_team WHERE team = ? AND hour >= ? AND hour < ?"
HOURS_KEY = f"SELECT hour, {_COUNTS} FROM history_key WHERE team = ? AND key = ? AND hour >= ? AND hour < ?"

ROW_COLUMNS = ", ".join(UsageRow._fields)

PRUNE_LOG = "DELETE FROM usage_log WHERE id IN (SELECT id FROM usage_log WHERE time < ? ORDER BY time LIMIT ?)"
PRUNE_TEAM = ("DELETE FROM history_team WHERE (team, hour) IN "
              "(SELECT team, hour FROM history_team WHERE hour <= ? ORDER BY hour LIMIT ?)")
PRUNE_KEY = ("DELETE FROM history_key WHERE (team, key, hour) IN "
             "(SELECT team, key, hour FROM history_key WHERE hour <= ? ORDER BY hour LIMIT ?)")


def migrate(db: sqlite3.Connection) -> None:
    """The history's column, indexes and tables, in one IMMEDIATE transaction (two processes opening
    one old ledger at once fill the tables once), and the former trigger dropped (add_rows counts each
    row once). Idempotent."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if "run" not in {row[1] for row in db.execute("PRAGMA table_info(usage_log)")}:
            db.execute("ALTER TABLE usage_log ADD COLUMN run TEXT NOT NULL DEFAULT ''")
        for stmt in INDEXES.strip().splitlines():
            db.execute(stmt)
        fresh = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history_key'").fetchone() is None
        for stmt in TABLES.split(";"):
            if stmt.strip():
                db.execute(stmt)
        if fresh:  # (the rows so far, summed once)
            for stmt in BACKFILL:
                db.execute(stmt)
        db.execute(f"DROP TRIGGER IF EXISTS {TRIGGER_NAME}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


_PLAIN = (int, float)
_INT64 = 2**63


def add_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Add usage rows, as just inserted into usage_log (INSERT_ROW's parameters), to their hours in
    both tables, inside the caller's transaction: the rows summed per team, key and hour first, one
    upsert per hour touched and table."""
    keys: dict[tuple[Any, Any, int], list[Any]] = {}
    odd = []
    for r in rows:
        try:
            inp = r[5] + r[6] + r[7] + r[8]
            k = (r[1], r[2], int(r[0] / 3600) * 3600)
            v = keys.get(k)
        except (TypeError, ValueError, OverflowError):  # (text, NaN, an infinity, unhashable)
            odd.append(r)
            continue
        out, cost, steps = r[9], r[11], r[12]
        if (type(inp) not in _PLAIN or type(out) not in _PLAIN or type(cost) not in _PLAIN
                or type(steps) not in _PLAIN or type(r[0]) not in _PLAIN):
            odd.append(r)
        elif v is None:
            keys[k] = [1, inp, out, cost, steps, 0, 1 if r[14] == "cut" else 0]
        else:
            v[0] += 1
            v[1] += inp
            v[2] += out
            v[3] += cost
            v[4] += steps
            if r[14] == "cut":
                v[6] += 1
    _upsert_hours(db, keys)
    if odd:
        params = [(r[1], r[2], r[0], r[5], r[6], r[7], r[8], r[9], r[11], r[12], r[14]) for r in odd]
        db.executemany(ODD_TEAM, params)
        db.executemany(ODD_KEY, params)


def _upsert_hours(db: sqlite3.Connection, keys: dict[tuple[Any, Any, int], list[Any]]) -> None:
    """One upsert per (team, key, hour) and per (team, hour)."""
    teams: dict[tuple[Any, int], list[Any]] = {}
    key_params = []
    for (team, key, hour), v in keys.items():
        if max(v) >= _INT64 or min(v) < -_INT64:
            v = _as_reals(v)
        key_params.append((team, key, hour, *v))
        t = teams.get((team, hour))
        if t is None:
            teams[(team, hour)] = v[:]
        else:
            t[:] = map(add, t, v)
    team_params = []
    for k, v in teams.items():
        if max(v) >= _INT64 or min(v) < -_INT64:
            v = _as_reals(v)
        team_params.append((*k, *v))
    db.executemany(ADD_KEY, key_params)
    db.executemany(ADD_TEAM, team_params)


def _as_reals(sums: list[Any]) -> list[Any]:
    """Sums beyond SQLite's integers as reals, as SQLite's own addition would make them."""
    return [float(x) if type(x) is int and not -_INT64 <= x < _INT64 else x for x in sums]


def write_denials(db: sqlite3.Connection, counts: dict[tuple[str, str, int], int]) -> None:
    """Add denial counts {(team, key, hour): n} to both tables, in one transaction."""
    teams: dict[tuple[str, int], int] = {}
    for (team, _, hour), n in counts.items():
        teams[(team, hour)] = teams.get((team, hour), 0) + n
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(DENIED_TEAM, [(t, h, n) for (t, h), n in teams.items()])
        db.executemany(DENIED_KEY, [(t, k, h, n) for (t, k, h), n in counts.items()])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def read_hours(db: sqlite3.Connection, team: str, key: str | None, start: float, end: float) -> dict[int, Tally]:
    rows = (db.execute(HOURS_TEAM, (team, start, end)) if key is None
            else db.execute(HOURS_KEY, (team, key, start, end)))
    return {int(hour): Tally(*counts) for hour, *counts in rows}


def read_page(db: sqlite3.Connection, start: float, end: float, team: str | None, key: str | None,
              after: tuple[float, int] | None, limit: int) -> tuple[list[UsageRow], tuple[float, int] | None]:
    """A page of rows in (time, id) order, and the cursor after its last (None: it was the last)."""
    where, params = ["time >= ?", "time < ?"], [start, end]
    if after is not None:  # (time >= its time keeps the index range; the few rows of that time are skipped)
        where[0] = "time >= ?"
        params[0] = max(start, after[0])
        where.append("NOT (time = ? AND id <= ?)")
        params += [after[0], after[1]]
    if team is not None:
        where.append("team = ?")
        params.append(team)
    if key is not None:
        where.append("key = ?")
        params.append(key)
    sql = f"SELECT id, {ROW_COLUMNS} FROM usage_log WHERE {' AND '.join(where)} ORDER BY time, id LIMIT ?"
    got = db.execute(sql, (*params, limit)).fetchall()
    rows = [UsageRow(*r[1:]) for r in got]
    return rows, ((got[-1][1], got[-1][0]) if len(got) == limit else None)


def prune(db: sqlite3.Connection, before: float, limit: int) -> int:
    """One bounded batch of retention, one transaction: up to `limit` rows of the log older than
    `before`, and up to `limit` rows of each hourly table whose hour ended by then. Answers how many
    rows went in all (below `limit`: nothing more to do)."""
    last_hour = before - 3600  # (an hour that ends by `before`)
    db.execute("BEGIN IMMEDIATE")
    try:
        n = db.execute(PRUNE_LOG, (before, limit)).rowcount
        n += db.execute(PRUNE_TEAM, (last_hour, limit)).rowcount
        n += db.execute(PRUNE_KEY, (last_hour, limit)).rowcount
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return n


def explain(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[str]:
    """EXPLAIN QUERY PLAN's details (the bench and tests check that an index is used)."""
    return [r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
