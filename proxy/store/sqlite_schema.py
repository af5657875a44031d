"""SqliteStore's tables and statements, and the migrations that bring an older ledger file up to them."""
from __future__ import annotations

import sqlite3

from proxy.ledger import FIELDS
from proxy.store import sqlite_history, sqlite_keys


def _columns(template: str, sep: str = ", ") -> str:
    """`template` for each dimension's column ({c}), joined: the statements below follow the declaration."""
    return sep.join(template.format(c=c) for c in FIELDS)


_AMOUNT_COLUMNS = _columns("{c} INTEGER NOT NULL DEFAULT 0")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS totals (
  scope_id TEXT NOT NULL, period_start REAL NOT NULL, {_AMOUNT_COLUMNS}, first_request_at REAL,
  expires_at REAL,  -- a run scope's: forgotten from then on (its last request + run_ttl); else NULL
  PRIMARY KEY (scope_id, period_start));
CREATE TABLE IF NOT EXISTS usage_log (
  id INTEGER PRIMARY KEY, time REAL NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
  model TEXT NOT NULL, route TEXT NOT NULL, input_tokens INTEGER NOT NULL,
  cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
  cache_read_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  web_search_requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, steps INTEGER NOT NULL,
  duration_s REAL NOT NULL, outcome TEXT NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS usage_log_time ON usage_log (time);
CREATE TABLE IF NOT EXISTS inflight (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
  model TEXT NOT NULL, route TEXT NOT NULL,
  scopes TEXT NOT NULL,  -- JSON [[scope id, period start, first_request_at(, a run's expires_at)], ...]
  started REAL NOT NULL, updated REAL NOT NULL, {_AMOUNT_COLUMNS});
"""
AMOUNT_TABLES = ("totals", "inflight")  # the tables with a column per dimension (_add_dimension_columns)
_PARAMS = ",".join("?" * len(FIELDS))

UPSERT_ADD = f"""
INSERT INTO totals (scope_id, period_start, {_columns("{c}")}, first_request_at, expires_at)
VALUES (?, ?, {_PARAMS}, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET {_columns("{c} = {c} + excluded.{c}")},
  first_request_at = COALESCE(first_request_at, excluded.first_request_at),
  expires_at = MAX(COALESCE(expires_at, excluded.expires_at), COALESCE(excluded.expires_at, expires_at))
"""

UPSERT_SET = f"""
INSERT INTO totals (scope_id, period_start, {_columns("{c}")}, first_request_at, expires_at)
VALUES (?, ?, {_PARAMS}, ?, ?)
ON CONFLICT (scope_id, period_start) DO UPDATE SET {_columns("{c} = excluded.{c}")},
  first_request_at = excluded.first_request_at, expires_at = excluded.expires_at
"""
SELECT_TOTALS = (f"SELECT {_columns('{c}')}, first_request_at, expires_at FROM totals "
                 "WHERE scope_id = ? AND period_start = ?")

# Run scopes (docs/budgets.md, "Runs"): a forgotten run's row is deleted before the upserts of the
# transaction that carries the deletion (a run started again in it adds to no old amounts); rows
# that no request asks for again are found by the sweep, RUN_SWEEP_MAX at a time.
DELETE_TOTALS = "DELETE FROM totals WHERE scope_id = ? AND period_start = ?"
SELECT_EXPIRED_RUNS = ("SELECT scope_id, period_start FROM totals WHERE expires_at <= ? "
                       "ORDER BY expires_at LIMIT ?")
SELECT_RUNS = (f"SELECT scope_id, period_start, {_columns('{c}')}, first_request_at, expires_at FROM totals "
               "WHERE scope_id >= ? AND scope_id < ? AND expires_at > ?")
RUN_SWEEP_MAX = 1000


def _add_run_expiry(db: sqlite3.Connection) -> None:
    """A ledger written before run scopes gains totals.expires_at (NULL: no expiry) and its index."""
    if "expires_at" not in {row[1] for row in db.execute("PRAGMA table_info(totals)")}:
        db.execute("ALTER TABLE totals ADD COLUMN expires_at REAL")
    db.execute("CREATE INDEX IF NOT EXISTS totals_expires_at ON totals (expires_at) WHERE expires_at IS NOT NULL")


INSERT_ROW = (
    "INSERT INTO usage_log (time, team, key, model, route, input_tokens, cache_write_5m_tokens, "
    "cache_write_1h_tokens, cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, "
    "duration_s, outcome, request_id, run) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")  # (run: sqlite_history.migrate)
SELECT_LOG = ("SELECT time, team, key, model, route, input_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
              "cache_read_tokens, output_tokens, web_search_requests, cost_nanos, steps, duration_s, outcome, "
              "request_id FROM usage_log ORDER BY id DESC LIMIT ?")

# A reservation's running charge: (id, owner, team, key, model, route, scopes, started) are written
# once; later pushes change only `updated` and the amounts.
UPSERT_INFLIGHT = f"""
INSERT INTO inflight (id, owner, team, key, model, route, scopes, started, updated, {_columns("{c}")})
VALUES (?,?,?,?,?,?,?,?,?, {_PARAMS})
ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, {_columns("{c} = excluded.{c}")}
"""
DELETE_INFLIGHT = "DELETE FROM inflight WHERE id = ?"
SELECT_INFLIGHT = (f"SELECT id, team, key, model, route, scopes, started, updated, {_columns('{c}')} FROM inflight "
                   "WHERE owner = ? ORDER BY started, id")


def _add_dimension_columns(db: sqlite3.Connection) -> None:
    """A ledger written before a dimension was declared (proxy/dimensions.py) gains its column, 0 in
    every row so far: CREATE TABLE IF NOT EXISTS leaves an existing table as it is."""
    for table in AMOUNT_TABLES:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in FIELDS:
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


def create(db: sqlite3.Connection) -> None:
    """Every table of the ledger, an older file's brought up to date (each step idempotent)."""
    db.executescript(SCHEMA)
    db.executescript(sqlite_keys.SCHEMA)
    _add_dimension_columns(db)
    _add_run_expiry(db)
    sqlite_history.migrate(db)  # the usage log's run column, indexes and hourly tables
