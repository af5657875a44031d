"""The results as Markdown: the one table, the targets, the transport comparison, the
profiles and the scale run; the same text is printed and written to bench/RESULTS.md."""
from __future__ import annotations

from dataclasses import dataclass

from bench import profile
from bench.matrix import MODES, PLAN, Cell, Sample
from bench.phases import ScaleResult
from bench.targets import LABELS

Cells = dict[tuple[str, str], Cell]
Samples = dict[tuple[str, str], list[Sample]]
REF = "aiohttp"  # the pass-through to beat


@dataclass(frozen=True)
class Context:
    machine: list[tuple[str, str]]
    versions: list[tuple[str, str]]
    rounds: int
    key_rounds: int
    seconds: float
    elapsed_s: float
    notes: list[str]  # how busy the machine was, what the proxy logged


def f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main_table(cells: Cells) -> str:
    head = ("| mode | target | n | req/s (min–max) | p50 ms | p99 ms | p99/p50 | CPU µs/req | CPU µs/event "
            "| core used | ÷ aiohttp pt, req/s | ÷ aiohttp pt, CPU | added p50 ms | errors |")
    rows = [head, "|" + "---|" * 14]
    for mode in MODES.values():
        for target in PLAN:
            c = cells.get((mode.key, target))
            if c is None:
                continue
            ref, direct = cells.get((mode.key, REF)), cells.get((mode.key, "direct"))
            per_event = c.cpu_us / mode.events if mode.events else None
            # added latency means something where nothing queues: c=1, and paced streams (bound by pacing)
            quiet = mode.conns == 1 or mode.upstream == "paced"
            added = c.p50_ms - direct.p50_ms if quiet and direct and target != "direct" else None
            cpu_ratio = ratio(ref.cpu_us, c.cpu_us) if ref and target != "direct" else None
            rps_ratio = ratio(c.rps, ref.rps) if ref and target != "direct" else None
            rows.append(f"| {mode.label} | {LABELS[target]} | {c.n} | {f(c.rps)} ({f(c.rps_min)}–{f(c.rps_max)}) "
                        f"| {f(c.p50_ms)} | {f(c.p99_ms)} | {f(c.p99_ms / c.p50_ms, 1)} | {f(c.cpu_us)} "
                        f"| {f(per_event, 1)} | {c.share:.0%} | {f(rps_ratio)} | {f(cpu_ratio)} | {f(added)} "
                        f"| {c.errors} |")
    return "\n".join(rows) + "\n"


def get(cells: Cells, mode: str, target: str, attr: str) -> float | None:
    c = cells.get((mode, target))
    return None if c is None else getattr(c, attr)


def per_round(samples: Samples, mode: str, target: str, ref: str = REF) -> str:
    """target ÷ the reference within each round (both ran minutes apart at most), by CPU per request."""
    pairs = zip(samples.get((mode, ref), []), samples.get((mode, target), []))
    return ", ".join(f(ref.cpu_per_req_us / s.cpu_per_req_us) for ref, s in pairs)


def targets_section(cells: Cells, samples: Samples, scale: list[ScaleResult]) -> str:
    lines = ["| target (reported, never asserted) | measured | goal |", "|---|---|---|"]
    for mode in ("json16", "sse16"):
        label = MODES[mode].label
        r = ratio(get(cells, mode, "proxy", "rps"), get(cells, mode, REF, "rps"))
        rc = ratio(get(cells, mode, REF, "cpu_us"), get(cells, mode, "proxy", "cpu_us"))
        lines.append(f"| {label}: proxy ÷ aiohttp pass-through | req/s {f(r)}, CPU-normalised {f(rc)} "
                     f"(per round: {per_round(samples, mode, 'proxy')}) | ≥ 1.00 |")
    for mode in ("json16", "sse16"):
        r = ratio(get(cells, mode, "proxy-redis", "rps"), get(cells, mode, "proxy", "rps"))
        rc = ratio(get(cells, mode, "proxy", "cpu_us"), get(cells, mode, "proxy-redis", "cpu_us"))
        lines.append(f"| {MODES[mode].label}: Redis store: proxy on redis ÷ proxy on SQLite | req/s {f(r)}, "
                     f"CPU-normalised {f(rc)} (per round: {per_round(samples, mode, 'proxy-redis', 'proxy')}) "
                     f"| ≥ 0.90 |")
    for mode in ("json1", "sse1"):
        added = (get(cells, mode, "proxy", "p50_ms") or 0) - (get(cells, mode, "direct", "p50_ms") or 0)
        lines.append(f"| {MODES[mode].label}: added p50, proxy − direct | {f(added)} ms | ≤ 0.3 ms |")
    for mode in ("json16", "sse16", "json1", "sse1"):
        r = ratio(get(cells, mode, "proxy", "p99_ms"), get(cells, mode, "proxy", "p50_ms"))
        lines.append(f"| {MODES[mode].label}: proxy p99 ÷ p50 | {f(r, 1)} | ≤ 3 |")
    for mode in ("json16", "sse16"):
        r = ratio(get(cells, mode, "direct", "rps"), get(cells, mode, "proxy", "rps"))
        rc = ratio(get(cells, mode, "proxy", "cpu_us"), get(cells, mode, "direct", "cpu_us"))
        lines.append(f"| {MODES[mode].label}: fake upstream ÷ proxy (bench validity) | req/s {f(r, 1)}×, "
                     f"CPU per request {f(rc, 0)}× | ≥ 5× |")
    for s in scale:
        lines.append(f"| {s.streams:,} paced streams ({s.label}): errors, peak RSS | {s.errors}, "
                     f"{s.peak_rss_mib:.0f} MiB | 0, ≤ 300 MiB |")
    return "\n".join(lines) + "\n"


def transport_table(cells: Cells) -> str:
    rows = ["| upstream client (raw ASGI pass-through) | JSON c=16 req/s | ÷ aiohttp | SSE c=16 req/s | ÷ aiohttp "
            "| CPU µs/req JSON | CPU µs/req SSE | ÷ aiohttp, CPU (JSON / SSE) | added p50 JSON c=1, ms |",
            "|" + "---|" * 9]
    for t in ("aiohttp", "transport", "httpx-aiohttp", "httpx"):
        j, s = cells.get(("json16", t)), cells.get(("sse16", t))
        rj, rs = cells.get(("json16", REF)), cells.get(("sse16", REF))
        if not (j and s and rj and rs):
            continue
        added = (get(cells, "json1", t, "p50_ms") or 0) - (get(cells, "json1", "direct", "p50_ms") or 0)
        rows.append(f"| {LABELS[t].removeprefix('pass-through: ')} | {f(j.rps)} | {f(j.rps / rj.rps)} | {f(s.rps)} "
                    f"| {f(s.rps / rs.rps)} | {f(j.cpu_us)} | {f(s.cpu_us)} | {f(rj.cpu_us / j.cpu_us)} / "
                    f"{f(rs.cpu_us / s.cpu_us)} | {f(added)} |")
    return "\n".join(rows) + "\n"


def transport_verdict(cells: Cells) -> str:
    """One sentence from the table: each client's CPU per request as a multiple of raw aiohttp's."""
    def times(t: str) -> str:
        return " / ".join(f(ratio(get(cells, m, t, "cpu_us"), get(cells, m, REF, "cpu_us")), 1) + "×"
                          for m in ("json16", "sse16"))

    return (f"\nThe same raw ASGI pass-through with only the upstream client changed. CPU per request as a "
            f"multiple of raw aiohttp's (JSON / SSE): the project's PooledTransport (proxy/http1.py) as the relay calls it "
            f"(open_upstream: httpx's Request/Response types only for other transports, the test seam; no "
            f"AsyncClient, no cookie jar) {times('transport')}; "
            f"httpx.AsyncClient on httpx-aiohttp {times('httpx-aiohttp')}; stock httpx {times('httpx')}.\n")


def scale_section(scale: list[ScaleResult]) -> str:
    rows = ["| run | streams | pacing | ok | errors | peak open at once | headers p50 / p99 ms | stream p50 / max ms "
            "| proxy CPU s | CPU ms/stream | RSS before → peak (VmHWM) MiB | ledger rows by outcome |",
            "|" + "---|" * 12]
    for s in scale:
        c = s.client
        h, st = c["headers_ms"], c["stream_ms"]
        rows.append(f"| {s.label} | {s.streams:,} | {s.events} events, 1 per {s.interval_ms:g} ms | {c['ok']:,} "
                    f"| {s.errors}{' ' + str(c['errors']) if c['errors'] else ''} | {c['peak_open']:,} | {h.get('p50')} / {h.get('p99')} "
                    f"| {st.get('p50')} / {st.get('max')} | {s.cpu_s:.2f} | {s.cpu_s / s.streams * 1000:.2f} "
                    f"| {s.rss_before_mib:.0f} → {s.peak_rss_mib:.0f} "
                    f"| {', '.join(f'{k} {v:,}' for k, v in s.outcomes.items())} |")
    return "\n".join(rows) + "\n"


STORES = {"proxy": "SQLite", "proxy-redis": "Redis", "proxy-memory": "memory://"}


def upstream_cell(s: ScaleResult) -> str:
    """The proxy's upstream protocol, and the connections it needs for the run's streams."""
    if not s.http2:
        return "HTTP/1.1 (a connection a stream)"
    used = s.upstream.get("used_connections")
    n = used if used is not None else s.upstream_connections
    conns = f"{n:,} connection{'' if n == 1 else 's'}"
    return f"HTTP/2 h2c ({conns}, ≤ {s.max_streams:,} streams each)"


def run_name(s: ScaleResult) -> str:
    return f"{s.streams:,} on {STORES.get(s.target, s.target)}, {s.protocol}"


def scale_only_table(scale: list[ScaleResult]) -> str:
    """`make bench-scale`: one row a run, the issue's figures first."""
    rows = ["| streams | store | upstream | ok | errors | peak open at once | RSS start → HWM MiB | KiB a stream "
            "(HWM − start) ÷ peak open | proxy CPU s | events relayed | CPU µs/event | headers p50 / p99 ms "
            "| stream p50 / max s | peak fds / limit | client CPU s, ramp s | wall s |", "|" + "---|" * 16]
    for s in scale:
        c = s.client
        h, st = c["headers_ms"], c["stream_ms"]
        per_stream = (s.peak_rss_mib - s.rss_before_mib) * 1024 / c["peak_open"] if c["peak_open"] else None
        errs = f"{s.errors}{' ' + str(c['errors']) if c['errors'] else ''}"
        rows.append(f"| {s.streams:,} | {STORES.get(s.target, s.target)} | {upstream_cell(s)} | {c['ok']:,} | {errs} "
                    f"| {c['peak_open']:,} "
                    f"| {s.rss_before_mib:.0f} → {s.peak_rss_mib:.0f} | {f(per_stream, 1)} | {s.cpu_s:.1f} "
                    f"| {c.get('events', 0):,} | {f(s.cpu_us_per_event, 1)} | {h.get('p50')} / {h.get('p99')} "
                    f"| {f(st.get('p50', 0) / 1000, 1)} / {f(st.get('max', 0) / 1000, 1)} "
                    f"| {s.peak_fds:,} / {s.nofile:,} | {c.get('client_cpu_s', '—')}, {c.get('ramp_s', '—')} "
                    f"| {c['wall_s']} |")
    return "\n".join(rows) + "\n"


def upstream_line(s: ScaleResult) -> str:
    """The paced upstream's CPU and, over HTTP/2, what paced_h2 counted."""
    cpu = "—" if s.upstream_cpu_s is None else f"{s.upstream_cpu_s:.1f} s"
    out = f"CPU {cpu}"
    u = s.upstream
    if s.http2 and u:
        errors = u.get("protocol_errors") or {}
        out += (f"; connections that carried streams {u.get('used_connections', 0):,} "
                f"(peak {u.get('peak_connections', 0):,} open), peak {u.get('peak_per_connection', 0):,} streams on one "
                f"and {u.get('peak_streams', 0):,} at once; "
                f"streams answered {u.get('started', 0):,}, ended {u.get('completed', 0):,}, reset by the proxy "
                f"{u.get('reset', 0):,}, lost with their connection {u.get('lost', 0):,}; events held back by the "
                f"proxy's flow-control window {u.get('stalls', 0):,}"
                + (f"; protocol errors {errors}" if errors else ""))
    elif s.http2:
        out += "; no counters from bench/paced_h2.py"
    return out


def scale_series(s: ScaleResult, every: int = 5) -> str:
    """The proxy's RSS, open descriptors (÷ 2: streams it holds) and share of a core over the run, every `every` s."""
    pts = list(s.series[::every]) + (list(s.series[-1:]) if len(s.series) % every != 1 else [])
    out, prev = [], (0.0, 0.0, 0, 0.0)
    for p in pts:
        t, rss, fds, cpu = p
        core = (cpu - prev[3]) / (t - prev[0]) if t > prev[0] else 0.0
        out.append(f"{t:.0f} s: {rss:.0f} MiB, {fds:,} fds, {core:.0%}")
        prev = p
    return "; ".join(out)


def scale_document(lines: list[str], scale: list[ScaleResult], elapsed_s: float) -> str:
    parts = ["# Scale results (the last `make bench-scale`)\n",
             "Written by `bench/run.py --scale-only`; bench/README.md (\"Scale\") says how it measures.\n",
             "\n".join(f"- {x}" for x in lines) + "\n",
             "## Concurrent paced streams through one proxy process\n", scale_only_table(scale),
             "\n## The proxy over each run\n",
             "Every 5 s: RSS, open descriptors (over HTTP/1.1 two a stream it holds, client side and upstream; over "
             "HTTP/2 one a stream plus its few upstream connections) and the share of a "
             "core the proxy used since the previous point (it has core 1 to itself only if no other process "
             "runs there: on a shared machine below 100% while streams wait means others took the core).\n",
             "\n".join(f"- {run_name(s)}: {scale_series(s)}" for s in scale) + "\n",
             "\n## The proxy's warnings and errors during each run\n",
             "\n".join(f"- {run_name(s)}: "
                       + ("none" if not s.log_problems else
                          "; ".join(f"{n:,}× `{m}`" for m, n in sorted(s.log_problems.items(), key=lambda kv: -kv[1])[:5]))
                       for s in scale) + "\n",
             "\n## The paced upstream over each run\n",
             "Its CPU (core 0, shared with the client) and, over HTTP/2, bench/paced_h2.py's counters.\n",
             "\n".join(f"- {run_name(s)}: {upstream_line(s)}" for s in scale) + "\n",
             "\n## Ledger rows by outcome (SQLite runs)\n",
             "\n".join(f"- {s.streams:,}, {s.protocol}: {', '.join(f'{k} {v:,}' for k, v in s.outcomes.items()) or '—'}"
                       for s in scale if s.target == "proxy") + "\n",
             f"\n`make bench-scale` took {elapsed_s / 60:.1f} min.\n"]
    return "\n".join(parts)


def document(ctx: Context, samples: Samples, profiles: list[tuple[str, profile.Summary]],
             scale: list[ScaleResult]) -> str:
    cells = {k: Cell.of(v) for k, v in samples.items()}
    kv = lambda pairs: "\n".join(f"- {k}: {v}" for k, v in pairs)  # noqa: E731
    parts = [
        "# Bench results (the last `make bench`)\n",
        "Written by `bench/run.py`; bench/README.md says how it measures and how to read it.\n",
        "## Machine\n", kv(ctx.machine) + "\n" + "\n".join(f"- {n}" for n in ctx.notes) + "\n",
        "## Versions\n", kv(ctx.versions) + "\n",
        f"## Results ({ctx.rounds} interleaved rounds, then {ctx.key_rounds} of the cells the targets compare; "
        f"{ctx.seconds:g} s per c=16 cell; medians; n: samples)\n",
        main_table(cells),
        "\n## Targets\n", targets_section(cells, samples, scale),
        "\n## Upstream client\n", transport_table(cells), transport_verdict(cells),
        "\n## Scale: concurrent paced streams through one proxy process\n", scale_section(scale),
        "\n## Profiles of the proxy (py-spy)\n",
        *(profile.render(title, s) + "\n" for title, s in profiles),
        f"\n`make bench` took {ctx.elapsed_s / 60:.1f} min.\n",
    ]
    return "\n".join(parts)
