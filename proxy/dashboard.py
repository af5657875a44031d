"""GET /admin/dashboard: a server-rendered page for people; no build step, no external assets.

Auth, in this order: no admin key configured -> 404 (as /admin); a key in x-api-key or
Authorization decides alone (admin -> page, proxy key -> 403, other -> 401); otherwise the
session cookie set by the login form; otherwise 303 to the login page. The cookie holds
HMAC-SHA256(admin_key, "dashboard"), never the key itself, so it changes when the admin key
does (that is how every session is revoked); logout clears it in this browser only."""
from __future__ import annotations

import hashlib
import hmac
from html import escape
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.admin import usage_document
from proxy.auth import presented_secret
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.periods import iso

COOKIE = "bp_dashboard"
REFRESH_SECONDS = 5
MAX_FORM_BYTES = 4096
DIMS = ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps", "wall_clock")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{display:flex;align-items:center;gap:16px;padding:12px 24px;background:#1d2330;color:#fff}
header h1{font-size:18px;margin:0;flex:1}header small{color:#aab}
header button,form.login button{font:inherit;padding:4px 12px;border-radius:4px;border:1px solid #889;cursor:pointer}
main{padding:16px 24px;display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:16px}
section.team{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px #0002}
h2{font-size:16px;margin:0 0 4px}h3{font-size:14px;margin:12px 0 4px;border-top:1px solid #e3e5ea;padding-top:8px}
.meta{color:#667;font-size:12px;margin-bottom:6px}.none{color:#889;font-style:italic}
.dim{margin:6px 0}.head{display:flex;justify-content:space-between;gap:12px;font-size:13px}
.name{color:#445}.fig{font-variant-numeric:tabular-nums;text-align:right}
.bar{height:10px;margin-top:2px;background:#e6e8ee;border-radius:5px;overflow:hidden;display:flex}
.used{background:#2e9d5b}.warn .used{background:#d99a1e}.over .used{background:#d0453b}
.held{background:repeating-linear-gradient(45deg,#7aa7e0 0 4px,#a9c6ee 4px 8px)}
.extra{color:#667;font-size:12px}.error{color:#b3261e;margin:8px 0}
form.login{max-width:340px;margin:80px auto;background:#fff;padding:24px;border-radius:8px;box-shadow:0 1px 3px #0002}
form.login input{width:100%;box-sizing:border-box;padding:6px;margin:8px 0 12px;font:inherit}
"""


def session_token(admin_key: str) -> str:
    return hmac.new(admin_key.encode(), b"dashboard", hashlib.sha256).hexdigest()


def fmt(dim: str, v: float | int) -> str:
    if dim == "cost_usd":
        if v >= 1 or v == 0:
            return f"${v:,.2f}"
        digits = f"{v:.6f}".rstrip("0")
        return "$" + digits if digits != "0." else "<$0.000001"
    if dim == "wall_clock":
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


def render_dashboard(doc: dict[str, Any], now: float) -> str:
    teams = []
    for team in doc["teams"]:
        name = team["name"]
        keys = "".join(f'<h3>key {escape(k["name"])}</h3>{scope_block(name + "/" + k["name"], k["budget"])}'
                       for k in team["keys"])
        teams.append(f'<section class="team" data-team="{escape(name)}"><h2>team {escape(name)}</h2>'
                     f'{scope_block(name, team["budget"])}{keys}</section>')
    body = "".join(teams) or '<p class="none">No teams configured.</p>'
    stamp = (iso(now) or "").replace("T", " ").replace("Z", " UTC")
    return (f'<header><h1>budget-proxy</h1><small>as of {escape(stamp)} · refreshes every {REFRESH_SECONDS}s'
            f'</small><form method="post" action="logout"><button type="submit">Sign out'
            f'</button></form></header><main>{body}</main>')


def build_dashboard_routes(state: Any, error_response: Any) -> list[Route]:
    def admin_key(request: Request) -> str:
        key = state.runtime.config.admin_key.get_secret_value()
        if not key:
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        return key

    def authorized(request: Request) -> bool:
        """True for the admin key in a header or a valid session cookie; raises 403/401."""
        key = admin_key(request)
        headers = dict(request.scope["headers"])
        if b"x-api-key" in headers or b"authorization" in headers:
            secret = presented_secret(headers)
            if state.runtime.keyring.is_admin(secret):
                return True
            if state.runtime.keyring.lookup(secret) is not None:
                raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
            raise AuthenticationError("Invalid admin key.")
        return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session_token(key).encode())

    async def dashboard(request: Request) -> Response:
        try:
            if not authorized(request):
                return RedirectResponse("login", status_code=303)
            doc = await usage_document(state)
        except StoreUnavailable as err:
            return page("budget-proxy: unavailable", f'<p class="error">{escape(err.message)}</p>', 503, True)
        except ProxyError as err:
            return error_response(err)
        return page("budget-proxy: budgets", render_dashboard(doc, state.clock()), refresh=True)

    async def login_page(request: Request) -> Response:
        try:
            admin_key(request)
        except ProxyError as err:
            return error_response(err)
        return login_form()

    async def login(request: Request) -> Response:
        try:
            key = admin_key(request)
        except ProxyError as err:
            return error_response(err)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return login_form("The form is too large.", 413)
        presented = parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0].strip()
        if not state.runtime.keyring.is_admin(presented):
            return login_form("That is not the admin key.", 401)
        resp = RedirectResponse("dashboard", status_code=303)
        resp.set_cookie(COOKIE, session_token(key), path="/admin", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
        return resp

    async def logout(request: Request) -> Response:
        resp = RedirectResponse("login", status_code=303)
        resp.delete_cookie(COOKIE, path="/admin", httponly=True, samesite="strict")
        return resp

    return [
        Route("/admin/dashboard", dashboard, methods=["GET"]),
        Route("/admin/login", login_page, methods=["GET"]),
        Route("/admin/login", login, methods=["POST"]),
        Route("/admin/logout", logout, methods=["POST"]),
    ]
