"""CPU each request costs in a ledger store: reserve + settle (with a usage-log row), and for every
fourth request two running charges first, as a stream makes them; on a key and its team.

    .venv/bin/python bench/store_cpu.py [-n 20000] [-c 16] [-r 3] [--stores memory,sqlite,redis] [--upstream-us 0]

Runs the requests through 16 concurrent tasks on one loop (uvloop when installed, as `budget-proxy
serve` runs) and prints process CPU time per request: time.process_time() counts every thread, so
SQLite's worker thread is included (redis: redis-server's own CPU per request is printed beside). CPU time rather than wall time because the benchmark machines
are shared; each store runs --repeat times on a fresh store and the median and best are reported.

With --upstream-us U each request waits a random 0..2U µs between reserve and settle, as if the
upstream answered: the tasks fall out of step and SQLite's group commits get small, as in the proxy
(with U = 0 every commit carries all 16 settlements).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.ledger import Amounts, Ask, Limits, Scope  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from bench.store_latency import run  # noqa: E402  (on uvloop, as `budget-proxy serve` runs)
from bench.targets import REDIS_DB, REDIS_URL, clear_redis, redis_server_pid  # noqa: E402
from proxy.store import Reservation, UsageRow, open_store  # noqa: E402

SCOPES = (Scope("key", "k", "key:bench/k", Limits(tokens=10**15, steps=10**12), "day"),
          Scope("team", "bench", "team:bench", Limits(cost_nanos=10**18), "month"))
ASK = Ask(1_200, 3_600, 1_024, Decimal(15_000))
RUNNING = (Amounts(1_300, 1_200, 100, 1_503_600, 1), Amounts(1_400, 1_200, 200, 3_003_600, 1))
ACTUAL = Amounts(1_500, 1_200, 300, 8_100_000, 1)


async def one(store: Any, rid: str, stream: bool, upstream_s: float) -> None:
    res = await store.reserve(SCOPES, ASK, time.time(), rid)
    assert isinstance(res, Reservation), res
    if upstream_s:
        await asyncio.sleep(upstream_s)
    if stream:
        for charged in RUNNING:
            res = await store.charge(res, charged, time.time())
            assert isinstance(res, Reservation), res
    row = UsageRow(time.time(), "bench", "k", "claude-x", "/v1/messages", 1_200, 0, 0, 0, 300, 0, 8_100_000, 1,
                   0.5, "completed", rid)
    await store.settle(res, ACTUAL, row)


async def cpu_per_request(url: str, n: int, concurrency: int, upstream_us: float = 0.0) -> float:
    store = open_store(url)
    await store.open()
    try:
        for i in range(200):  # warm-up: first loads from disk, page cache, caches
            await one(store, f"warm_{i}", i % 4 == 0, 0.0)
        per_task = n // concurrency

        async def task(t: int) -> None:
            waits = random.Random(t)
            for i in range(per_task):
                await one(store, f"req_{t}_{i}", i % 4 == 0, waits.uniform(0, 2 * upstream_us) / 1e6)

        gc.collect()
        start = time.process_time()
        await asyncio.gather(*(task(t) for t in range(concurrency)))
        spent = time.process_time() - start
    finally:
        await store.close()
    return spent / (per_task * concurrency) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-r", "--repeat", type=int, default=3)
    p.add_argument("--stores", default="memory,sqlite")
    p.add_argument("--upstream-us", type=float, default=0.0)
    args = p.parse_args()
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    print(f"reserve (+2 charges every 4th) + settle, n={args.n}, {args.concurrency} tasks, {loop}; "
          f"upstream 0..{2 * args.upstream_us:.0f} µs; process CPU µs per request\n")
    print(f"{'store':<10}{'median':>10}{'best':>10}   runs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stores.split(","):
            runs, server = [], []
            for i in range(args.repeat):
                url = {"memory": "memory://", "redis": f"{REDIS_URL}/{REDIS_DB}?prefix=store-cpu-{os.getpid()}-{i}:"
                       }.get(name, f"sqlite:///{tmp}/ledger{i}.db")
                pid = redis_server_pid() if name == "redis" else None
                r0 = cpu_seconds(pid) if pid else 0.0
                try:
                    runs.append(run(cpu_per_request(url, args.n, args.concurrency, args.upstream_us)))
                finally:
                    if name == "redis":
                        clear_redis(f"store-cpu-{os.getpid()}-{i}:")
                if pid:  # (includes the warm-up: a slight overstatement)
                    server.append((cpu_seconds(pid) - r0) / args.n * 1e6)
            print(f"{name:<10}{statistics.median(runs):>10.1f}{min(runs):>10.1f}   "
                  + " ".join(f"{r:.1f}" for r in runs)
                  + (f"   redis-server µs/req: {statistics.median(server):.1f}" if server else ""))


if __name__ == "__main__":
    main()
