"""What the dashboard reads from the store besides the budgets: each scope's usage trend and, per
key with a run budget, its active runs (docs/http-api.md "Dashboard")."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy.dashboard_html import MAX_TRENDS, Trend, fmt, fractions
from proxy.history import BUCKETS, bucket_tallies, floor_to
from proxy.ledger import Limits, Scope
from proxy.runs import run_scope_id
from proxy.runtime_keys import caller_of
from proxy.views import scope_view

log = logging.getLogger("budget_proxy")
TOP_RUNS = 3           # runs shown per key with a run budget (the most used of its latest RUNS_SCANNED)
RUNS_SCANNED = 50
MAX_RUN_KEYS = 50      # keys with a run budget whose runs are shown (one list_runs query each)


def trend_window(period: str, now: float) -> tuple[str, int, int]:
    """(bucket, start, end): the last 24 h by hour for a scope of period hour/day/none, the last
    30 days by day for week/month; the current bucket is the last."""
    if period in ("week", "month"):
        end = floor_to(now, BUCKETS["day"]) + BUCKETS["day"]
        return "day", end - 30 * BUCKETS["day"], end
    end = floor_to(now, BUCKETS["hour"]) + BUCKETS["hour"]
    return "hour", end - 24 * BUCKETS["hour"], end


async def load_trends(store: Any, cards: list[dict[str, Any]], now: float) -> dict[str, Trend]:
    """The trends of the first MAX_TRENDS cards: one usage_hours query each. A store that cannot
    answer leaves the trends out (the budgets still show)."""
    async def one(c: dict[str, Any]) -> tuple[str, Trend]:
        bucket, start, end = trend_window(c["budget"]["period"], now)
        hours = await store.usage_hours(c["team"], c["key"], start, end)
        return c["label"], Trend(bucket, bucket_tallies(hours, start, end, BUCKETS[bucket]))
    try:
        return dict(await asyncio.gather(*(one(c) for c in cards[:MAX_TRENDS])))
    except Exception as exc:
        log.error("dashboard: usage history unavailable: %s", exc.__class__.__name__)
        return {}


async def load_runs(state: Any, doc: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Per key with a run budget: its active runs and the TOP_RUNS most used of its latest
    RUNS_SCANNED (as GET /admin/runs lists them)."""
    rt = state.runtime
    records: dict[tuple[str, str], Any] | None = None   # the runtime keys' records, read once if needed
    out: list[dict[str, Any]] = []
    for team in doc["teams"]:
        for k in team["keys"]:
            if k.get("runtime") and records is None:
                records = {(r.team, r.name): r for r in await state.store.list_keys()}
            limits = run_limits_of(rt, records, team["name"], k)
            if limits is None:
                continue
            if len(out) >= MAX_RUN_KEYS:
                return out
            out.append(await key_runs(state.store, team["name"], k["name"], limits, now))
    return out


def run_limits_of(rt: Any, records: dict[tuple[str, str], Any] | None, team: str,
                  key: dict[str, Any]) -> Limits | None:
    """A key's run budget: a config key's from the config, a runtime key's from its record."""
    if not key.get("runtime"):
        return rt.runs.limits_for(team, key["name"])
    rec = (records or {}).get((team, key["name"]))
    return caller_of(rec).run_limits if rec is not None else None


async def key_runs(store: Any, team: str, key: str, limits: Limits, now: float) -> dict[str, Any]:
    """{"label", "active", "top"}: the key's active runs and the most used of its latest."""
    prefix = run_scope_id(team, key, "")
    active, entries = await store.list_runs(prefix, now, RUNS_SCANNED)
    ranked = [run_entry(Scope("run", scope_id[len(prefix):], scope_id, limits, "none"), st, now)
              for scope_id, st, _ in entries]
    ranked.sort(key=lambda x: (-x["fraction"], x["run"]))
    return {"label": f"{team}/{key}", "active": active, "top": ranked[:TOP_RUNS]}


def run_entry(scope: Scope, st: Any, now: float) -> dict[str, Any]:
    """{"run", "fraction", "text"}: one run and how much of its most used dimension it has used."""
    view = scope_view(scope, st, now)
    fr = fractions(view)
    dim = max(fr, key=lambda d: fr[d]) if fr else None
    text = (f"{fr[dim]:.0%} of {dim} ({fmt(dim, view['used'].get(dim, 0) or 0)} / "
            f"{fmt(dim, view['limit'][dim])})") if dim else "no limit"
    return {"run": view["name"], "fraction": fr[dim] if dim else -1.0, "text": text}
