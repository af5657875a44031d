"""Run scopes end to end (docs/budgets.md "Runs"): the real proxy in front of
the Anthropic simulator, driven by the official anthropic SDK (default_headers / extra_headers carry
x-budget-run), on memory://, SQLite and Redis.

The figures are worked out by hand. The simulator reports input 7 (== the heuristic's estimate of
MSG, so admission's input estimate is exact and, with clamping on, no scope can pass its limit) and
output 7 ("Hello from the simulator." is 25 bytes); a request sent with max_tokens 7 therefore holds
and uses 14 tokens, one step, and 7 x $1 + 7 x $5 per Mtok = 42,000 nano-dollars (claude-haiku-4-5).

Redis: 127.0.0.1:6379 DB 11 (no other test uses it), a fresh key prefix per test; skipped when Redis
is not reachable unless BUDGET_PROXY_REQUIRE_REDIS is set.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import anthropic
import httpx
import pytest

from proxy.store.memory import RUN_FORGET_MAX
from tests.simulator import Reply

AGENT_KEY = "bp-test-agent-key-00000001"   # research/agent: a key with a run budget
PLAIN_KEY = "bp-test-plain-key-00000002"   # research/plain: no run budget
ADMIN = "bp-test-admin-key-000000003"
MSG = [{"role": "user", "content": "Say hello"}]
EST = 7                 # heuristic input estimate of MSG (tests/test_budgets.py checks it)
HAIKU = "claude-haiku-4-5"
PER_CALL = {"tokens": 14, "cost_nanos": 7 * 1_000 + 7 * 5_000}  # max_tokens 7, the simulator's reply
REDIS_DB = 11
T0 = dt.datetime(2026, 12, 9, 12, 0, tzinfo=dt.timezone.utc).timestamp()


class FakeClock:
    """The proxy's clock (create_app(clock=...)), moved by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def teams(run_budget: dict | None = None, runs: str = "optional", key_budget: dict | None = None,
          team_budget: dict | None = None) -> dict[str, Any]:
    agent: dict[str, Any] = {"key": AGENT_KEY, "budget": key_budget or {}, "runs": runs}
    if run_budget is not None:
        agent["run_budget"] = run_budget
    return {"research": {"budget": team_budget or {},
                         "keys": {"agent": agent, "plain": {"key": PLAIN_KEY}}}}


def client(proxy, run: str | None = None, key: str = AGENT_KEY, **kw: Any) -> anthropic.Anthropic:
    """An SDK client whose every request names `run` (default_headers, as the README shows)."""
    headers = {"x-budget-run": run} if run is not None else None
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, default_headers=headers, **kw)


def call(proxy, run: str | None = None, key: str = AGENT_KEY, max_tokens: int = 7):
    """messages.create naming `run`; the raw response (headers) with .parse()."""
    with client(proxy, run, key) as c:
        return c.messages.with_raw_response.create(model=HAIKU, max_tokens=max_tokens, messages=MSG)


def denied(proxy, run: str | None, dimension: str, scope: str = "run", key: str = AGENT_KEY,
           max_tokens: int = 7) -> anthropic.RateLimitError:
    """The call is refused with a budget 429 naming (scope, dimension) and never reaches upstream."""
    before = len(proxy.sim.messages_requests())
    with pytest.raises(anthropic.RateLimitError) as exc:
        call(proxy, run, key, max_tokens)
    e = exc.value
    assert e.status_code == 429 and e.body["error"]["details"] == {"error_code": "budget_exceeded"}, e.body
    assert (e.body["budget"]["scope"], e.body["budget"]["dimension"]) == (scope, dimension), e.body
    assert len(proxy.sim.messages_requests()) == before, "a denied request reached upstream"
    return e


def budget(proxy, run: str | None = None, key: str = AGENT_KEY) -> dict[str, Any]:
    headers = {"x-api-key": key, **({"x-budget-run": run} if run is not None else {})}
    r = httpx.get(proxy.url + "/budget", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def run_scope(proxy, run: str, key: str = AGENT_KEY) -> dict[str, Any]:
    first = budget(proxy, run, key)["scopes"][0]
    assert (first["scope"], first["name"]) == ("run", run), first
    return first


ZERO_HELD = {"tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "steps": 0}


# --- stores ------------------------------------------------------------------------------------

def redis_url(prefix: str) -> str:
    return f"redis://127.0.0.1:6379/{REDIS_DB}?prefix={prefix}"


@pytest.fixture
def redis_prefix() -> Any:
    """A fresh key prefix on DB 11, deleted afterwards; skips without Redis (unless required)."""
    import redis

    client_ = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2, socket_connect_timeout=1)
    try:
        client_.ping()
    except redis.exceptions.RedisError as exc:
        client_.close()
        if os.environ.get("BUDGET_PROXY_REQUIRE_REDIS"):
            pytest.fail(f"Redis at 127.0.0.1:6379 is required (BUDGET_PROXY_REQUIRE_REDIS) but unreachable: {exc}")
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable (set BUDGET_PROXY_REQUIRE_REDIS to fail instead)")
    prefix = f"bp-runs-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix, client_
    finally:
        keys = list(client_.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client_.delete(*keys)
        client_.close()


STORES = ("memory", "sqlite", "redis")


@pytest.fixture(params=STORES)
def store_url(request, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    prefix, _ = request.getfixturevalue("redis_prefix")
    return redis_url(prefix)


@pytest.fixture
def up(start, sim) -> Callable[..., Any]:
    """up(teams, **config) -> a proxy in front of `sim` (as `.sim`); the simulator reports input 7."""
    sim.default = Reply(input_tokens=EST)

    def _up(t: dict[str, Any] | None = None, **config: Any):
        p = start(teams=t or teams({"steps": 2}), **config)
        p.sim = sim
        return p
    return _up


# --- one key's runs exhaust independently ----------------------------------------------------------

def test_runs_of_one_key_exhaust_their_steps_independently(up, store_url):
    p = up(teams({"steps": 2}, key_budget={"steps": 10}), store=store_url)
    for run in ("run-a", "run-b"):
        call(p, run)
    r = call(p, "run-a")  # the run's last step: the tightest of run (2), key (10)
    assert r.headers["x-budget-remaining-steps"] == "0"  # (as it stood at admission: this call's step held)
    e = denied(p, "run-a", "steps")
    assert e.body["budget"] == {"scope": "run", "name": "run-a", "dimension": "steps", "limit": 2, "used": 2,
                                "resets_at": None}
    call(p, "run-b")                   # run-b has its own two steps
    denied(p, "run-b", "steps")
    call(p, "run-c")                   # a new run starts with a whole budget
    call(p, None)                      # the key without a run id: only the key's and team's budgets
    assert call(p, None).headers["x-budget-remaining-steps"] == str(10 - 7)
    key_scope = budget(p)["scopes"][0]
    assert key_scope["scope"] == "key" and key_scope["used"]["steps"] == 7  # every run's calls count for the key
    assert denied(p, "run-a", "steps").body["budget"]["used"] == 2  # denials are not steps


def test_runs_of_one_key_exhaust_their_tokens_independently(up, store_url):
    p = up(teams({"tokens": 2 * 14}), store=store_url)
    call(p, "a"), call(p, "a")
    e = denied(p, "a", "tokens")
    assert e.body["budget"]["used"] == 28 and e.body["budget"]["limit"] == 28
    assert "used 28 of 28, 0 left, at least 8 needed" in e.message
    r = call(p, "b", max_tokens=100)  # its hold is clamped to what its run has left: 28 - 7 input
    assert r.headers["x-budget-clamped-max-tokens"] == "21"
    assert p.sim.messages_requests()[-1].json["max_tokens"] == 21
    assert run_scope(p, "b")["used"]["tokens"] == 14 and run_scope(p, "a")["used"]["tokens"] == 28


def test_runs_of_one_key_exhaust_their_cost_independently(up):
    p = up(teams({"cost_usd": "0.000084"}))  # two calls of 42,000 nanos
    call(p, "a"), call(p, "a")
    e = denied(p, "a", "cost_usd")
    assert e.body["budget"]["limit"] == 0.000084 and e.body["budget"]["used"] == 0.000084
    assert call(p, "b").headers["x-budget-remaining-cost-usd"] == "0.000042"  # run b after this call's hold
    assert run_scope(p, "b")["used"]["cost_usd"] == 0.000042


def test_a_runs_wall_clock_counts_from_its_own_first_request(up, store_url):
    clock = FakeClock()
    p = up(teams({"wall_clock": "60s"}), clock=clock, store=store_url)
    assert budget(p, "late")["scopes"][0]["used"]["wall_clock"] == 0  # /budget starts no clock
    call(p, "early")
    clock.advance(30)
    call(p, "late")          # its clock starts now, 30 s after early's
    clock.advance(29)
    assert run_scope(p, "early")["used"]["wall_clock"] == 59.0
    assert run_scope(p, "late")["remaining"]["wall_clock"] == 31.0
    call(p, "early")
    clock.advance(1)
    e = denied(p, "early", "wall_clock")
    assert e.body["budget"] == {"scope": "run", "name": "early", "dimension": "wall_clock", "limit": 60.0,
                                "used": 60.0, "resets_at": None}
    assert "wall-clock budget of run 'early' of key 'agent' of team 'research' is spent: 60.0 s of 60.0 s" \
        in e.message
    call(p, "late")          # 30 s into its own minute
    clock.advance(30)
    denied(p, "late", "wall_clock")
    call(p, None)            # the key has no wall clock of its own


# --- what a run's denial says ------------------------------------------------------------------------

def test_a_runs_429_names_the_run_its_key_and_team(up):
    p = up(teams({"steps": 1}, key_budget={"steps": 5, "period": "day"}))
    call(p, "job-42")
    e = denied(p, "job-42", "steps")
    assert e.body["budget"]["scope"] == "run" and e.body["budget"]["name"] == "job-42"
    msg = e.body["error"]["message"]
    assert msg == ("Budget exceeded: step budget of run 'job-42' of key 'agent' of team 'research' is spent: "
                   "1 of 1 steps used; it has no reset period.")
    assert AGENT_KEY not in msg
    h = e.response.headers
    assert h["x-should-retry"] == "false" and h["x-budget-exceeded"] == "steps"
    assert "retry-after" not in h and "x-budget-resets-at" not in h  # a run never resets
    assert e.body["request_id"] == h["request-id"]


def test_when_the_key_runs_out_first_the_429_names_the_key_not_the_run(up):
    p = up(teams({"steps": 5}, key_budget={"steps": 1}))
    call(p, "r")
    e = denied(p, "r", "steps", scope="key")
    assert e.body["budget"]["name"] == "agent" and "of key 'agent' of team 'research'" in e.message


def test_the_remaining_headers_count_the_run_scope(up):
    p = up(teams({"tokens": 100, "steps": 3}, key_budget={"tokens": 1000, "steps": 50}))
    r = call(p, "r")
    # tightest across run, key and team, after this call's hold (14 tokens, one step)
    assert r.headers["x-budget-remaining-tokens"] == "86" and r.headers["x-budget-remaining-steps"] == "2"
    r = call(p, None)  # no run: the key's
    assert r.headers["x-budget-remaining-tokens"] == str(1000 - 14 - 14)
    assert r.headers["x-budget-remaining-steps"] == str(50 - 2)


def test_a_stream_cut_by_its_run_says_so(up, sim):
    p = up(teams({"tokens": 40}), admission={"clamp_max_tokens": False})
    # 8 deltas of 30 bytes = 10 estimated tokens each; the hold is what the run has: 40 - 7 input = 33
    sim.queue(Reply(chunks=["abcdefghijklmnopqrstuvwxyz123 "] * 8, input_tokens=EST, output_tokens=80))
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(p, "r1").messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    e = exc.value
    assert e.status_code == 200 and e.body["error"]["type"] == "rate_limit_error", e.body
    assert e.body["error"]["message"] == ("budget exceeded mid-stream: the tokens budget of run 'r1' of key 'agent' "
                                          "of team 'research' ran out")
    assert sim.wait_idle(5)
    scope = run_scope(p, "r1")
    assert scope["held"] == ZERO_HELD
    assert 40 < scope["used"]["tokens"] <= 40 + 10  # at most one metering interval past its limit


# --- the header: validated on every key, required where configured ----------------------------------

@pytest.mark.parametrize("bad", ["", "has space", "a/b", "run@1", "x" * 129, "tab\there", "semi;colon", "é"])
def test_an_invalid_run_id_is_a_400_on_every_key(up, bad):
    p = up()
    for key in (AGENT_KEY, PLAIN_KEY):
        r = httpx.post(p.url + "/v1/messages", json={"model": HAIKU, "max_tokens": 7, "messages": MSG},
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                                "x-budget-run": bad.encode("utf-8")})
        assert r.status_code == 400, (key, bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "x-budget-run must be 1-128 characters" in r.json()["error"]["message"]
        g = httpx.get(p.url + "/budget", headers={"x-api-key": key, "x-budget-run": bad.encode("utf-8")})
        assert g.status_code == 400, (key, bad, g.text)
    assert p.sim.messages_requests() == []


def test_an_invalid_run_id_through_the_sdk(up):
    p = up()
    with pytest.raises(anthropic.BadRequestError):
        call(p, "not valid", key=PLAIN_KEY)
    longest = "A-z.0_9:" * 16  # 128 characters, every kind allowed
    call(p, longest, key=PLAIN_KEY)   # a key without run_budget accepts a valid header ...
    assert [s["scope"] for s in budget(p, longest, PLAIN_KEY)["scopes"]] == ["key", "team"]  # ... and ignores it
    call(p, longest)
    assert run_scope(p, longest)["used"]["steps"] == 1


def test_the_run_header_is_not_forwarded_upstream(up):
    p = up()
    call(p, "r1")
    sent = p.sim.messages_requests()[-1].headers
    assert "x-budget-run" not in sent


def test_runs_required_makes_the_header_mandatory(up):
    p = up(teams({"steps": 3}, runs="required"))
    with pytest.raises(anthropic.BadRequestError) as exc:
        call(p, None)
    assert "requires an x-budget-run header" in exc.value.body["error"]["message"]
    assert p.sim.messages_requests() == []
    call(p, "r1")
    call(p, None, key=PLAIN_KEY)  # another key of the team is not bound by it
    # /budget without the header still answers (the key's and team's scopes)
    assert [s["scope"] for s in budget(p)["scopes"]] == ["key", "team"]


# --- GET /budget -----------------------------------------------------------------------------------

def test_budget_with_the_header_lists_the_run_scope_first(up):
    p = up(teams({"tokens": 1000, "steps": 4, "wall_clock": "30m"}, key_budget={"steps": 100}))
    call(p, "r1"), call(p, "r1")
    doc = budget(p, "r1")
    assert doc["key"] == "agent" and doc["team"] == "research"
    assert [(s["scope"], s["name"]) for s in doc["scopes"]] == [("run", "r1"), ("key", "agent"), ("team", "research")]
    run = doc["scopes"][0]
    assert run["period"] == "none" and run["resets_at"] is None
    assert run["limit"] == {"tokens": 1000, "steps": 4, "wall_clock": 1800.0}
    assert run["used"] == {"tokens": 28, "input_tokens": 14, "output_tokens": 14, "cost_usd": 0.000084, "steps": 2,
                           "wall_clock": run["used"]["wall_clock"]}
    assert run["held"] == ZERO_HELD
    assert run["remaining"]["tokens"] == 972 and run["remaining"]["steps"] == 2
    fresh = budget(p, "never-called")["scopes"][0]
    assert fresh["used"]["steps"] == 0 and fresh["remaining"]["steps"] == 4
    assert [s["scope"] for s in budget(p)["scopes"]] == ["key", "team"]


# --- many calls at once across the runs of one key ----------------------------------------------------

# Every call asks for 7 input + 100 output and the simulator generates all 100 (10 deltas of 30 bytes,
# 10 estimated tokens each): a full hold is used whole, so nothing frees room for a partial one to grow
# into. Per run, 250 tokens hold two whole calls (214) and a third of 36 (7 + 29 output); the team's
# 1100 hold ten whole calls and a partial one of 30: every run wants 250, all five 1250, so both the
# runs and the team deny. All admitted calls wait at a gate until every call has been admitted or
# denied, so the holds of all of them are in flight together.
CHUNKS = ["abcdefghijklmnopqrstuvwxyz123 "] * 10
DELTA_TOKENS = 10
RUNS, PER_RUN, MAX = 5, 8, 100                   # 40 calls
RUN_LIMIT, TEAM_LIMIT = 250, 1100


async def _one(url: str, run: str, stream: bool) -> tuple[str, str, int]:
    """(run, outcome, output tokens) of one call through AsyncAnthropic."""
    async with anthropic.AsyncAnthropic(base_url=url, api_key=AGENT_KEY, max_retries=0,
                                        default_headers={"x-budget-run": run}) as c:
        try:
            if stream:
                async with c.messages.stream(model=HAIKU, max_tokens=MAX, messages=MSG) as s:
                    final = await s.get_final_message()
            else:
                final = await c.messages.create(model=HAIKU, max_tokens=MAX, messages=MSG)
            return run, "ok", final.usage.output_tokens
        except anthropic.RateLimitError as e:
            assert e.body["budget"]["scope"] in ("run", "team"), e.body
            return run, "denied:" + e.body["budget"]["scope"], 0
        except anthropic.APIStatusError as e:
            if e.status_code == 200:  # the proxy cut the stream
                return run, "cut", 0
            raise


async def _fan_out(url: str, sim, streams_only: bool) -> list[tuple[str, str, int]]:
    """All calls at once; every admitted one waits at the gate until all have been admitted or denied."""
    n = RUNS * PER_RUN
    tasks = [asyncio.ensure_future(_one(url, f"run-{i % RUNS}", streams_only or i % 2 == 0)) for i in range(n)]
    try:
        deadline = time.monotonic() + 20
        while True:
            done = sum(t.done() for t in tasks)
            if await asyncio.to_thread(sim.wait_at_gate, "g", n - done, 0.05):
                break
            assert time.monotonic() < deadline, f"{done} answered, the rest not all at the gate"
    finally:
        sim.open_gate("g")
    return list(await asyncio.gather(*tasks))


@pytest.mark.parametrize("clamp", [True, False], ids=["clamp-on", "clamp-off"])
def test_concurrent_calls_across_five_runs_of_one_key_keep_every_bound(up, sim, clamp, store_url, capsys):
    p = up(teams({"tokens": RUN_LIMIT}, team_budget={"tokens": TEAM_LIMIT}), store=store_url,
           admission={"clamp_max_tokens": clamp})
    sim.default = Reply(chunks=CHUNKS, input_tokens=EST, output_tokens=MAX, gate="g")
    results = asyncio.run(_fan_out(p.url, sim, streams_only=not clamp))
    assert sim.wait_idle(10)

    outcomes = Counter(o for _, o, _ in results)
    cuts = Counter(r for r, o, _ in results if o == "cut")
    runs = {f"run-{i}": run_scope(p, f"run-{i}") for i in range(RUNS)}
    key_s, team_s = budget(p)["scopes"]
    with capsys.disabled():
        print(f"\n  [{store_url.split(':')[0]}, {'clamp on, half streams' if clamp else 'clamp off, streams'}] "
              f"{len(results)} calls across {RUNS} runs: "
              f"admitted {outcomes['ok'] + outcomes['cut']} (cut {outcomes['cut']}), "
              f"denied {outcomes['denied:run'] + outcomes['denied:team']} "
              f"(by a run {outcomes['denied:run']}, by the team {outcomes['denied:team']})")
        for name, s in runs.items():
            print(f"    {name}: used {s['used']['tokens']} of {RUN_LIMIT} tokens, {s['used']['steps']} steps"
                  f", cut {cuts[name]}")
        print(f"    key agent: used {key_s['used']['tokens']} tokens (no limit); "
              f"team research: used {team_s['used']['tokens']} of {TEAM_LIMIT}")

    # every call ended one way or another, and nothing is left held anywhere
    assert sum(outcomes.values()) == RUNS * PER_RUN and outcomes["ok"] >= RUNS
    for s in (*runs.values(), key_s, team_s):
        assert s["held"] == ZERO_HELD, s
    # the key and the team are charged exactly what the runs were: every call named a run
    assert key_s["used"]["tokens"] == team_s["used"]["tokens"] == sum(s["used"]["tokens"] for s in runs.values())
    assert team_s["used"]["steps"] == outcomes["ok"] + outcomes["cut"]
    if clamp:
        # input estimated exactly: the bound is no overshoot at all, in every scope
        assert outcomes["cut"] == 0
        assert all(s["used"]["tokens"] <= RUN_LIMIT for s in runs.values())
        assert team_s["used"]["tokens"] <= TEAM_LIMIT
    else:
        # one metering interval (one delta, 10 estimated tokens) per stream cut, in each scope it counts in
        for name, s in runs.items():
            assert s["used"]["tokens"] <= RUN_LIMIT + DELTA_TOKENS * cuts[name], (name, s["used"])
        assert team_s["used"]["tokens"] <= TEAM_LIMIT + DELTA_TOKENS * outcomes["cut"]
    # a run's own limit was what stopped some of them: the team alone would have admitted more
    assert any(s["used"]["tokens"] > RUN_LIMIT - (EST + MAX) for s in runs.values())


# --- run_ttl: a run is forgotten run_ttl after its last request ---------------------------------------

def _sqlite_rows(path: str) -> dict[str, float | None]:
    db = sqlite3.connect(path)
    try:
        return {sid: exp for sid, exp in db.execute("SELECT scope_id, expires_at FROM totals WHERE scope_id LIKE 'run:%'")}
    finally:
        db.close()


def _wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_run_is_forgotten_run_ttl_after_its_last_request(up, tmp_path, kind):
    clock = FakeClock()
    path = f"{tmp_path}/ledger.db"
    store = "memory://" if kind == "memory" else f"sqlite:///{path}"
    p = up(teams({"steps": 1, "wall_clock": "10m"}), clock=clock, store=store, admission={"run_ttl": "1h"})
    book = p.state.store.book
    call(p, "kept"), call(p, "gone")
    denied(p, "kept", "steps")
    clock.advance(3599)
    denied(p, "kept", "steps")         # a request (denied or not) keeps its run another hour
    assert run_scope(p, "gone")["used"]["steps"] == 1
    clock.advance(1)                   # "gone": an hour since its last request
    assert run_scope(p, "gone")["used"] == {"tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
                                            "steps": 0, "wall_clock": 0.0}
    assert ("run:research/agent/gone", 0.0) not in book.totals
    call(p, "gone")                    # a new run of that id: its budget and its wall clock start again
    assert run_scope(p, "gone")["used"]["steps"] == 1 and run_scope(p, "gone")["used"]["wall_clock"] == 0.0
    denied(p, "kept", "steps")         # (kept alive by its denials, still spent)
    clock.advance(3600)
    call(p, "kept")
    if kind == "sqlite":  # the rows of forgotten runs leave the ledger too
        rows = _sqlite_rows(path)
        assert rows["run:research/agent/kept"] == clock.t + 3600
    # runs nobody asks for again are forgotten by later requests (at most RUN_FORGET_MAX each)
    for i in range(2 * RUN_FORGET_MAX):
        call(p, f"idle-{i}")
    assert len(book.runs) == 2 * RUN_FORGET_MAX + 1  # the idle ones and kept ("gone" went with kept's call)
    clock.advance(3601)
    call(p, None), call(p, None)       # a request without a run forgets due runs too, 16 each ...
    assert len(book.runs) == 1
    call(p, None)
    assert not any(sid.startswith("run:") for sid, _ in book.totals)
    assert list(book.runs) == []       # ... so all of them: kept, gone and the idle ones
    if kind == "sqlite":
        assert _wait_for(lambda: _sqlite_rows(path) == {}), _sqlite_rows(path)


def test_a_run_in_flight_is_not_forgotten(up, sim):
    clock = FakeClock()
    p = up(teams({"tokens": 100}), clock=clock, admission={"run_ttl": "60s"})
    sim.queue(Reply(input_tokens=EST, gate="slow"))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(call, p, "long")
        try:
            assert sim.wait_at_gate("slow", 1, 5)
            clock.advance(120)         # its ttl has passed while its request is in flight
            call(p, "other")           # (a reserve: it forgets what is due)
            assert run_scope(p, "long")["held"]["tokens"] == 14
        finally:
            sim.open_gate("slow")
        assert slow.result(5).parse().usage.output_tokens == 7
    assert run_scope(p, "long")["used"]["tokens"] == 14 and run_scope(p, "long")["held"] == ZERO_HELD
    clock.advance(60)                  # a ttl after it was found in flight
    call(p, "other")
    assert run_scope(p, "long")["used"]["tokens"] == 0


def test_a_sqlite_run_survives_a_restart_until_its_ttl_and_not_after(start, sim, tmp_path):
    sim.default = Reply(input_tokens=EST)
    clock = FakeClock()
    path = f"{tmp_path}/ledger.db"
    cfg = dict(teams=teams({"steps": 1}), clock=clock, store=f"sqlite:///{path}", admission={"run_ttl": "1h"})
    p = start(**cfg)
    p.sim = sim
    call(p, "r1"), call(p, "r2")
    p.stop()
    clock.advance(1800)
    p = start(**cfg)
    p.sim = sim
    denied(p, "r1", "steps")           # still spent, read back from disk; the denial keeps it an hour more
    assert _wait_for(lambda: _sqlite_rows(path).get("run:research/agent/r1") == clock.t + 3600)
    p.stop()
    clock.advance(3599)                # r1: just under an hour since its last (denied) request; r2: 90 minutes
    p = start(**cfg)
    p.sim = sim
    assert run_scope(p, "r2")["used"]["steps"] == 0  # a row past its expiry counts as nothing ...
    call(p, None)                                    # ... and the sweep deletes it
    assert _wait_for(lambda: list(_sqlite_rows(path)) == ["run:research/agent/r1"]), _sqlite_rows(path)
    denied(p, "r1", "steps")
    p.stop()
    clock.advance(3600)
    p = start(**cfg)
    p.sim = sim
    call(p, "r1")                      # forgotten: a new run of that id
    assert run_scope(p, "r1")["used"]["steps"] == 1


def test_a_redis_run_expires_run_ttl_after_its_last_request(up, redis_prefix):
    prefix, r = redis_prefix
    p = up(teams({"steps": 1}), store=redis_url(prefix), admission={"run_ttl": "2s"})
    call(p, "r1")
    totals = f"{prefix}T:run:research/agent/r1@0"
    assert 1500 < r.pttl(totals) <= 2000               # a run's totals live run_ttl from its last request
    assert r.pttl(f"{prefix}T:key:research/agent@0") == -1  # (a key's without period: for ever)
    assert r.zrange(f"{prefix}R:research/agent", 0, -1) == [b"r1"]
    time.sleep(1.0)
    denied(p, "r1", "steps")                             # a denied request keeps it alive too
    assert r.pttl(totals) > 1500
    time.sleep(2.2)
    assert not r.exists(totals)                          # Redis itself forgot it: nothing to sweep
    assert not r.exists(f"{prefix}R:research/agent")     # (and the key's index of runs with its last run)
    assert run_scope(p, "r1")["used"]["steps"] == 0
    call(p, "r1")                                        # the same id: a new run
    assert run_scope(p, "r1")["used"]["steps"] == 1


# --- one run, two proxies on one Redis -------------------------------------------------------------

def test_a_run_is_shared_by_two_proxies_on_one_redis(start, sim, redis_prefix):
    prefix, _ = redis_prefix
    sim.default = Reply(input_tokens=EST)
    a = start(teams=teams({"steps": 3, "tokens": 1000}), store=redis_url(prefix))
    b = start(teams=teams({"steps": 3, "tokens": 1000}), store=redis_url(prefix))
    a.sim = b.sim = sim
    call(a, "shared"), call(b, "shared"), call(a, "shared")
    for p in (a, b):
        e = denied(p, "shared", "steps")
        assert e.body["budget"]["used"] == 3
        assert run_scope(p, "shared")["used"]["tokens"] == 42
    call(b, "other")  # another run of the key, on either
    assert run_scope(a, "other")["used"]["steps"] == 1


# --- GET /admin/runs ----------------------------------------------------------------------------------

def test_admin_runs_lists_a_keys_active_runs_newest_first(up, store_url):
    clock = FakeClock()
    p = up(teams({"steps": 5, "tokens": 1000}), clock=clock, store=store_url, admin_key=ADMIN,
           admission={"run_ttl": "1d"})
    admin = {"authorization": f"Bearer {ADMIN}"}
    for run, calls in (("first", 3), ("second", 1), ("third", 2)):
        for _ in range(calls):
            call(p, run)
        clock.advance(60)
    call(p, None)
    r = httpx.get(p.url + "/admin/runs", params={"team": "research", "key": "agent", "limit": "2"}, headers=admin)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["team"], doc["key"], doc["run_ttl"], doc["active"]) == ("research", "agent", 86400.0, 3)
    assert [x["name"] for x in doc["runs"]] == ["third", "second"]
    third = doc["runs"][0]
    assert third["scope"] == "run" and third["used"]["steps"] == 2 and third["limit"] == {"tokens": 1000, "steps": 5}
    assert third["remaining"]["steps"] == 3 and third["held"] == ZERO_HELD
    if not store_url.startswith("redis"):  # (Redis dates it by its own clock)
        assert third["expires_at"] == dt.datetime.fromtimestamp(T0 + 120 + 86400, dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    full = httpx.get(p.url + "/admin/runs", params={"team": "research", "key": "agent"}, headers=admin).json()
    assert [x["name"] for x in full["runs"]] == ["third", "second", "first"]
    assert httpx.get(p.url + "/admin/runs", params={"team": "research", "key": "plain"},
                     headers=admin).json()["runs"] == []
    for params, status in (({"team": "research"}, 400), ({"team": "nope", "key": "agent"}, 404),
                           ({"team": "research", "key": "nope"}, 404),
                           ({"team": "research", "key": "agent", "limit": "0"}, 400),
                           ({"team": "research", "key": "agent", "limit": "x"}, 400)):
        assert httpx.get(p.url + "/admin/runs", params=params, headers=admin).status_code == status, params
    assert httpx.get(p.url + "/admin/runs", params={"team": "research", "key": "agent"},
                     headers={"x-api-key": AGENT_KEY}).status_code == 403
    assert httpx.get(p.url + "/admin/runs", params={"team": "research", "key": "agent"}).status_code == 401
