"""[pure] The usage history's arithmetic (docs/http-api.md, "History"): the parameters of
/admin/history and /admin/usage.csv, hours folded into buckets, the series with every bucket present,
and the CSV rows. The stores answer hourly tallies (LedgerStore.usage_hours) and pages of rows
(LedgerStore.usage_page); proxy/admin_history.py serves them.

Buckets are UTC hours or UTC days. A range is widened to whole buckets: `from` down to the start of
its bucket, `to` up to the end of its (a `to` on a boundary stays). Without `from`, the range is the
7 days of buckets that end with the one holding `to` (default: now), the current bucket included: 7
days by day, or 168 hours by hour."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from proxy.ledger import in_unit
from proxy.periods import iso
from proxy.store.base import Tally, UsageRow

BUCKETS = {"hour": 3600, "day": 86400}
DEFAULT_SPAN_S = 7 * 86400
MAX_BUCKETS = 10_000  # (hours: 416 days)


class BadParam(ValueError):
    """A query parameter the route refuses (400); the message says which and why."""


class HistoryQuery(NamedTuple):
    team: str
    key: str | None
    start: int       # the first bucket's start (epoch s, UTC)
    end: int         # the last bucket's end
    bucket: str      # "hour" | "day"

    @property
    def size(self) -> int:
        return BUCKETS[self.bucket]


class CsvQuery(NamedTuple):
    start: float
    end: float
    team: str | None
    key: str | None


# --- parameters ------------------------------------------------------------------------------
def _single(params: Iterable[tuple[str, str]], allowed: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            raise BadParam(f"unknown parameter '{name}' (allowed: {', '.join(allowed)})")
        if name in out:
            raise BadParam(f"parameter '{name}' is given more than once")
        out[name] = value
    return out


def parse_time(name: str, text: str) -> float:
    """An ISO-8601 date or date-time (Z or an offset; without one, UTC) as epoch seconds."""
    try:
        t = datetime.fromisoformat(text.strip())
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp()
    except (ValueError, OverflowError):
        raise BadParam(f"'{name}' must be an ISO-8601 date or date-time, e.g. 2026-12-01 or "
                       f"2026-12-01T10:00:00Z; got {text[:64]!r}") from None


def floor_to(t: float, size: int) -> int:
    return int(t // size) * size


def ceil_to(t: float, size: int) -> int:
    return int(math.ceil(t / size)) * size


def history_query(params: Iterable[tuple[str, str]], now: float) -> HistoryQuery:
    """/admin/history's parameters (team=T[&key=K][&from=ISO&to=ISO][&bucket=hour|day]), or BadParam."""
    p = _single(params, ("team", "key", "from", "to", "bucket"))
    team = p.get("team", "")
    if not team:
        raise BadParam("parameter 'team' is required (the team's name in the config)")
    key = p.get("key")
    if key == "":
        raise BadParam("parameter 'key' is empty (leave it out for the whole team)")
    bucket = p.get("bucket", "day")
    if bucket not in BUCKETS:
        raise BadParam(f"'bucket' must be hour or day; got {bucket[:32]!r}")
    size = BUCKETS[bucket]
    if "to" in p:
        to = parse_time("to", p["to"])
        end = ceil_to(to, size)
    else:  # now: up to the end of the bucket holding it (on a boundary too)
        to = now
        end = floor_to(now, size) + size
    if "from" in p:
        frm = parse_time("from", p["from"])
        if frm >= to:
            raise BadParam("'from' must be before 'to' (default: now)")
        start = floor_to(frm, size)
    else:
        start = end - DEFAULT_SPAN_S
    n = (end - start) // size
    if n > MAX_BUCKETS:
        raise BadParam(f"the range holds {n} {bucket}s; at most {MAX_BUCKETS} (a shorter range, or bucket=day)")
    return HistoryQuery(team, key, start, end, bucket)


def csv_query(params: Iterable[tuple[str, str]], now: float) -> CsvQuery:
    """/admin/usage.csv's parameters ([from=ISO&to=ISO][&team=T][&key=K]; default: the last 7 days)."""
    p = _single(params, ("from", "to", "team", "key"))
    for name in ("team", "key"):
        if p.get(name) == "":
            raise BadParam(f"parameter '{name}' is empty (leave it out for every {name})")
    # (the default `to`, now, includes a row logged at this very instant)
    end = parse_time("to", p["to"]) if "to" in p else math.nextafter(now, math.inf)
    start = parse_time("from", p["from"]) if "from" in p else now - DEFAULT_SPAN_S
    if start >= end:
        raise BadParam("'from' must be before 'to' (default: now)")
    return CsvQuery(start, end, p.get("team"), p.get("key"))


def parse_since(text: str, now: float, bucket: str) -> tuple[int, int]:
    """The CLI's `--since 7d --by day`: the buckets from the one holding now - since to the current one."""
    from proxy.config import parse_duration

    try:
        seconds = parse_duration(text)
    except (ValueError, TypeError):
        raise BadParam(f"--since must be a duration such as 90m, 12h or 7d; got {text!r}") from None
    size = BUCKETS[bucket]
    end = floor_to(now, size) + size
    start = floor_to(now - seconds, size)
    start = min(start, end - size)
    if (end - start) // size > MAX_BUCKETS:
        raise BadParam(f"--since {text} holds more than {MAX_BUCKETS} {bucket}s; use --by day or a shorter span")
    return start, end


# --- the series ------------------------------------------------------------------------------
def bucket_tallies(hours: Mapping[int, Tally], start: int, end: int, size: int) -> list[tuple[int, Tally]]:
    """Every bucket of [start, end), in order, with the sum of its hours (Tally() when it has none)."""
    sums: dict[int, Tally] = {}
    for hour, t in hours.items():
        if start <= hour < end:
            b = floor_to(hour, size)
            sums[b] = sums[b] + t if b in sums else t
    zero = Tally()
    return [(b, sums.get(b, zero)) for b in range(start, end, size)]


def point(start: int, t: Tally) -> dict[str, Any]:
    return {"start": iso(start), "requests": t.requests, "tokens": t.input_tokens + t.output_tokens,
            "input_tokens": t.input_tokens, "output_tokens": t.output_tokens,
            "cost_usd": in_unit("cost_usd", t.cost_nanos), "steps": t.steps, "denied": t.denied, "cut": t.cut}


def history_body(q: HistoryQuery, hours: Mapping[int, Tally]) -> dict[str, Any]:
    """/admin/history's answer."""
    return {"bucket": q.bucket, "team": q.team, "key": q.key, "from": iso(q.start), "to": iso(q.end),
            "series": [point(b, t) for b, t in bucket_tallies(hours, q.start, q.end, q.size)]}


# --- CSV -------------------------------------------------------------------------------------
CSV_COLUMNS = ("time", "request_id", "team", "key", "run", "model", "input_tokens", "cache_write_tokens",
               "cache_read_tokens", "output_tokens", "tokens", "cost_usd", "steps", "duration_ms", "outcome")
CSV_HEADER = ",".join(CSV_COLUMNS) + "\r\n"
_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may take for the start of a formula
_QUOTE = (",", '"', "\r", "\n")


def text_cell(v: Any) -> str:
    """A text value as one CSV field: a leading = + - @ (or tab, CR) gets a ' in front, so that no
    spreadsheet runs it as a formula; then quoted as RFC 4180 says when it holds a comma, a quote
    or a line break."""
    s = v if isinstance(v, str) else str(v)
    if s.startswith(_FORMULA):
        s = "'" + s
    if any(c in s for c in _QUOTE):
        s = '"' + s.replace('"', '""') + '"'
    return s


def iso_ms(t: float) -> str:
    ms = math.floor(t * 1000)
    return datetime.fromtimestamp(ms // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def usd(nanos: int) -> str:
    """Nano-dollars as an exact decimal: 12345000 -> 0.012345."""
    sign, n = ("-", -nanos) if nanos < 0 else ("", nanos)
    whole, frac = divmod(n, 10**9)
    return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


def csv_line(r: UsageRow) -> str:
    cache_write = r.cache_write_5m_tokens + r.cache_write_1h_tokens
    tokens = r.input_tokens + cache_write + r.cache_read_tokens + r.output_tokens
    return ",".join((
        iso_ms(r.time), text_cell(r.request_id), text_cell(r.team), text_cell(r.key), text_cell(r.run),
        text_cell(r.model), str(r.input_tokens), str(cache_write), str(r.cache_read_tokens), str(r.output_tokens),
        str(tokens), usd(r.cost_nanos), str(r.steps), str(round(r.duration_s * 1000)), text_cell(r.outcome))) + "\r\n"


def csv_chunk(rows: Sequence[UsageRow]) -> bytes:
    """A page of rows as CSV bytes (UTF-8; what UTF-8 cannot carry, a lone surrogate, escaped)."""
    return "".join([csv_line(r) for r in rows]).encode("utf-8", "backslashreplace")
