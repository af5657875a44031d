"""Run the real proxy under uvicorn on loopback, in a thread with its own event loop, so that
tests can drive it with the synchronous SDKs as well as the async ones."""
from __future__ import annotations

import asyncio
import datetime as dt
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Coroutine, Iterator, TypeVar

from proxy.app import BudgetProxyApp, create_app
from proxy.config import LoadedConfig, parse_config
from proxy.server import GracefulServer

T = TypeVar("T")


def make_config(upstream_url: str, teams: dict[str, Any], **top: Any) -> LoadedConfig:
    data: dict[str, Any] = {
        "upstreams": {"anthropic": {"base_url": upstream_url, "api_key": "sk-upstream-secret",
                                    "timeout_seconds": top.pop("timeout_seconds", 30)}},
        "store": top.pop("store", "memory://"),
        "teams": teams,
    }
    data.update(top)
    return parse_config(data, env={})


class ProxyServer:
    def __init__(self, app: BudgetProxyApp) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = GracefulServer(app)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> ProxyServer:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            self.thread.join(0.01)
        raise RuntimeError("proxy did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the proxy's own loop (to read its store the way the proxy does)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def state(self):
        return self.app.state

    def scope_states(self, team: str, key: str | None = None):
        budgets = self.state.runtime.budgets
        scopes = [budgets.keys[(team, key)]] if key else [budgets.teams[team]]
        return self.call(self.state.store.states(scopes, self.state.clock()))


def start_proxy(loaded: LoadedConfig, **kwargs: Any) -> ProxyServer:
    return ProxyServer(create_app(loaded, **kwargs)).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: Any, timeout: float = 30.0, path: str = "/healthz") -> bool:
    """Poll `url + path` until it answers 200 (bounded); False if `proc` exits first or time runs out."""
    import subprocess
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        try:
            proc.wait(0.05)  # a bounded pause that also notices an early exit
        except subprocess.TimeoutExpired:
            pass
    return False


def require_redis(db: int) -> Any:
    """A client on the shared Redis's database `db`; skip without Redis unless CI requires it
    (BUDGET_PROXY_REQUIRE_REDIS), then fail."""
    import os

    import pytest
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("BUDGET_PROXY_REQUIRE_REDIS"):
            pytest.fail(f"Redis at 127.0.0.1:6379 is required (BUDGET_PROXY_REQUIRE_REDIS) but unreachable: {exc}")
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable (set BUDGET_PROXY_REQUIRE_REDIS to fail instead)")
    return client


def fresh_redis_url(db: int, tag: str) -> Iterator[str]:
    """A store URL under a prefix of its own, whose keys are deleted afterwards (for a fixture)."""
    import uuid

    client = require_redis(db)
    prefix = f"bp-{tag}-{uuid.uuid4().hex[:12]}:"
    yield f"redis://127.0.0.1:6379/{db}?prefix={prefix}"
    for k in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(k)


class FakeClock:
    """The proxy's clock (create_app(clock=...)); moved by hand, never by time passing."""

    def __init__(self, when: dt.datetime) -> None:
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t

    def set(self, when: dt.datetime) -> None:
        self.t = when.timestamp()

    def advance(self, seconds: float) -> None:
        self.t += seconds


def utc(*a: int) -> dt.datetime:
    return dt.datetime(*a, tzinfo=dt.timezone.utc)


def stop_process(proc: Any, grace: float) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL (and up to 10 s more)."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def ended_after(make: Callable[..., T], end: Callable[[T], None]) -> Iterator[Callable[..., T]]:
    """The body of a factory fixture (`yield from ended_after(...)`): yields `make`, remembering
    everything it makes, and ends each of them after the test."""
    made: list[T] = []

    def remembered(*args: Any, **kw: Any) -> T:
        thing = make(*args, **kw)
        made.append(thing)
        return thing

    yield remembered
    for thing in made:
        end(thing)


def wait_rows(proxy: ProxyServer, n: int, timeout: float = 5.0) -> list:
    """The memory store's usage log once it holds `n` rows: a bounded poll, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while len(proxy.state.store.rows) < n:
        assert time.monotonic() < deadline, f"timed out waiting for {n} usage-log rows"
        time.sleep(0.002)
    return list(proxy.state.store.rows)
