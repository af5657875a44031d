"""A/B of proxy versions: the same proxy config run from two or more source trees, interleaved
round by round, compared by CPU per request within each round (the machine drifts by up to 2×
between minutes, far less between neighbours).

    .venv/bin/python -m bench.ab HEAD~1 WORKTREE [--modes json16,sse16,paced16] [--rounds 6] [--seconds 3]
    .venv/bin/python -m bench.ab WORKTREE WORKTREE@redis --modes json16,sse16

Each version is a git revision (its `proxy/` and `config/` are exported to a temp dir),
WORKTREE (this checkout as it is) or a directory holding a `proxy/` package; the first is the
baseline. A version ending in @redis runs on the redis:// store (bench.targets.REDIS_URL), else
on SQLite; for those, redis-server's own CPU per request is reported too. Needs `make bench`'s tools."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench import procs
from bench.matrix import MODES, Sample, check, measure
from bench.run import raise_nofile
from bench.targets import ROOT, Workspace, redis_server_pid


def export(version: str, into: Path) -> Path:
    rev = version.removesuffix("@redis")
    if rev == "WORKTREE":
        return ROOT
    if Path(rev, "proxy").is_dir():  # a directory holding a proxy/ package (a prototype)
        return Path(rev).resolve()
    out = into / version.replace("/", "_").replace("~", "-").replace("^", "-")
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "proxy", "config"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run(ws: Workspace, trees: dict[str, Path], modes: list[str], rounds: int, seconds: float
        ) -> tuple[dict[tuple[str, str], list[Sample]], dict[tuple[str, str], list[float]]]:
    """Samples per (mode, version), and redis-server's CPU µs per request for the @redis versions."""
    redis_pid = redis_server_pid()
    redis_cpu: dict[tuple[str, str], list[float]] = defaultdict(list)
    ups = {"nginx": ws.start_nginx(), "paced": ws.start_paced(1.0)}
    samples: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    names = list(trees)
    try:
        for rnd in range(rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                for kind in ("nginx", "paced"):
                    todo = [MODES[m] for m in modes if MODES[m].upstream == kind]
                    if not todo:
                        continue
                    target = "proxy-redis" if name.endswith("@redis") else "proxy"
                    server = ws.start(target, ups[kind], ws.root / f"ledger-{names.index(name)}.db", tree=trees[name])
                    try:
                        for mode in todo:
                            check(server, mode)
                        measure(ws, server, todo[0], 1.0)
                        for mode in todo:
                            r0 = procs.cpu_seconds(redis_pid) if redis_pid and target == "proxy-redis" else None
                            sample = measure(ws, server, mode, seconds)
                            samples[(mode.key, name)].append(sample)
                            if r0 is not None:
                                redis_cpu[(mode.key, name)].append(
                                    (procs.cpu_seconds(redis_pid) - r0) / max(1, sample.run.requests) * 1e6)
                    finally:
                        server.stop()
            print(f"  round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for u in ups.values():
            u.stop()
    return samples, redis_cpu


def table(samples: dict[tuple[str, str], list[Sample]], names: list[str], modes: list[str],
          redis_cpu: dict[tuple[str, str], list[float]]) -> str:
    base = names[0]
    rows = [f"| mode | version | CPU µs/req, median (each round) | speed-up vs {base}, median (each round) "
            f"| req/s | ÷ {base} req/s | p50 ms | p99 ms (each round) | redis-server µs/req | errors |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in modes:
        for name in names:
            ss, bs = samples[(m, name)], samples[(m, base)]
            cpu = [s.cpu_per_req_us for s in ss]
            up = [b.cpu_per_req_us / s.cpu_per_req_us for s, b in zip(ss, bs)]
            rps = [s.run.rps / b.run.rps for s, b in zip(ss, bs)]
            rc = redis_cpu.get((m, name))
            rows.append(f"| {MODES[m].label} | {name} | {statistics.median(cpu):,.0f} ({', '.join(f'{c:,.0f}' for c in cpu)}) "
                        f"| {statistics.median(up):.2f} ({', '.join(f'{u:.2f}' for u in up)}) "
                        f"| {statistics.median(s.run.rps for s in ss):,.0f} | {statistics.median(rps):.2f} "
                        f"| {statistics.median(s.run.p50_ms for s in ss):.2f} "
                        f"| {statistics.median(s.run.p99_ms for s in ss):.2f} ({', '.join(f'{s.run.p99_ms:.2f}' for s in ss)}) "
                        f"| {f'{statistics.median(rc):,.0f}' if rc else '–'} "
                        f"| {sum(s.run.errors for s in ss)} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("versions", nargs="+", help="git revisions or WORKTREE; the first is the baseline")
    p.add_argument("--modes", default="json16,sse16,paced16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    modes = args.modes.split(",")
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="budget-proxy-ab-") as tmp:
        root = Path(tmp)
        trees = {v: export(v, root / "trees") for v in args.versions}
        samples, redis_cpu = run(Workspace(root / "ws"), trees, modes, args.rounds, args.seconds)
    print(table(samples, list(trees), modes, redis_cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
