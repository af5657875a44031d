"""`budget-proxy serve --workers N`: a supervisor and N worker processes on one port sharing one
Redis ledger (docs/configuration.md "Workers").

The real CLI runs in a subprocess in front of the in-process Anthropic simulator and is driven
by the anthropic SDK, a new connection per call so the kernel spreads them over the workers.
No sleeps: every wait is a bounded poll on something observable."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import anthropic
import httpx
import pytest
import yaml

from proxy.workers import workers_problem
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.harness import free_port, fresh_redis_url
from tests.simulator.anthropic import AnthropicSimulator

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 5
UPSTREAM_SECRET = "sk-upstream-secret-workers"


@pytest.mark.parametrize("store", ["sqlite:///data/ledger.db", "memory://"])
def test_more_than_one_worker_on_a_process_local_store_is_refused(store):
    problem = workers_problem(2, store)
    assert problem is not None and "redis://" in problem and "2 processes" in problem


@pytest.mark.parametrize("store", ["redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/0",
                                   "redis+sentinel://127.0.0.1:26379/main/0"])
def test_workers_share_a_redis_store(store):
    assert workers_problem(4, store) is None


def test_one_worker_runs_on_any_store_and_zero_is_refused():
    assert workers_problem(1, "sqlite:///data/ledger.db") is None
    assert workers_problem(0, "redis://127.0.0.1:6379/0") == "--workers must be 1 or more"


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)  # (a poll interval, not a timing assertion)
    pytest.fail(f"not within {timeout} s: {what}")


class Supervised:
    """`python -m proxy serve --workers N` in a subprocess."""

    def __init__(self, config: Path, log: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config, self.log = config, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(workers)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Every worker listening, not just the first to answer: connections made before the second
        # listens all go to the first.
        wait_until(lambda: len(children_of(self.proc.pid)) == workers and len(listeners(self.port)) == workers
                   and self.ready(), f"{workers} workers listening")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"supervisor exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def workers(self) -> set[int]:
        return children_of(self.proc.pid)

    def stop(self) -> None:
        pids = self.workers
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def module_sim() -> Iterator[AnthropicSimulator]:
    s = AnthropicSimulator()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def supervised(module_sim, tmp_path_factory) -> Iterator[Callable[..., Supervised]]:
    """make(workers, key_budget): a supervisor on a Redis ledger of its own."""
    made: list[Supervised] = []
    urls = []

    def make(workers: int = 2, key_budget: dict | None = None) -> Supervised:
        url_gen = fresh_redis_url(REDIS_DB, "workers")
        urls.append(url_gen)
        tmp = tmp_path_factory.mktemp("workers")
        cfg = {"upstreams": {"anthropic": {"base_url": module_sim.url, "api_key": UPSTREAM_SECRET}},
               "store": next(url_gen),
               "teams": {"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": key_budget or {"steps": 1000}}}}}}
        (tmp / "proxy.yaml").write_text(yaml.safe_dump(cfg))
        s = Supervised(tmp / "proxy.yaml", tmp / "proxy.log", workers)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
    for url_gen in urls:
        next(url_gen, None)  # (deletes the prefix's keys)


@pytest.fixture(scope="module")
def two_workers(supervised) -> Supervised:
    """Shared by the tests that leave it running (the one that kills a worker comes last)."""
    return supervised(workers=2, key_budget={"steps": 10})


def sockets_of(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets(port: int, state: str) -> set[str]:
    """Inodes of the IPv4 TCP sockets in `state` ("01" established, "0A" listening) whose local port is `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(fields[9])
    return inodes


def listeners(port: int) -> set[str]:
    return tcp_sockets(port, "0A")


def accepted_inodes(port: int) -> set[str]:
    """The server's side of every established connection to `port`."""
    return tcp_sockets(port, "01")


def test_connections_are_spread_over_every_worker(two_workers):
    s = two_workers
    held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(24)]
    try:
        workers = s.workers

        def each_worker_holds_some() -> bool:
            accepted = accepted_inodes(s.port)
            per_worker = [len(sockets_of(pid) & accepted) for pid in workers]
            return sum(per_worker) == len(held) and all(n > 0 for n in per_worker)

        wait_until(each_worker_holds_some, "24 connections accepted, some by each of the 2 workers")
    finally:
        for c in held:
            c.close()


def call(url: str, key: str = ALPHA_KEY) -> int:
    """One /v1/messages call on a connection of its own; its HTTP status."""
    client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
    try:
        client.messages.create(model="claude-haiku-4-5", max_tokens=16,
                               messages=[{"role": "user", "content": "hi"}])
        return 200
    except anthropic.APIStatusError as err:
        return err.status_code
    finally:
        client.close()


def test_workers_share_one_budget_and_never_overspend_it(two_workers):
    s = two_workers
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        status = call(s.url)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # One process's budget per worker would let up to 20 through.
    assert sorted(statuses) == [200] * 10 + [429] * 20
    doc = httpx.get(s.url + "/budget", headers={"x-api-key": ALPHA_KEY}, timeout=10).json()
    key = next(x for x in doc["scopes"] if x["scope"] == "key")
    assert key["used"]["steps"] == 10 and key["held"]["steps"] == 0


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(two_workers):
    s = two_workers
    before = s.workers
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(s.workers) == 2 and victim not in s.workers and s.ready(),
               "a new worker in place of the killed one")
    assert all(httpx.get(s.url + "/healthz", timeout=10).status_code == 200 for _ in range(6))
    assert "exited (signal 9); starting another" in s.log.read_text()


def test_sighup_reloads_every_worker(supervised):
    """A key added to the file answers on every worker once the supervisor has had SIGHUP: 16 calls
    on connections of their own (spread over both workers, as above) all get through."""
    s = supervised(workers=2)
    assert call(s.url, BETA_KEY) == 401
    cfg = yaml.safe_load(s.config.read_text())
    cfg["teams"]["research"]["keys"]["beta"] = {"key": BETA_KEY}
    s.config.write_text(yaml.safe_dump(cfg))
    s.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: all(call(s.url, BETA_KEY) == 200 for _ in range(16)), "the new key on every worker")
    assert s.proc.poll() is None and len(s.workers) == 2  # reloaded, not restarted


def test_sigterm_stops_every_worker_gracefully(supervised):
    s = supervised(workers=2)
    workers = s.workers
    assert call(s.url) == 200
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    wait_until(lambda: not any(alive(p) for p in workers), "every worker gone after SIGTERM")
    log = s.log.read_text()
    assert "Traceback" not in log and log.count("Application shutdown complete") == 2
    assert UPSTREAM_SECRET not in log


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(supervised):
    s = supervised(workers=2)
    workers = s.workers
    s.proc.kill()
    s.proc.wait(10)
    wait_until(lambda: not any(alive(p) for p in workers), "workers exit once their supervisor is gone")


def test_workers_on_a_sqlite_store_exit_2_naming_the_fix(tmp_path, module_sim):
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"anthropic": {"base_url": module_sim.url, "api_key": UPSTREAM_SECRET}},
                                    "store": f"sqlite:///{tmp_path}/l.db",
                                    "teams": {"t": {"keys": {"k": {"key": ALPHA_KEY}}}}}))
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                           str(free_port()), "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers 2 needs a redis:// store" in done.stderr
    assert UPSTREAM_SECRET not in done.stderr + done.stdout


def test_each_worker_draws_its_own_request_ids():
    """Ids name reservations in the shared ledger: a forked worker must not repeat its siblings'."""
    from proxy.errors import new_request_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert child_id[:22] != new_request_id()[:22]
