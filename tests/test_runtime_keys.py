"""Runtime keys (docs/http-api.md, "Runtime keys"): minted, listed and revoked through the admin
API, used with the official anthropic SDK through the real proxy in front of the simulator.

- create / use / revoke, expiry on an injected clock, and the 401 messages that say why;
- the 404 / 409 / 400 cases, and a listing that never shows a secret;
- the store contract of the three stores (put, find, list, revoke, names, retention);
- the auth cache: one store read per distinct digest per CACHE_SECONDS, bounded memory;
- SQLite: keys survive a restart and show in `budget-proxy usage`;
- Redis: two proxies on one Redis and prefix share keys; a revocation through one is refused by
  the other within 1 s (measured: run with -s to see the figures);
- `budget-proxy keys create|list|revoke` against a running proxy.

Redis is 127.0.0.1:6379 DB 11 (no other test uses it), a fresh prefix per test, deleted after
(skipped without Redis unless BUDGET_PROXY_REQUIRE_REDIS is set).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest
import yaml

from proxy.__main__ import main
from proxy.config import key_digest, load_config
from proxy.errors import AuthenticationError
from proxy.runtime_keys import CACHE_ENTRIES, CACHE_SECONDS, BoundedMap, RuntimeKeys
from proxy.store import open_store
from proxy.store.base import KEY_RETENTION_S, KeyRecord
from proxy.store.memory import MemoryStore
from proxy.store.sqlite import SqliteStore
from tests.conftest import ALPHA_KEY, default_teams
from tests.harness import ProxyServer, fresh_redis_url, start_proxy
from tests.simulator import AnthropicSimulator

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bp-test-admin-runtime-keys-0001"
REDIS_DB = 11
MSG = [{"role": "user", "content": "Say hello"}]
HAIKU = "claude-haiku-4-5"


# --- helpers -------------------------------------------------------------------------------------
def admin(proxy: ProxyServer, key: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {key}"}, timeout=10)


def create(proxy: ProxyServer, **body: Any) -> dict[str, Any]:
    r = admin(proxy).post("/admin/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def sdk(proxy: ProxyServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0)


def ask(proxy: ProxyServer, key: str, model: str = HAIKU, **kw: Any) -> Any:
    return sdk(proxy, key).messages.create(model=model, max_tokens=50, messages=MSG, **kw)


def refused(proxy: ProxyServer, key: str) -> str:
    """The 401 message a key gets on /v1/messages."""
    with pytest.raises(anthropic.AuthenticationError) as info:
        ask(proxy, key)
    assert info.value.status_code == 401
    return info.value.body["error"]["message"]  # type: ignore[index]


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def key_usage(proxy: ProxyServer, team: str, name: str) -> dict[str, Any] | None:
    doc = admin(proxy).get("/admin/usage").json()
    keys = next(t for t in doc["teams"] if t["name"] == team)["keys"]
    return next((k["budget"] for k in keys if k["name"] == name), None)


class Clock:
    """An injected app clock (expiry and budgets run on it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def proxy(start: Callable[..., ProxyServer]) -> ProxyServer:
    return start(admin_key=ADMIN)


# --- create, use, revoke ---------------------------------------------------------------------------
def test_a_created_key_calls_is_metered_on_its_own_scope_and_is_refused_once_revoked(proxy: ProxyServer) -> None:
    made = create(proxy, team="research", name="run-1", budget={"tokens": 100000, "period": "day"})
    assert made["team"] == "research" and made["name"] == "run-1" and made["expires_at"] is None
    assert made["key"].startswith("bp-") and len(made["key"]) >= 32
    msg = ask(proxy, made["key"])
    assert msg.content[0].text
    budget = httpx.get(proxy.url + "/budget", headers={"x-api-key": made["key"]}).json()
    assert (budget["key"], budget["team"]) == ("run-1", "research")
    assert [s["scope"] for s in budget["scopes"]] == ["key", "team"]
    assert budget["scopes"][0]["limit"] == {"tokens": 100000}
    used = key_usage(proxy, "research", "run-1")
    assert used is not None and used["used"]["tokens"] == msg.usage.input_tokens + msg.usage.output_tokens
    assert admin(proxy).delete("/admin/keys/research/run-1").status_code == 204
    assert refused(proxy, made["key"]) == "This proxy key was revoked."
    assert admin(proxy).delete("/admin/keys/research/run-1").status_code == 204  # (idempotent)
    assert key_usage(proxy, "research", "run-1") is None  # a key that no longer works is not listed
    listed = admin(proxy).get("/admin/keys", params={"team": "research"}).json()["keys"]
    assert next(k for k in listed if k["name"] == "run-1")["revoked"] is True
    assert ask(proxy, ALPHA_KEY).content  # config keys are untouched


def test_a_runtime_key_budget_denies_naming_the_key(proxy: ProxyServer) -> None:
    made = create(proxy, team="research", name="tiny", budget={"tokens": 1})
    with pytest.raises(anthropic.RateLimitError) as info:
        ask(proxy, made["key"])
    budget = info.value.body["budget"]  # type: ignore[index]
    assert (budget["scope"], budget["name"]) == ("key", "tiny")


def test_a_runtime_key_run_budget_and_allow_list_apply(proxy: ProxyServer) -> None:
    made = create(proxy, team="support", name="agent-7", run_budget={"steps": 1}, runs="required",
                  models=["claude-haiku-*"])
    with pytest.raises(anthropic.BadRequestError):  # runs: required, no x-budget-run
        ask(proxy, made["key"])
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(proxy, made["key"], model="claude-sonnet-5-5", extra_headers={"x-budget-run": "r1"})
    assert ask(proxy, made["key"], extra_headers={"x-budget-run": "r1"}).content
    with pytest.raises(anthropic.RateLimitError) as info:
        ask(proxy, made["key"], extra_headers={"x-budget-run": "r1"})
    assert info.value.body["budget"]["scope"] == "run"  # type: ignore[index]
    assert ask(proxy, made["key"], extra_headers={"x-budget-run": "r2"}).content  # another run, its own budget


def test_a_name_is_generated_when_none_is_given(proxy: ProxyServer) -> None:
    a, b = create(proxy, team="research"), create(proxy, team="research")
    assert a["name"] != b["name"] and a["key"] != b["key"]
    names = [k["name"] for k in admin(proxy).get("/admin/keys").json()["keys"]]
    assert a["name"] in names and b["name"] in names
    assert ask(proxy, a["key"]).content


# --- expiry and the 401 messages ----------------------------------------------------------------
def test_a_key_expires_on_the_app_clock_and_says_so(start: Callable[..., ProxyServer]) -> None:
    clock = Clock()
    proxy = start(admin_key=ADMIN, clock=clock)
    made = create(proxy, team="research", name="short", expires_in="2h")
    assert made["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now + 7200))
    assert ask(proxy, made["key"]).content
    clock.now += 7200 - 1
    assert ask(proxy, made["key"]).content
    clock.now += 1
    assert refused(proxy, made["key"]) == f"This proxy key expired at {made['expires_at']}."
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now + 60))
    made = create(proxy, team="research", name="until", expires_at=at)
    assert made["expires_at"] == at and ask(proxy, made["key"]).content
    clock.now += 61
    assert refused(proxy, made["key"]) == f"This proxy key expired at {at}."
    assert key_usage(proxy, "research", "until") is None


def test_unknown_keys_get_the_plain_401(proxy: ProxyServer) -> None:
    assert refused(proxy, "bp-not-a-key-at-all-0000000000000") == "Invalid proxy key."


# --- admin errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "words"), [
    ({"team": "nobody"}, 404, "No team named 'nobody'"),
    ({"team": "research", "name": "alpha"}, 409, "already has a key named 'alpha'"),
    ({"team": "research", "budget": {"tokens": -1}}, 400, "budget.tokens"),
    ({"team": "research", "budget": {"cost_usd": "lots"}}, 400, "budget.cost_usd"),
    ({"team": "research", "budget": {"period": "fortnight"}}, 400, "budget.period"),
    ({"team": "research", "budget": {"tokenz": 5}}, 400, "budget.tokenz"),
    ({"team": "research", "run_budget": {"steps": 3, "period": "day"}}, 400, "run_budget"),
    ({"team": "research", "runs": "sometimes"}, 400, "runs"),
    ({"team": "research", "name": "has space"}, 400, "name"),
    ({"team": "research", "expires_in": "soon"}, 400, "expires_in"),
    ({"team": "research", "expires_in": "2h", "expires_at": "2099-01-01T00:00:00Z"}, 400, "not both"),
    ({"team": "research", "expires_at": "2001-01-01T00:00:00Z"}, 400, "expires_at"),
    ({"team": "research", "expires_in": 1e300}, 400, "expires_in"),
    ({"team": "research", "expires_in": 0}, 400, "expires_in"),
    ({"team": "research", "models": "claude-*"}, 400, "models"),
    ({"name": "x"}, 400, "team"),
])
def test_create_refusals(proxy: ProxyServer, body: dict[str, Any], status: int, words: str) -> None:
    assert words in error_of(admin(proxy).post("/admin/keys", json=body), status)


def test_a_runtime_name_is_taken_once_per_team(proxy: ProxyServer) -> None:
    create(proxy, team="research", name="dup")
    assert "already has a key named 'dup'" in error_of(admin(proxy).post("/admin/keys", json={
        "team": "research", "name": "dup"}), 409)
    assert create(proxy, team="support", name="dup")["name"] == "dup"  # another team: free


def test_body_that_is_not_a_json_object_is_400(proxy: ProxyServer) -> None:
    assert "not JSON" in error_of(admin(proxy).post("/admin/keys", content=b"{nope"), 400)
    assert "JSON object" in error_of(admin(proxy).post("/admin/keys", json=["research"]), 400)
    assert admin(proxy).post("/admin/keys", json={"team": "research", "name": "x" * 70_000}).status_code == 413


def test_revoke_refusals(proxy: ProxyServer) -> None:
    assert "edit the config" in error_of(admin(proxy).delete("/admin/keys/research/alpha"), 409)
    assert "no runtime key named 'ghost'" in error_of(admin(proxy).delete("/admin/keys/research/ghost"), 404)
    assert ask(proxy, ALPHA_KEY).content


def test_the_key_routes_need_the_admin_key(proxy: ProxyServer) -> None:
    made = create(proxy, team="research", name="mine")
    for key, status in ((ALPHA_KEY, 403), (made["key"], 403), ("bp-wrong-admin-0000000000", 401)):
        c = admin(proxy, key)
        assert c.post("/admin/keys", json={"team": "research"}).status_code == status
        assert c.get("/admin/keys").status_code == status
        assert c.delete("/admin/keys/research/mine").status_code == status
        assert c.get("/admin/dashboard").status_code == status
    assert ask(proxy, made["key"]).content


def test_listing_shows_every_key_and_never_a_secret(proxy: ProxyServer) -> None:
    made = [create(proxy, team="research", name="l1", budget={"cost_usd": 2.5, "wall_clock": "30m"},
                   run_budget={"steps": 40}, models=["claude-*"], expires_in="1d"),
            create(proxy, team="support", name="l2")]
    r = admin(proxy).get("/admin/keys")
    assert r.status_code == 200
    for m in made:
        assert m["key"] not in r.text and key_digest(m["key"]).removeprefix("sha256:") not in r.text
    assert ALPHA_KEY not in r.text
    keys = {(k["team"], k["name"]): k for k in r.json()["keys"]}
    assert set(keys) == {("research", "alpha"), ("research", "beta"), ("support", "gamma"),
                         ("research", "l1"), ("support", "l2")}
    assert all("key" not in k for k in keys.values())
    l1 = keys[("research", "l1")]
    assert l1["origin"] == "runtime" and l1["revoked"] is False and l1["created_at"] and l1["expires_at"]
    assert l1["budget"] == {"cost_usd": 2.5, "wall_clock": 1800.0, "period": "none"}
    assert l1["run_budget"] == {"steps": 40, "period": "none"} and l1["models"] == ["claude-*"]
    gamma = keys[("support", "gamma")]
    assert gamma["origin"] == "config" and gamma["models"] == ["claude-haiku-*"] and gamma["expires_at"] is None
    only = admin(proxy).get("/admin/keys", params={"team": "support"}).json()["keys"]
    assert {k["name"] for k in only} == {"gamma", "l2"}
    assert "No team named" in error_of(admin(proxy).get("/admin/keys", params={"team": "nope"}), 404)


def test_runtime_keys_show_in_usage_team_and_dashboard_and_can_be_reset(proxy: ProxyServer) -> None:
    made = create(proxy, team="research", name="dash-key", budget={"tokens": 5000})
    ask(proxy, made["key"])
    team = admin(proxy).get("/admin/teams/research").json()
    assert "dash-key" in [k["name"] for k in team["keys"]]
    html = admin(proxy).get("/admin/dashboard").text
    assert "dash-key" in html and made["key"] not in html
    r = admin(proxy).post("/admin/teams/research/keys/dash-key/reset")
    assert r.status_code == 200, r.text
    assert key_usage(proxy, "research", "dash-key")["used"]["tokens"] == 0  # type: ignore[index]


# --- the stores' contract -------------------------------------------------------------------------
@pytest.fixture
def redis_url() -> Iterator[str]:
    yield from fresh_redis_url(REDIS_DB, "test-keys")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("redis_url")


def record(team: str = "t", name: str = "k", secret: str = "s1", created: float = 1000.0,
           expires: float | None = None) -> KeyRecord:
    return KeyRecord(team, name, key_digest(secret), {"tokens": 10, "cost_usd": "0.1", "period": "day"},
                     {"steps": 3, "period": "none"}, "required", ("claude-*",), created, expires)


async def test_store_contract_for_runtime_keys(store_url: str) -> None:
    s: Any = open_store(store_url)
    await s.open()
    try:
        a, b = record(secret="s1"), record(name="k2", secret="s2", created=1001.0, expires=5000.0)
        assert await s.put_key(a, 1000.0) and await s.put_key(b, 1001.0)
        assert not await s.put_key(record(secret="s3"), 1002.0)  # (t, k) is taken
        assert await s.put_key(record(team="u", secret="s4"), 1002.0)  # another team: free
        assert await s.find_key(key_digest("s1")) == a and await s.find_key(key_digest("nope")) is None
        assert await s.find_key(key_digest("s3")) is None
        assert {(r.team, r.name) for r in await s.list_keys()} == {("t", "k"), ("t", "k2"), ("u", "k")}
        assert sorted(r.name for r in await s.list_keys("t")) == ["k", "k2"]
        revoked = await s.revoke_key("t", "k", 2000.5)
        assert revoked == a._replace(revoked_at=2000.5)
        assert (await s.revoke_key("t", "k", 3000.0)).revoked_at == 2000.5  # the first time stays
        assert await s.find_key(key_digest("s1")) == revoked
        assert await s.revoke_key("t", "ghost", 2000.0) is None
    finally:
        await s.close()


async def test_store_forgets_gone_keys_after_the_retention(tmp_path: Path) -> None:
    for s in (MemoryStore(), SqliteStore(str(tmp_path / "l.db"))):
        await s.open()
        try:
            await s.put_key(record(secret="a", expires=2000.0), 1000.0)
            assert not await s.put_key(record(secret="b"), 2000.0 + KEY_RETENTION_S - 1)
            assert await s.put_key(record(secret="b"), 2000.0 + KEY_RETENTION_S)  # the name is free again
            assert await s.find_key(key_digest("a")) is None
        finally:
            await s.close()


async def test_redis_keeps_a_gone_key_only_for_the_retention(redis_url: str) -> None:
    s: Any = open_store(redis_url)
    await s.open()
    try:
        now = time.time()
        await s.put_key(record(secret="a", created=now, expires=now + 60), now)
        await s.put_key(record(name="k2", secret="b", created=now), now)
        await s.revoke_key("t", "k2", now)
        ttl_a = await s._client.pttl(s.prefix + "key:" + key_digest("a"))
        ttl_b = await s._client.pttl(s.prefix + "key:" + key_digest("b"))
        assert abs(ttl_a / 1000 - (60 + KEY_RETENTION_S)) < 5 and abs(ttl_b / 1000 - KEY_RETENTION_S) < 5
        await s._client.delete(s.prefix + "key:" + key_digest("a"))  # as if its retention had passed
        assert [r.name for r in await s.list_keys()] == ["k2"]
        assert await s.put_key(record(secret="c", created=now), now)  # its name is free again
    finally:
        await s.close()


# --- the auth cache -------------------------------------------------------------------------------
class CountingStore(MemoryStore):
    def __init__(self, delay: float = 0.01) -> None:
        super().__init__()
        self.reads, self.delay = 0, delay

    async def find_key(self, digest: str) -> KeyRecord | None:
        self.reads += 1
        await asyncio.sleep(self.delay)  # (a store read takes a while: concurrent misses overlap)
        return await super().find_key(digest)


class FakeRuntime:
    class budgets:  # noqa: N801 (a stand-in for proxy/budgets.py Budgets)
        teams = {"t": object()}
        keys: dict[Any, Any] = {}


async def test_a_flood_of_wrong_keys_costs_one_read_per_digest_per_cache_period() -> None:
    store, now = CountingStore(), [0.0]
    keys = RuntimeKeys(store, monotonic=lambda: now[0])

    async def try_key(secret: str) -> str:
        try:
            await keys.caller(secret, FakeRuntime, 0.0)
        except AuthenticationError as err:
            return err.message
        return "ok"

    answers = await asyncio.gather(*(try_key("wrong") for _ in range(50)))
    assert set(answers) == {"Invalid proxy key."} and store.reads == 1  # concurrent misses share one read
    await asyncio.gather(*(try_key(f"wrong-{i}") for i in range(100)))
    assert store.reads == 101
    now[0] += CACHE_SECONDS / 2
    await asyncio.gather(*(try_key(f"wrong-{i}") for i in range(100)))
    assert store.reads == 101  # still cached
    now[0] += CACHE_SECONDS
    await try_key("wrong-1")
    assert store.reads == 102  # stale: read again


async def test_the_cache_sees_a_revocation_within_its_period() -> None:
    store, now = CountingStore(), [0.0]
    keys = RuntimeKeys(store, monotonic=lambda: now[0])
    await store.put_key(record(secret="s"), 0.0)
    caller = await keys.caller("s", FakeRuntime, 0.0)
    assert caller.scope is not None and caller.scope.id == "key:t/k" and caller.runs_required
    assert caller.scope.limits.tokens == 10 and caller.run_limits.steps == 3  # type: ignore[union-attr]
    await store.revoke_key("t", "k", 1.0)
    assert await keys.caller("s", FakeRuntime, 0.0) is caller  # within CACHE_SECONDS: the cached answer
    now[0] += CACHE_SECONDS
    with pytest.raises(AuthenticationError, match="was revoked"):
        await keys.caller("s", FakeRuntime, 0.0)


def test_the_cache_maps_are_bounded() -> None:
    m = BoundedMap(100)
    for i in range(10_000):
        m.put(f"d{i}", (float(i), None, None))
    assert list(m.entries) == [f"d{i}" for i in range(9_900, 10_000)]  # the latest reads
    m.put("d9900", (10_000.0, None, None))  # read again: the newest
    assert list(m.entries)[-1] == "d9900" and len(m.entries) == 100


async def test_memory_stays_bounded_under_a_flood_of_distinct_wrong_keys() -> None:
    store = CountingStore(delay=0)
    keys = RuntimeKeys(store)
    for i in range(CACHE_ENTRIES + 500):
        with pytest.raises(AuthenticationError):
            await keys.caller(f"flood-{i}", FakeRuntime, 0.0)
    assert len(keys.unknown.entries) == CACHE_ENTRIES and not keys.reading and not keys.known.entries


# --- SQLite: restarts and `budget-proxy usage` ---------------------------------------------------
def write_config(path: Path, sim: AnthropicSimulator, store: str) -> Path:
    path.write_text(yaml.safe_dump({
        "upstreams": {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream-secret"}},
        "store": store, "admin_key": ADMIN,
        "teams": default_teams()}))
    return path


def test_sqlite_keys_survive_a_restart_and_show_in_usage(tmp_path: Path, sim: AnthropicSimulator,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "proxy.yaml", sim, f"sqlite:///{tmp_path / 'ledger.db'}")
    proxy = start_proxy(load_config(config))
    try:
        kept = create(proxy, team="research", name="kept", budget={"tokens": 100000})
        gone = create(proxy, team="research", name="gone")
        msg = ask(proxy, kept["key"])
    finally:
        proxy.stop()
    proxy = start_proxy(load_config(config))
    try:
        assert ask(proxy, kept["key"]).content and ask(proxy, gone["key"]).content
        assert admin(proxy).delete("/admin/keys/research/gone").status_code == 204
        used = key_usage(proxy, "research", "kept")["used"]["tokens"]  # type: ignore[index]
        assert used == 2 * (msg.usage.input_tokens + msg.usage.output_tokens)
    finally:
        proxy.stop()
    proxy = start_proxy(load_config(config))
    try:
        assert refused(proxy, gone["key"]) == "This proxy key was revoked."
        assert ask(proxy, kept["key"]).content
    finally:
        proxy.stop()
    capsys.readouterr()
    assert main(["usage", "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    keys = {k["name"]: k["budget"] for k in doc["teams"][0]["keys"]}
    assert keys["kept"]["used"]["tokens"] == 3 * (msg.usage.input_tokens + msg.usage.output_tokens)
    assert "gone" not in keys
    assert main(["usage", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and kept["key"] not in out


# --- Redis: two proxies, one store ----------------------------------------------------------------
def first_refusal_after(url: str, key: str, since: float, limit: float = 3.0) -> float:
    """Seconds from `since` until `url` refuses `key` on /v1/messages (polled every 10 ms, bounded)."""
    body = {"model": HAIKU, "max_tokens": 5, "messages": MSG}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=url, timeout=5) as c:
        while True:
            status = c.post("/v1/messages", json=body, headers=headers).status_code
            now = time.monotonic()
            if status == 401:
                return now - since
            assert status == 200 and now - since < limit, (status, now - since)
            time.sleep(0.01)


def test_two_proxies_on_one_redis_share_keys_and_revocations(start: Callable[..., ProxyServer],
                                                             redis_url: str) -> None:
    a, b = start(admin_key=ADMIN, store=redis_url), start(admin_key=ADMIN, store=redis_url)
    made = create(a, team="research", name="shared", budget={"tokens": 100000})
    msg = ask(b, made["key"])
    used = key_usage(a, "research", "shared")["used"]  # type: ignore[index]
    assert used["tokens"] == msg.usage.input_tokens + msg.usage.output_tokens
    assert "already has a key named 'shared'" in error_of(admin(b).post("/admin/keys", json={
        "team": "research", "name": "shared"}), 409)
    assert {k["name"] for k in admin(b).get("/admin/keys").json()["keys"]} >= {"shared"}
    other, here = [], []
    for i in range(8):
        key = create(a, team="research", name=f"rev-{i}")["key"]
        assert ask(a, key).content and ask(b, key).content  # both replicas hold it in their caches
        time.sleep(i * CACHE_SECONDS / 8)  # revoke at every point of b's cache period
        assert ask(b, key).content
        assert admin(a).delete(f"/admin/keys/research/rev-{i}").status_code == 204
        revoked = time.monotonic()
        here.append(first_refusal_after(a.url, key, revoked))
        other.append(first_refusal_after(b.url, key, revoked))
        assert refused(b, key) == "This proxy key was revoked."
    print(f"\nrevocation -> 401, on the other replica: min {min(other):.3f} s, median "
          f"{statistics.median(other):.3f} s, max {max(other):.3f} s (n={len(other)}); "
          f"on the revoking replica: max {max(here):.3f} s")
    assert max(other) < 1.0


# --- the CLI ----------------------------------------------------------------------------------------
def test_cli_keys_create_list_revoke(proxy: ProxyServer, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BUDGET_PROXY_ADMIN_KEY", ADMIN)
    assert main(["keys", "create", "--team", "research", "--name", "cli-bot", "--budget",
                 "tokens=100000,cost_usd=2.5,period=day", "--run-budget", "steps=5,wall_clock=30m",
                 "--models", "claude-haiku-*", "--expires-in", "2h", "--url", proxy.url]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["name"] == "cli-bot" and made["key"].startswith("bp-") and made["expires_at"]
    assert ask(proxy, made["key"], extra_headers={"x-budget-run": "cli-run"}).content
    assert main(["keys", "--url", proxy.url, "list", "--team", "research"]) == 0
    out = capsys.readouterr().out
    assert "cli-bot" in out and "runtime" in out and "alpha" in out and made["key"] not in out
    assert main(["keys", "revoke", "research", "cli-bot", "--url", proxy.url]) == 0
    assert capsys.readouterr().out.strip() == "revoked research/cli-bot"
    assert refused(proxy, made["key"]) == "This proxy key was revoked."
    assert main(["keys", "create", "--team", "nobody", "--url", proxy.url]) == 1
    assert "error 404" in capsys.readouterr().err
    assert main(["keys", "revoke", "research", "alpha", "--url", proxy.url]) == 1
    assert "edit the config" in capsys.readouterr().err
    monkeypatch.delenv("BUDGET_PROXY_ADMIN_KEY")
    assert main(["keys", "list", "--url", proxy.url]) == 1
    assert "BUDGET_PROXY_ADMIN_KEY" in capsys.readouterr().err


def test_cli_keys_as_a_user_runs_it(proxy: ProxyServer) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "BUDGET_PROXY_ADMIN_KEY": ADMIN}
    run = [sys.executable, "-m", "proxy", "keys"]
    r = subprocess.run([*run, "create", "--team", "support", "--url", proxy.url], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert ask(proxy, made["key"]).content
    r = subprocess.run([*run, "list", "--url", proxy.url], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and made["name"] in r.stdout and made["key"] not in r.stdout
