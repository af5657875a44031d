"""Two real proxy processes (`python -m proxy serve`) sharing one Redis, in front of one simulator.

- Under 48 concurrent mixed JSON and stream requests on one team budget, the team's used amount
  stays within the single-node bound (docs/budgets.md "Overshoot bound"), holds return to zero, and both replicas report
  the same GET /budget.
- A replica killed with SIGKILL mid-stream leaves holds that expire on their own, seen through
  the other replica's /budget within the hold TTL + one renewal interval + slack. That test runs
  its replicas with a short TTL of its own (hold_ttl=4, renew_every=1 in the store URL: the same
  expiry and renewal code as the 15 s / 5 s defaults, a quarter of the wait).

Redis is 127.0.0.1:6379 DB 13, a fresh key prefix per test (skipped without Redis unless
BUDGET_PROXY_REQUIRE_REDIS is set).
"""
from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.harness import free_port
from tests.simulator import AnthropicSimulator, Reply
from tests.test_store_contract import REDIS_DB, Namespace, rns  # noqa: F401 (rns: the fixture)

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alpha": "bp-replica-alpha-key-0001", "beta": "bp-replica-beta-key-0002"}
MODEL = "claude-sonnet-4-5"
HOLD_TTL, RENEW_EVERY = 15.0, 5.0        # the product defaults (proxy/store/redis.py)
KILL_HOLD_TTL, KILL_RENEW_EVERY = 4.0, 1.0  # the kill test's own: a renewal can run 3 s late and still keep a hold
STREAM_CHUNKS = [f"w{i:02d} " + "abcd " * 14 for i in range(12)]  # 12 deltas of 74 bytes (25 estimated tokens)
OUT = math.ceil(len("".join(STREAM_CHUNKS)) / 3)                  # reported = the relay's bytes/3 estimate
EVENT_TOKENS = math.ceil(len(STREAM_CHUNKS[0]) / 3)                # the largest growth one event brings
INPUT = 100


class Replica:
    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-format", "text"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica exited with {self.proc.returncode}"
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("replica not ready in time")

    def budget(self, key: str = "alpha") -> dict[str, Any]:
        r = httpx.get(self.url + "/budget", headers={"x-api-key": KEYS[key]}, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def replicas(tmp_path: Path, sim: AnthropicSimulator, rns: Namespace) -> Iterator[Any]:
    started: list[Replica] = []

    def start(n: int, team_budget: dict[str, Any], hold_ttl: float = HOLD_TTL, renew_every: float = RENEW_EVERY,
              **admission: Any) -> list[Replica]:
        config = tmp_path / "proxy.yaml"
        config.write_text(yaml.safe_dump({
            "upstreams": {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream-secret"}},
            "store": f"{rns.url}&hold_ttl={hold_ttl}&renew_every={renew_every}",
            "admission": admission,
            "teams": {"research": {"budget": team_budget,
                                   "keys": {name: {"key": secret} for name, secret in KEYS.items()}}},
        }))
        for i in range(n):
            started.append(Replica(config, tmp_path / f"replica{len(started)}.log"))
        for r in started[-n:]:
            r.wait_ready()
        return started[-n:]

    yield start
    for r in started:
        r.stop()


def team_of(doc: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in doc["scopes"] if s["scope"] == "team")


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """/budget without the one moving figure (wall-clock seconds used since the first request)."""
    for s in doc["scopes"]:
        s["used"].pop("wall_clock", None)
        s.get("remaining", {}).pop("wall_clock", None)
    return doc


async def one_request(client: httpx.AsyncClient, url: str, key: str, stream: bool) -> tuple[str, int | None]:
    """(outcome, x-budget-remaining-tokens at admission)."""
    body = {"model": MODEL, "max_tokens": OUT, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": KEYS[key], "anthropic-version": "2023-06-01"}
    async with client.stream("POST", url + "/v1/messages", json=body, headers=headers) as r:
        payload = await r.aread()
    if r.status_code == 429:
        return "denied", None
    assert r.status_code == 200, (r.status_code, payload[:300])
    remaining = int(r.headers["x-budget-remaining-tokens"])
    return ("cut" if b"budget exceeded mid-stream" in payload else "admitted"), remaining


@pytest.mark.parametrize("clamp", [True, False], ids=["clamp_on", "clamp_off"])
def test_two_replicas_keep_the_single_node_bound(replicas: Any, sim: AnthropicSimulator, clamp: bool) -> None:
    # Every request holds INPUT + OUT = its actual usage; the limit fits 15 of them and 250 tokens
    # more, so exactly one request is admitted with a partial hold (clamped, or running past it).
    size = INPUT + OUT
    limit = 15 * size + 250
    sim.count_tokens_reply = INPUT  # an exact input estimate: with clamping on, the bound is 0
    reply = Reply(chunks=STREAM_CHUNKS, input_tokens=INPUT, output_tokens=OUT, event_delay=0.002)
    sim.default = reply
    a, b = replicas(2, {"tokens": limit}, input_estimate="count_tokens", clamp_max_tokens=clamp)

    async def load() -> list[tuple[bool, str, int | None]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            kinds = [(i % 3 != 0, (a, b)[i % 2], ("alpha", "beta")[(i // 2) % 2]) for i in range(48)]
            outcomes = await asyncio.gather(*(one_request(client, r.url, k, s) for s, r, k in kinds))
        return [(s, *o) for (s, _, _), o in zip(kinds, outcomes)]

    results = asyncio.run(load())
    deadline = time.monotonic() + 10
    while any(v for v in team_of(a.budget())["held"].values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    doc_a, doc_b = comparable(a.budget()), comparable(b.budget())
    team = team_of(doc_a)
    count = {o: sum(1 for _, x, _ in results if x == o) for o in ("admitted", "denied", "cut")}
    # docs/budgets.md "Overshoot bound". Clamping on: the input-estimate error (0 here). Off: one
    # metering interval (one delta event) per stream cut, plus what non-streaming responses generate
    # past their holds; only one admitted with nothing left (x-budget-remaining-tokens: 0) can have
    # had a partial hold.
    json_at_edge = sum(1 for s, o, rem in results if not s and o == "admitted" and rem == 0)
    bound = 0 if clamp else count["cut"] * EVENT_TOKENS + json_at_edge * OUT
    print(f"\n[clamp {'on' if clamp else 'off'}] 48 requests (32 streams, 16 JSON) over 2 replicas: "
          f"admitted {count['admitted']}, denied {count['denied']}, cut {count['cut']}; "
          f"team used {team['used']['tokens']} of {limit} tokens (allowed up to {limit + bound}), "
          f"held {team['held']['tokens']}")
    assert count["admitted"] + count["cut"] >= 16 and count["denied"] > 20
    assert team["used"]["tokens"] <= limit + bound
    assert all(v == 0 for v in team["held"].values())
    assert doc_a == doc_b
    if clamp:
        assert count["cut"] == 0


def test_a_killed_replica_has_its_holds_expire(replicas: Any, sim: AnthropicSimulator) -> None:
    a, b = replicas(2, {"tokens": 100_000}, hold_ttl=KILL_HOLD_TTL, renew_every=KILL_RENEW_EVERY)
    sim.queue(Reply(chunks=STREAM_CHUNKS, input_tokens=INPUT, output_tokens=OUT, gate="kill", gate_after=2))
    body = {"model": MODEL, "max_tokens": 1_000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    def client() -> None:  # its connection dies with the replica
        try:
            with httpx.stream("POST", a.url + "/v1/messages", json=body, timeout=60,
                              headers={"x-api-key": KEYS["alpha"], "anthropic-version": "2023-06-01"}) as r:
                for _ in r.iter_raw():
                    pass
        except httpx.HTTPError:
            pass

    reader = threading.Thread(target=client, daemon=True)
    reader.start()
    try:
        assert sim.wait_at_gate("kill", timeout=10)
        before = team_of(b.budget())
        assert before["held"]["tokens"] > 0 and before["used"]["tokens"] > 0  # a hold, and charges so far
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.proc.wait(5)
        bound = KILL_HOLD_TTL + KILL_RENEW_EVERY + 3
        while any(v for v in team_of(b.budget())["held"].values()):
            assert time.monotonic() - killed < bound, "the dead replica's hold did not expire in time"
            time.sleep(0.1)
        took = time.monotonic() - killed
        after = team_of(b.budget())
        print(f"\n[kill -9] held {before['held']['tokens']} tokens -> 0 after {took:.1f} s "
              f"(TTL {KILL_HOLD_TTL:g} s, renew every {KILL_RENEW_EVERY:g} s, bound {bound:g} s); "
              f"charges kept as settled: used {before['used']['tokens']} -> {after['used']['tokens']}")
        assert after["used"]["tokens"] == before["used"]["tokens"]
        assert b.budget()["scopes"][0]["held"]["tokens"] == 0  # the key scope too
    finally:
        sim.open_gate("kill")
        reader.join(10)


def test_a_proxy_fails_closed_while_redis_is_unreachable(start: Any, sim: AnthropicSimulator) -> None:
    proxy = start(teams={"research": {"keys": {"alpha": {"key": KEYS["alpha"]}}}},
                  store=f"redis://127.0.0.1:{free_port()}/{REDIS_DB}")  # nothing listens there
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/readyz").status_code == 503
    started = time.monotonic()
    r = httpx.post(proxy.url + "/v1/messages", timeout=10,
                   json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"x-api-key": KEYS["alpha"], "anthropic-version": "2023-06-01"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "api_error"
    assert time.monotonic() - started < 3  # short socket timeouts: a dead Redis fails fast
    assert sim.messages_requests() == []  # nothing forwarded uncharged
