"""The dashboard's HTML: the page shell, the login form, one card per scope (bars, trend sparkline,
runs-out time) and the runtime-key and active-run lists. Inline CSS and SVG only: nothing is
fetched, no script runs; one column on a phone."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape
from typing import Any, Callable, NamedTuple

from starlette.responses import HTMLResponse

from proxy.ledger import BY_NAME, DIMENSIONS, in_unit
from proxy.periods import iso
from proxy.store.base import Tally

REFRESH_SECONDS = 5
DIMS = DIMENSIONS
MAX_TRENDS = 50        # scopes drawn with a trend (the most used first); the rest are listed without
SPARK_W, SPARK_H = 240, 40

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


# The dimensions the usage history (a Tally per bucket) can draw, in the dimension's unit.
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

