"""The interleaved matrix: every round starts each target fresh, checks that it answers
byte for byte what the fake upstream sends, warms it up and runs wrk on each of its modes;
the server's CPU time (all threads, from /proc) is read around every wrk run."""
from __future__ import annotations

import http.client
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from bench import payloads, procs, wrk
from bench.targets import KEY, Server, Workspace, redis_up


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    body: str       # which request body: "json" (stream false) or "sse" (stream true)
    query: str      # selects nginx's answer
    conns: int
    upstream: str   # "nginx" or "paced"
    events: int = 0  # SSE events per response, for per-event cost


MODES = {m.key: m for m in (
    Mode("json16", "JSON c=16", "json", "?mode=json", 16, "nginx"),
    Mode("sse16", "SSE burst c=16", "sse", "?mode=sse", 16, "nginx", 55),
    Mode("paced16", "SSE paced c=16", "sse", "", 16, "paced", 55),
    Mode("json1", "JSON c=1", "json", "?mode=json", 1, "nginx"),
    Mode("sse1", "SSE burst c=1", "sse", "?mode=sse", 1, "nginx", 55),
)}
ALL = tuple(MODES)
PLAN = {  # target -> modes, in the order each round runs them
    "direct": ALL,
    "aiohttp": ALL,
    "transport": ALL,
    "proxy": ALL,
    "httpx-aiohttp": ("json16", "sse16", "json1"),
    "httpx": ("json16", "sse16", "json1"),
    "proxy-memory": ("json16", "sse16"),
    "proxy-redis": ("json16", "sse16"),  # the local Redis (bench.targets.REDIS_URL); skipped when it is down
}
# Reference points far from the targets (0.1x and 0.4x): their first round is enough.
ONCE = ("httpx-aiohttp", "httpx")
# The cells the targets are ratios of: key rounds run only these, so their medians rest on more
# samples in the same 10 minutes (one slow round moved a ratio by 0.1-0.2 on this shared machine).
KEY_PLAN = {"aiohttp": ("json16", "sse16"), "proxy": ("json16", "sse16"), "proxy-redis": ("json16", "sse16")}


@dataclass(frozen=True)
class Sample:
    run: wrk.WrkResult
    cpu_s: float
    wall_s: float

    @property
    def cpu_per_req_us(self) -> float:
        return self.cpu_s / max(1, self.run.requests) * 1e6

    @property
    def share(self) -> float:
        """Fraction of one core the server used: ~1.0 when CPU-bound on a quiet machine."""
        return self.cpu_s / self.wall_s


@dataclass(frozen=True)
class Cell:
    """The median of a cell's samples, field by field."""

    n: int
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    share: float
    errors: int

    @staticmethod
    def of(samples: list[Sample]) -> Cell:
        med = statistics.median
        rps = [s.run.rps for s in samples]
        return Cell(len(samples), med(rps), min(rps), max(rps), med(s.run.p50_ms for s in samples),
                    med(s.run.p99_ms for s in samples), med(s.cpu_per_req_us for s in samples),
                    med(s.share for s in samples), sum(s.run.errors for s in samples))


def check(server: Server, mode: Mode) -> None:
    """One request: the answer must be the upstream's, byte for byte (and a proxy adds its headers)."""
    host, port = server.url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = payloads.request_body(stream=mode.body == "sse")
    conn.request("POST", "/v1/messages" + mode.query, body, {"x-api-key": KEY, "content-type": "application/json"})
    resp = conn.getresponse()
    got = resp.read()
    conn.close()
    want = payloads.json_reply() if mode.body == "json" else payloads.sse_body()
    if resp.status != 200 or got != want:
        raise RuntimeError(f"{server.name} {mode.key}: status {resp.status}, body differs: {got[:200]!r}")
    if server.name.startswith("proxy") and resp.getheader("x-budget-remaining-tokens") is None:
        raise RuntimeError("the proxy answered without x-budget-remaining-tokens: is enforcement on?")


def measure(ws: Workspace, server: Server, mode: Mode, seconds: float) -> Sample:
    url = server.url + "/v1/messages" + mode.query
    c0, t0 = procs.cpu_seconds(server.pid), time.monotonic()
    run = wrk.run(url, ws.bodies[mode.body], KEY, mode.conns, seconds)
    return Sample(run, procs.cpu_seconds(server.pid) - c0, time.monotonic() - t0)


def seconds_for(mode: Mode, seconds: float) -> float:
    return seconds if mode.conns > 1 else max(2.0, round(seconds * 0.7))


def run_rounds(ws: Workspace, upstreams: dict[str, Server], rounds: int, key_rounds: int, seconds: float,
               say: Callable[[str], None]) -> dict[tuple[str, str], list[Sample]]:
    """`rounds` of the whole PLAN (ONCE in the first only), then `key_rounds` of KEY_PLAN."""
    samples: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    skip = set()
    if not redis_up():
        say("  no Redis at 127.0.0.1:6379: proxy-redis skipped")
        skip.add("proxy-redis")
    total = rounds + key_rounds
    for rnd in range(total):
        plan = PLAN if rnd < rounds else KEY_PLAN
        order = [t for t in plan if t not in skip and (rnd == 0 or t not in ONCE)]
        for target in (order if rnd % 2 == 0 else order[::-1]):  # alternate to spread drift evenly
            for kind in ("nginx", "paced"):
                modes = [MODES[m] for m in plan[target] if MODES[m].upstream == kind]
                if modes:
                    run_target(ws, target, upstreams[kind], modes, seconds, samples)
        say(f"  round {rnd + 1}/{total} done" + (" (key cells)" if rnd >= rounds else ""))
    return samples


def run_target(ws: Workspace, target: str, upstream: Server, modes: list[Mode], seconds: float,
               samples: dict[tuple[str, str], list[Sample]]) -> None:
    server = ws.start(target, upstream)
    try:
        for mode in modes:
            check(server, mode)
        measure(ws, server, modes[0], 1.0)  # warm-up: connection pools, ledger periods, caches
        for mode in modes:
            samples[(mode.key, target)].append(measure(ws, server, mode, seconds_for(mode, seconds)))
    finally:
        server.stop()
