"""py-spy profiles of a server under load, and what dominates them.

`record` samples a running process (non-blocking, every thread, idle time excluded) into
py-spy's "raw" collapsed-stack file, which speedscope and flamegraph.pl open as they are.
`summarize` reads that file: self time by area, the top functions by self time and the
project's functions by inclusive time, in percent of all samples."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"

SQLITE_IO = "<SqliteStore I/O>"  # a pseudo-file: the methods that run on, or hop to, the SQLite thread
_SQLITE_IO_METHODS = {"GroupWriter._run", "GroupWriter._serve", "GroupWriter._write", "SqliteStore._load_rows",
                      "SqliteStore._read_log", "SqliteStore._ping", "SqliteStore._connect"}

# Self time is charged to the first area whose marker is in the frame's file name.
AREAS = (
    ("access log (logging, proxy/logs.py)", ("logging/", "proxy/logs.py")),
    ("metrics (prometheus_client, proxy/metrics.py)", ("prometheus_client/", "proxy/metrics.py")),
    ("SQLite I/O + its thread hop", ("sqlite3/", "concurrent/futures/", "threading.py", SQLITE_IO)),
    ("proxy: relay", ("proxy/relay.py",)),
    ("proxy: SSE decoder + meter", ("proxy/sse.py", "proxy/meter.py", "proxy/providers/")),
    ("proxy: ledger, pricing, estimate", ("proxy/store/", "proxy/ledger.py", "proxy/pricing.py", "proxy/estimate.py",
                                          "proxy/periods.py", "proxy/usage.py")),
    ("proxy: upstream client (http1.py, upstream.py)", ("proxy/http1.py", "proxy/upstream.py")),
    ("proxy: other", ("proxy/",)),
    ("httpx types (Request/Response/Headers/URL)", ("httpx/",)),
    ("aiohttp client", ("aiohttp/", "multidict/", "yarl/")),
    ("uvicorn + httptools (server side)", ("uvicorn/", "httptools/")),
    ("json", ("json/",)),
    ("stdlib: dataclass __init__, dataclasses, decimal, random", ("<string>", "dataclasses.py", "decimal.py",
                                                              "enum.py", "typing.py", "random.py", "secrets.py")),
    ("asyncio + uvloop (Python side)", ("asyncio/", "uvloop/")),
)
OTHER = "other"
# Areas whose inclusive share is worth a line (the rest sit under every stack, or under none).
INCLUSIVE_AREAS = {AREAS[i][0] for i in (0, 1, 2, 4, 5, 6, 8)}


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def name(self) -> str:
        return f"{self.function} ({self.file})"


def parse_frame(text: str) -> Frame:
    func, _, rest = text.rpartition(" (")
    if not func:
        return Frame(text, "?")
    file = rest.rstrip(")").rsplit(":", 1)[0]
    if func in _SQLITE_IO_METHODS and file.endswith(("proxy/store/sqlite.py", "proxy/store/sqlite_writer.py")):
        file = f"{file} {SQLITE_IO}"
    return Frame(func, file)


def read_stacks(path: Path) -> list[tuple[list[Frame], int]]:
    """py-spy raw format: `frame;frame;...;leaf count` per line, root first."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([parse_frame(f) for f in stack.split(";")], int(count)))
    return stacks


def area_of(file: str) -> str:
    for area, markers in AREAS:
        if any(m in file for m in markers):
            return area
    return OTHER


@dataclass(frozen=True)
class Summary:
    samples: int
    areas: list[tuple[str, float]]        # self time by area, % of samples
    areas_inclusive: list[tuple[str, float]]  # samples with the area anywhere on the stack
    self_top: list[tuple[str, float]]     # functions by self time
    proxy_inclusive: list[tuple[str, float]]  # the project's functions by inclusive time


def summarize(path: Path, top: int = 12) -> Summary:
    stacks = read_stacks(path)
    total = sum(n for _, n in stacks) or 1
    areas: Counter[str] = Counter()
    areas_in: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        # Time inside C code called from Python is charged to the calling frame; time the
        # event loop spends in C with no Python frame above it lands on the outermost frames.
        areas[area_of(leaf.file)] += n
        self_time[leaf.name] += n
        for area in {area_of(f.file) for f in frames} & INCLUSIVE_AREAS:
            areas_in[area] += n
        for name in {f.name for f in frames if f.file.startswith("proxy/") and f.file != "proxy/__main__.py"}:
            inclusive[name] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, 100 * n / total) for name, n in c.most_common(k)]

    return Summary(total, pct(areas, len(AREAS) + 1), pct(areas_in, len(INCLUSIVE_AREAS)), pct(self_time, top),
                   pct(inclusive, top))


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> None:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", str(rate),
           "--nonblocking", "--format", "raw", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-500:]}")


ENTRY_POINTS = ("BudgetProxyApp.__call__", "Relay.__call__", "Relay.forward")


def dominant(s: Summary) -> str:
    areas = ", ".join(f"{a} {p:.0f}%" for a, p in s.areas[:3])
    inner = [(n, p) for n, p in s.proxy_inclusive if not n.startswith(ENTRY_POINTS)][:4]
    return (f"What dominates: by self time {areas}; in the proxy's own code (inclusive) "
            + ", ".join(f"`{n.split(' (')[0]}` {p:.0f}%" for n, p in inner) + ".")


def render(title: str, s: Summary) -> str:
    lines = [f"#### {title} ({s.samples} samples)", "", dominant(s), "", "| self time by area | % |", "|---|---|"]
    lines += [f"| {a} | {p:.1f} |" for a, p in s.areas if p >= 0.5]
    lines += ["", "| inclusive time (the area anywhere on the stack) | % |", "|---|---|"]
    lines += [f"| {a} | {p:.1f} |" for a, p in s.areas_inclusive]
    lines += ["", "| top functions, self time | % |", "|---|---|"]
    lines += [f"| `{n}` | {p:.1f} |" for n, p in s.self_top]
    lines += ["", "| proxy functions, inclusive time | % |", "|---|---|"]
    lines += [f"| `{n}` | {p:.1f} |" for n, p in s.proxy_inclusive]
    return "\n".join(lines) + "\n"
