"""Usage-log rows that SQLite can always store: values made safe, and rows inserted one by one so that
one bad row never fails the others (the "Row isolation" of SqliteStore's docstring)."""
from __future__ import annotations

import logging
import sqlite3
from typing import Any, Sequence, get_type_hints

from proxy.store.base import UsageRow
from proxy.store.sqlite_schema import INSERT_ROW

log = logging.getLogger("budget_proxy.store")

INT64_MAX = 2**63 - 1
_ROW_KINDS = tuple(t if t in (int, float) else str for t in get_type_hints(UsageRow).values())


def safe_text(v: Any) -> str:
    """v as text sqlite3 can encode: what UTF-8 cannot carry (a lone surrogate) as a backslash escape."""
    if not isinstance(v, str):
        if v is None:
            return ""
        try:
            v = str(v)
        except Exception:
            return ""
    return v if v.isascii() else v.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_int(v: Any) -> int:
    try:
        i = int(v)
    except Exception:  # None, NaN, infinities, text
        return 0
    return max(-INT64_MAX, min(INT64_MAX, i))


def safe_float(v: Any) -> float:
    try:
        f = float(v)
    except Exception:
        return 0.0
    return f if f == f else 0.0  # (SQLite would store NaN as NULL)


def safe_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """A usage-log row that INSERT_ROW cannot refuse: every column present, each of its column's type."""
    values = list(row[:len(_ROW_KINDS)]) + [None] * (len(_ROW_KINDS) - len(row))
    return tuple(safe_int(v) if kind is int else safe_float(v) if kind is float else safe_text(v)
                 for v, kind in zip(values, _ROW_KINDS))


def insert_rows_one_by_one(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Insert usage rows inside an open transaction, each on its own: one that cannot be written as
    it is is written made safe (safe_row), or skipped with an error log; it never fails the others.
    Answers the rows as written (the hourly history sums those)."""
    written = []
    for row in rows:
        db.execute("SAVEPOINT usage_row")
        try:
            db.execute(INSERT_ROW, row)
            written.append(row)
        except Exception as exc:
            db.execute("ROLLBACK TO usage_row")
            rid = safe_text(row[15]) if len(row) > 15 else "?"
            try:
                made_safe = safe_row(row)
                db.execute(INSERT_ROW, made_safe)
                written.append(made_safe)
            except Exception as again:
                db.execute("ROLLBACK TO usage_row")
                log.error("usage row skipped: request_id=%s error=%s", rid, again.__class__.__name__)
            else:
                log.warning("usage row written with its values made safe: request_id=%s error=%s", rid,
                            exc.__class__.__name__)
        db.execute("RELEASE usage_row")
    return written
