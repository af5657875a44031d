"""The load generator: wrk with bench/post.lua, pinned to the load core; its text output parsed."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "post.lua"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors (connect, read, write, timeout)


def parse(text: str) -> WrkResult:
    lat = {int(q): float(v) * _UNITS[u] for q, v, u in _LATENCY.findall(text)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None or 50 not in lat or 99 not in lat:
        raise ValueError(f"unexpected wrk output:\n{text}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(float(rps.group(1)), lat[50], lat[99], int(total.group(1)), errors)


def run(url: str, body_file: Path, key: str, conns: int, seconds: float, core: int = 0,
        timeout_s: float = 5.0) -> WrkResult:
    cmd = ["taskset", "-c", str(core), "wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s",
           "--latency", "-s", str(LUA), url]
    env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_KEY": key}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse(out.stdout)
