"""`budget-proxy usage --since 7d --by day [--team T] [--key K] [--json]`: the usage history as a table
(docs/http-api.md, "History"), one series per team (or the key's), read from the store directly,
as `budget-proxy usage` reads budgets: no running proxy and no admin key needed (the SQLite file is
read beside a serving proxy, WAL; Redis is shared anyway), and the same numbers as /admin/history,
which the same history_document() answers."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any, Awaitable, Callable, TypeVar

from proxy.cli_table import print_table
from proxy.history import BadParam, HistoryQuery, parse_since

T = TypeVar("T")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="DURATION",
                   help="print the history of this span (e.g. 12h, 7d, 30d) instead of the budgets")
    p.add_argument("--by", choices=("hour", "day"), help="history buckets (default: day)")
    p.add_argument("--team", help="history: this team only")
    p.add_argument("--key", help="history: this key of --team only")


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.since or args.by or args.team or args.key)


def _queries(args: argparse.Namespace, runtime: Any, now: float) -> list[HistoryQuery]:
    bucket = args.by or "day"
    start, end = parse_since(args.since or "7d", now, bucket)
    teams = list(runtime.budgets.teams)
    if args.team is not None and args.team not in teams:
        raise BadParam(f"no team named {args.team!r} in the config")
    team = args.team
    if args.key is not None and team is None:
        holders = [t for (t, k) in runtime.budgets.keys if k == args.key]
        if len(holders) != 1:
            where = f"in teams {', '.join(holders)}" if holders else "not a config key"
            raise BadParam(f"--key {args.key} needs --team ({where})")
        team = holders[0]
    return [HistoryQuery(t, args.key, start, end, bucket) for t in ([team] if team else teams)]


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}".rstrip("0").rstrip(".") or "0"
    return str(v)


COLUMNS = ("requests", "tokens", "input_tokens", "output_tokens", "cost_usd", "steps", "denied", "cut")


def table(docs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The rows printed: a header, each document's buckets, and its total."""
    rows = [("start", "team", "key", *COLUMNS)]
    for doc in docs:
        key = doc["key"] or "*"
        total: dict[str, Any] = {c: 0 for c in COLUMNS}
        for p in doc["series"]:
            start = p["start"][:10] if doc["bucket"] == "day" else p["start"][:13] + ":00Z"
            rows.append((start, doc["team"], key, *(_num(p[c]) for c in COLUMNS)))
            for c in COLUMNS:
                total[c] += p[c]
        total["cost_usd"] = round(total["cost_usd"], 9)
        rows.append(("total", doc["team"], key, *(_num(total[c]) for c in COLUMNS)))
    return rows


def read_store(runtime: Any, read: Callable[[Any], Awaitable[T]]) -> T | None:
    """`read(store)` against the configured store, opened and closed around it; None (after saying
    so on stderr) when the store is unavailable. Shared by `usage` and its history form."""
    from proxy.errors import StoreUnavailable
    from proxy.store import open_store

    async def opened() -> T:
        store = open_store(runtime.config.store)
        await store.open()
        try:
            return await read(store)
        finally:
            await store.close()

    try:
        return asyncio.run(opened())
    except StoreUnavailable as err:
        print(f"store unavailable: {err.message}", file=sys.stderr)
        return None


def run(args: argparse.Namespace, runtime: Any) -> int:
    from proxy.admin_history import history_document

    try:
        queries = _queries(args, runtime, time.time())
    except BadParam as err:
        print(f"usage: {err}", file=sys.stderr)
        return 2

    async def read(store: Any) -> list[dict[str, Any]]:
        return [await history_document(store, q) for q in queries]

    docs = read_store(runtime, read)
    if docs is None:
        return 1
    if args.json:
        print(json.dumps({"history": docs}, indent=2))
        return 0
    rows = table(docs)
    print_table(rows, right_from=3)
    return 0
