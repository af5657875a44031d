"""The two phases after the matrix: py-spy profiles of the proxy under load, and the scale
run (1,000 concurrent paced streams through one proxy process)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs, profile
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
    outcomes: dict[str, int]  # usage-log rows of the run, by outcome

    @property
    def errors(self) -> int:
        return sum(self.client["errors"].values())


def ledger_outcomes(db: Path, since: float = 0.0) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT outcome, count(*) FROM usage_log WHERE time >= ? GROUP BY outcome", (since,))
        return dict(rows.fetchall())
    finally:
        con.close()


def scale_run(ws: Workspace, label: str, streams: int, interval_ms: float, warm: bool) -> ScaleResult:
    """A fresh proxy and ledger. `warm`: one stream first, so the ledger periods are loaded
    before the burst (a cold start measures the first-request path of N requests at once)."""
    db = ws.root / f"scale-{label}.db"
    paced = ws.start_paced(interval_ms)
    try:
        server = ws.start("proxy", paced, db)
        try:
            if warm:
                check(server, MODES["paced16"])
            rss0, cpu0, since = procs.status_kib(server.pid, "VmRSS"), procs.cpu_seconds(server.pid), time.time()
            client = run_client(ws, server, streams, deadline_s=60 + 3 * 55 * interval_ms / 1000)
            cpu = procs.cpu_seconds(server.pid) - cpu0
            hwm = procs.status_kib(server.pid, "VmHWM")
        finally:
            server.stop()
    finally:
        paced.stop()
    return ScaleResult(label, streams, interval_ms, client, cpu, rss0 / 1024, hwm / 1024, ledger_outcomes(db, since))


def run_client(ws: Workspace, server: Server, streams: int, deadline_s: float) -> dict:
    cmd = ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "bench.scale", "--url", server.url, "--key", KEY,
           "--body", str(ws.bodies["sse"]), "--streams", str(streams), "--deadline-s", f"{deadline_s:g}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline_s + 60, env={**os.environ, **ENV})
    if done.returncode != 0:
        raise RuntimeError(f"bench.scale failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)
