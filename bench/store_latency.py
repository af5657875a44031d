"""What each ledger store adds per request: one reserve + one settle (with a usage-log row), as the
relay makes them for a JSON request, on a key and its team.

    .venv/bin/python bench/store_latency.py [-n 2000] [--redis redis://127.0.0.1:6379/13?prefix=bench:]
        [--stores memory,sqlite,redis] [--repeat 3]

Prints p50 / p99 of the reserve+settle round trip one request at a time, and the throughput of
16 concurrent workers with this process's CPU time per request over that run (time.process_time:
what the store's client costs the proxy; the Redis server's own CPU is not in it). The Redis keys
under the prefix are deleted before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from proxy.ledger import Amounts, Ask, Limits, Scope  # noqa: E402
from proxy.store import Reservation, UsageRow, open_store  # noqa: E402

SCOPES = [Scope("key", "k", "key:bench/k", Limits(tokens=10**12, steps=10**9), "day"),
          Scope("team", "bench", "team:bench", Limits(cost_nanos=10**15), "month")]
ASK = Ask(1_200, 3_600, 1_024, Decimal(15_000))
ACTUAL = Amounts(1_500, 1_200, 300, 8_100_000, 1)
ids = (f"req_bench_{i}" for i in itertools.count())


async def one(store: Any) -> float:
    rid = next(ids)
    t0 = time.perf_counter()
    res = await store.reserve(SCOPES, ASK, time.time(), rid)
    assert isinstance(res, Reservation), res
    row = UsageRow(time.time(), "bench", "k", "claude-x", "/v1/messages", 1_200, 0, 0, 0, 300, 0, 8_100_000, 1,
                   0.5, "completed", rid)
    await store.settle(res, ACTUAL, row)
    return time.perf_counter() - t0


async def measure(url: str, n: int, concurrency: int) -> tuple[float, float, float, float]:
    store = open_store(url)
    await store.open()
    try:
        for _ in range(min(200, n)):  # warm-up: connections, scripts, page cache
            await one(store)
        lat = sorted([await one(store) for _ in range(n)])
        per_worker = n // concurrency
        start, cpu0 = time.perf_counter(), time.process_time()

        async def worker() -> None:
            for _ in range(per_worker):
                await one(store)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done = per_worker * concurrency
        rate, cpu_us = done / (time.perf_counter() - start), (time.process_time() - cpu0) / done * 1e6
    finally:
        await store.close()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6, rate, cpu_us


def clear(url: str) -> None:
    client = redis.Redis.from_url(url.split("?")[0])
    prefix = url.split("prefix=")[1] if "prefix=" in url else "budget-proxy:"
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)


def run(coro: Any) -> Any:
    """On uvloop when installed, as `budget-proxy serve` runs (uvicorn's loop="auto")."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/13?prefix=bench:")
    p.add_argument("--stores", default="memory,sqlite,redis", help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=1, help="measure each store this many times")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("memory", "memory://"), ("sqlite", f"sqlite:///{tmp}/ledger.db"), ("redis", args.redis)]
        stores = [s for s in stores if s[0] in args.stores.split(",")]
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        parser = "hiredis" if importlib.util.find_spec("hiredis") else "pure Python"
        print(f"reserve + settle, n={args.n}, {loop}, redis-py parser: {parser}; throughput and CPU per request "
              f"with {args.concurrency} concurrent workers\n")
        print(f"{'store':<14}{'p50 µs':>10}{'p99 µs':>10}{'req/s c=' + str(args.concurrency):>14}{'CPU µs/req':>12}")
        for name, url in stores:
            for _ in range(args.repeat):
                if url.startswith("redis"):
                    clear(url)
                p50, p99, rate, cpu_us = run(measure(url, args.n, args.concurrency))
                if url.startswith("redis"):
                    clear(url)
                print(f"{name:<14}{p50:>10.0f}{p99:>10.0f}{rate:>14.0f}{cpu_us:>12.0f}")


if __name__ == "__main__":
    main()
