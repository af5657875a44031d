"""The proxy's own instructions per request: bench.inproc (the real app over ASGI, a canned
upstream) run under valgrind's callgrind at two request counts, the difference divided by the
difference in requests, so start-up and warm-up cancel out. Unlike CPU time it does not drift with
the machine: on memory:// repeat runs agree within 0.1%, so a change to the request path can be
judged on a noisy machine in about a minute and a half; bench.ab then says what it is worth in req/s.
On sqlite:// they move by up to 3%: how many settlements share a transaction depends on timing,
and valgrind's slowdown changes it.

    .venv/bin/python -m bench.instructions [--mode json|sse] [--store memory|sqlite|redis]
                                           [--requests 400,1200] [--tree DIR]

Needs valgrind (Debian package `valgrind`). Instructions count work, not stalls: time spent
waiting on a lock, the disk or Redis is not in them, and they are the whole process's (the
SQLite thread's too)."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.targets import ROOT

COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(tree: Path, mode: str, store: str, requests: int) -> int:
    """Instructions retired by one bench.inproc process serving `requests` requests."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
           "bench.inproc", "--mode", mode, "--store", store, "--requests", str(requests), "--runs", "0"]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    found = COLLECTED.search(out.stderr)
    if found is None:
        raise SystemExit(f"callgrind printed no total:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("json", "sse"), default="json")
    p.add_argument("--store", choices=("memory", "sqlite", "redis"), default="sqlite")
    p.add_argument("--requests", default="400,1200", help="the two request counts, multiples of 16")
    p.add_argument("--tree", type=Path, default=ROOT, help="a directory holding the proxy/ to measure")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install valgrind)")
    low, high = (int(n) for n in args.requests.split(","))
    with ThreadPoolExecutor(2) as pool:  # (the two runs side by side: instructions do not mind)
        a, b = pool.map(lambda n: instructions(args.tree.resolve(), args.mode, args.store, n), (low, high))
    print(f"{args.mode} store={args.store} tree={args.tree}: {(b - a) / (high - low):,.0f} instructions "
          f"per request ({low} and {high} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
