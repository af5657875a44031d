"""SqliteStore's runtime keys (docs/http-api.md, "Runtime keys"): one row per key in the ledger's
own file, so they survive a restart. Every function runs on the store's worker thread with its
connection; a read-modify-write is one IMMEDIATE transaction, so another process on the same file
(`budget-proxy usage`) never sees half of one."""
from __future__ import annotations

import sqlite3
from typing import Any, Callable

from proxy.store.base import KEY_RETENTION_S, KeyRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS runtime_keys (
  digest TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT NOT NULL,
  record TEXT NOT NULL,  -- KeyRecord.to_json(): the secret is never stored, only its digest
  gone_at REAL,          -- revoked or expired: the row is dropped KEY_RETENTION_S later
  UNIQUE (team, name));
"""


def _immediate(db: sqlite3.Connection, work: Callable[[], Any]) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def put(db: sqlite3.Connection, rec: KeyRecord, now: float) -> bool:
    def work() -> bool:
        db.execute("DELETE FROM runtime_keys WHERE gone_at <= ?", (now - KEY_RETENTION_S,))
        try:
            db.execute("INSERT INTO runtime_keys (digest, team, name, record, gone_at) VALUES (?,?,?,?,?)",
                       (rec.digest, rec.team, rec.name, rec.to_json(), rec.gone_at()))
        except sqlite3.IntegrityError:  # the name (or, never in practice, the digest) is taken
            return False
        return True
    return _immediate(db, work)


def find(db: sqlite3.Connection, digest: str) -> KeyRecord | None:
    row = db.execute("SELECT record FROM runtime_keys WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else KeyRecord.from_json(row[0])


def listed(db: sqlite3.Connection, team: str | None) -> list[KeyRecord]:
    if team is None:
        rows = db.execute("SELECT record FROM runtime_keys ORDER BY rowid").fetchall()
    else:
        rows = db.execute("SELECT record FROM runtime_keys WHERE team = ? ORDER BY rowid", (team,)).fetchall()
    return [KeyRecord.from_json(r[0]) for r in rows]


def revoke(db: sqlite3.Connection, team: str, name: str, now: float) -> KeyRecord | None:
    def work() -> KeyRecord | None:
        row = db.execute("SELECT record FROM runtime_keys WHERE team = ? AND name = ?", (team, name)).fetchone()
        if row is None:
            return None
        rec = KeyRecord.from_json(row[0])
        if rec.revoked_at is None:
            rec = rec._replace(revoked_at=now)
            db.execute("UPDATE runtime_keys SET record = ?, gone_at = ? WHERE digest = ?",
                       (rec.to_json(), rec.gone_at(), rec.digest))
        return rec
    return _immediate(db, work)
