"""The two phases after the matrix: py-spy profiles of the proxy under load, and the scale
run (N concurrent paced streams through one proxy process: 1,000 in `make bench`,
10,000 in `make bench-scale`)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import paced_h2, procs, profile
from bench.matrix import MODES, Sample, check, measure
from bench.targets import ENV, KEY, LOAD_CORE, Server, Workspace


def profile_proxy(ws: Workspace, upstream: Server, mode_key: str, seconds: float, out: Path) -> profile.Summary:
    """Sample the proxy for `seconds` in the middle of a wrk run of the mode."""
    mode = MODES[mode_key]
    server = ws.start("proxy", upstream)
    try:
        check(server, mode)
        measure(ws, server, mode, 1.0)
        done: list[Sample] = []
        load = threading.Thread(target=lambda: done.append(measure(ws, server, mode, seconds + 3)))
        load.start()
        time.sleep(1.5)
        profile.record(server.pid, seconds, out)
        load.join()
    finally:
        server.stop()
    return profile.summarize(out)


@dataclass(frozen=True)
class ScaleResult:
    label: str
    streams: int
    interval_ms: float
    client: dict            # what bench.scale printed
    cpu_s: float            # proxy CPU over the run
    rss_before_mib: float
    peak_rss_mib: float     # VmHWM: the process's high-water mark
    outcomes: dict[str, int]  # usage-log rows of the run, by outcome (SQLite ledger; {} on Redis)
    target: str = "proxy"   # bench.targets.LABELS: the store
    events: int = 55        # events a stream
    fds_before: int = 0     # the proxy's open descriptors before the burst, and their peak
    peak_fds: int = 0
    nofile: int = 0         # the proxy's RLIMIT_NOFILE (soft, raised to the hard limit)
    series: tuple[tuple[float, float, int, float], ...] = ()  # (s since start, RSS MiB, open fds, CPU s), once a second
    log_problems: dict[str, int] = field(default_factory=dict)  # the proxy's warnings and errors during the run
    http2: bool = False     # the proxy spoke HTTP/2 (h2c) to bench/paced_h2.py, else HTTP/1.1 to bench/paced.py
    max_streams: int = 1000  # HTTP/2: the upstream's SETTINGS_MAX_CONCURRENT_STREAMS
    upstream_cpu_s: float | None = None  # the paced upstream's CPU over the run
    upstream: dict = field(default_factory=dict)  # HTTP/2: paced_h2's counters (connections, streams, stalls)

    @property
    def protocol(self) -> str:
        return "HTTP/2" if self.http2 else "HTTP/1.1"

    @property
    def upstream_connections(self) -> int:
        """The upstream connections N streams need at most: one a stream, or one per max_streams."""
        return -(-self.streams // self.max_streams) if self.http2 else self.streams

    @property
    def errors(self) -> int:
        return sum(self.client["errors"].values())

    @property
    def cpu_us_per_event(self) -> float | None:
        ev = self.client.get("events") or 0
        return self.cpu_s / ev * 1e6 if ev else None


class Sampler(threading.Thread):
    """The proxy's RSS, open descriptors and CPU used so far, once a second while the client runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.stop = pid, time.monotonic(), threading.Event()
        self.cpu0 = procs.cpu_seconds(pid)
        self.series: list[tuple[float, float, int, float]] = []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.series.append((round(time.monotonic() - self.t0, 1),
                                    round(procs.status_kib(self.pid, "VmRSS") / 1024, 1), procs.open_fds(self.pid),
                                    round(procs.cpu_seconds(self.pid) - self.cpu0, 2)))
            except (OSError, KeyError):
                return


def log_problems(log: Path, offset: int) -> dict[str, int]:
    """The proxy's warning and error lines written after `offset`, by message (first 120 chars)."""
    out: dict[str, int] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            if b'"budget_proxy.access"' in line:
                continue
            text = line.decode(errors="replace").strip()
            try:
                rec = json.loads(text)
                level = str(rec.get("level", "")).upper()
                if level not in ("WARNING", "ERROR", "CRITICAL"):
                    continue
                text = f"{level} {rec.get('message') or rec.get('msg') or ''} {rec.get('exc_info', '')}".strip()
            except ValueError:
                if not any(w in text for w in ("Error", "error", "Too many", "Traceback")):
                    continue
            key = text[:120]
            out[key] = out.get(key, 0) + 1
    return out


def ledger_outcomes(db: Path, since: float = 0.0) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT outcome, count(*) FROM usage_log WHERE time >= ? GROUP BY outcome", (since,))
        return dict(rows.fetchall())
    finally:
        con.close()


@dataclass(frozen=True)
class Ramp:
    """The client starts at most `per_step` streams every `step_ms`, and at most `max_pending` wait
    for headers at once (below the proxy's listen backlog, uvicorn's 2048)."""

    per_step: int = 1000
    step_ms: float = 100.0
    max_pending: int = 1024


def stream_sockets(streams: int, http2: bool = False, max_streams: int = 1000) -> int:
    """The proxy's sockets for `streams` streams: the client side of each, plus an upstream connection
    a stream over HTTP/1.1, or one per up to `max_streams` streams over HTTP/2."""
    return streams + (-(-streams // max_streams) if http2 else streams)


def scale_run(ws: Workspace, label: str, streams: int, interval_ms: float, warm: bool, *, target: str = "proxy",
              events: int = 55, ramp: Ramp | None = None, max_connections: int | None = None,
              http2: bool = False, max_streams: int = 1000) -> ScaleResult:
    """A fresh proxy and ledger. `warm`: one stream first, so the ledger periods are loaded
    before the burst (a cold start measures the first-request path of N requests at once).
    `target`: "proxy" (SQLite ledger) or "proxy-redis"; `ramp`: None starts every stream at once;
    `max_connections`: the proxy's upstream pool (its default, 1,000, when None); `http2`: the proxy
    speaks h2c to bench/paced_h2.py (advertising `max_streams` concurrent streams a connection)."""
    db = ws.root / f"scale-{label}.db"
    paced = ws.start_paced(interval_ms, events, http2=http2, max_streams=max_streams)
    try:
        server = ws.start(target, paced, db, max_connections=max_connections, http2=http2)
        try:
            if warm:
                check(server, MODES["paced16"])
            nofile, fds0 = procs.nofile_soft_limit(server.pid), procs.open_fds(server.pid)
            sockets = stream_sockets(streams, http2, max_streams)
            if nofile < sockets + fds0:
                print(f"bench: warning: the proxy may open {nofile:,} descriptors; {streams:,} streams need "
                      f"{sockets:,} sockets + the {fds0} it holds idle", file=sys.stderr, flush=True)
            log_at = ws.access_log.stat().st_size
            rss0, cpu0, since = procs.status_kib(server.pid, "VmRSS"), procs.cpu_seconds(server.pid), time.time()
            up_cpu0 = procs.cpu_seconds(paced.pid)
            sampler = Sampler(server.pid)
            sampler.start()
            try:
                client = run_client(ws, server, streams, deadline_s=60 + 3 * events * interval_ms / 1000,
                                    events=events, ramp=ramp)
            finally:
                sampler.stop.set()
                sampler.join()
            cpu = procs.cpu_seconds(server.pid) - cpu0
            hwm = procs.status_kib(server.pid, "VmHWM")
            up_cpu = procs.cpu_seconds(paced.pid) - up_cpu0
        finally:
            server.stop()
    finally:
        paced.stop()  # SIGTERM: paced_h2 writes its last counters
    outcomes = ledger_outcomes(db, since) if target == "proxy" else {}
    upstream = paced_h2.stats_from_log(paced.proc.log) if http2 and paced.proc is not None else {}
    return ScaleResult(label, streams, interval_ms, client, cpu, rss0 / 1024, hwm / 1024, outcomes, target, events,
                       fds0, max((s[2] for s in sampler.series), default=fds0), nofile, tuple(sampler.series),
                       log_problems(ws.access_log, log_at), http2, max_streams, up_cpu, upstream)


def run_client(ws: Workspace, server: Server, streams: int, deadline_s: float, events: int = 55,
               ramp: Ramp | None = None) -> dict:
    cmd = ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "bench.scale", "--url", server.url, "--key", KEY,
           "--body", str(ws.bodies["sse"]), "--streams", str(streams), "--deadline-s", f"{deadline_s:g}",
           "--events", str(events)]
    if ramp is not None:
        cmd += ["--ramp-per-step", str(ramp.per_step), "--ramp-step-ms", f"{ramp.step_ms:g}",
                "--max-pending", str(ramp.max_pending)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline_s + 120, env={**os.environ, **ENV},
                          preexec_fn=procs.raise_nofile)
    if done.returncode != 0:
        raise RuntimeError(f"bench.scale failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)
