"""Budget alert webhooks (docs/budgets.md "Alerts"; proxy/alerts.py, proxy/alerting.py).

- The pure rules: thresholds reached (exactly), event keys, claim TTLs, event bodies, the retry
  schedule, how a webhook is named in logs.
- Every store's claim_alert: once per key (memory, SQLite across a reopen, Redis across two stores).
- Through the real proxy (simulator, anthropic SDK) and a loopback webhook receiver: a key crossing
  80 %, 95 % and its limit yields exactly threshold 0.8, threshold 0.95 and budget.exceeded, once
  each; the same on two proxies sharing one Redis (the transcript is printed: pytest -s).
- Delivery: a receiver failing twice gets the event on the third try after 1 s and 2 s (injected
  sleep); one failing for ever is given up after 10 minutes (injected clock); a full queue drops its
  oldest event; a hanging receiver does not hold up proxied requests.
- `budget-proxy alerts test` against the receiver.

Redis: 127.0.0.1:6379 DB 7 (no other test uses it), a fresh key prefix per test.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest
import redis
from aiohttp import web

from proxy import alerting
from proxy import alerts as rules
from proxy.alerting import Alerts, WebhookSender
from proxy.config import ConfigError, parse_config
from proxy.ledger import Amounts, Denied, Limits, Scope, ScopeState
from proxy.periods import iso, period_bounds
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.harness import ProxyServer, fresh_redis_url
from tests.simulator import AnthropicSimulator, Reply

REDIS_DB = 7  # no other test uses it
MODEL = "claude-haiku-4-5"  # $1 / M input tokens, $5 / M output tokens
HOOK_SECRET = "Bearer hook-secret-123"
WAIT = 10.0  # the longest any bounded wait here waits


# --- a loopback webhook receiver ---------------------------------------------------------------------

class Receiver:
    """An aiohttp server on loopback, in a thread: records every POST (headers, JSON body), answers
    the statuses of `plan` in turn (then 200), or hangs while `hang` is set."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.plan: deque[int] = deque()
        self.hang = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/budget?token=url-secret"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hooks/budget", self._handle)
        self._runner = web.AppRunner(app)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        headers = dict(request.headers)
        headers["X-Test-Query"] = request.query_string  # (which webhook of the config it was)
        self.requests.append((headers, body))
        if self.hang:
            assert self._release is not None
            await self._release.wait()
        status = self.plan.popleft() if self.plan else 200
        return web.json_response({"ok": status < 300}, status=status)

    def start(self) -> Receiver:
        self.thread.start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        assert self.loop is not None and self._runner is not None and self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [b for _, b in self.requests]

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= n:
                return True
            time.sleep(0.02)
        return len(self.requests) >= n


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The background look every 0.05 s instead of every second (tests wait less)."""
    monkeypatch.setattr(alerting, "CHECK_EVERY_S", 0.05)


@pytest.fixture
def redis_url() -> Iterator[str]:
    yield from fresh_redis_url(REDIS_DB, "alerts")


# --- the pure rules ------------------------------------------------------------------------------------

def test_crossed_is_exact_and_ascending() -> None:
    assert rules.crossed([0.95, 0.8], 949, 1000) == [0.8]
    assert rules.crossed([0.95, 0.8], 950, 1000) == [0.8, 0.95]          # 0.95 * 1000 is 950 exactly
    assert rules.crossed([0.8, 0.95], 799_999_999, 10**9) == []
    assert rules.crossed([0.8, 0.95, 1.0], 2000, 1000) == [0.8, 0.95, 1.0]
    assert rules.crossed([0.8], 80.0, 100.0) == [0.8]                    # wall clock: seconds (floats)
    assert rules.crossed([0.8], 5, 0) == []                              # a zero limit: only denials alert
    assert rules.crossed([], 5, 10) == []


def test_event_keys_name_type_threshold_dimension_period_and_scope() -> None:
    day = period_bounds("day", 1_718_000_000)[0]
    k = rules.event_key(rules.THRESHOLD, "key:research/alpha", "cost_usd", day, 0.8)
    assert k != rules.event_key(rules.THRESHOLD, "key:research/alpha", "cost_usd", day, 0.95)
    assert k != rules.event_key(rules.THRESHOLD, "key:research/alpha", "cost_usd", day + 86400, 0.8)
    assert k != rules.event_key(rules.THRESHOLD, "key:research/alpha", "tokens", day, 0.8)
    assert k != rules.event_key(rules.THRESHOLD, "team:research", "cost_usd", day, 0.8)
    assert k != rules.event_key(rules.EXCEEDED, "key:research/alpha", "cost_usd", day)
    assert k == rules.event_key(rules.THRESHOLD, "key:research/alpha", "cost_usd", day, 0.8)


def test_claims_last_until_the_period_ends() -> None:
    now = 1_718_000_000.0  # 06:13:20 UTC
    end = period_bounds("day", now)[1]
    assert rules.claim_ttl("day", now) == pytest.approx(end - now + rules.CLAIM_MARGIN_S)
    assert rules.claim_ttl("none", now) == rules.NO_PERIOD_CLAIM_S


def test_event_bodies() -> None:
    now = 1_718_000_000.25
    key = Scope("key", "alpha", "key:research/alpha", Limits(cost_nanos=10**7), "day")
    b = rules.body(rules.THRESHOLD, 0.8, key, rules.owner_of(key, "research", "alpha"), "cost_usd",
                   8_500_000, 10**7, now)
    assert b == {"type": "budget.threshold", "threshold": 0.8, "scope": "key", "team": "research", "key": "alpha",
                 "run": None, "dimension": "cost_usd", "used": 0.0085, "limit": 0.01, "period": "day",
                 "resets_at": "2024-06-11T00:00:00Z", "at": "2024-06-10T06:13:20.250Z"}
    team = Scope("team", "research", "team:research", Limits(tokens=100), "none")
    b = rules.body(rules.EXCEEDED, None, team, rules.owner_of(team, "research", "alpha"), "tokens", 101, 100, now)
    assert (b["type"], b["threshold"], b["scope"], b["team"], b["key"], b["run"]) == \
        ("budget.exceeded", None, "team", "research", None, None)
    assert (b["used"], b["limit"], b["period"], b["resets_at"]) == (101, 100, "none", None)
    run = Scope("run", "run-7", "run:research/alpha/run-7", Limits(wall_clock=1800.0), "none", 3600.0)
    b = rules.body(rules.THRESHOLD, 0.95, run, rules.owner_of(run, "research", "alpha"), "wall_clock",
                   1712.34567, 1800.0, now)
    assert (b["scope"], b["team"], b["key"], b["run"], b["used"], b["limit"]) == \
        ("run", "research", "alpha", "run-7", 1712.346, 1800.0)
    sample = rules.sample_body(now)
    assert sample["type"] == "budget.test" and sample["test"] is True


def test_retry_schedule() -> None:
    assert [rules.retry_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    waits = rules.schedule()
    assert waits[:7] == [1, 2, 4, 8, 16, 32, 60] and set(waits[7:]) == {60}
    assert sum(waits) <= rules.GIVE_UP_S < sum(waits) + 60
    assert rules.next_attempt(3, first_at=0.0, now=10.0) == 4.0
    assert rules.next_attempt(3, first_at=0.0, now=597.0) is None   # 597 + 4 > 600: given up


def test_logs_name_a_webhook_without_its_secrets() -> None:
    assert rules.url_label("https://user:pw@hooks.example.com:8443/T0/B1/xyz?token=s") == "https://hooks.example.com:8443"
    assert rules.url_label("http://127.0.0.1/x") == "http://127.0.0.1"


def test_config() -> None:
    cfg = parse_config({"alerts": {"webhooks": [
        {"url": "https://hooks.example.com/budget", "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"}},
        {"url": "http://127.0.0.1:9000/x", "thresholds": [0.95, 0.5, 1]}]}}, env={"HOOK_TOKEN": "t0k"}).proxy
    a, b = cfg.alerts.webhooks
    assert a.thresholds == [0.8, 0.95] and a.headers["Authorization"].get_secret_value() == "Bearer t0k"
    assert "t0k" not in repr(cfg)
    assert b.thresholds == [0.5, 0.95, 1.0] and b.headers == {}
    assert parse_config({}, env={}).proxy.alerts.webhooks == []
    with pytest.raises(ConfigError) as err:
        parse_config({"alerts": {"webhooks": [{"url": "ftp://x/y"}, {"url": "https://x", "thresholds": [0]},
                                              {"url": "https://x", "thresholds": [1.5]},
                                              {"url": "https://x", "headers": {"Bad Name": "v"}},
                                              {"thresholds": [0.5]}, {"url": "https://x", "extra": 1}]}},
                     env={})
    where = [p for p, _ in err.value.problems]
    assert where == ["alerts.webhooks.0.url", "alerts.webhooks.1.thresholds", "alerts.webhooks.2.thresholds",
                     "alerts.webhooks.3.headers", "alerts.webhooks.4.url", "alerts.webhooks.5.extra"]


# --- the stores' claims ---------------------------------------------------------------------------------

def test_memory_claims_once() -> None:
    async def main() -> None:
        s = MemoryStore()
        assert await s.claim_alert("a", 60) is True
        assert await s.claim_alert("a", 60) is False
        assert await s.claim_alert("b", 60) is True
    asyncio.run(main())


def test_sqlite_claims_once_across_a_reopen(tmp_path: Any) -> None:
    path = str(tmp_path / "ledger.db")

    async def main() -> None:
        s = SqliteStore(path)
        await s.open()
        assert await s.claim_alert("a", 3600) is True
        assert await s.claim_alert("a", 3600) is False
        assert await s.claim_alert("gone", 0.001) is True
        await s.close()
        s = SqliteStore(path)
        await s.open()
        assert await s.claim_alert("a", 3600) is False     # a restart does not send it again
        await asyncio.sleep(0.01)
        assert await s.claim_alert("gone", 3600) is True   # an expired claim is free again
        await s.close()
    asyncio.run(main())


def test_redis_claims_once_across_replicas(redis_url: str) -> None:
    async def main() -> None:
        a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
        await a.open()
        await b.open()
        try:
            results = await asyncio.gather(*(s.claim_alert("k1", 120) for s in (a, b, a, b)))
            assert sorted(results) == [False, False, False, True]
            ttl = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).pttl(a.prefix + "alert:k1")
            assert 100_000 < ttl <= 120_000
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


# --- detection, without a server --------------------------------------------------------------------

class FakeStore(MemoryStore):
    """states() answers what the test set; claims as memory:// does."""

    def __init__(self) -> None:
        super().__init__()
        self.set: dict[str, ScopeState] = {}

    async def states(self, scopes: Any, now: float) -> list[ScopeState]:
        return [self.set.get(s.id, ScopeState()) for s in scopes]


def fake_state(webhooks: list[dict[str, Any]], now: list[float]) -> SimpleNamespace:
    cfg = parse_config({"alerts": {"webhooks": webhooks}}, env={}).proxy
    return SimpleNamespace(runtime=SimpleNamespace(config=cfg), store=FakeStore(), clock=lambda: now[0],
                           metrics=SimpleNamespace())


def test_detection_wall_clock_between_requests_and_webhook_thresholds(receiver: Receiver) -> None:
    """A run's wall clock reaches 95 % with no request in between; each webhook gets the thresholds
    it asked for; an exceeded event goes to every webhook, once."""
    now = [1_718_000_000.0]
    state = fake_state([{"url": receiver.url}, {"url": receiver.url.replace("token=", "other="),
                                                "thresholds": [0.5]}], now)
    run = Scope("run", "r1", "run:research/alpha/r1", Limits(wall_clock=100.0), "none", 3600.0)
    caller = SimpleNamespace(team="research", key="alpha")
    state.store.set[run.id] = ScopeState(Amounts(), Amounts(), now[0] - 85.0)

    async def main() -> None:
        alerts = Alerts(state)
        alerts.touched(caller, (run,))
        await alerts.tick()                      # 85 s of 100: 0.5 (second hook) and 0.8 (first)
        now[0] += 12.0
        await alerts.tick()                      # 97 s, no request: 0.95 from the watch
        await alerts.tick()                      # nothing new
        alerts.exceeded(caller, Denied(run, "wall_clock", 100.0, 101.0, 0, 0))
        alerts.exceeded(caller, Denied(run, "wall_clock", 100.0, 102.0, 0, 0))
        await alerts.tick()
        deadline = time.monotonic() + WAIT
        while not alerts.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await alerts.stop()
    asyncio.run(main())
    got = sorted(((h["X-Test-Query"].split("=")[0], b["type"], b["threshold"]) for h, b in receiver.requests), key=str)
    assert got == sorted([("token", "budget.threshold", 0.8), ("token", "budget.threshold", 0.95),
                          ("token", "budget.exceeded", None), ("other", "budget.threshold", 0.5),
                          ("other", "budget.exceeded", None)], key=str)
    order = [(b["type"], b["threshold"]) for h, b in receiver.requests if h["X-Test-Query"].startswith("token")]
    assert order == [("budget.threshold", 0.8), ("budget.threshold", 0.95), ("budget.exceeded", None)]
    assert all(b["run"] == "r1" and b["key"] == "alpha" and b["dimension"] == "wall_clock" for b in receiver.bodies)


# --- delivery --------------------------------------------------------------------------------------------

def test_retries_after_1_and_2_seconds_then_delivers(receiver: Receiver) -> None:
    receiver.plan.extend([500, 503])
    slept: list[float] = []
    outcomes: list[tuple[str, str]] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            s = WebhookSender(receiver.url, {"Authorization": HOOK_SECRET}, client, sleep=sleep,
                              observe=lambda t, o: outcomes.append((t, o)))
            s.start()
            s.enqueue({"type": "budget.threshold", "n": 1})
            deadline = time.monotonic() + WAIT
            while not (s.idle and len(receiver.requests) >= 3) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await s.close()
    asyncio.run(main())
    assert [b for _, b in receiver.requests] == [{"type": "budget.threshold", "n": 1}] * 3
    assert all(h["Authorization"] == HOOK_SECRET for h, _ in receiver.requests)
    assert slept == [1.0, 2.0]
    assert outcomes == [("budget.threshold", "failed")] * 2 + [("budget.threshold", "sent")]


def test_a_receiver_failing_for_ever_is_given_up_after_ten_minutes(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    slept: list[float] = []
    outcomes: list[str] = []
    seen: list[httpx.Request] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(502)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            s = WebhookSender("https://hooks.example.com/T0/secret-path", {"Authorization": "Bearer s3cret"}, client,
                              sleep=sleep, clock=lambda: clock[0], observe=lambda t, o: outcomes.append(o))
            s.start()
            s.enqueue({"type": "budget.exceeded"})
            deadline = time.monotonic() + WAIT
            while not (s.idle and outcomes[-1:] == ["dropped"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await s.close()
    with caplog.at_level("INFO", logger="budget_proxy.alerts"):
        asyncio.run(main())
    assert slept == rules.schedule()
    assert len(seen) == len(slept) + 1
    assert outcomes == ["failed"] * len(seen) + ["dropped"]
    text = caplog.text
    assert "dropped after" in text and "https://hooks.example.com" in text
    assert "s3cret" not in text and "secret-path" not in text


def test_a_full_queue_drops_its_oldest_event(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[tuple[str, str]] = []

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            s = WebhookSender("http://127.0.0.1:9/x", {}, client, queue_max=3,
                              observe=lambda t, o: outcomes.append((t, o)))  # (not started: nothing is sent)
            for i in range(5):
                s.enqueue({"type": "budget.threshold", "n": i})
            assert [b["n"] for b in s.outbox] == [2, 3, 4]
            await s.close()
    with caplog.at_level("WARNING", logger="budget_proxy.alerts"):
        asyncio.run(main())
    assert outcomes[:2] == [("budget.threshold", "dropped")] * 2
    assert "queue full" in caplog.text


def test_a_hanging_receiver_times_out_and_is_retried(receiver: Receiver) -> None:
    receiver.hang = True
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        receiver.hang = False  # (answers from the next attempt on)

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            s = WebhookSender(receiver.url, {}, client, sleep=sleep, timeout=0.3)
            s.start()
            s.enqueue({"type": "budget.threshold"})
            deadline = time.monotonic() + WAIT
            while not (s.idle and len(receiver.requests) >= 2) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await s.close()
    asyncio.run(main())
    assert len(receiver.requests) == 2 and slept == [1.0]


# --- through the real proxy ------------------------------------------------------------------------------

def alert_teams(cost_limit: float = 0.01) -> dict[str, Any]:
    return {"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": {"cost_usd": cost_limit, "period": "day"}},
                                  "beta": {"key": BETA_KEY}}},
            "support": {"keys": {"gamma": {"key": GAMMA_KEY}}}}


def alerts_config(receiver: Receiver) -> dict[str, Any]:
    return {"webhooks": [{"url": receiver.url, "headers": {"Authorization": HOOK_SECRET}}]}


def client(proxy: ProxyServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=ALPHA_KEY, max_retries=0, timeout=WAIT)


def ask(proxy: ProxyServer) -> None:
    client(proxy).messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "hi"}])


def denied(proxy: ProxyServer) -> None:
    with pytest.raises(anthropic.RateLimitError):
        ask(proxy)


def settle_quietly(receiver: Receiver, n: int) -> None:
    """Wait for `n` events, then a few more looks, in which no other may arrive."""
    assert receiver.wait_for(n), receiver.bodies
    time.sleep(0.3)
    assert len(receiver.requests) == n, receiver.bodies


def check_transcript(bodies: list[dict[str, Any]], used: list[float]) -> None:
    assert [(b["type"], b["threshold"]) for b in bodies] == \
        [("budget.threshold", 0.8), ("budget.threshold", 0.95), ("budget.exceeded", None)]
    resets = iso(period_bounds("day", time.time())[1])
    for b, u in zip(bodies, used):
        assert b == {**b, "scope": "key", "team": "research", "key": "alpha", "run": None, "dimension": "cost_usd",
                     "limit": 0.01, "period": "day", "resets_at": resets}
        assert b["used"] == pytest.approx(u)
        assert abs(datetime.fromisoformat(b["at"].replace("Z", "+00:00")).timestamp() - time.time()) < 60


def print_transcript(title: str, receiver: Receiver) -> None:
    print(f"\n--- webhook transcript: {title} ({len(receiver.requests)} POSTs) ---")
    for _, body in receiver.requests:
        print(json.dumps(body))


def test_a_key_crossing_80_95_and_its_limit(start: Callable[..., ProxyServer], sim: AnthropicSimulator,
                                            receiver: Receiver, fast_checks: None) -> None:
    proxy = start(alert_teams(), alerts=alerts_config(receiver))
    # $0.0085 of $0.01: 85 %
    sim.queue(Reply(text="a", input_tokens=8000, output_tokens=100))
    ask(proxy)
    settle_quietly(receiver, 1)
    # +$0.00105 = $0.00955: 95.5 %; then one more still within (no new event)
    sim.queue(Reply(text="b", input_tokens=1000, output_tokens=10), Reply(text="c", input_tokens=10, output_tokens=1))
    ask(proxy)
    assert receiver.wait_for(2)
    ask(proxy)             # $0.009565
    settle_quietly(receiver, 2)
    # the rest is not enough for the next one: denied (twice: one event)
    sim.queue(Reply(text="d", input_tokens=600, output_tokens=10))
    ask(proxy)             # admitted (its input estimate fits), charged past the limit: $0.010215
    denied(proxy)
    denied(proxy)
    settle_quietly(receiver, 3)
    print_transcript("one proxy, memory://", receiver)
    check_transcript(receiver.bodies, [0.0085, 0.00955, 0.010215])
    assert all(h["Authorization"] == HOOK_SECRET for h, _ in receiver.requests)
    assert all(h["Content-Type"] == "application/json" for h, _ in receiver.requests)
    text = httpx.get(proxy.url + "/metrics").text
    assert 'budget_proxy_alerts_total{outcome="sent",type="budget.threshold"} 2.0' in text
    assert 'budget_proxy_alerts_total{outcome="sent",type="budget.exceeded"} 1.0' in text


def test_two_proxies_on_one_redis_send_each_event_once(start: Callable[..., ProxyServer], sim: AnthropicSimulator,
                                                       receiver: Receiver, redis_url: str, fast_checks: None) -> None:
    a = start(alert_teams(), alerts=alerts_config(receiver), store=redis_url)
    b = start(alert_teams(), alerts=alerts_config(receiver), store=redis_url)
    sim.queue(Reply(text="a", input_tokens=8000, output_tokens=100))   # through A: 85 %
    ask(a)
    assert receiver.wait_for(1)
    sim.queue(Reply(text="b", input_tokens=10, output_tokens=1))       # through B: still 85 %: B sees 0.8 too
    ask(b)
    settle_quietly(receiver, 1)
    assert any(k.startswith("budget.threshold|0.8|") for k in b.state.alerts._known)  # B looked, A had claimed it
    sim.queue(Reply(text="c", input_tokens=1000, output_tokens=10))    # through B: 95.5 %
    ask(b)
    assert receiver.wait_for(2)
    sim.queue(Reply(text="d", input_tokens=10, output_tokens=1))       # through A: A sees 0.95 too
    ask(a)
    settle_quietly(receiver, 2)
    sim.queue(Reply(text="e", input_tokens=600, output_tokens=10))     # through A: past the limit
    ask(a)
    for proxy in (a, b, a, b):                                          # denied through both
        denied(proxy)
    settle_quietly(receiver, 3)
    print_transcript("two proxies, one Redis", receiver)
    check_transcript(receiver.bodies, [0.0085, 0.009565, 0.01023])
    assert sum(sent_alerts(p) for p in (a, b)) == 3


def sent_alerts(proxy: ProxyServer) -> float:
    lines = httpx.get(proxy.url + "/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith('budget_proxy_alerts_total{outcome="sent"'))


def test_a_stream_cut_by_its_budget(start: Callable[..., ProxyServer], sim: AnthropicSimulator, receiver: Receiver,
                                    fast_checks: None) -> None:
    """Clamping off: a stream runs past its key's output budget and is cut. The thresholds it
    passed go out first, then budget.exceeded."""
    teams = alert_teams()
    teams["research"]["keys"]["alpha"]["budget"] = {"output_tokens": 20}
    proxy = start(teams, alerts=alerts_config(receiver), admission={"clamp_max_tokens": False})
    sim.queue(Reply(chunks=["abcd " * 3] * 30, input_tokens=10, gate="parked", gate_after=20))
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=[{"role": "user", "content": "hi"}]) as s:
            for _ in s.text_stream:
                pass
    assert "budget exceeded mid-stream" in exc.value.message
    assert sim.wait_idle(5)
    sim.open_gate("parked")
    settle_quietly(receiver, 3)
    print_transcript("a stream cut", receiver)
    assert [(b["type"], b["threshold"], b["dimension"], b["scope"], b["period"], b["resets_at"], b["limit"])
            for b in receiver.bodies] == [("budget.threshold", 0.8, "output_tokens", "key", "none", None, 20),
                                          ("budget.threshold", 0.95, "output_tokens", "key", "none", None, 20),
                                          ("budget.exceeded", None, "output_tokens", "key", "none", None, 20)]
    assert receiver.bodies[1]["used"] >= 19


def test_a_hanging_receiver_does_not_delay_proxied_requests(start: Callable[..., ProxyServer],
                                                            sim: AnthropicSimulator, receiver: Receiver,
                                                            fast_checks: None) -> None:
    receiver.hang = True
    proxy = start(alert_teams(), alerts=alerts_config(receiver))
    sim.queue(Reply(text="a", input_tokens=8000, output_tokens=100))
    ask(proxy)
    assert receiver.wait_for(1)           # the 0.8 event is now stuck in the receiver
    done: list[str] = []

    def traffic() -> None:
        sim.queue(Reply(text="b", input_tokens=1000, output_tokens=10),
                  *[Reply(text="x", input_tokens=10, output_tokens=1) for _ in range(5)])
        for _ in range(6):
            ask(proxy)
            done.append("ok")
        sim.queue(Reply(text="d", input_tokens=600, output_tokens=10))
        ask(proxy)
        for _ in range(3):
            denied(proxy)
            done.append("denied")

    t = threading.Thread(target=traffic)
    t.start()
    t.join(WAIT * 2)                       # bounded: the calls complete while the receiver hangs
    assert not t.is_alive() and done == ["ok"] * 6 + ["denied"] * 3
    assert len(receiver.requests) == 1    # (still hanging on the first)


def test_alerts_test_cli(tmp_path: Any, receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.__main__ import main

    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({"store": "memory://", "alerts": {"webhooks": [
        {"url": receiver.url, "headers": {"Authorization": "Bearer ${HOOK_TOKEN:-cli-secret}"}}]}}))
    assert main(["alerts", "test", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"webhook 0 (http://127.0.0.1:{receiver.port}): HTTP 200" in out
    assert "url-secret" not in out and "cli-secret" not in out
    headers, body = receiver.requests[0]
    assert headers["Authorization"] == "Bearer cli-secret"
    assert body["type"] == "budget.test" and body["test"] is True

    receiver.plan.append(500)
    config.write_text(json.dumps({"store": "memory://", "alerts": {"webhooks": [
        {"url": receiver.url}, {"url": "http://127.0.0.1:9/closed"}]}}))
    assert main(["alerts", "test", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "webhook 0" in out and "HTTP 500 (not 2xx)" in out
    assert "webhook 1 (http://127.0.0.1:9): failed: ConnectError" in out

    config.write_text(json.dumps({"store": "memory://"}))
    assert main(["alerts", "test", "--config", str(config)]) == 1
