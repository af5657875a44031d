"""What the bench runs: the fake upstreams (load core) and the servers under test (their own
core), each started fresh from a workspace in a temp dir that holds configs, bodies, the
SQLite ledger and every log."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import nginx, payloads, procs

LOAD_CORE, SERVER_CORE = 0, 1
KEY = "bp-bench-load-key-000000000000000"
LABELS = {
    "direct": "direct to the fake upstream",
    "aiohttp": "pass-through: aiohttp session",
    "transport": "pass-through: PooledTransport (own)",
    "httpx-aiohttp": "pass-through: httpx + httpx-aiohttp",
    "httpx": "pass-through: httpx stock",
    "proxy": "proxy, full enforcement",
    "proxy-memory": "proxy, memory:// store (diagnostic)",
    "proxy-redis": "proxy, redis:// store",
}
# proxy-redis: the local Redis, a DB the tests do not use (they use 13), and a key prefix of its own
# per start (bench-PID-PORT:), deleted when that proxy stops; nothing else on the server is touched.
REDIS_URL, REDIS_DB = "redis://127.0.0.1:6379", 12
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}  # `python -m bench.x` from any working directory
# `budget-proxy ARGS` with the `proxy` package of another source tree (argv[1]) first on the path.
FROM_TREE = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from proxy.__main__ import main; "
             "sys.exit(main(sys.argv[1:]))")


@dataclass
class Server:
    """A target that is up: where to send load and whose CPU counts (for `direct`, the upstream's)."""

    name: str
    url: str
    pid: int
    proc: procs.Proc | None  # None when this bench did not start it for this target
    redis_prefix: str | None = None  # proxy-redis: its keys, deleted once it has stopped

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.redis_prefix is not None:
            clear_redis(self.redis_prefix)


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}", socket_connect_timeout=1.0).ping())
    except (redis.RedisError, OSError):
        return False


def redis_server_pid() -> int | None:
    import redis

    try:
        return int(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0).info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None


def clear_redis(prefix: str) -> None:
    """Delete the keys under `prefix` (one proxy-redis start's), never anything else."""
    import redis

    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}", socket_connect_timeout=1.0)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
    finally:
        client.close()


def proxy_yaml(upstream_url: str, store: str, max_connections: int | None = None, http2: bool = False) -> str:
    """A key budget and a team budget, both far from running out: everything is metered, nothing denied
    (10,000 concurrent holds of the bench request's max_tokens 1,024 are 10.2 M tokens and about $200).
    `max_connections`: the upstream pool's size (the product's default, 1,000, when None); `http2`: the
    upstream is spoken to over HTTP/2 (h2c with prior knowledge for an http:// base_url: bench/paced_h2.py)."""
    pool = "" if max_connections is None else f"\n    max_connections: {max_connections}"
    if http2:
        pool += "\n    http2: true"
    return f"""upstreams:
  anthropic:
    base_url: {upstream_url}
    api_key: bench-upstream-key{pool}
store: "{store}"
admission:
  clamp_max_tokens: true
server:
  shutdown_grace_seconds: 2
teams:
  bench:
    budget: {{tokens: 1000000000000, cost_usd: 1000000000, period: month}}
    keys:
      load:
        key: {KEY}
        budget: {{tokens: 1000000000000, steps: 1000000000, period: day}}
"""


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.bodies = {"json": root / "request-json.json", "sse": root / "request-sse.json"}
        self.bodies["json"].write_bytes(payloads.request_body(stream=False))
        self.bodies["sse"].write_bytes(payloads.request_body(stream=True))
        self.access_log = self.logs / "proxy-stderr.log"
        self.ledger = root / "ledger.db"

    # --- fake upstreams, on the load core ------------------------------------------------
    def start_nginx(self) -> Server:
        port = procs.free_port()
        work = self.root / "nginx"
        work.mkdir(exist_ok=True)
        proc = procs.start("nginx", nginx.command(work, port), LOAD_CORE, self.logs / "nginx.log")
        procs.wait_port(proc, port)
        return Server("direct", f"http://127.0.0.1:{port}", proc.pid, proc)

    def start_paced(self, interval_ms: float, events: int = 55, http2: bool = False,
                    max_streams: int = 1000) -> Server:
        """bench/paced.py (HTTP/1.1), or with `http2` bench/paced_h2.py (h2c, `max_streams` advertised as
        SETTINGS_MAX_CONCURRENT_STREAMS; its counters in its log: paced_h2.stats_from_log(proc.log))."""
        port = procs.free_port()
        module, log = "bench.paced", self.logs / f"paced-{interval_ms:g}ms.log"
        if http2:
            module, log = "bench.paced_h2", self.logs / f"paced-h2-{interval_ms:g}ms-{port}.log"
        cmd = [sys.executable, "-m", module, "--port", str(port), "--interval-ms", str(interval_ms),
               "--events", str(events)]
        if http2:
            cmd += ["--max-streams", str(max_streams)]
        proc = procs.start("paced", cmd, LOAD_CORE, log, ENV)
        procs.wait_port(proc, port)
        return Server("direct", f"http://127.0.0.1:{port}", proc.pid, proc)

    # --- servers under test, on their own core -------------------------------------------
    def start(self, name: str, upstream: Server, ledger: Path | None = None, tree: Path | None = None,
              max_connections: int | None = None, serve_args: tuple[str, ...] = (),
              cores: int | str = SERVER_CORE, http2: bool = False) -> Server:
        """`tree`: run the proxy from that source tree instead of the installed one (bench.ab);
        `max_connections`: the proxy's upstream pool size (the scale run's streams); `serve_args`: more
        `budget-proxy serve` arguments (bench.workers: `--workers N`); `cores`: taskset's list ("0-1");
        `http2`: `http2: true` on the proxy's upstream (its upstream must be bench/paced_h2.py)."""
        if name == "direct":
            return Server("direct", upstream.url, upstream.pid, None)
        port = procs.free_port()
        prefix = None
        if name.startswith("proxy"):
            config = self.root / f"proxy-{port}.yaml"
            store = "memory://" if name == "proxy-memory" else f"sqlite:///{ledger or self.ledger}"
            if name == "proxy-redis":
                prefix = f"bench-{os.getpid()}-{port}:"
                clear_redis(prefix)
                store = f"{REDIS_URL}/{REDIS_DB}?prefix={prefix}"
            config.write_text(proxy_yaml(upstream.url, store, max_connections, http2))
            serve = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--log-format", "json",
                     *serve_args]
            cmd = [str(BIN / "budget-proxy"), *serve] if tree is None else [sys.executable, "-c", FROM_TREE, str(tree), *serve]
            log = self.access_log  # the access log (one JSON line a request) stays on, as in production
        else:
            cmd = [sys.executable, "-m", "bench.transport", "--client", name, "--upstream", upstream.url,
                   "--port", str(port)]
            log = self.logs / f"{name}.log"
        proc = procs.start(name, cmd, cores, log, ENV)
        server = Server(name, f"http://127.0.0.1:{port}", proc.pid, proc, prefix)
        try:
            procs.wait_port(proc, port)
        except BaseException:
            server.stop()
            raise
        return server
