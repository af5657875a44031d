"""SqliteStore's alert claims (proxy/alerting.py): one row per alert event sent, in the ledger's own
file, so that a restart inside a period does not send its events again. Runs on the store's worker
thread with its connection (autocommit: the INSERT OR IGNORE is atomic on its own)."""
from __future__ import annotations

import sqlite3
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_claims (
  event_key TEXT PRIMARY KEY,   -- proxy/alerts.py event_key: type, threshold, dimension, period, scope
  expires_at REAL NOT NULL)     -- epoch s; a row past it is free to claim again and is pruned
"""


def claim(db: sqlite3.Connection, event_key: str, ttl: float) -> bool:
    db.execute(SCHEMA)  # (cheap when it exists; a ledger file older than alerts gains the table)
    now = time.time()
    db.execute("DELETE FROM alert_claims WHERE expires_at <= ?", (now,))
    cur = db.execute("INSERT OR IGNORE INTO alert_claims (event_key, expires_at) VALUES (?, ?)",
                     (event_key, now + ttl))
    return cur.rowcount == 1
