"""The proxy as a real process on a SQLite ledger: restarts, SIGTERM and kill -9 (docs/budgets.md "Crash durability").

`python -m proxy serve` runs in a subprocess in front of the in-process Anthropic simulator.
Every settled charge is committed before the response ends; holds are never persisted and
never outlive the process. Beyond that, the running charge of a stream is persisted at least
every second, so a kill -9 loses at most the last second of each stream in flight, never a whole
stream's charge (on SQLite and, when Redis is reachable, on a Redis ledger too).
SIGTERM stops accepting, lets in-flight requests finish within the grace period, settles
every charge and closes the store.

No sleeps: every wait is a bounded poll on something observable (the process, /healthz, the
simulator's gates)."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import anthropic
import httpx
import pytest
import redis
import yaml

from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.harness import free_port, require_redis
from tests.simulator import Reply

ROOT = Path(__file__).resolve().parent.parent
MSG = [{"role": "user", "content": "Say hello"}]
HAIKU = "claude-haiku-4-5"
ZERO_HELD = {"tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "steps": 0}
# claude-haiku-4-5 in nano-dollars per token (config/pricing.yaml: $1 in, $5 out, $1.25 5m, $2 1h, $0.10 read)
H_IN, H_OUT, H_W5M, H_W1H, H_READ = 1_000, 5_000, 1_250, 2_000, 100


class ProxyProcess:
    """One `python -m proxy serve` process; start() waits (bounded) for /healthz."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ProxyProcess:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.config),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"proxy exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            try:
                self.proc.wait(0.05)  # a bounded pause that also notices an early exit
            except subprocess.TimeoutExpired:
                pass
        pytest.fail(f"proxy did not answer /healthz within 30 s:\n{self.log.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def wait_stopped(self, timeout: float = 30) -> None:
        """After SIGTERM: the process ends by itself. uvicorn re-raises the signal once its
        shutdown is complete, so the status is -SIGTERM (or 0)."""
        assert self.wait_exit(timeout) in (0, -signal.SIGTERM)
        assert "Traceback" not in self.log.read_text()

    def wait_not_listening(self, timeout: float = 10) -> None:
        """After SIGTERM: wait (bounded) until new connections are refused."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/healthz", timeout=0.5)
            except httpx.TransportError:
                return
        pytest.fail("the proxy still accepts connections after SIGTERM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def budget(self, key: str = ALPHA_KEY) -> dict[str, Any]:
        r = httpx.get(self.url + "/budget", headers={"x-api-key": key}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def client(self, key: str = ALPHA_KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)


def without_wall_clock(doc: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """(scope, used without wall_clock, held) per scope: wall_clock used grows with real time."""
    return [(s["scope"], {k: v for k, v in s["used"].items() if k != "wall_clock"}, s["held"]) for s in doc["scopes"]]


@pytest.fixture
def proxy_process(sim, tmp_path) -> Callable[..., ProxyProcess]:
    made: list[ProxyProcess] = []

    def make(grace: float = 10, team_budget: dict | None = None, store: str | None = None) -> ProxyProcess:
        cfg = {
            "upstreams": {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream-secret", "timeout_seconds": 30}},
            "store": store or f"sqlite:///{tmp_path}/l.db",  # an absolute path: sqlite:////tmp/...
            "server": {"shutdown_grace_seconds": grace},
            "teams": {"research": {
                "budget": team_budget or {"tokens": 100_000, "steps": 100, "cost_usd": 10},
                "keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 50_000}},
                         "beta": {"key": BETA_KEY}}}},
        }
        path = tmp_path / f"proxy{len(made)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        p = ProxyProcess(path, tmp_path / "proxy.log")
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def charged_requests(p: ProxyProcess, sim) -> dict[str, int]:
    """Three JSON calls and a stream, alpha and beta; returns the usage the simulator reported."""
    replies = [Reply(input_tokens=7, cache_write_5m=3, output_tokens=11),
               Reply(input_tokens=5, cache_write_1h=2, cache_read=4, output_tokens=20),
               Reply(input_tokens=6, output_tokens=9)]
    sim.queue(*replies)
    p.client().messages.create(model=HAIKU, max_tokens=50, messages=MSG)
    p.client().messages.create(model=HAIKU, max_tokens=50, messages=MSG)
    p.client(BETA_KEY).messages.create(model=HAIKU, max_tokens=50, messages=MSG)
    sim.queue(Reply(text="one two three four", input_tokens=7, cache_read=1, output_tokens=5))
    with p.client().messages.stream(model=HAIKU, max_tokens=50, messages=MSG) as s:
        s.get_final_message()
    replies.append(Reply(input_tokens=7, cache_read=1, output_tokens=5))
    tokens = sum(r.input_tokens + r.cache_write_5m + r.cache_write_1h + r.cache_read + r.output_tokens for r in replies)
    cost = sum(r.input_tokens * H_IN + r.cache_write_5m * H_W5M + r.cache_write_1h * H_W1H
               + r.cache_read * H_READ + r.output_tokens * H_OUT for r in replies)
    return {"tokens": tokens, "cost_nanos": cost, "steps": len(replies)}


def test_sigterm_and_restart_keep_every_charge(proxy_process, sim):
    p = proxy_process().start()
    expected = charged_requests(p, sim)
    before = p.budget()
    team = before["scopes"][1]
    assert team["used"]["tokens"] == expected["tokens"] == 80
    assert team["used"]["cost_usd"] == expected["cost_nanos"] / 1e9
    assert team["used"]["steps"] == 4
    p.signal(signal.SIGTERM)
    p.wait_stopped()
    p.start()  # same config, same DB
    after = p.budget()
    print(f"\nSIGTERM + restart: team used {team['used']} -> {after['scopes'][1]['used']}")
    assert without_wall_clock(after) == without_wall_clock(before)
    assert after["scopes"][1]["used"]["wall_clock"] >= before["scopes"][1]["used"]["wall_clock"]
    assert without_wall_clock(p.budget(BETA_KEY))[1][1] == without_wall_clock(before)[1][1]
    # and the restarted proxy keeps counting from there
    sim.queue(Reply(input_tokens=7, output_tokens=3))
    p.client().messages.create(model=HAIKU, max_tokens=50, messages=MSG)
    assert p.budget()["scopes"][1]["used"]["tokens"] == expected["tokens"] + 10


def test_kill_9_with_a_stream_in_flight_leaves_no_hold_and_keeps_its_running_charge(proxy_process, sim):
    p = proxy_process().start()
    expected = charged_requests(p, sim)
    settled = without_wall_clock(p.budget())
    # 100 input tokens, far above the estimate: message_start outgrows the hold, so the store is told at once
    sim.queue(Reply(text="a b c d e f g h", input_tokens=100, output_tokens=40, gate="mid", gate_after=2))
    errors: list[BaseException] = []
    got: list[str] = []

    def stream_in_flight() -> None:
        try:
            with p.client().messages.stream(model=HAIKU, max_tokens=200, messages=MSG) as s:
                for t in s.text_stream:
                    got.append(t)
        except BaseException as exc:  # the proxy dies under it
            errors.append(exc)

    th = threading.Thread(target=stream_in_flight)
    th.start()
    assert sim.wait_at_gate("mid", 1, timeout=10)
    during = p.budget()["scopes"][1]
    assert during["held"]["tokens"] > 0  # in flight, with a hold
    assert during["held"]["steps"] + during["used"]["steps"] == expected["steps"] + 1
    assert during["used"]["tokens"] >= expected["tokens"] + 100  # message_start was charged as it arrived
    p.signal(signal.SIGKILL)
    assert p.wait_exit() == -signal.SIGKILL
    th.join(15)
    assert not th.is_alive() and errors and got  # the client saw the connection go
    assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"
    sim.open_gate("mid")
    p.start()
    after = p.budget()
    print(f"\nkill -9 with a stream in flight: held before {during['held']['tokens']} tokens, "
          f"used {during['used']['tokens']}; after restart used {after['scopes'][1]['used']['tokens']}, "
          f"held {after['scopes'][1]['held']}")
    for s in after["scopes"]:
        assert s["held"] == ZERO_HELD  # no hold survives
    # the completed requests' charges, and the stream's running charge as it was pushed:
    # everything it was charged before the kill (the gate held it since), now settled
    used = {k: v for k, v in during["used"].items() if k != "wall_clock"}
    assert without_wall_clock(after)[1][1] == used
    assert used["tokens"] >= expected["tokens"] + 100 and used["steps"] == expected["steps"] + 1
    assert after["scopes"][1]["remaining"]["tokens"] == 100_000 - used["tokens"]


def test_sigterm_lets_an_in_flight_request_finish_and_charges_it(proxy_process, sim):
    p = proxy_process(grace=20).start()
    expected = charged_requests(p, sim)
    sim.queue(Reply(input_tokens=7, cache_read=2, output_tokens=30, gate="json"))
    result: list[Any] = []

    def in_flight() -> None:
        try:
            result.append(p.client().messages.create(model=HAIKU, max_tokens=50, messages=MSG))
        except BaseException as exc:
            result.append(exc)

    th = threading.Thread(target=in_flight)
    th.start()
    assert sim.wait_at_gate("json", 1, timeout=10)
    p.signal(signal.SIGTERM)
    p.wait_not_listening()  # it has begun shutting down
    sim.open_gate("json")   # the upstream answers within the grace period
    th.join(20)
    assert not th.is_alive()
    msg = result[0]
    assert not isinstance(msg, BaseException), msg
    assert msg.usage.output_tokens == 30
    p.wait_stopped()
    p.start()
    used = p.budget()["scopes"][1]["used"]
    print(f"\nSIGTERM with a JSON request in flight: used {used['tokens']} tokens "
          f"(= {expected['tokens']} before + 39 finished during shutdown)")
    assert used["tokens"] == expected["tokens"] + 39 and used["steps"] == expected["steps"] + 1


def test_sigterm_lets_an_in_flight_stream_finish_and_charges_it(proxy_process, sim):
    p = proxy_process(grace=20).start()
    expected = charged_requests(p, sim)
    sim.queue(Reply(text="a b c d e f g h", input_tokens=7, output_tokens=12, gate="mid", gate_after=2))
    result: list[Any] = []

    def in_flight() -> None:
        try:
            with p.client().messages.stream(model=HAIKU, max_tokens=50, messages=MSG) as s:
                text = "".join(s.text_stream)
                result.append((text, s.get_final_message()))
        except BaseException as exc:
            result.append(exc)

    th = threading.Thread(target=in_flight)
    th.start()
    assert sim.wait_at_gate("mid", 1, timeout=10)
    p.signal(signal.SIGTERM)
    p.wait_not_listening()
    sim.open_gate("mid")
    th.join(20)
    assert not th.is_alive()
    assert not isinstance(result[0], BaseException), result[0]
    text, final = result[0]
    assert text == "a b c d e f g h" and final.usage.output_tokens == 12
    p.wait_stopped()
    p.start()
    used = p.budget()["scopes"][1]["used"]
    assert used["tokens"] == expected["tokens"] + 19 and used["steps"] == expected["steps"] + 1


def test_a_stream_still_running_when_the_grace_period_ends_is_cut_and_charged(proxy_process, sim):
    p = proxy_process(grace=1).start()
    expected = charged_requests(p, sim)
    sim.queue(Reply(text="a b c d e f g h", input_tokens=7, output_tokens=12, gate="never", gate_after=2))
    result: list[Any] = []

    def in_flight() -> None:
        got = ""
        try:
            with p.client().messages.stream(model=HAIKU, max_tokens=50, messages=MSG) as s:
                for t in s.text_stream:
                    got += t
            result.append(got)
        except BaseException as exc:
            result.append((got, exc))

    th = threading.Thread(target=in_flight)
    th.start()
    assert sim.wait_at_gate("never", 1, timeout=10)
    p.signal(signal.SIGTERM)
    p.wait_stopped(30)  # bounded: the grace period, then the cut
    th.join(10)
    assert not th.is_alive()
    got, exc = result[0]
    assert got == "a b "  # what was relayed before the upstream was parked
    assert isinstance(exc, anthropic.APIStatusError) and exc.status_code == 200, exc
    assert exc.body["error"]["type"] == "api_error"
    sim.open_gate("never")
    p.start()
    used = p.budget()["scopes"][1]["used"]
    print(f"\ngrace over, stream cut: used {used['tokens']} tokens ({used['tokens'] - expected['tokens']} for the cut "
          f"stream)")
    assert used["steps"] == expected["steps"] + 1  # it produced a message: a step, charged for what was generated
    assert used["input_tokens"] >= 7 + 25  # 25 input tokens in the completed ones, 7 in the cut one
    assert used["tokens"] > expected["tokens"] + 7
    for s in p.budget()["scopes"]:
        assert s["held"] == ZERO_HELD


# --- kill -9 in the middle of a long stream (at most the last second is lost) ----------------------------------------

PACED_CHUNKS = [f"w{i:03d} abcdefg " for i in range(300)]  # 300 text deltas of 13 bytes
EVENT_DELAY = 0.03                                         # ~33 events a second: a 9+ s stream
PACED_BYTES = [len(c) for c in PACED_CHUNKS]
PACED_INPUT = 100
PACED_OUTPUT = math.ceil(sum(PACED_BYTES) / 3)   # reported at the end = the relay's bytes/3 estimate of it all
PUSH_INTERVAL = 1.0                              # proxy/relay.py PUSH_INTERVAL_SECONDS
# Pushes happen at events, so the last one before the kill can be up to one event gap more than a
# second old; and the kill may land in the millisecond between a push and its group commit.
PUSH_SLACK = 2 * EVENT_DELAY + 0.1
REDIS_CRASH_DB = 12  # no other test uses it
# The kill comes after the first push (PUSH_INTERVAL) and its slack, with room to spare: what was received by
# PUSH_INTERVAL + PUSH_SLACK before the kill (the ledger's floor) is then never empty.
KILL_AFTER = PUSH_INTERVAL + PUSH_SLACK + 0.4


class PacedStream:
    """A client reading one long paced stream in a thread, noting when each text delta arrived."""

    def __init__(self, p: ProxyProcess) -> None:
        self.p = p
        self.got: list[tuple[float, int]] = []  # (monotonic time, text bytes received so far)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        total = 0
        try:
            with self.p.client().messages.stream(model=HAIKU, max_tokens=4096, messages=MSG) as s:
                for text in s.text_stream:
                    total += len(text.encode())
                    self.got.append((time.monotonic(), total))
        except BaseException as exc:  # the proxy dies under it
            self.errors.append(exc)

    def receiving_for(self) -> float:
        got = self.got
        return got[-1][0] - got[0][0] if got else 0.0

    def bytes_by(self, t: float) -> int:
        return max((b for at, b in self.got if at <= t), default=0)


def generated_bytes(sim) -> int:
    """What the upstream generated for the last stream: the text of the deltas it sent."""
    return sum(PACED_BYTES[:sim.streams[-1].text_deltas_sent])


def kill_mid_stream(p: ProxyProcess, sim) -> dict[str, Any]:
    """Run the paced stream, kill -9 the proxy once the client has received text for over KILL_AFTER
    seconds; return what the client received and what the upstream generated."""
    sim.queue(Reply(chunks=PACED_CHUNKS, input_tokens=PACED_INPUT, output_tokens=PACED_OUTPUT,
                    event_delay=EVENT_DELAY))
    client = PacedStream(p)
    client.thread.start()
    deadline = time.monotonic() + 60
    while client.receiving_for() <= KILL_AFTER:
        assert time.monotonic() < deadline and client.thread.is_alive(), (client.errors, len(client.got))
        client.thread.join(0.02)  # a bounded pause that also notices the client ending
    killed_at = time.monotonic()
    p.signal(signal.SIGKILL)
    assert p.wait_exit() == -signal.SIGKILL
    client.thread.join(15)
    assert not client.thread.is_alive() and client.errors, "the client should have seen the connection go"
    assert sim.wait_idle(10) and sim.streams[-1].outcome == "aborted"
    received = client.got[-1][1]
    by_1s = client.bytes_by(killed_at - PUSH_INTERVAL)
    floor = client.bytes_by(killed_at - PUSH_INTERVAL - PUSH_SLACK)
    generated = generated_bytes(sim)
    assert 0 < floor <= by_1s <= received <= generated < sum(PACED_BYTES)  # killed mid-stream
    return {"received_bytes": received, "receiving_s": round(killed_at - client.got[0][0], 2),
            "bytes_1s_before_kill": by_1s, "floor_bytes": floor, "generated_bytes": generated}


def check_ledger(p: ProxyProcess, seen: dict[str, Any], label: str) -> dict[str, Any]:
    """After the restart: the key's used tokens and cost count at least what was generated up to a
    push interval before the kill, and no more than what was generated at all."""
    doc = p.budget()
    key_used = doc["scopes"][0]["used"]
    team_used = doc["scopes"][1]["used"]
    lo_tokens = PACED_INPUT + math.ceil(seen["floor_bytes"] / 3)
    hi_tokens = PACED_INPUT + math.ceil(seen["generated_bytes"] / 3)
    lo_cost, hi_cost = (PACED_INPUT * H_IN + (lo_tokens - PACED_INPUT) * H_OUT) / 1e9, \
        (PACED_INPUT * H_IN + (hi_tokens - PACED_INPUT) * H_OUT) / 1e9
    figures = (f"{label}: client received {seen['received_bytes']} text bytes "
               f"(~{math.ceil(seen['received_bytes'] / 3)} output tokens) over {seen['receiving_s']} s, "
               f"{seen['bytes_1s_before_kill']} bytes (~{math.ceil(seen['bytes_1s_before_kill'] / 3)} tokens) "
               f"by 1 s before the kill; the upstream generated {seen['generated_bytes']} bytes; "
               f"ledger after restart: key used {key_used['tokens']} tokens ({PACED_INPUT} input + "
               f"{key_used['output_tokens']} output), ${key_used['cost_usd']}, {key_used['steps']} step(s); "
               f"asserted bounds {lo_tokens}..{hi_tokens} tokens")
    print("\n" + figures)
    assert lo_tokens <= key_used["tokens"] <= hi_tokens, figures
    assert key_used["input_tokens"] == PACED_INPUT, figures
    assert lo_cost - 1e-9 <= key_used["cost_usd"] <= hi_cost + 1e-9, figures
    assert key_used["steps"] == 1, figures
    assert {k: v for k, v in team_used.items() if k != "wall_clock"} == \
        {k: v for k, v in key_used.items() if k != "wall_clock"}, figures
    return key_used


def test_kill_9_mid_stream_loses_at_most_the_last_second_sqlite(proxy_process, sim, tmp_path):
    p = proxy_process().start()
    seen = kill_mid_stream(p, sim)
    p.start()  # same config, same ledger: the running charge it left is folded in
    used = check_ledger(p, seen, "kill -9 mid-stream, SQLite")
    for s in p.budget()["scopes"]:
        assert s["held"] == ZERO_HELD
    db = sqlite3.connect(tmp_path / "l.db")
    try:
        rows = db.execute("SELECT team, key, input_tokens, output_tokens, cost_nanos, steps, outcome FROM usage_log"
                          ).fetchall()
        assert db.execute("SELECT COUNT(*) FROM inflight").fetchone() == (0,)
    finally:
        db.close()
    assert rows == [("research", "alpha", PACED_INPUT, used["output_tokens"], round(used["cost_usd"] * 1e9), 1,
                     "interrupted")]


@pytest.fixture
def redis_ledger() -> Iterator[str]:
    """A fresh key prefix in Redis DB 12, deleted afterwards; skipped without Redis unless
    BUDGET_PROXY_REQUIRE_REDIS is set (then it fails)."""
    client = require_redis(REDIS_CRASH_DB)
    prefix = f"bp-crash-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for k in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(k)
    client.close()


def test_kill_9_mid_stream_loses_at_most_the_last_second_redis(proxy_process, sim, redis_ledger):
    url = f"redis://127.0.0.1:6379/{REDIS_CRASH_DB}?prefix={redis_ledger}&hold_ttl=3&renew_every=1"
    p = proxy_process(store=url).start()
    seen = kill_mid_stream(p, sim)
    p.start()
    # at once: the running charge is counted in used (its hold too, until it expires)
    check_ledger(p, seen, "kill -9 mid-stream, Redis, before the hold expired")
    deadline = time.monotonic() + 30
    while any(s["held"] != ZERO_HELD for s in p.budget()["scopes"]):  # the hold expires on its own (hold_ttl 3 s)
        assert time.monotonic() < deadline, p.budget()
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait_exit(0.1)  # a bounded pause that also notices the proxy dying
    used = check_ledger(p, seen, "kill -9 mid-stream, Redis, after the hold expired")
    log = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_CRASH_DB, decode_responses=True)
    try:
        rows = [fields for _, fields in log.xrange(redis_ledger + "log")]
    finally:
        log.close()
    assert [(r["team"], r["key"], int(r["input_tokens"]), int(r["output_tokens"]), int(r["cost_nanos"]),
             r["outcome"]) for r in rows] == [
        ("research", "alpha", PACED_INPUT, used["output_tokens"], round(used["cost_usd"] * 1e9), "hold_expired")]
