"""GET /admin/dashboard: a server-rendered page for people; no build step, no external assets.

What it shows: every team and key scope (config keys, and runtime keys marked "runtime"), the
most used first (the highest used / limit across its limited dimensions); for the first MAX_TRENDS of
them a trend from the usage history (LedgerStore.usage_hours, one query per scope): the last 24 h
by hour for a scope whose period is hour, day or none, the last 30 days by day for week or month,
drawn as an inline SVG sparkline of its most used dimension; and, while it is burning, when it runs
out at its recent rate (see runs_out). Then the runtime keys, and per key with a run budget its
active runs and the most used of them (LedgerStore.list_runs, as GET /admin/runs). Inline CSS and
SVG only: nothing is fetched, no script runs; one column on a phone.

Auth, in this order: no admin key configured -> 404 (as /admin); a key in x-api-key or
Authorization decides alone (admin -> page, proxy key -> 403, other -> 401); otherwise the
session cookie set by the login form; otherwise 303 to the login page.

The session cookie (docs/http-api.md "Dashboard") never holds the admin key: it is `<session id>.<expiry>.<mac>`, the
mac an HMAC-SHA256 keyed by the admin key over the id and the expiry (unix seconds). So a session
ends by itself after 12 h (the cookie's Max-Age too), and a changed admin_key invalidates every
session at once. Logout revokes its session server-side (see SessionRevocations: per process). The
cookie is Secure when the request came over TLS, or with `x-forwarded-proto: https` from a peer in
server.trusted_proxies. Failed logins are throttled per client address (see LoginThrottle)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import hmac
import ipaddress
import logging
import math
import re
import secrets
from collections import OrderedDict, deque
from datetime import datetime, timezone
from html import escape
from typing import Any, Callable, NamedTuple, Union
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.admin import usage_document
from proxy.auth import presented_secret
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.history import BUCKETS, bucket_tallies, floor_to
from proxy.ledger import BY_NAME, DIMENSIONS, Scope, in_unit
from proxy.periods import iso
from proxy.runs import run_scope_id
from proxy.store.base import Tally
from proxy.views import scope_view

log = logging.getLogger("budget_proxy")
COOKIE = "bp_dashboard"
REFRESH_SECONDS = 5
MAX_FORM_BYTES = 4096
DIMS = DIMENSIONS  # (proxy/dimensions.py)

SESSION_SECONDS = 12 * 3600          # a login lasts this long (cookie Max-Age and server-side)
MAX_REVOKED_SESSIONS = 10_000        # signed-out sessions remembered until they expire
LOGIN_MAX_FAILURES = 10              # failed logins from one address within LOGIN_WINDOW_SECONDS ...
LOGIN_WINDOW_SECONDS = 60.0          # ... block it for this long after the last of them
MAX_TRACKED_ADDRESSES = 4096         # client addresses whose failed logins are remembered

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{display:flex;align-items:center;gap:16px;padding:12px 24px;background:#1d2330;color:#fff}
header h1{font-size:18px;margin:0;flex:1}header small{color:#aab}
header button,form.login button{font:inherit;padding:4px 12px;border-radius:4px;border:1px solid #889;cursor:pointer}
main{padding:16px 24px;display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,420px),1fr));gap:16px}
main>*{min-width:0}h2,h3,.head,.meta,.runs li{overflow-wrap:anywhere}
.kind{display:inline-block;font-size:11px;font-weight:600;padding:0 6px;margin-left:6px;border-radius:8px;
background:#e3e9f7;color:#2c4a8a;vertical-align:middle}
.trend{margin:8px 0 2px}.trend svg{display:block;width:100%;height:40px}
.trend polyline{fill:none;stroke:#3867c7;stroke-width:1.5}
.trend .area{fill:#3867c733;stroke:none}
.trend .cap{display:flex;justify-content:space-between;gap:8px;flex-wrap:wrap;color:#667;font-size:12px}
.burn{font-size:12px;margin:4px 0;color:#445}.burn.soon{color:#b3261e;font-weight:600}
section.extras{grid-column:1/-1}.runs{margin:4px 0 8px;padding-left:18px}.runs li{margin:2px 0}
@media (max-width:600px){header{padding:10px 12px;gap:8px;flex-wrap:wrap}main{padding:10px;gap:10px}
section.scope,section.extras{padding:10px 12px}}
section.scope,section.extras{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px #0002}
h2{font-size:16px;margin:0 0 4px}h3{font-size:14px;margin:12px 0 4px;border-top:1px solid #e3e5ea;padding-top:8px}
.meta{color:#667;font-size:12px;margin-bottom:6px}.none{color:#889;font-style:italic}
.dim{margin:6px 0}.head{display:flex;justify-content:space-between;flex-wrap:wrap;gap:0 12px;font-size:13px}
.name{color:#445}.fig{font-variant-numeric:tabular-nums;text-align:right}
.bar{height:10px;margin-top:2px;background:#e6e8ee;border-radius:5px;overflow:hidden;display:flex}
.used{background:#2e9d5b}.warn .used{background:#d99a1e}.over .used{background:#d0453b}
.held{background:repeating-linear-gradient(45deg,#7aa7e0 0 4px,#a9c6ee 4px 8px)}
.extra{color:#667;font-size:12px}.error{color:#b3261e;margin:8px 0}
form.login{max-width:340px;margin:80px auto;background:#fff;padding:24px;border-radius:8px;box-shadow:0 1px 3px #0002}
form.login input{width:100%;box-sizing:border-box;padding:6px;margin:8px 0 12px;font:inherit}
"""


_SESSION = re.compile(r"^([A-Za-z0-9_-]{16,64})\.([0-9]{1,12})\.([0-9a-f]{64})$")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _session_mac(admin_key: str, sid: str, expires: int) -> str:
    msg = f"budget-proxy dashboard session\x00{sid}\x00{expires}".encode()
    return hmac.new(admin_key.encode(), msg, hashlib.sha256).hexdigest()


def issue_session(admin_key: str, now: float) -> str:
    """A new session cookie value, valid for SESSION_SECONDS from `now`."""
    sid = secrets.token_urlsafe(18)
    expires = int(now) + SESSION_SECONDS
    return f"{sid}.{expires}.{_session_mac(admin_key, sid, expires)}"


def read_session(value: str, admin_key: str, now: float) -> tuple[str, int] | None:
    """(session id, expiry) of a cookie value signed with this admin key and not yet expired."""
    m = _SESSION.match(value) if len(value) <= 160 else None
    if m is None:
        return None
    sid, expires, mac = m[1], int(m[2]), m[3]
    if not hmac.compare_digest(mac.encode(), _session_mac(admin_key, sid, expires).encode()):
        return None
    return (sid, expires) if now < expires else None


class SessionRevocations:
    """Sessions signed out before their expiry, remembered until it.

    Revocation is per process: it lives in this process's memory, so another replica (or this one
    after a restart) still accepts a copy of a signed-out cookie until the cookie expires; change
    admin_key to end every session everywhere. Bounded: past `capacity` live entries, the ones that
    expire first are forgotten and every session expiring no later than them is refused from then
    on (it fails closed: a few other sessions end early, a revoked one never comes back)."""

    def __init__(self, capacity: int = MAX_REVOKED_SESSIONS) -> None:
        self.capacity = capacity
        self.expiry: dict[str, int] = {}
        self.heap: list[tuple[int, str]] = []   # (expiry, session id), soonest first
        self.floor = 0                          # sessions expiring at or before this are refused

    def __len__(self) -> int:
        return len(self.expiry)

    def revoke(self, sid: str, expires: int, now: float) -> None:
        self._prune(now)
        if sid in self.expiry:
            return
        while len(self.expiry) >= self.capacity:
            old_expires, old = heapq.heappop(self.heap)
            del self.expiry[old]
            self.floor = max(self.floor, old_expires)
        self.expiry[sid] = expires
        heapq.heappush(self.heap, (expires, sid))

    def is_revoked(self, sid: str, expires: int) -> bool:
        return expires <= self.floor or sid in self.expiry

    def _prune(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:   # expired: refused by its expiry anyway
            _, sid = heapq.heappop(self.heap)
            del self.expiry[sid]


class _Failures:
    __slots__ = ("times", "blocked_until")

    def __init__(self, max_failures: int) -> None:
        self.times: deque[float] = deque(maxlen=max_failures)
        self.blocked_until = 0.0


class LoginThrottle:
    """Failed logins per client address: after `max_failures` within `window` seconds, every
    login attempt from that address (right key or wrong) is refused until `window` seconds after
    the last of those failures. A successful login clears the address's record.

    Per process and bounded: at most `capacity` addresses are tracked, least recently failed
    first out (records that no longer block anything go first), so many addresses cannot grow
    it without bound."""

    def __init__(self, max_failures: int = LOGIN_MAX_FAILURES, window: float = LOGIN_WINDOW_SECONDS,
                 capacity: int = MAX_TRACKED_ADDRESSES) -> None:
        self.max_failures, self.window, self.capacity = max_failures, window, capacity
        self.entries: OrderedDict[str, _Failures] = OrderedDict()   # least recently failed first

    def __len__(self) -> int:
        return len(self.entries)

    def wait_seconds(self, addr: str, now: float) -> float:
        """How long `addr` must still wait before it may try again (0: it may try now)."""
        entry = self.entries.get(addr)
        if entry is None or not entry.blocked_until:
            return 0.0
        if now < entry.blocked_until:
            return entry.blocked_until - now
        del self.entries[addr]   # the block is over: a fresh start
        return 0.0

    def failed(self, addr: str, now: float) -> None:
        if self.wait_seconds(addr, now) > 0:
            return  # already blocked: the block is not extended
        entry = self.entries.pop(addr, None)
        if entry is None:
            self._make_room(now)
            entry = _Failures(self.max_failures)
        self.entries[addr] = entry
        times = entry.times
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        if len(times) >= self.max_failures:
            entry.blocked_until = now + self.window
            times.clear()

    def succeeded(self, addr: str) -> None:
        self.entries.pop(addr, None)

    def _stale(self, entry: _Failures, now: float) -> bool:
        return entry.blocked_until <= now and (not entry.times or entry.times[-1] <= now - self.window)

    def _make_room(self, now: float) -> None:
        while self.entries and self._stale(next(iter(self.entries.values())), now):
            self.entries.popitem(last=False)
        while len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=16)
def _networks(items: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in items)


def _last_value(request: Request, name: str) -> str:
    """The last comma-separated item of every `name` header, in order ("" when there is none)."""
    values = [v.strip() for h in request.headers.getlist(name) for v in h.split(",")]
    values = [v for v in values if v]
    return values[-1] if values else ""


def from_trusted_proxy(request: Request, trusted: list[str] | tuple[str, ...]) -> bool:
    """True when the direct peer is in server.trusted_proxies."""
    if not trusted:
        return False
    client = request.scope.get("client")
    peer = _ip(client[0]) if client else None
    if peer is None:
        return False
    return any(peer.version == net.version and peer in net for net in _networks(tuple(trusted)))


def client_address(request: Request, trusted: list[str] | tuple[str, ...]) -> str:
    """The direct peer; when that is a trusted proxy, the last address of x-forwarded-for."""
    client = request.scope.get("client")
    peer = client[0] if client else ""
    if from_trusted_proxy(request, trusted):
        forwarded = _ip(_last_value(request, "x-forwarded-for"))
        if forwarded is not None:
            return str(forwarded)
    ip = _ip(peer)
    return str(ip) if ip is not None else peer


def is_secure(request: Request, trusted: list[str] | tuple[str, ...]) -> bool:
    """The request arrived over TLS, or a trusted proxy says its client's did."""
    if request.scope.get("scheme") == "https":
        return True
    return (from_trusted_proxy(request, trusted)
            and _last_value(request, "x-forwarded-proto").lower() == "https")


def fmt(dim: str, v: float | int) -> str:
    """An amount in its dimension's unit: USD as money, seconds as a duration, a count with separators."""
    unit = BY_NAME[dim].unit if dim in BY_NAME else ""
    if unit == "USD":
        if v >= 1 or v == 0:
            return f"${v:,.2f}"
        digits = f"{v:.6f}".rstrip("0")
        return "$" + digits if digits != "0." else "<$0.000001"
    if unit == "s":
        s = int(v)
        if v < 60:
            return f"{v:.1f}s"
        return f"{s // 60}m {s % 60:02d}s" if v < 3600 else f"{s // 3600}h {s // 60 % 60:02d}m"
    return f"{int(v):,}"


def page(title: str, body: str, status: int = 200, refresh: bool = False) -> HTMLResponse:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>")
    return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store",
                                                           "x-frame-options": "DENY",
                                                           "referrer-policy": "no-referrer"})


def login_form(error: str | None = None, status: int = 200) -> HTMLResponse:
    err = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return page("budget-proxy: sign in", (
        '<form class="login" method="post" action="login"><h2>budget-proxy dashboard</h2>'
        f'{err}<label for="key">Admin key</label>'
        '<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>'
        '<button type="submit">Sign in</button></form>'), status)


def too_many_attempts(wait: float) -> HTMLResponse:
    seconds = max(1, math.ceil(wait))
    resp = page("budget-proxy: too many attempts", (
        '<form class="login"><h2>budget-proxy dashboard</h2>'
        '<p class="error" role="alert">Too many failed sign-in attempts from your address.</p>'
        f'<p>Wait {seconds} s, then try again.</p></form>'), 429)
    resp.headers["retry-after"] = str(seconds)
    return resp


def dim_row(label: str, dim: str, budget: dict[str, Any]) -> str:
    limit, used = budget["limit"][dim], budget["used"][dim]
    held = budget["held"].get(dim, 0)
    used_pct = min(100.0, 100.0 * used / limit) if limit else 100.0
    held_pct = min(100.0 - used_pct, 100.0 * held / limit) if limit else 0.0
    level = "over" if used_pct >= 90 else "warn" if used_pct >= 75 else "ok"
    fig = f"{fmt(dim, used)} / {fmt(dim, limit)} · {used_pct:.0f}%" + (f" · {fmt(dim, held)} held" if held else "")
    return (f'<div class="dim {level}" data-scope="{escape(label)}" data-dim="{dim}" data-used="{used}" '
            f'data-limit="{limit}" data-held="{held}"><div class="head"><span class="name">{dim}</span>'
            f'<span class="fig">{escape(fig)}</span></div>'
            f'<div class="bar" role="meter" aria-valuemin="0" aria-valuemax="{limit}" aria-valuenow="{used}">'
            f'<span class="used" style="width:{used_pct:.2f}%"></span>'
            f'<span class="held" style="width:{held_pct:.2f}%"></span></div></div>')


def scope_block(label: str, budget: dict[str, Any]) -> str:
    resets = budget["resets_at"]
    period = "no period, never resets" if not resets else \
        f"per {budget['period']} · resets {resets.replace('T', ' ').replace('Z', ' UTC')}"
    rows = "".join(dim_row(label, d, budget) for d in DIMS if d in budget["limit"])
    if not rows:
        rows = '<div class="none">no limit of its own</div>'
    free = [f"{d} {fmt(d, budget['used'][d])}" for d in DIMS if d not in budget["limit"] and budget["used"].get(d)]
    extra = f'<div class="extra">also used: {escape(" · ".join(free))}</div>' if free else ""
    return f'<div class="meta">{escape(period)}</div>{rows}{extra}'


MAX_TRENDS = 50        # scopes drawn with a trend (the most used first); the rest are listed without
TOP_RUNS = 3           # runs shown per key with a run budget (the most used of its latest RUNS_SCANNED)
RUNS_SCANNED = 50
MAX_RUN_KEYS = 50      # keys with a run budget whose runs are shown (one list_runs query each)
SPARK_W, SPARK_H = 240, 40

# The dimensions the usage history can draw (proxy/store/base.py Tally), in the dimension's unit.
TREND_DIMS: dict[str, Callable[[Tally], float]] = {
    "tokens": lambda t: t.input_tokens + t.output_tokens,
    "cost_usd": lambda t: in_unit("cost_usd", t.cost_nanos),
    "input_tokens": lambda t: t.input_tokens,
    "output_tokens": lambda t: t.output_tokens,
    "steps": lambda t: t.steps,
}


class Trend(NamedTuple):
    """A scope's usage history: every bucket of the window, oldest first."""

    bucket: str                        # "hour" (the last 24 h) | "day" (the last 30 days)
    series: list[tuple[int, Tally]]


def trend_window(period: str, now: float) -> tuple[str, int, int]:
    """(bucket, start, end): the last 24 h by hour for a scope of period hour/day/none, the last
    30 days by day for week/month; the current bucket is the last."""
    if period in ("week", "month"):
        end = floor_to(now, BUCKETS["day"]) + BUCKETS["day"]
        return "day", end - 30 * BUCKETS["day"], end
    end = floor_to(now, BUCKETS["hour"]) + BUCKETS["hour"]
    return "hour", end - 24 * BUCKETS["hour"], end


def fractions(budget: dict[str, Any]) -> dict[str, float]:
    """used / limit of each limited dimension (a limit of 0: 1.0 once anything is used, else 0)."""
    out = {}
    for d, limit in budget["limit"].items():
        used = budget["used"].get(d, 0) or 0
        out[d] = used / limit if limit else (1.0 if used else 0.0)
    return out


def fraction_used(budget: dict[str, Any]) -> float:
    """The highest fraction used across the scope's limited dimensions (-1: it has no limit)."""
    return max(fractions(budget).values(), default=-1.0)


def trend_dim(budget: dict[str, Any]) -> str:
    """What a scope's trend draws: its most used limited dimension the history has, else tokens."""
    ranked = sorted(fractions(budget).items(), key=lambda kv: -kv[1])
    return next((d for d, _ in ranked if d in TREND_DIMS), "tokens")


def sparkline(values: list[float]) -> str:
    """An inline SVG line (and the area under it) of `values`, scaled to the largest."""
    n, peak = len(values), max(values, default=0) or 1
    step = SPARK_W / max(1, n - 1)
    pts = " ".join(f"{i * step:.1f},{SPARK_H - 2 - (v / peak) * (SPARK_H - 4):.1f}" for i, v in enumerate(values))
    return (f'<svg class="spark" viewBox="0 0 {SPARK_W} {SPARK_H}" preserveAspectRatio="none" role="img" '
            f'aria-label="usage trend" data-points="{n}">'
            f'<polygon class="area" points="0,{SPARK_H} {pts} {SPARK_W},{SPARK_H}"/>'
            f'<polyline points="{pts}" vector-effect="non-scaling-stroke"/></svg>')


def clock_text(t: float, now: float) -> str:
    """14:20 UTC today, else 2026-12-09 14:20 UTC."""
    when = datetime.fromtimestamp(t, timezone.utc)
    same_day = when.date() == datetime.fromtimestamp(now, timezone.utc).date()
    return when.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC")


def runs_out(budget: dict[str, Any], trend: Trend, now: float) -> tuple[str, bool] | None:
    """When the scope runs out at its recent rate: (text, soon), or None when it is not burning
    (no limit the history can measure, or nothing used recently). The recent rate is what the
    last two buckets hold (the previous one and the current one so far: the last 1-2 hours, or
    1-2 days) over the time since the previous one began; the earliest dimension to run out wins."""
    if len(trend.series) < 2:
        return None
    since = trend.series[-2][0]
    elapsed = max(1.0, now - since)
    earliest: float | None = None
    for d, limit in budget["limit"].items():
        if d not in TREND_DIMS:
            continue
        rate = sum(TREND_DIMS[d](t) for _, t in trend.series[-2:]) / elapsed
        if rate <= 0:
            continue
        left = limit - (budget["used"].get(d, 0) or 0) - (budget["held"].get(d, 0) or 0)
        at = now + max(0.0, left) / rate
        earliest = at if earliest is None else min(earliest, at)
    if earliest is None:
        return None
    resets = budget.get("resets_at")
    if resets and earliest >= datetime.fromisoformat(resets.replace("Z", "+00:00")).timestamp():
        return "at this rate: not before reset", False
    if earliest <= now:
        return "at this rate: out now", True
    return f"runs out ~{clock_text(earliest, now)}", earliest - now < 3 * 3600


def trend_block(budget: dict[str, Any], trend: Trend | None, now: float) -> str:
    if trend is None:
        return ""
    dim = trend_dim(budget)
    values = [TREND_DIMS[dim](t) for _, t in trend.series]
    span = "last 24 h by hour" if trend.bucket == "hour" else "last 30 days by day"
    cap = (f'<div class="cap"><span>{dim} · {span}</span>'
           f'<span>peak {escape(fmt(dim, max(values, default=0)))}/{trend.bucket} · '
           f'total {escape(fmt(dim, sum(values)))}</span></div>')
    burn = runs_out(budget, trend, now)
    burn_html = (f'<div class="burn{" soon" if burn[1] else ""}">{escape(burn[0])}</div>' if burn else "")
    return f'<div class="trend" data-dim="{dim}" data-bucket="{trend.bucket}">{sparkline(values)}{cap}</div>{burn_html}'


def scope_cards(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every team and key scope as {"label", "team", "key", "kind", "runtime", "budget", "fraction"},
    the most used first (then by name)."""
    cards = []
    for team in doc["teams"]:
        name = team["name"]
        cards.append({"label": name, "team": name, "key": None, "kind": "team", "runtime": False,
                      "budget": team["budget"]})
        for k in team["keys"]:
            cards.append({"label": f"{name}/{k['name']}", "team": name, "key": k["name"], "kind": "key",
                          "runtime": bool(k.get("runtime")), "budget": k["budget"]})
    for c in cards:
        c["fraction"] = fraction_used(c["budget"])
    cards.sort(key=lambda c: (-c["fraction"], c["label"]))
    return cards


def card_html(c: dict[str, Any], trend: Trend | None, now: float, trended: bool) -> str:
    label, fr = c["label"], c["fraction"]
    badge = '<span class="kind">runtime</span>' if c["runtime"] else ""
    note = "" if trended else '<div class="meta">trend: only the most used scopes have one</div>'
    return (f'<section class="scope" data-scope="{escape(label)}" data-kind="{c["kind"]}" '
            f'data-fraction="{"" if fr < 0 else f"{fr:.4f}"}"{" data-runtime" if c["runtime"] else ""}>'
            f'<h2>{c["kind"]} {escape(label)}{badge}</h2>{scope_block(label, c["budget"])}'
            f'{trend_block(c["budget"], trend, now)}{note}</section>')


def extras_html(cards: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    runtime = [c["label"] for c in cards if c["runtime"]]
    rt = ("".join(f"<li>{escape(label)}</li>" for label in sorted(runtime)) if runtime
          else '<li class="none">none</li>')
    parts = [f'<h2>Runtime keys</h2><ul class="runs runtime-keys">{rt}</ul>']
    if runs:
        items = []
        for r in runs:
            top = "".join(f'<li class="run" data-run="{escape(x["run"])}">{escape(x["run"])} · '
                          f'{escape(x["text"])}</li>' for x in r["top"])
            items.append(f'<div class="keyruns" data-key="{escape(r["label"])}" data-active="{r["active"]}">'
                         f'<div class="head"><span class="name">{escape(r["label"])}</span>'
                         f'<span class="fig">{r["active"]} active run{"" if r["active"] == 1 else "s"}</span></div>'
                         f'{f"<ul class=runs>{top}</ul>" if top else ""}</div>')
        parts.append("<h2>Active runs</h2>" + "".join(items))
    return f'<section class="extras">{"".join(parts)}</section>'


def render_dashboard(doc: dict[str, Any], now: float, trends: dict[str, Trend] | None = None,
                     runs: list[dict[str, Any]] | None = None) -> str:
    """The page's body: every scope, the most used first; the first MAX_TRENDS with their trend
    (`trends`, by label), then runtime keys and active runs."""
    trends = trends or {}
    cards = scope_cards(doc)
    body = "".join(card_html(c, trends.get(c["label"]), now, i < MAX_TRENDS or not trends)
                   for i, c in enumerate(cards))
    body = (body + extras_html(cards, runs or [])) if cards else '<p class="none">No teams configured.</p>'
    stamp = (iso(now) or "").replace("T", " ").replace("Z", " UTC")
    return (f'<header><h1>budget-proxy</h1><small>as of {escape(stamp)} · refreshes every {REFRESH_SECONDS}s'
            f'</small><form method="post" action="logout"><button type="submit">Sign out'
            f'</button></form></header><main>{body}</main>')


async def load_trends(store: Any, cards: list[dict[str, Any]], now: float) -> dict[str, Trend]:
    """The trends of the first MAX_TRENDS cards: one usage_hours query each. A store that cannot
    answer leaves the trends out (the budgets still show)."""
    async def one(c: dict[str, Any]) -> tuple[str, Trend]:
        bucket, start, end = trend_window(c["budget"]["period"], now)
        hours = await store.usage_hours(c["team"], c["key"], start, end)
        return c["label"], Trend(bucket, bucket_tallies(hours, start, end, BUCKETS[bucket]))
    try:
        return dict(await asyncio.gather(*(one(c) for c in cards[:MAX_TRENDS])))
    except Exception as exc:
        log.error("dashboard: usage history unavailable: %s", exc.__class__.__name__)
        return {}


async def load_runs(state: Any, doc: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Per key with a run budget: its active runs and the TOP_RUNS most used of its latest
    RUNS_SCANNED (proxy/admin_runs.py's list_runs)."""
    from proxy.runtime_keys import caller_of

    rt = state.runtime
    records = None
    out = []
    for team in doc["teams"]:
        for k in team["keys"]:
            name = k["name"]
            if k.get("runtime"):
                if records is None:
                    records = {(r.team, r.name): r for r in await state.store.list_keys()}
                rec = records.get((team["name"], name))
                limits = caller_of(rec).run_limits if rec is not None else None
            else:
                limits = rt.runs.limits_for(team["name"], name)
            if limits is None:
                continue
            if len(out) >= MAX_RUN_KEYS:
                return out
            prefix = run_scope_id(team["name"], name, "")
            active, entries = await state.store.list_runs(prefix, now, RUNS_SCANNED)
            ranked = []
            for scope_id, st, _ in entries:
                view = scope_view(Scope("run", scope_id[len(prefix):], scope_id, limits, "none"), st, now)
                fr = fractions(view)
                dim = max(fr, key=lambda d: fr[d]) if fr else None
                text = (f"{fr[dim]:.0%} of {dim} ({fmt(dim, view['used'].get(dim, 0) or 0)} / "
                        f"{fmt(dim, view['limit'][dim])})") if dim else "no limit"
                ranked.append({"run": view["name"], "fraction": fr[dim] if dim else -1.0, "text": text})
            ranked.sort(key=lambda x: (-x["fraction"], x["run"]))
            out.append({"label": f"{team['name']}/{name}", "active": active, "top": ranked[:TOP_RUNS]})
    return out


def build_dashboard_routes(state: Any, error_response: Any) -> list[Route]:
    revocations = SessionRevocations()
    throttle = LoginThrottle()

    def admin_key(request: Request) -> str:
        key = state.runtime.config.admin_key.get_secret_value()
        if not key:
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        return key

    def trusted() -> list[str]:
        return state.runtime.config.server.trusted_proxies

    def session(request: Request, key: str) -> tuple[str, int] | None:
        """The request's live session: signed with the current admin key, unexpired, not revoked."""
        found = read_session(request.cookies.get(COOKIE, ""), key, state.clock())
        if found is None or revocations.is_revoked(*found):
            return None
        return found

    async def authorized(request: Request) -> bool:
        """True for the admin key in a header or a valid session cookie; raises 403/401."""
        key = admin_key(request)
        headers = dict(request.scope["headers"])
        if b"x-api-key" in headers or b"authorization" in headers:
            secret = presented_secret(headers)
            if state.runtime.keyring.is_admin(secret):
                return True
            if state.runtime.keyring.lookup(secret) is not None or await state.runtime_keys.is_key(secret):
                raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
            raise AuthenticationError("Invalid admin key.")
        return session(request, key) is not None

    async def dashboard(request: Request) -> Response:
        try:
            if not await authorized(request):
                return RedirectResponse("login", status_code=303)
            doc = await usage_document(state)
            now = state.clock()
            config_keys = state.runtime.budgets.keys
            for team in doc["teams"]:
                for k in team["keys"]:
                    k["runtime"] = (team["name"], k["name"]) not in config_keys
            try:
                runs = await load_runs(state, doc, now)
            except Exception as exc:
                log.error("dashboard: runs unavailable: %s", exc.__class__.__name__)
                runs = []
            trends = await load_trends(state.store, scope_cards(doc), now)
        except StoreUnavailable as err:
            return page("budget-proxy: unavailable", f'<p class="error">{escape(err.message)}</p>', 503, True)
        except ProxyError as err:
            return error_response(err)
        return page("budget-proxy: budgets", render_dashboard(doc, now, trends, runs), refresh=True)

    async def login_page(request: Request) -> Response:
        try:
            admin_key(request)
        except ProxyError as err:
            return error_response(err)
        return login_form()

    async def login(request: Request) -> Response:
        try:
            admin_key(request)
        except ProxyError as err:
            return error_response(err)
        addr = client_address(request, trusted())
        wait = throttle.wait_seconds(addr, state.clock())
        if wait > 0:
            return too_many_attempts(wait)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return login_form("The form is too large.", 413)
        presented = parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0].strip()
        # Again, with no await between this check and the failure's record: attempts sent together
        # cannot get more than LOGIN_MAX_FAILURES keys checked while their bodies were being read.
        now = state.clock()
        wait = throttle.wait_seconds(addr, now)
        if wait > 0:
            return too_many_attempts(wait)
        if not state.runtime.keyring.is_admin(presented):
            throttle.failed(addr, now)
            return login_form("That is not the admin key.", 401)
        throttle.succeeded(addr)
        key = state.runtime.config.admin_key.get_secret_value()  # the current one (a reload may have
        resp = RedirectResponse("dashboard", status_code=303)    # come while the form was read)
        resp.set_cookie(COOKIE, issue_session(key, now), max_age=SESSION_SECONDS, path="/admin",
                        httponly=True, samesite="strict", secure=is_secure(request, trusted()))
        return resp

    async def logout(request: Request) -> Response:
        key = state.runtime.config.admin_key.get_secret_value()
        found = session(request, key) if key else None
        if found is not None:
            revocations.revoke(*found, now=state.clock())
        resp = RedirectResponse("login", status_code=303)
        resp.delete_cookie(COOKIE, path="/admin", httponly=True, samesite="strict",
                           secure=is_secure(request, trusted()))
        return resp

    return [
        Route("/admin/dashboard", dashboard, methods=["GET"]),
        Route("/admin/login", login_page, methods=["GET"]),
        Route("/admin/login", login, methods=["POST"]),
        Route("/admin/logout", logout, methods=["POST"]),
    ]
