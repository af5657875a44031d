"""`make bench-workers`: `budget-proxy serve --workers N` on the Redis store at N = 1 and N = 2.

    .venv/bin/python -m bench.workers [--rounds 3] [--seconds 5] [--conns 16,32] [--modes json,sse]

Every cell (mode, connections, N) starts a fresh proxy (the proxy-redis target's YAML and a key
prefix of its own, deleted afterwards), checks one request (byte for byte, 200 with
`x-budget-remaining-tokens`), warms up for 1 s and runs wrk; the N = 1 and N = 2 cells of a
mode alternate in order round by round (1, 2 / 2, 1 / ...). CPU is the supervisor's and every
worker's (its children, from /proc/*/stat); after each cell the key's used steps in Redis (GET
/budget) must equal the requests wrk completed plus the check: both workers charged one budget.
Rewrites bench/RESULTS-workers.md. Only loopback addresses are used; every load is bounded."""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import procs, wrk
from bench.matrix import MODES, Cell, Mode, Sample, check
from bench.run import BusyMeter, first_line, machine, publish, say
from bench.targets import KEY, LOAD_CORE, SERVER_CORE, Server, Workspace, redis_server_pid, redis_up

HERE = Path(__file__).resolve().parent
# N -> the cores its processes may use. N = 1 where the main bench runs a server (core 1, the load
# generator and nginx on core 0); N = 2 on both cores, so one worker shares core 0 with them.
CORES = {1: str(SERVER_CORE), 2: f"{LOAD_CORE}-{SERVER_CORE}"}
MODE_OF = {"json": "json16", "sse": "sse16"}  # bench.matrix's modes; the connections are ours


def tree_pids(pid: int) -> list[int]:
    """`pid` and its children (the supervisor's workers), from the ppid field of /proc/*/stat."""
    out = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        try:
            out[p] = procs.cpu_seconds(p)
        except OSError:
            pass
    return out


def listeners(port: int) -> int:
    """Listening TCP sockets on 127.0.0.1:`port`: one a worker (SO_REUSEPORT), from /proc/net/tcp."""
    want = f"0100007F:{port:04X}"
    return sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
               if line.split()[1] == want and line.split()[3] == "0A")


def wait_workers(server: Server, n: int, timeout: float = 20.0) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while listeners(port) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {listeners(port)} of {n} workers listen on {port}")
        time.sleep(0.05)


def budget_steps(server: Server) -> tuple[int, int]:
    """The bench key's (used, held) steps, from GET /budget (the key scope comes first)."""
    host, port = server.url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/budget", headers={"x-api-key": KEY})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET /budget: {resp.status} {body[:200]!r}")
    key = json.loads(body)["scopes"][0]
    return int(key["used"]["steps"]), int(key["held"].get("steps", 0))


@dataclass(frozen=True)
class WorkerSample:
    sample: Sample                 # CPU: the supervisor and all its workers
    worker_cpu: tuple[float, ...]  # each process's CPU over the wrk run, largest first
    redis_cpu_s: float | None      # redis-server's CPU over the wrk run (it serves every worker)
    machine_busy: float            # cores the whole machine kept busy over the wrk run (2.0: saturated)
    expected_steps: int            # the check + what wrk completed (warm-up and run)
    used_steps: int                # the key's used steps in Redis after the run
    in_flight: int                 # the most requests that can have been cut when wrk stopped (2 runs × c)
    restarts: bool                 # the set of processes changed during the run (a worker died)


def measure(ws: Workspace, server: Server, mode: Mode, conns: int, seconds: float,
            redis_pid: int | None) -> tuple[Sample, dict[int, float], float | None, list[int], float]:
    url = server.url + "/v1/messages" + mode.query
    pids = tree_pids(server.pid)
    b0 = BusyMeter.busy()
    c0, r0, t0 = cpu_by_pid(pids), procs.cpu_seconds(redis_pid) if redis_pid else None, time.monotonic()
    run = wrk.run(url, ws.bodies[mode.body], KEY, conns, seconds, core=LOAD_CORE)
    wall = time.monotonic() - t0
    c1, busy = cpu_by_pid(pids), (BusyMeter.busy() - b0) / wall
    per = {p: c1[p] - c0[p] for p in c0 if p in c1}
    redis_s = procs.cpu_seconds(redis_pid) - r0 if redis_pid and r0 is not None else None
    return Sample(run, sum(per.values()), wall), per, redis_s, pids, busy


def run_cell(ws: Workspace, upstream: Server, n: int, mode: Mode, conns: int, seconds: float,
             redis_pid: int | None) -> WorkerSample:
    server = ws.start("proxy-redis", upstream, serve_args=("--workers", str(n)), cores=CORES[n])
    try:
        wait_workers(server, n)
        check(server, mode)  # one request: 200, the upstream's bytes, x-budget-remaining-tokens
        warm, *_ = measure(ws, server, mode, conns, 1.0, redis_pid)
        sample, per, redis_s, pids, busy = measure(ws, server, mode, conns, seconds, redis_pid)
        # requests cut when wrk stopped settle within the proxy; wait for no step to be held
        deadline = time.monotonic() + 5.0
        used, held = budget_steps(server)
        while held and time.monotonic() < deadline:
            time.sleep(0.1)
            used, held = budget_steps(server)
        restarts = sorted(tree_pids(server.pid)) != sorted(pids)
        workers = [v for p, v in per.items() if p != server.pid or n == 1]
    finally:
        server.stop()
    return WorkerSample(sample, tuple(sorted(workers, reverse=True)), redis_s, busy,
                        1 + warm.run.requests + sample.run.requests, used, 2 * conns, restarts)


def f(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def table(results: dict[tuple[str, int, int], list[WorkerSample]], modes: list[str], conns: list[int]) -> str:
    rows = ["| mode | c | workers | cores (taskset) | n | req/s (min–max) | N=2 ÷ N=1 req/s (per round) | p50 ms "
            "| p99 ms | proxy CPU µs/req (supervisor + workers) | cores used | CPU split over workers "
            "| redis-server CPU µs/req | machine cores busy | errors | steps used − expected (per round; tolerance 0..2c) |",
            "|" + "---|" * 16]
    for m in modes:
        mode = MODES[MODE_OF[m]]
        for c in conns:
            one = results.get((m, c, 1), [])
            for n in (1, 2):
                ws = results.get((m, c, n), [])
                if not ws:
                    continue
                cell = Cell.of([w.sample for w in ws])
                if n == 2 and one:
                    paired = [b.sample.run.rps / a.sample.run.rps for a, b in zip(one, ws)]
                    r = f"**{cell.rps / Cell.of([w.sample for w in one]).rps:.2f}** ({', '.join(f'{x:.2f}' for x in paired)})"
                else:
                    r = "—"
                split = "—"
                if n > 1:
                    shares = [statistics.median(w.worker_cpu[i] / sum(w.worker_cpu) for w in ws) for i in range(n)]
                    split = " / ".join(f"{s:.0%}" for s in shares)
                redis = [w.redis_cpu_s / w.sample.run.requests * 1e6 for w in ws
                         if w.redis_cpu_s is not None and w.sample.run.requests]
                diffs = ", ".join(f"{w.used_steps - w.expected_steps:+d}" for w in ws)
                rows.append(f"| {mode.label.split(' c=')[0]} | {c} | {n} | {CORES[n]} | {cell.n} "
                            f"| {f(cell.rps)} ({f(cell.rps_min)}–{f(cell.rps_max)}) | {r} | {cell.p50_ms:.2f} "
                            f"| {cell.p99_ms:.2f} | {f(cell.cpu_us)} | {cell.share:.2f} | {split} "
                            f"| {f(statistics.median(redis) if redis else None)} "
                            f"| {statistics.median(w.machine_busy for w in ws):.2f} | {cell.errors} | {diffs} |")
    return "\n".join(rows) + "\n"


def verdicts(results: dict[tuple[str, int, int], list[WorkerSample]]) -> list[str]:
    everything = [w for ws in results.values() for w in ws]
    errors = sum(w.sample.run.errors for w in everything)
    off = [w for w in everything if not 0 <= w.used_steps - w.expected_steps <= w.in_flight]
    died = sum(w.restarts for w in everything)
    return [f"errors (non-2xx + socket errors) over every cell: **{errors}** (must be 0)",
            f"budget shared: in {len(everything) - len(off)} of {len(everything)} cells the key's used steps in Redis "
            f"(GET /budget after the run, nothing held) were the requests wrk completed (warm-up and run) plus the "
            f"check, give or take the requests cut when wrk stopped (0..2c: wrk counts a request only once its "
            f"answer arrived, the proxy charges it at admission, and each of the 2 wrk runs stops with up to c "
            f"in flight)" + (f"; **outside it**: {', '.join(f'{w.used_steps}/{w.expected_steps}' for w in off)}"
                             if off else ""),
            f"a worker died and was replaced during a run: {died} cells"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="wrk duration of a cell (after a 1 s warm-up)")
    p.add_argument("--conns", default="16,32")
    p.add_argument("--modes", default="json,sse")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS-workers.md")
    args = p.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not redis_up():
        say("bench: no Redis answers at 127.0.0.1:6379: --workers 2 needs it; nothing measured")
        return 1
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="budget-proxy-workers-"))
    ws = Workspace(root)
    host, busy = machine(), BusyMeter()
    redis_pid = redis_server_pid()
    redis0, t0 = (procs.cpu_seconds(redis_pid) if redis_pid else 0.0), time.monotonic()
    results: dict[tuple[str, int, int], list[WorkerSample]] = defaultdict(list)
    nginx = ws.start_nginx()
    try:
        for rnd in range(args.rounds):
            for m in modes:
                for c in conns:
                    for n in ((1, 2) if rnd % 2 == 0 else (2, 1)):
                        w = run_cell(ws, nginx, n, MODES[MODE_OF[m]], c, args.seconds, redis_pid)
                        results[(m, c, n)].append(w)
                        say(f"  round {rnd + 1}/{args.rounds} {m} c={c} N={n}: {w.sample.run.rps:,.0f} req/s, "
                            f"{w.sample.cpu_per_req_us:,.0f} µs/req, {w.sample.share:.2f} cores, "
                            f"split {' / '.join(f'{x:.2f}' for x in w.worker_cpu)} s, machine {w.machine_busy:.2f} cores, errors {w.sample.run.errors}, "
                            f"steps {w.used_steps} vs {w.expected_steps}")
    except BaseException:
        say(f"bench: failed; logs kept in {root / 'logs'}")
        raise
    finally:
        nginx.stop()
    busy_text = busy.text()
    redis_cores = (procs.cpu_seconds(redis_pid) - redis0) / (time.monotonic() - t0) if redis_pid else None
    lines = [*(f"{k}: {v}" for k, v in host),
             f"other processes during the run: {busy_text}; this includes redis-server, which serves the runs "
             f"({f(redis_cores, 2)} cores on average), and any other tenant of the machine",
             f"budget-proxy (git): {first_line(['git', '-C', str(HERE.parent), 'describe', '--always', '--dirty'])}",
             f"each cell: a fresh `budget-proxy serve --workers N --log-format json` on "
             f"redis://127.0.0.1:6379/12 (a key prefix of its own, deleted afterwards), one checked request, "
             f"1 s warm-up, wrk -t1 for {args.seconds:g} s; {args.rounds} rounds, N = 1 and N = 2 alternating "
             f"in order; medians",
             f"cores: wrk and nginx on core {LOAD_CORE}; N = 1 on core {SERVER_CORE} (as in `make bench`); N = 2 on "
             f"cores {CORES[2]}; redis-server unpinned"]
    text = "\n".join([
        "# Workers results (the last `make bench-workers`)\n",
        "Written by `bench/workers.py`; bench/README.md (\"Workers\") says how it measures.\n",
        "\n".join(f"- {x}" for x in lines) + "\n",
        "## Throughput at N = 1 and N = 2 workers (Redis store)\n",
        "**This machine has 2 cores: at N = 2 the load generator (wrk) and the fake upstream (nginx) share "
        "core 0 with one worker, so the N = 2 figures and the N = 2 ÷ N = 1 ratio are a lower bound of the "
        "scaling a machine with a core for each worker and the load elsewhere gives.** **machine cores busy** is "
        "the whole machine's busy time over the wrk run ÷ wall time (/proc/stat, every process: the proxy, wrk, "
        "nginx, redis-server and any other tenant): near 2.00 the machine is saturated and N = 2 has no core "
        "left to scale into.\n",
        table(results, modes, conns),
        "\n## Checks\n",
        "\n".join(f"- {v}" for v in verdicts(results)) + "\n",
        f"\n`make bench-workers` took {(time.monotonic() - started) / 60:.1f} min.\n",
    ])
    return publish(text, args.results, root)


if __name__ == "__main__":
    sys.exit(main())
