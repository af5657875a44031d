"""Usage history (docs/http-api.md "History"): GET /admin/history,
GET /admin/usage.csv, retention, and `budget-proxy usage --since/--by`, through the real proxy
(uvicorn, the Anthropic simulator, the official SDK) on memory://, sqlite:// and redis:// stores.

Prices are config/pricing.yaml's for claude-haiku-4-5, written out here: $1 input, $5 output,
$1.25 5m cache write, $0.10 cache read per million tokens (nano-dollars per token: 1000, 5000,
1250, 100)."""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest

from proxy import admin_history
from proxy.ledger import in_unit
from proxy.history import (BadParam, csv_line, csv_query, history_query, parse_since, text_cell, usd)
from proxy.store.base import Tally, UsageRow
from tests.harness import FakeClock, utc
from tests.simulator import Reply

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 14  # no other test uses it
ADMIN = "adm-history-secret-0001"
A_KEY, B_KEY, G_KEY, R_KEY = ("bp-hist-alpha-0000000001", "bp-hist-beta-00000000002", "bp-hist-gamma-0000000003",
                              "bp-hist-runner-000000004")
HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
HEADER = ("time,request_id,team,key,run,model,input_tokens,cache_write_tokens,cache_read_tokens,output_tokens,"
          "tokens,cost_usd,steps,duration_ms,outcome")
ZERO = {"requests": 0, "tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "steps": 0, "denied": 0,
        "cut": 0}


def teams() -> dict[str, Any]:
    return {
        "research": {"keys": {
            "alpha": {"key": A_KEY, "budget": {"steps": 2}},      # the third request is denied
            "beta": {"key": B_KEY},
            "gamma": {"key": G_KEY, "budget": {"tokens": 60}},    # its stream is cut (clamping off)
            "runner": {"key": R_KEY, "run_budget": {"steps": 100}},
        }},
        "support": {"keys": {}},
    }


# --- stores ---------------------------------------------------------------------------------
def redis_available() -> bool:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=1, socket_connect_timeout=1).ping()
        return True
    except Exception:
        return False


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        if not redis_available():
            pytest.skip("no Redis on 127.0.0.1:6379")
        import redis

        prefix = f"bp-hist-{uuid.uuid4().hex[:12]}:"
        yield f"redis://127.0.0.1:6379/{REDIS_DB}?prefix={prefix}"
        client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        names = list(client.scan_iter(match=prefix + "*"))
        if names:
            client.delete(*names)


@pytest.fixture
def hist(start: Callable[..., Any], store_url: str) -> Callable[..., Any]:
    """hist(clock=..., **config) -> a proxy on the parametrized store, with the admin key."""
    def _start(clock: Any = None, **top: Any) -> Any:
        top.setdefault("admission", {"clamp_max_tokens": False, "unpriced_models": "allow"})
        kw = {"clock": clock} if clock is not None else {}
        return start(teams(), store=store_url, admin_key=ADMIN, **top, **kw)
    return _start


# --- helpers ----------------------------------------------------------------------------------
def client(proxy: Any, key: str = A_KEY, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **kw)


def create(proxy: Any, key: str = A_KEY, model: str = HAIKU, **kw: Any) -> Any:
    return client(proxy, key, **kw).messages.create(model=model, max_tokens=100, messages=MSG)


def admin_get(proxy: Any, path: str, params: Any = None, key: str = ADMIN) -> httpx.Response:
    return httpx.get(proxy.url + path, params=params, headers={"x-api-key": key}, timeout=10)


def history(proxy: Any, **params: Any) -> dict[str, Any]:
    r = admin_get(proxy, "/admin/history", params)
    assert r.status_code == 200, r.text
    return r.json()


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """check() once it stops failing (denial counts and prunes land in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def point(start: str, **counts: Any) -> dict[str, Any]:
    return {"start": start, **ZERO, **counts}


def csv_rows(text: str) -> list[dict[str, str]]:
    assert text.startswith(HEADER + "\r\n"), text[:200]
    return list(csv.DictReader(io.StringIO(text, newline="")))


def wait_retention(proxy: Any) -> None:
    async def wait() -> None:
        task = proxy.state.retention.task
        if task is not None:
            await task
    proxy.call(wait())


# --- the series -------------------------------------------------------------------------------
def test_series_after_known_traffic(hist: Callable[..., Any], sim: Any) -> None:
    clock = FakeClock(utc(2026, 11, 30, 10, 15))
    p = hist(clock)
    # 10:15 two of alpha's (its steps budget: 2), then its third is denied
    sim.queue(Reply(input_tokens=100, output_tokens=20), Reply(input_tokens=100, output_tokens=20))
    create(p)
    create(p)
    with pytest.raises(anthropic.RateLimitError):
        create(p)
    # 11:05 beta, with cache writes and reads
    clock.set(utc(2026, 11, 30, 11, 5))
    sim.queue(Reply(input_tokens=100, output_tokens=20, cache_write_5m=10, cache_read=50))
    create(p, B_KEY)
    # 11:30 gamma's stream runs past its 60 tokens and is cut
    clock.set(utc(2026, 11, 30, 11, 30))
    sim.queue(Reply(chunks=["abcdefghijk "] * 40, input_tokens=7, output_tokens=200))
    with pytest.raises(anthropic.APIStatusError):
        with client(p, G_KEY).messages.stream(model=HAIKU, max_tokens=500, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    assert sim.wait_idle(5)
    # next day, 00:00:00 exactly: beta again
    clock.set(utc(2026, 12, 1))
    sim.queue(Reply(input_tokens=100, output_tokens=20))
    create(p, B_KEY)

    csv_text = admin_get(p, "/admin/usage.csv", {"from": "2026-11-30", "to": "2026-12-02"}).text
    rows = csv_rows(csv_text)
    assert [(r["key"], r["outcome"]) for r in rows] == [("alpha", "completed"), ("alpha", "completed"),
                                                      ("beta", "completed"), ("gamma", "cut"), ("beta", "completed")]
    cut = rows[3]
    cut_in, cut_out, cut_nanos = int(cut["input_tokens"]), int(cut["output_tokens"]), int(Decimal(cut["cost_usd"]) * 10**9)
    assert cut_in == 7 and cut_out > 0 and cut_nanos == 7 * 1000 + cut_out * 5000

    def by_day() -> None:
        doc = history(p, team="research", **{"from": "2026-11-29T12:00:00Z", "to": "2026-12-01T08:00:00Z"})
        assert doc["bucket"] == "day" and doc["team"] == "research" and doc["key"] is None
        assert doc["from"] == "2026-11-29T00:00:00Z" and doc["to"] == "2026-12-02T00:00:00Z"
        assert doc["series"] == [
            point("2026-11-29T00:00:00Z"),
            point("2026-11-30T00:00:00Z", requests=4, input_tokens=100 + 100 + 160 + 7,
                  output_tokens=20 + 20 + 20 + cut_out, tokens=240 + 180 + 7 + cut_out,
                  cost_usd=in_unit("cost_usd", 200_000 + 200_000 + 217_500 + cut_nanos), steps=4, denied=1, cut=1),
            point("2026-12-01T00:00:00Z", requests=1, input_tokens=100, output_tokens=20, tokens=120,
                  cost_usd=0.0002, steps=1)]
    eventually(by_day)

    def by_hour() -> None:
        doc = history(p, team="research", bucket="hour", **{"from": "2026-11-30T09:30:00Z", "to": "2026-11-30T12:00:00Z"})
        assert [s["start"] for s in doc["series"]] == ["2026-11-30T09:00:00Z", "2026-11-30T10:00:00Z",
                                                      "2026-11-30T11:00:00Z"]
        assert doc["series"][0] == point("2026-11-30T09:00:00Z")
        assert doc["series"][1] == point("2026-11-30T10:00:00Z", requests=2, input_tokens=200, output_tokens=40,
                                         tokens=240, cost_usd=0.0004, steps=2, denied=1)
        assert doc["series"][2]["requests"] == 2 and doc["series"][2]["cut"] == 1
    eventually(by_hour)

    # one key: alpha's denial is alpha's, beta's cache tokens are beta's
    alpha = history(p, team="research", key="alpha", **{"from": "2026-11-30", "to": "2026-12-01"})
    assert alpha["key"] == "alpha" and alpha["series"] == [
        point("2026-11-30T00:00:00Z", requests=2, input_tokens=200, output_tokens=40, tokens=240, cost_usd=0.0004,
              steps=2, denied=1)]
    beta = history(p, team="research", key="beta", bucket="hour", **{"from": "2026-11-30T11:00:00Z",
                                                                      "to": "2026-11-30T12:00:00Z"})
    assert beta["series"] == [point("2026-11-30T11:00:00Z", requests=1, input_tokens=160, output_tokens=20,
                                    tokens=180, cost_usd=0.0002175, steps=1)]
    # another team's history is its own
    assert all(s == point(s["start"]) for s in history(p, team="support")["series"])


def test_bucket_boundaries_and_default_range(hist: Callable[..., Any], sim: Any) -> None:
    clock = FakeClock(utc(2026, 11, 30, 23, 59, 59))
    p = hist(clock)
    sim.queue(*[Reply(input_tokens=10, output_tokens=1) for _ in range(3)])
    clock.advance(0.5)                 # 23:59:59.5: the day's last hour
    create(p, B_KEY)
    clock.set(utc(2026, 12, 1))        # 00:00:00: the next day's first hour
    create(p, B_KEY)
    clock.set(utc(2026, 12, 3, 9, 30))
    create(p, B_KEY)

    doc = history(p, team="research", bucket="hour", **{"from": "2026-11-30T23:00:00Z", "to": "2026-12-01T01:00:00Z"})
    assert [(s["start"], s["requests"]) for s in doc["series"]] == [("2026-11-30T23:00:00Z", 1),
                                                                   ("2026-12-01T00:00:00Z", 1)]
    # default: the 7 days ending with the current one, every day present, zeros included
    doc = history(p, team="research")
    assert doc["bucket"] == "day" and doc["from"] == "2026-11-27T00:00:00Z" and doc["to"] == "2026-12-04T00:00:00Z"
    assert [(s["start"][:10], s["requests"]) for s in doc["series"]] == [
        ("2026-11-27", 0), ("2026-11-28", 0), ("2026-11-29", 0), ("2026-11-30", 1), ("2026-12-01", 1),
        ("2026-12-02", 0), ("2026-12-03", 1)]
    assert doc["series"][0] == point("2026-11-27T00:00:00Z")
    # by hour: 168 hours, the last the current one
    doc = history(p, team="research", bucket="hour")
    assert len(doc["series"]) == 168 and doc["series"][-1]["start"] == "2026-12-03T09:00:00Z"
    assert doc["series"][-1]["requests"] == 1 and sum(s["requests"] for s in doc["series"]) == 3
    # an explicit `to` without `from`: the 7 days before it
    doc = history(p, team="research", to="2026-12-01T00:00:00Z")
    assert doc["series"][-1]["start"] == "2026-11-30T00:00:00Z" and len(doc["series"]) == 7


# --- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
def test_bad_parameters_are_400_with_a_clear_message(hist: Callable[..., Any]) -> None:
    p = hist(FakeClock(utc(2026, 11, 30, 12)))
    cases = [
        ({}, "'team' is required"),
        ({"team": "research", "bucket": "week"}, "'bucket' must be hour or day"),
        ({"team": "research", "from": "yesterday"}, "'from' must be an ISO-8601"),
        ({"team": "research", "to": "2026-13-01"}, "'to' must be an ISO-8601"),
        ({"team": "research", "from": "2026-12-01", "to": "2026-11-01"}, "'from' must be before 'to'"),
        ({"team": "research", "from": "2020-01-01", "bucket": "hour"}, "at most 10000"),
        ({"team": "research", "buckets": "hour"}, "unknown parameter 'buckets'"),
        ([("team", "research"), ("team", "support")], "more than once"),
        ({"team": "research", "key": ""}, "'key' is empty"),
    ]
    for params, message in cases:
        r = admin_get(p, "/admin/history", params)
        assert r.status_code == 400, (params, r.text)
        body = r.json()
        assert body["error"]["type"] == "invalid_request_error" and message in body["error"]["message"], body
    r = admin_get(p, "/admin/history", {"team": "nope"})
    assert r.status_code == 404 and "No team named 'nope'" in r.text
    for params, message in [({"from": "12/01/2026"}, "'from' must be an ISO-8601"),
                            ({"from": "2026-12-01", "to": "2026-11-01"}, "'from' must be before 'to'"),
                            ({"team": "research", "model": "x"}, "unknown parameter 'model'")]:
        r = admin_get(p, "/admin/usage.csv", params)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (params, r.text)
    # the admin key only
    for path in ("/admin/history?team=research", "/admin/usage.csv"):
        assert admin_get(p, path, key="wrong").status_code == 401
        assert admin_get(p, path, key=A_KEY).status_code == 403


def test_history_is_404_without_an_admin_key(start: Callable[..., Any]) -> None:
    p = start(teams(), store="memory://")
    assert httpx.get(p.url + "/admin/history?team=research").status_code == 404
    assert httpx.get(p.url + "/admin/usage.csv").status_code == 404


# --- CSV ----------------------------------------------------------------------------------------
NASTY = ['=HYPERLINK("http://evil.example","x"),1', "+1+1", "-2", "@SUM(A1:A9)", 'quote"inside', "comma,model",
         "ok model \u00e9"]


def test_usage_csv_streams_every_row_escaped(hist: Callable[..., Any], sim: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_history, "CSV_PAGE", 2)  # pages of 2 rows: the export goes page by page
    clock = FakeClock(utc(2026, 11, 30, 12))
    p = hist(clock)
    pages: list[int] = []
    page = p.state.store.usage_page

    async def counted(*a: Any) -> Any:
        rows, after = await page(*a)
        pages.append(len(rows))
        return rows, after
    p.state.store.usage_page = counted
    sim.queue(*[Reply(input_tokens=10, output_tokens=2) for _ in range(len(NASTY) + 2)])
    for i, model in enumerate(NASTY):
        clock.advance(1)
        create(p, B_KEY, model=model)
    clock.advance(1)
    create(p, R_KEY, default_headers={"x-budget-run": "-run-7"})   # a run id may start with '-'
    clock.advance(1)
    create(p, A_KEY)

    r = admin_get(p, "/admin/usage.csv")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
    assert "attachment" in r.headers["content-disposition"]
    rows = csv_rows(r.text)
    assert len(rows) == len(NASTY) + 2
    assert sum(pages) == len(NASTY) + 2
    assert len(pages) >= 5  # pages of 2 rows
    for row, model in zip(rows, NASTY):
        assert row["model"] == ("'" + model if model[0] in "=+-@" else model), row
        assert row["team"] == "research" and row["key"] == "beta" and row["run"] == ""
        assert row["input_tokens"] == "10" and row["output_tokens"] == "2" and row["tokens"] == "12"
        assert row["cost_usd"] == "0" and row["steps"] == "1" and row["outcome"] == "completed"
    # no line of the file starts a formula, and the raw text quotes what needs quoting
    assert '"\'=HYPERLINK(""http://evil.example"",""x""),1"' in r.text
    assert ",\"comma,model\"," in r.text and ",\"quote\"\"inside\"," in r.text
    run_row, alpha_row = rows[-2], rows[-1]
    assert run_row["key"] == "runner" and run_row["run"] == "'-run-7"
    assert alpha_row["model"] == HAIKU and alpha_row["cost_usd"] == "0.00002"  # 10 x 1000 + 2 x 5000 nanos
    assert alpha_row["time"] == "2026-11-30T12:00:09.000Z" and alpha_row["request_id"].startswith("req_")
    assert alpha_row["cache_write_tokens"] == "0" and alpha_row["cache_read_tokens"] == "0"
    assert int(alpha_row["duration_ms"]) >= 0

    # filters: team, key, time
    assert [x["key"] for x in csv_rows(admin_get(p, "/admin/usage.csv", {"key": "alpha"}).text)] == ["alpha"]
    assert csv_rows(admin_get(p, "/admin/usage.csv", {"team": "support"}).text) == []
    sliced = csv_rows(admin_get(p, "/admin/usage.csv", {"team": "research", "key": "beta",
                                                        "from": "2026-11-30T12:00:02Z",
                                                        "to": "2026-11-30T12:00:04Z"}).text)
    assert [x["model"] for x in sliced] == ["'+1+1", "'-2"]
    # the default range is the last 7 days: nothing from 8 days ago
    clock.advance(8 * 86400)
    assert csv_rows(admin_get(p, "/admin/usage.csv").text) == []


# --- retention ----------------------------------------------------------------------------------
def test_retention_prunes_the_usage_log_and_its_history(hist: Callable[..., Any], sim: Any) -> None:
    clock = FakeClock(utc(2026, 11, 20, 10))
    p = hist(clock, store_retention_days=2)
    sim.queue(*[Reply(input_tokens=10, output_tokens=2) for _ in range(4)])
    create(p)
    create(p)
    with pytest.raises(anthropic.RateLimitError):
        create(p)                     # a denial on the 20th too
    wait_retention(p)
    old = {"from": "2026-11-20", "to": "2026-11-23"}
    def denied_counted() -> None:
        assert history(p, team="research", **old)["series"][0]["denied"] == 1
    eventually(denied_counted)
    assert len(csv_rows(admin_get(p, "/admin/usage.csv", old).text)) == 2

    clock.set(utc(2026, 11, 22, 9))   # not yet 2 days: nothing goes (the hourly prune is not due either way)
    create(p, B_KEY)
    wait_retention(p)
    assert len(csv_rows(admin_get(p, "/admin/usage.csv", old).text)) == 3

    clock.set(utc(2026, 11, 22, 12))  # the 20th 10:00-11:00 is now more than 2 days old
    create(p, B_KEY)
    wait_retention(p)
    rows = csv_rows(admin_get(p, "/admin/usage.csv", old).text)
    assert [(r["key"], r["time"][:13]) for r in rows] == [("beta", "2026-11-22T09"), ("beta", "2026-11-22T12")]
    series = history(p, team="research", **old)["series"]
    assert series[0] == point("2026-11-20T00:00:00Z")       # its tallies and its denial went too
    assert series[2]["requests"] == 2
    alpha = history(p, team="research", key="alpha", **old)["series"]
    assert alpha[0] == point("2026-11-20T00:00:00Z")


def test_retention_zero_keeps_everything_and_the_default_is_90_days() -> None:
    from proxy.config import parse_config

    cfg = parse_config({"teams": {}}, env={})
    assert cfg.proxy.store_retention_days == 90
    assert parse_config({"teams": {}, "store_retention_days": 0}, env={}).proxy.store_retention_days == 0
    from proxy.config import ConfigError
    with pytest.raises(ConfigError) as exc:
        parse_config({"teams": {}, "store_retention_days": -1}, env={})
    assert "store_retention_days" in str(exc.value.problems)


# --- stores -------------------------------------------------------------------------------------
@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_tallies_expire_after_the_retention(hist: Callable[..., Any], sim: Any, store_url: str) -> None:
    import redis

    p = hist(store_retention_days=3)  # the real clock: Redis' TTLs are relative to the row's time
    sim.queue(Reply(input_tokens=10, output_tokens=2), Reply(input_tokens=10, output_tokens=2))
    create(p)
    create(p)  # (the first settlement's prune tells the store the configured retention)
    prefix = store_url.split("prefix=")[1]
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    names = [n.decode() for n in client.zrange(prefix + "Hi", 0, -1)]
    assert {n[len(prefix):len(prefix) + 3] for n in names} == {"Ht:", "Hk:"} and len(names) == 2, names
    for name in names:  # this hour's team and key tallies: until the hour ends + 3 days
        ttl = client.pttl(name)
        assert 3 * 86400_000 - 60_000 < ttl <= 3 * 86400_000 + 3600_000, (name, ttl)
    assert client.ttl(prefix + "log") == -1  # the stream is trimmed by retention's prune, not a TTL


def test_an_old_sqlite_ledger_gains_the_history_at_its_next_open(tmp_path: Path) -> None:
    """A ledger written before the history (no run column, no hourly tables): opened, its rows so far
    are summed into the tables once, and new rows add to them."""
    from proxy.store.sqlite import SqliteStore

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
    CREATE TABLE usage_log (
      id INTEGER PRIMARY KEY, time REAL NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
      model TEXT NOT NULL, route TEXT NOT NULL, input_tokens INTEGER NOT NULL,
      cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
      cache_read_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
      web_search_requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, steps INTEGER NOT NULL,
      duration_s REAL NOT NULL, outcome TEXT NOT NULL, request_id TEXT NOT NULL);""")
    t0 = utc(2026, 11, 30, 10).timestamp()
    db.executemany("INSERT INTO usage_log VALUES (NULL,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
        (t0 + 60, "research", "alpha", HAIKU, "/v1/messages", 10, 1, 2, 3, 4, 0, 500, 1, 0.1, "completed", "r1"),
        (t0 + 120, "research", "beta", HAIKU, "/v1/messages", 10, 0, 0, 0, 4, 0, 500, 1, 0.1, "cut", "r2"),
        (t0 + 3600, "research", "alpha", HAIKU, "/v1/messages", 1, 0, 0, 0, 1, 0, 7, 1, 0.1, "completed", "r3")])
    db.commit()
    db.close()

    async def check() -> None:
        store = SqliteStore(str(path))
        await store.open()
        try:
            hours = await store.usage_hours("research", None, t0, t0 + 7200)
            assert hours == {int(t0): Tally(2, 26, 8, 1000, 2, 0, 1), int(t0) + 3600: Tally(1, 1, 1, 7, 1, 0, 0)}
            assert await store.usage_hours("research", "alpha", t0, t0 + 3600) == {int(t0): Tally(1, 16, 4, 500, 1)}
            store.log_denial("research", "alpha", t0 + 5)
            row = UsageRow(t0 + 30, "research", "alpha", HAIKU, "/v1/messages", 5, 0, 0, 0, 5, 0, 5, 1, 0.1,
                           "completed", "r4", "run-1")
            await store._run(store._write, {}, [row.as_tuple()])  # (the group commit's write: rows and their hours)
            await asyncio.sleep(0.2)
            assert (await store.usage_hours("research", "alpha", t0, t0 + 3600))[int(t0)] == Tally(2, 21, 9, 505, 2, 1, 0)
            rows, after = await store.usage_page(t0, t0 + 7200, "research", "alpha", None, 10)
            assert [r.request_id for r in rows] == ["r4", "r1", "r3"] and after is None
            assert rows[0].run == "run-1" and rows[1].run == ""
        finally:
            await store.close()
    asyncio.run(check())
    # opened again: nothing summed twice
    async def again() -> None:
        store = SqliteStore(str(path))
        await store.open()
        try:
            assert (await store.usage_hours("research", None, t0, t0 + 3600))[int(t0)].requests == 3
        finally:
            await store.close()
    asyncio.run(again())


def test_store_pages_and_prunes_in_bounded_batches(store_url: str) -> None:
    """The store calls behind the routes: pages of any size, rows of one instant included, no row twice;
    hourly tallies; prune_log in batches of `limit` until fewer come back."""
    from decimal import Decimal as D

    from proxy.ledger import Amounts, Ask, Limits, Scope
    from proxy.store import open_store

    t0 = utc(2026, 11, 30, 10).timestamp()
    scopes = [Scope("key", "alpha", "key:research/alpha", Limits(tokens=10**12), "none"),
              Scope("team", "research", "team:research", Limits(tokens=10**12), "none")]

    async def go() -> None:
        store = open_store(store_url)
        await store.open()
        try:
            times = [t0 + i for i in range(10)] + [t0 + 10] * 5 + [t0 + 3600 + i for i in range(10)]
            for i, t in enumerate(times):
                res = await store.reserve(scopes, Ask(10, 10_000, 10, D(5000)), t, f"req_{i}")
                await store.settle(res, Amounts(12, 10, 2, 20_000, 1), UsageRow(
                    t, "research", "alpha", HAIKU, "/v1/messages", 10, 0, 0, 0, 2, 0, 20_000, 1, 0.1,
                    "cut" if i == 3 else "completed", f"req_{i}"))
            for limit in (1, 3, 4, 1000):
                got, after, calls = [], None, 0
                while True:
                    rows, after = await store.usage_page(t0, t0 + 7200, "research", None, after, limit)
                    got += rows
                    calls += 1
                    assert len(rows) <= limit and calls < 100
                    if after is None:
                        break
                assert [r.request_id for r in got] == [f"req_{i}" for i in range(len(times))], limit
            rows, _ = await store.usage_page(t0 + 10, t0 + 11, None, "alpha", None, 1000)
            assert len(rows) == 5  # (one instant, five rows)
            hours = await store.usage_hours("research", "alpha", t0, t0 + 7200)
            assert hours == {int(t0): Tally(15, 150, 30, 300_000, 15, 0, 1), int(t0) + 3600: Tally(10, 100, 20, 200_000, 10)}
            # everything older than the second hour: 15 rows (+ their hour's 2 tallies), in batches of 4
            batches = []
            while True:
                batches.append(await store.prune_log(t0 + 3600, 4))
                if batches[-1] < 4:
                    break
            assert sum(batches) >= 15 and len(batches) >= 4, batches
            rows, _ = await store.usage_page(t0, t0 + 7200, None, None, None, 1000)
            assert [r.request_id for r in rows] == [f"req_{i}" for i in range(15, 25)]
            assert await store.usage_hours("research", None, t0, t0 + 7200) == {int(t0) + 3600: Tally(10, 100, 20, 200_000, 10)}
        finally:
            await store.close()
    asyncio.run(go())


# --- the CLI --------------------------------------------------------------------------------------
def test_cli_usage_since_by_prints_the_history_table(start: Callable[..., Any], sim: Any, tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    p = start(teams(), store=f"sqlite:///{db}", admin_key=ADMIN)  # the real clock: the CLI reads time.time()
    sim.queue(*[Reply(input_tokens=100, output_tokens=20) for _ in range(3)])
    create(p)
    create(p)
    with pytest.raises(anthropic.RateLimitError):
        create(p)
    create(p, B_KEY)
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({"store": f"sqlite:///{db}", "teams": {
        "research": {"keys": {"alpha": {"key": A_KEY}, "beta": {"key": B_KEY}}}, "support": {"keys": {}}}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/tmp")}
        return subprocess.run([sys.executable, "-m", "proxy", "usage", "--config", str(config), *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")

    def by_day() -> None:
        r = run("--since", "7d", "--by", "day")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["start", "team", "key", "requests", "tokens", "input_tokens", "output_tokens",
                                    "cost_usd", "steps", "denied", "cut"]
        research = [ln.split() for ln in lines if ln.split()[1] == "research"]
        assert len(research) == 9  # 8 days (the one 7 days ago, partly, to today) and the total
        assert research[-2] == [today, "research", "*", "3", "360", "300", "60", "0.0006", "3", "1", "0"]
        assert research[-1] == ["total", "research", "*", "3", "360", "300", "60", "0.0006", "3", "1", "0"]
        assert any(ln.split()[:2] == ["total", "support"] for ln in lines)
    eventually(by_day, timeout=10)

    r = run("--since", "3h", "--by", "hour", "--team", "research", "--key", "alpha")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert len(rows) == 5 and rows[-1] == ["total", "research", "alpha", "2", "240", "200", "40", "0.0004", "2", "1", "0"]
    assert all(r[0].endswith(":00Z") for r in rows[:-1])
    r = run("--since", "1d", "--key", "beta", "--json")  # the key's team found in the config
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)["history"]
    assert len(docs) == 1 and docs[0]["key"] == "beta" and docs[0]["bucket"] == "day"
    assert sum(s["requests"] for s in docs[0]["series"]) == 1
    for args, message in [(("--since", "3x"), "--since must be a duration"),
                          (("--team", "nope"), "no team named 'nope'"),
                          (("--key", "nope"), "--key nope needs --team")]:
        r = run(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = run()  # without them: the budgets table
    assert r.returncode == 0 and r.stdout.split()[:3] == ["team", "key", "dimension"]


# --- the arithmetic (pure) ------------------------------------------------------------------------
def test_csv_cells_neutralise_formulas_and_quote() -> None:
    assert text_cell("plain") == "plain"
    assert text_cell("=1+2") == "'=1+2" and text_cell("+1") == "'+1" and text_cell("-1") == "'-1"
    assert text_cell("@x") == "'@x" and text_cell("\tx") == "'\tx" and text_cell("\rx") == "\"'\rx\""
    assert text_cell('a,"b"') == '"a,""b"""' and text_cell("line\nbreak") == '"line\nbreak"'
    assert text_cell('=A1,"x"') == '"\'=A1,""x"""'
    assert usd(0) == "0" and usd(12_345_000) == "0.012345" and usd(3 * 10**9) == "3" and usd(1) == "0.000000001"
    row = UsageRow(utc(2026, 12, 1).timestamp() + 0.5, "t", "k", "m", "/v1/messages", 1, 2, 3, 4, 5, 0, 6, 1, 0.0125, "cut", "req_1", "r")
    assert csv_line(row) == "2026-12-01T00:00:00.500Z,req_1,t,k,r,m,1,5,4,5,15,0.000000006,1,12,cut\r\n"


def test_ranges_widen_to_whole_buckets() -> None:
    now = utc(2026, 12, 7, 11, 37).timestamp()
    q = history_query([("team", "t"), ("from", "2026-12-01T10:30:00+02:00"), ("to", "2026-12-02T00:00:00Z"),
                       ("bucket", "hour")], now)
    assert (q.start, q.end) == (utc(2026, 12, 1, 8).timestamp(), utc(2026, 12, 2).timestamp())
    q = history_query([("team", "t"), ("from", "2026-12-01"), ("to", "2026-12-01T00:00:01")], now)
    assert (q.start, q.end) == (utc(2026, 12, 1).timestamp(), utc(2026, 12, 2).timestamp())
    q = csv_query([], now)
    assert q.end > now and q.end - now < 1e-6 and q.start == now - 7 * 86400 and q.team is None
    start, end = parse_since("7d", now, "day")
    assert (start, end) == (utc(2026, 11, 30).timestamp(), utc(2026, 12, 8).timestamp())
    assert parse_since("90m", now, "hour") == (utc(2026, 12, 7, 10).timestamp(), utc(2026, 12, 7, 12).timestamp())
    with pytest.raises(BadParam):
        parse_since("soon", now, "day")
