"""The admin dashboard: auth rules over HTTP, the rendered figures, and a real headless Chromium
driven over the DevTools protocol (log in through the form, read the DOM, take a screenshot).

The browser test skips when Chromium is missing, unless BUDGET_PROXY_REQUIRE_BROWSER is set
(as in CI), where a missing Chromium fails. BUDGET_PROXY_SCREENSHOT=PATH also writes the
screenshot there (`make browser` refreshes docs/dashboard.png that way)."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import pytest

from proxy import dashboard_html
from proxy.app import build_runtime, create_app
from proxy.config import ConfigError, parse_config
from proxy.dashboard import (COOKIE, MAX_TRENDS, SESSION_SECONDS, LoginThrottle, SessionRevocations,
                             issue_session, read_session, render_dashboard)
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.harness import make_config
from tests.simulator import Reply

ADMIN = "bp-admin-dashboard-key-4242"
MSG = [{"role": "user", "content": "hello"}]
SESSION = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[0-9]{1,12}\.[0-9a-f]{64}$")  # id.expiry.hmac
ODD_KEY = "<b>ops</b> & co"  # a key name that must be shown literally
RUNNER_KEY = "bp-runner-dashboard-key-0000000001"


def teams() -> dict:
    return {
        "research": {"budget": {"tokens": 10_000, "cost_usd": 0.04, "period": "day"},
                     "keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 1_000, "steps": 10}},
                              ODD_KEY: {"key": BETA_KEY},
                              "runner": {"key": RUNNER_KEY, "run_budget": {"steps": 4}}}},
        "support": {"budget": {"steps": 20, "period": "week"},
                    "keys": {"gamma": {"key": GAMMA_KEY, "budget": {"output_tokens": 2_000, "wall_clock": "2h"}}}},
    }


@pytest.fixture
def admin_proxy(start):
    return start(teams=teams(), admin_key=ADMIN)


def call(proxy, key: str, max_tokens: int = 50):
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0).messages.create(
        model="claude-haiku-4-5", max_tokens=max_tokens, messages=MSG)


def traffic(proxy, sim) -> None:
    """alpha 700 + 120 tokens (2 steps), the odd key 5000, gamma 1920 (1900 output)."""
    sim.queue(Reply(input_tokens=500, output_tokens=200), Reply(input_tokens=100, output_tokens=20),
              Reply(input_tokens=4000, output_tokens=1000), Reply(input_tokens=20, output_tokens=1900))
    call(proxy, ALPHA_KEY, 200)
    call(proxy, ALPHA_KEY, 50)
    call(proxy, BETA_KEY, 1000)
    call(proxy, GAMMA_KEY, 1900)


def rows(html: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(scope label, dimension): {"used", "limit", "held"}} from the data attributes."""
    out = {}
    for m in re.finditer(r'<div class="dim[^"]*" data-scope="([^"]*)" data-dim="(\w+)" data-used="([^"]*)" '
                         r'data-limit="([^"]*)" data-held="([^"]*)"', html):
        out[(m[1], m[2])] = {"used": m[3], "limit": m[4], "held": m[5]}
    return out


def login(proxy, key: str = ADMIN, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(proxy.url + "/admin/login", data={"key": key}, headers=headers)


def session_of(r: httpx.Response) -> str:
    """The session cookie's value in a login response's set-cookie."""
    m = re.match(rf"{COOKIE}=([^;]*);", r.headers["set-cookie"])
    assert m, r.headers.get("set-cookie")
    return m[1]


def dash(proxy, session: str) -> httpx.Response:
    """GET the dashboard with this session cookie (as a copied cookie would be sent)."""
    return httpx.get(proxy.url + "/admin/dashboard", headers={"cookie": f"{COOKIE}={session}"})


class Clock:
    """The app's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# --- auth rules ----------------------------------------------------------------------------------

def test_everything_is_404_without_an_admin_key(proxy):
    for method, path in (("GET", "/admin/dashboard"), ("GET", "/admin/login"), ("POST", "/admin/login")):
        r = httpx.request(method, proxy.url + path, headers={"x-api-key": ALPHA_KEY}, data={"key": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_without_auth_redirects_to_the_login_form(admin_proxy):
    r = httpx.get(admin_proxy.url + "/admin/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "login"
    r = httpx.get(admin_proxy.url + "/admin/dashboard", follow_redirects=True)
    assert r.status_code == 200 and r.url.path == "/admin/login"
    assert '<form class="login" method="post" action="login">' in r.text and 'type="password"' in r.text
    # a cookie that is not a session signed with the admin key is no session
    for value in (ADMIN, issue_session("some-other-key", time.time()), "x" * 5000):
        assert dash(admin_proxy, value).status_code == 303
    good = issue_session(ADMIN, time.time())
    sid, expires, mac = good.split(".")
    assert dash(admin_proxy, good).status_code == 200
    assert dash(admin_proxy, f"{sid}.{int(expires) + 3600}.{mac}").status_code == 303  # a longer life: no


def test_header_auth(admin_proxy):
    url = admin_proxy.url + "/admin/dashboard"
    r = httpx.get(url, headers={"x-api-key": ALPHA_KEY})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(url, headers={"x-api-key": "bp-wrong"}).status_code == 401
    cookie = f"{COOKIE}={issue_session(ADMIN, time.time())}"
    assert httpx.get(url, headers={"x-api-key": ALPHA_KEY, "cookie": cookie}).status_code == 403
    for headers in ({"x-api-key": ADMIN}, {"authorization": f"Bearer {ADMIN}"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["cache-control"] == "no-store"
        assert '<meta http-equiv="refresh" content="5">' in r.text


def test_login_sets_a_session_cookie_that_works_and_logout_clears_it(admin_proxy):
    with httpx.Client(base_url=admin_proxy.url) as browser:
        r = browser.post("/admin/login", data={"key": ADMIN})
        assert r.status_code == 303 and r.headers["location"] == "dashboard"
        cookie = r.headers["set-cookie"]
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attrs and "samesite=strict" in cookie.lower()
        assert "max-age=43200" in cookie.lower() and "secure" not in attrs  # 12 h; plain http
        assert SESSION.match(session_of(r)) and ADMIN not in cookie
        r = browser.get("/admin/dashboard")
        assert r.status_code == 200 and "team research" in r.text
        r = browser.post("/admin/logout")
        assert r.status_code == 303 and r.headers["location"] == "login"
        assert "bp_dashboard" not in browser.cookies
        assert browser.get("/admin/dashboard").status_code == 303


def test_a_wrong_key_reshows_the_form_with_401(admin_proxy):
    for key in ("nope", ALPHA_KEY, ""):
        r = httpx.post(admin_proxy.url + "/admin/login", data={"key": key})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert 'role="alert">That is not the admin key.' in r.text and 'name="key"' in r.text
    r = httpx.post(admin_proxy.url + "/admin/login", content=b"key=" + b"x" * 10_000,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "set-cookie" not in r.headers


# --- the session (docs/http-api.md "Dashboard") ----------------------------------------------------------------------

@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def clocked_proxy(start, clock):
    return start(teams=teams(), admin_key=ADMIN, clock=clock)


def test_a_session_expires_after_12_hours(clocked_proxy, clock):
    r = login(clocked_proxy)
    assert r.status_code == 303 and "max-age=43200" in r.headers["set-cookie"].lower()
    session = session_of(r)
    assert int(session.split(".")[1]) == int(clock.now) + SESSION_SECONDS  # the expiry it carries
    assert dash(clocked_proxy, session).status_code == 200
    clock.now += SESSION_SECONDS - 1
    assert dash(clocked_proxy, session).status_code == 200
    clock.now += 2
    r = dash(clocked_proxy, session)
    assert r.status_code == 303 and r.headers["location"] == "login"
    # a new login starts a new 12 h
    assert dash(clocked_proxy, session_of(login(clocked_proxy))).status_code == 200


def test_logout_invalidates_a_copied_cookie(admin_proxy):
    other = session_of(login(admin_proxy))  # another browser's session
    with httpx.Client(base_url=admin_proxy.url) as browser:
        r = browser.post("/admin/login", data={"key": ADMIN})
        copied = session_of(r)
        assert dash(admin_proxy, copied).status_code == 200
        r = browser.post("/admin/logout")
        assert r.status_code == 303 and r.headers["location"] == "login"
        assert COOKIE not in browser.cookies
    r = dash(admin_proxy, copied)
    assert r.status_code == 303 and r.headers["location"] == "login"
    # logging out again with the copy, or with garbage, changes nothing; the other session lives on
    for value in (copied, "garbage"):
        r = httpx.post(admin_proxy.url + "/admin/logout", headers={"cookie": f"{COOKIE}={value}"})
        assert r.status_code == 303
    assert dash(admin_proxy, copied).status_code == 303
    assert dash(admin_proxy, other).status_code == 200


def test_a_changed_admin_key_invalidates_every_session(admin_proxy, sim):
    sessions = [session_of(login(admin_proxy)) for _ in range(2)]
    assert all(dash(admin_proxy, s).status_code == 200 for s in sessions)
    new_admin = "bp-admin-dashboard-key-rotated-7"
    admin_proxy.state.runtime = build_runtime(make_config(sim.url, teams(), admin_key=new_admin))  # as a reload does
    for s in sessions:
        r = dash(admin_proxy, s)
        assert r.status_code == 303 and r.headers["location"] == "login"
    assert login(admin_proxy, ADMIN).status_code == 401
    fresh = session_of(login(admin_proxy, new_admin))
    assert dash(admin_proxy, fresh).status_code == 200


def secure(r: httpx.Response) -> bool:
    return "secure" in {a.strip().lower() for a in r.headers["set-cookie"].split(";")}


def test_cookie_is_secure_only_over_tls_or_from_a_trusted_proxy(start):
    https = {"x-forwarded-proto": "https"}
    untrusting = start(teams=teams(), admin_key=ADMIN)
    assert not secure(login(untrusting)) and not secure(login(untrusting, headers=https))
    elsewhere = start(teams=teams(), admin_key=ADMIN, server={"trusted_proxies": ["10.0.0.0/8", "::1"]})
    assert not secure(login(elsewhere, headers=https))  # the peer, 127.0.0.1, is not listed
    trusting = start(teams=teams(), admin_key=ADMIN, server={"trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]})
    assert secure(login(trusting, headers=https))
    assert secure(login(trusting, headers={"x-forwarded-proto": "http, https"}))  # the last hop's word
    assert not secure(login(trusting)) and not secure(login(trusting, headers={"x-forwarded-proto": "http"}))
    # logout clears it with the same attributes
    r = httpx.post(trusting.url + "/admin/logout", headers=https)
    assert r.status_code == 303 and secure(r) and 'bp_dashboard="";' in r.headers["set-cookie"]


async def test_cookie_is_secure_over_tls():
    """A request whose ASGI scope says https (uvicorn serving TLS itself)."""
    app = create_app(make_config("http://127.0.0.1:9", teams(), admin_key=ADMIN))
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://dashboard.example") as client:
        r = await client.post("/admin/login", data={"key": ADMIN})
        assert r.status_code == 303 and secure(r)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard.example") as client:
        r = await client.post("/admin/login", data={"key": ADMIN})
        assert r.status_code == 303 and not secure(r)


def test_failed_logins_are_throttled_per_address(clocked_proxy, clock):
    for _ in range(10):
        clock.now += 1
        r = login(clocked_proxy, "wrong")
        assert r.status_code == 401
    clock.now += 1
    r = login(clocked_proxy)  # the 11th attempt, with the right key, 1 s after the 10th failure
    assert r.status_code == 429 and "set-cookie" not in r.headers
    assert r.headers["retry-after"] == "59" and "Wait 59 s" in r.text and "Too many failed" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert login(clocked_proxy, "wrong").status_code == 429  # not counted, does not extend the block
    clock.now += 58  # 59 s after the 10th failure
    r = login(clocked_proxy)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    clock.now += 1  # the minute since those failures has passed
    r = login(clocked_proxy)
    assert r.status_code == 303 and dash(clocked_proxy, session_of(r)).status_code == 200
    # a success clears the record: 9 more failures do not block
    for _ in range(9):
        assert login(clocked_proxy, "wrong").status_code == 401
    assert login(clocked_proxy).status_code == 303


def test_failures_count_within_a_minute_only(clocked_proxy, clock):
    for _ in range(9):
        assert login(clocked_proxy, "wrong").status_code == 401
    clock.now += 60  # those 9 are more than a minute old now
    for _ in range(9):
        assert login(clocked_proxy, "wrong").status_code == 401
    assert login(clocked_proxy).status_code == 303


def test_throttle_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy(start, clock):
    trusting = start(teams=teams(), admin_key=ADMIN, clock=clock, server={"trusted_proxies": ["127.0.0.0/8"]})
    attacker = {"x-forwarded-for": "198.51.100.1, 203.0.113.66"}  # the last address is the client
    for _ in range(10):
        assert login(trusting, "wrong", headers=attacker).status_code == 401
    assert login(trusting, headers=attacker).status_code == 429
    assert login(trusting, headers={"x-forwarded-for": "203.0.113.66"}).status_code == 429
    assert login(trusting, headers={"x-forwarded-for": "203.0.113.67"}).status_code == 303  # someone else
    # an untrusted peer's x-forwarded-for is ignored: every attempt is the peer's own
    untrusting = start(teams=teams(), admin_key=ADMIN, clock=clock)
    for i in range(10):
        assert login(untrusting, "wrong", headers={"x-forwarded-for": f"192.0.2.{i}"}).status_code == 401
    assert login(untrusting, headers={"x-forwarded-for": "192.0.2.200"}).status_code == 429


def test_throttle_memory_is_bounded():
    throttle = LoginThrottle(capacity=100)
    now = 1_000.0
    for i in range(10_000):  # an attacker with many addresses
        for _ in range(10):
            throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now)
        now += 0.001
        assert len(throttle) <= 100
    assert throttle.wait_seconds("10.0.39.15", now) > 0  # the most recent ones are still blocked
    assert max(len(e.times) for e in throttle.entries.values()) <= 10
    # records that block nothing any more make room first
    now += 61
    throttle.failed("192.0.2.1", now)
    assert len(throttle) == 1


def test_revoked_sessions_are_bounded_and_fail_closed():
    revoked = SessionRevocations(capacity=3)
    now = 1_000.0
    for i in range(5):
        revoked.revoke(f"s{i}", int(now) + 100 + i, now)
        assert len(revoked) <= 3
    # s0 and s1 were forgotten, but everything expiring no later than s1 is refused
    assert all(revoked.is_revoked(f"s{i}", int(now) + 100 + i) for i in range(5))
    assert revoked.is_revoked("never-revoked", int(now) + 101)
    assert not revoked.is_revoked("never-revoked", int(now) + 102)
    # expired entries go first
    revoked.revoke("late", int(now) + 500, now + 200)
    assert len(revoked) == 1


def test_sessions_are_signed_with_the_admin_key():
    value = issue_session("key-a", 1_000.0)
    sid = value.split(".")[0]
    assert read_session(value, "key-a", 1_000.0) == (sid, 1_000 + SESSION_SECONDS)
    assert read_session(value, "key-b", 1_000.0) is None
    assert read_session(value, "key-a", 1_000.0 + SESSION_SECONDS) is None
    assert issue_session("key-a", 1_000.0) != value  # a new id each time
    assert "key-a" not in value


def test_trusted_proxies_are_validated():
    ok = parse_config({"server": {"trusted_proxies": ["10.0.0.1", " 172.16.0.0/12", "fd00::/8", "10.1.2.3/8"]}}, env={})
    assert ok.proxy.server.trusted_proxies == ["10.0.0.1/32", "172.16.0.0/12", "fd00::/8", "10.0.0.0/8"]
    assert parse_config({}, env={}).proxy.server.trusted_proxies == []
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"trusted_proxies": ["10.0.0.1", "proxy.local", "10.0.0.0/33"]}}, env={})
    assert err.value.problems == [("server.trusted_proxies",
                                   "items 1, 2 are not an IP address or CIDR network (e.g. 10.0.0.5 or 10.0.0.0/8)")]


# --- what the page shows -------------------------------------------------------------------------

def test_page_shows_used_against_limits_and_no_secret(admin_proxy, sim):
    traffic(admin_proxy, sim)
    html = httpx.get(admin_proxy.url + "/admin/dashboard", headers={"x-api-key": ADMIN}).text
    got = rows(html)
    assert got[("research/alpha", "tokens")] == {"used": "820", "limit": "1000", "held": "0"}
    assert got[("research/alpha", "steps")] == {"used": "2", "limit": "10", "held": "0"}
    assert got[("research", "tokens")] == {"used": "5820", "limit": "10000", "held": "0"}
    # haiku-4-5: $1 in, $5 out per million: 4600 in + 1220 out
    assert (float(got[("research", "cost_usd")]["used"]), float(got[("research", "cost_usd")]["limit"])) == \
        (pytest.approx(0.0107), 0.04)
    assert got[("support/gamma", "output_tokens")] == {"used": "1900", "limit": "2000", "held": "0"}
    assert got[("support", "steps")] == {"used": "1", "limit": "20", "held": "0"}
    assert ("support/gamma", "wall_clock") in got and ("support", "tokens") not in got
    assert "820 / 1,000 · 82%" in html and "$0.0107 / $0.04 · 27%" in html
    assert '<div class="dim over" data-scope="support/gamma" data-dim="output_tokens"' in html
    assert '<div class="dim warn" data-scope="research/alpha" data-dim="tokens"' in html
    assert "per day · resets" in html and "per week · resets" in html and "no period, never resets" in html
    assert "&lt;b&gt;ops&lt;/b&gt; &amp; co" in html and "<b>ops" not in html
    for secret in (ADMIN, ALPHA_KEY, BETA_KEY, GAMMA_KEY, "sk-upstream-secret", session_of(login(admin_proxy))):
        assert secret not in html
    for external in ("<script", "<link", "src=", "url(", "http://", "https://"):
        assert external not in html  # inline CSS only: works offline


def test_render_escapes_every_value():
    evil = '"><script>alert(1)</script>'
    scope = {"period": evil, "resets_at": evil, "limit": {"tokens": 10}, "used": {"tokens": 5, "steps": 2},
             "held": {"tokens": 1}}
    html = render_dashboard({"teams": [{"name": evil, "budget": scope, "keys": [{"name": evil, "budget": scope}]}]}, 0)
    assert "<script" not in html and '"><' + "script" not in html
    assert html.count("&lt;script&gt;") >= 4


def scope_order(html: str) -> list[str]:
    return re.findall(r'<section class="scope" data-scope="([^"]*)"', html)


def card(html: str, label: str) -> str:
    """One scope's section of the page."""
    m = re.search(rf'<section class="scope" data-scope="{re.escape(label)}".*?</section>', html, re.S)
    assert m, label
    return m[0]


def spark_points(section: str) -> list[tuple[float, float]]:
    m = re.search(r'<polyline points="([^"]*)"', section)
    assert m, section
    return [tuple(map(float, p.split(","))) for p in m[1].split()]


def admin_get(proxy) -> str:
    r = httpx.get(proxy.url + "/admin/dashboard", headers={"x-api-key": ADMIN})
    assert r.status_code == 200
    return r.text


def at(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


def test_scopes_are_sorted_by_the_highest_fraction_used(admin_proxy, sim):
    traffic(admin_proxy, sim)
    html = admin_get(admin_proxy)
    # gamma output 1900/2000; alpha tokens 820/1000; research tokens 5820/10000; support steps 1/20;
    # then the scopes without a limit of their own, by name
    assert scope_order(html) == ["support/gamma", "research/alpha", "research", "support",
                                 f"research/{ODD_KEY}".replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"),
                                 "research/runner"]
    fractions = [float(f) for f in re.findall(r'<section class="scope"[^>]* data-fraction="([0-9.]+)"', html)]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] == pytest.approx(0.95)
    assert "520px" not in html  # no fixed minimum column width (phones)


def test_render_caps_the_scopes_with_a_trend():
    from proxy.dashboard import Trend
    from proxy.store.base import Tally

    scope = {"period": "day", "resets_at": None, "limit": {"tokens": 100}, "used": {"tokens": 1}, "held": {}}
    doc = {"teams": [{"name": f"t{i:03d}", "budget": scope, "keys": []} for i in range(MAX_TRENDS + 5)]}
    trends = {f"t{i:03d}": Trend("hour", [(3600 * h, Tally()) for h in range(24)]) for i in range(MAX_TRENDS)}
    html = render_dashboard(doc, 0, trends)
    assert html.count("<svg") == MAX_TRENDS and html.count("trend: only the most used scopes have one") == 5


def test_a_sparkline_of_the_last_24_hours_or_30_days(clocked_proxy, clock, sim):
    clock.now = at("2026-12-07T10:30:00Z")
    sim.queue(Reply(input_tokens=500, output_tokens=200))
    call(clocked_proxy, ALPHA_KEY, 200)                      # 700 tokens in the 10:00 hour
    clock.now = at("2026-12-07T12:10:00Z")
    sim.queue(Reply(input_tokens=100, output_tokens=20), Reply(input_tokens=10, output_tokens=1900))
    call(clocked_proxy, ALPHA_KEY, 50)                       # 120 tokens in the 12:00 hour
    call(clocked_proxy, GAMMA_KEY, 1900)
    html = admin_get(clocked_proxy)
    alpha = card(html, "research/alpha")
    assert 'data-bucket="hour"' in alpha and 'data-points="24"' in alpha
    pts = spark_points(alpha)
    assert len(pts) == 24
    ys = [y for _, y in pts]
    # the last point is the 12:00 hour (120), two before it the 10:00 hour (700, the peak)
    assert ys[21] == pytest.approx(2.0) and ys[23] == pytest.approx(38 - 36 * 120 / 700, abs=0.1)
    assert all(y == pytest.approx(38.0) for i, y in enumerate(ys) if i not in (21, 23))
    assert "tokens · last 24 h by hour" in alpha and "total 820" in alpha
    # support's period is a week: 30 days by day, today the peak
    support = card(html, "support")
    assert 'data-bucket="day"' in support and "last 30 days by day" in support
    pts = spark_points(support)
    assert len(pts) == 30 and pts[-1][1] == pytest.approx(2.0) and all(y == pytest.approx(38.0) for _, y in pts[:-1])
    assert "steps · last 30 days by day" in support  # its limited dimension


def test_when_a_burning_scope_runs_out(clocked_proxy, clock, sim):
    clock.now = at("2026-12-07T10:30:00Z")
    sim.queue(Reply(input_tokens=500, output_tokens=200), Reply(input_tokens=100, output_tokens=20))
    call(clocked_proxy, ALPHA_KEY, 200)
    call(clocked_proxy, ALPHA_KEY, 50)
    html = admin_get(clocked_proxy)
    # the recent rate: 820 tokens since 09:00 (5400 s); alpha has 180 tokens left -> 1185 s -> 10:49:45
    assert '<div class="burn soon">runs out ~10:49 UTC</div>' in card(html, "research/alpha")
    # research (per day) has 9180 left -> 16.8 h -> after its reset at midnight
    assert '<div class="burn">at this rate: not before reset</div>' in card(html, "research")
    assert 'class="burn' not in card(html, "support/gamma")  # nothing used: not burning
    # later, with nothing more used, the rate falls: an hour after, 820 over 7200 s
    clock.now = at("2026-12-07T11:15:00Z")  # since 10:00 (the previous hour): 4500 s -> 988 s -> 11:31:28
    assert "runs out ~11:31 UTC" in card(admin_get(clocked_proxy), "research/alpha")
    clock.now = at("2026-12-07T13:00:00Z")  # nothing in the last two hours: not burning
    assert 'class="burn' not in card(admin_get(clocked_proxy), "research/alpha")


def test_runtime_keys_and_active_runs_are_listed(admin_proxy, sim):
    r = httpx.post(admin_proxy.url + "/admin/keys", headers={"x-api-key": ADMIN},
                   json={"team": "support", "name": "ci-bot", "budget": {"tokens": 100}, "run_budget": {"steps": 3}})
    assert r.status_code == 201, r.text
    bot = r.json()["key"]
    sim.queue(*[Reply(input_tokens=5, output_tokens=5) for _ in range(5)])
    client = anthropic.Anthropic(base_url=admin_proxy.url, api_key=RUNNER_KEY, max_retries=0)
    for run in ("r-1", "r-1", "r-1", "r-2"):
        client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG,
                               extra_headers={"x-budget-run": run})
    anthropic.Anthropic(base_url=admin_proxy.url, api_key=bot, max_retries=0).messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=MSG, extra_headers={"x-budget-run": "build-7"})
    html = admin_get(admin_proxy)
    assert '<span class="kind">runtime</span>' in card(html, "support/ci-bot")
    assert "runtime" not in card(html, "research/alpha")
    assert re.search(r'<ul class="runs runtime-keys"><li>support/ci-bot</li></ul>', html)
    assert '<div class="keyruns" data-key="research/runner" data-active="2">' in html
    assert '<div class="keyruns" data-key="support/ci-bot" data-active="1">' in html
    runner = re.search(r'data-key="research/runner".*?</ul></div>', html, re.S)[0]
    assert re.findall(r'data-run="([^"]*)"', runner) == ["r-1", "r-2"]  # the most used first
    assert "r-1 · 75% of steps (3 / 4)" in runner and "2 active runs" in runner
    assert bot not in html


def test_a_history_outage_leaves_the_budgets_shown(admin_proxy, sim):
    traffic(admin_proxy, sim)

    async def broken(*args):
        raise OSError("disk gone")
    admin_proxy.state.store.usage_hours = broken
    html = admin_get(admin_proxy)
    assert "<svg" not in html and scope_order(html)[:2] == ["support/gamma", "research/alpha"]
    assert rows(html)[("research/alpha", "tokens")]["used"] == "820"


def test_store_outage_is_a_503_page_that_retries(admin_proxy):
    async def broken(scopes, now):
        raise OSError("disk gone")
    admin_proxy.state.store.states = broken
    r = httpx.get(admin_proxy.url + "/admin/dashboard", headers={"x-api-key": ADMIN})
    assert r.status_code == 503 and "unavailable" in r.text and 'http-equiv="refresh"' in r.text


# --- a real browser ------------------------------------------------------------------------------

def chromium_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("BUDGET_PROXY_REQUIRE_BROWSER"):
            pytest.fail("BUDGET_PROXY_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


class Chromium:
    """Headless Chromium and one page, driven over the DevTools protocol (flattened sessions)."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary, self.profile = binary, profile
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.waiters: list[tuple[str, asyncio.Future]] = []

    async def __aenter__(self) -> Chromium:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--window-size=1200,900",
            "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            ws_url = await asyncio.wait_for(self._devtools_url(), 60)
        except BaseException:
            self.proc.kill()
            await self.proc.wait()
            raise
        self.drain = asyncio.ensure_future(self._drain_stderr())
        self.http = aiohttp.ClientSession()
        self.reader = None
        try:
            await self._connect(ws_url)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _connect(self, ws_url: str) -> None:
        self.ws = await self.http.ws_connect(ws_url, max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]
        await self.send("Page.enable", session=True)
        await self.viewport(1280, 900, mobile=False)

    async def viewport(self, width: int, height: int, mobile: bool) -> None:
        """Emulate a window of this size (mobile: a phone's, which honours the viewport meta tag)."""
        self.width, self.height = width, height
        await self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                        deviceScaleFactor=1, mobile=mobile)

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await self.ws.close()
        await self.http.close()
        self.proc.kill()
        await self.proc.wait()
        self.drain.cancel()

    async def _devtools_url(self) -> str:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            if m := re.search(rb"DevTools listening on (ws://\S+)", line):
                return m[1].decode()
        raise RuntimeError("chromium exited before its DevTools endpoint was up")

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while await self.proc.stderr.read(65536):
            pass

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            for name, fut in list(self.waiters):
                if data.get("method") == name and not fut.done():
                    fut.set_result(data.get("params"))
                    self.waiters.remove((name, fut))

    async def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut = self.pending[msg_id] = asyncio.get_running_loop().create_future()
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def expect(self, event: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((event, fut))
        return fut

    async def load(self, action: Any, timeout: float = 30) -> None:
        """Run `action` (a coroutine) and wait for the page load it causes."""
        loaded = self.expect("Page.loadEventFired")
        await action
        await asyncio.wait_for(loaded, timeout)

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, max_height: int | None = None) -> bytes:
        """The page down to the end of its content (at most `max_height`, default the window's)."""
        height = await self.js("Math.ceil(document.documentElement.scrollHeight)")
        clip = {"x": 0, "y": 0, "width": self.width, "height": min(max_height or self.height, height), "scale": 1}
        shot = await self.send("Page.captureScreenshot", session=True, format="png", clip=clip,
                               captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


READ_DOM = """JSON.stringify({
  path: location.pathname, cookie: document.cookie,
  scopes: [...document.querySelectorAll("section.scope h2")].map(e => e.textContent),
  labels: [...document.querySelectorAll("section.scope")].map(e => e.dataset.scope),
  bold: document.querySelectorAll("main b").length,
  scrollWidth: document.documentElement.scrollWidth,
  columns: new Set([...document.querySelectorAll("section.scope")].map(e => e.getBoundingClientRect().left)).size,
  cards: [...document.querySelectorAll("section.scope, section.extras")].map(e => {
    const r = e.getBoundingClientRect(); return {left: r.left, right: r.right};
  }),
  sparks: [...document.querySelectorAll("section.scope svg.spark")].map(svg => {
    const r = svg.getBoundingClientRect();
    return {scope: svg.closest("section").dataset.scope, width: r.width, height: r.height,
            points: svg.querySelector("polyline").points.numberOfItems,
            line: svg.querySelector("polyline").getBBox().width};
  }),
  burns: Object.fromEntries([...document.querySelectorAll("section.scope .burn")].map(
    e => [e.closest("section").dataset.scope, e.textContent])),
  runtime: [...document.querySelectorAll("section.scope[data-runtime] h2")].map(e => e.textContent),
  runs: [...document.querySelectorAll(".keyruns")].map(e => [e.dataset.key, +e.dataset.active]),
  rows: [...document.querySelectorAll(".dim")].map(d => {
    const bar = d.querySelector(".bar").getBoundingClientRect();
    return {scope: d.dataset.scope, dim: d.dataset.dim, used: +d.dataset.used, limit: +d.dataset.limit,
            held: +d.dataset.held, fig: d.querySelector(".fig").textContent,
            barWidth: bar.width,
            usedFrac: d.querySelector(".used").getBoundingClientRect().width / bar.width,
            heldFrac: d.querySelector(".held").getBoundingClientRect().width / bar.width};
  })})"""


async def check_layout(dom: dict[str, Any], width: int) -> None:
    """Nothing wider than the window; every bar and every trend drawn with a width."""
    assert dom["scrollWidth"] <= width
    assert all(0 <= c["left"] and c["right"] <= width for c in dom["cards"]), dom["cards"]
    assert dom["rows"] and all(r["barWidth"] > 100 for r in dom["rows"])
    sparks = {s["scope"]: s for s in dom["sparks"]}
    assert sorted(sparks) == sorted(dom["labels"])  # every scope has its trend (fewer than MAX_TRENDS)
    for s in sparks.values():
        assert s["width"] > 100 and s["height"] == 40 and s["line"] > 100, s
        assert s["points"] == (30 if s["scope"].startswith("support") and "/" not in s["scope"] else 24), s


async def test_browser_logs_in_and_shows_the_budgets(admin_proxy, sim, tmp_path, monkeypatch):
    browser_bin = chromium_or_skip()
    traffic(admin_proxy, sim)
    r = httpx.post(admin_proxy.url + "/admin/keys", headers={"x-api-key": ADMIN},
                   json={"team": "support", "name": "ci-bot", "budget": {"tokens": 100}, "run_budget": {"steps": 3}})
    assert r.status_code == 201, r.text
    sim.queue(*[Reply(input_tokens=5, output_tokens=5) for _ in range(3)])
    for run in ("r-1", "r-1", "r-2"):
        anthropic.Anthropic(base_url=admin_proxy.url, api_key=RUNNER_KEY, max_retries=0).messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=MSG, extra_headers={"x-budget-run": run})
    # One request of the odd key held upstream: its reservation shows as held.
    sim.queue(Reply(input_tokens=40, output_tokens=8, gate="held"))
    in_flight = threading.Thread(target=call, args=(admin_proxy, BETA_KEY, 2000))
    in_flight.start()
    try:
        assert await asyncio.to_thread(sim.wait_at_gate, "held")
        async with Chromium(browser_bin, tmp_path / "profile") as page:
            base = admin_proxy.url + "/admin/"
            await page.load(page.send("Page.navigate", session=True, url=base + "dashboard"))
            assert await page.js("location.pathname") == "/admin/login"  # redirected: no session yet
            await page.load(page.js(f"document.querySelector('#key').value = {json.dumps(ADMIN)};"
                                    "document.querySelector('form.login button').click()"))
            dom = json.loads(await page.js(READ_DOM))
            assert dom["path"] == "/admin/dashboard"
            assert dom["cookie"] == ""  # HttpOnly: page scripts cannot read the session
            cookies = (await page.send("Network.getCookies", session=True, urls=[base]))["cookies"]
            assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("bp_dashboard", True, "Strict")]
            assert SESSION.match(cookies[0]["value"]) and ADMIN not in cookies[0]["value"]
            # the most used first; the runtime key marked; the runs of the key with a run budget
            assert dom["scopes"] == ["key support/gamma", "key research/alpha", "team research", "team support",
                                     "key support/ci-botruntime", f"key research/{ODD_KEY}", "key research/runner"]
            assert dom["bold"] == 0 and dom["runtime"] == ["key support/ci-botruntime"]
            assert dom["runs"] == [["research/runner", 2], ["support/ci-bot", 0]]
            assert dom["burns"]["research/alpha"].startswith("runs out ~")
            await check_layout(dom, 1280)
            by = {(r["scope"], r["dim"]): r for r in dom["rows"]}
            usage = httpx.get(admin_proxy.url + "/admin/usage", headers={"x-api-key": ADMIN}).json()
            team_held = usage["teams"][0]["budget"]["held"]["tokens"]
            assert team_held > 0
            expected = {("research/alpha", "tokens"): (820, 1000, 0), ("research/alpha", "steps"): (2, 10, 0),
                        ("research", "tokens"): (5850, 10000, team_held),  # + the runner's 30
                        ("support/gamma", "output_tokens"): (1900, 2000, 0), ("support", "steps"): (1, 20, 0)}
            for key, (used, limit, held) in expected.items():
                row = by[key]
                assert (row["used"], row["limit"], row["held"]) == (used, limit, held), key
                assert row["usedFrac"] == pytest.approx(used / limit, abs=0.01), key  # the bar as drawn
                assert row["heldFrac"] == pytest.approx(held / limit, abs=0.01), key
            assert by[("research/alpha", "tokens")]["fig"] == "820 / 1,000 · 82%"
            assert f"{team_held:,} held" in by[("research", "tokens")]["fig"]
            png = await page.screenshot()
            # a phone: one column, nothing wider than the screen, the bars and trends drawn
            await page.viewport(390, 844, mobile=True)
            await page.load(page.send("Page.reload", session=True))
            phone = json.loads(await page.js(READ_DOM))
            assert phone["path"] == "/admin/dashboard" and phone["scopes"] == dom["scopes"]
            assert phone["scrollWidth"] <= 390 and phone["columns"] == 1
            await check_layout(phone, 390)
            phone_png = await page.screenshot(max_height=2400)
            await page.viewport(1280, 900, mobile=False)
            # This last page (and each one it refreshes into) asks for a refresh every second, not
            # REFRESH_SECONDS (5): the same <meta http-equiv="refresh"> the wait below is for, a
            # fifth of the wait. (The in-process proxy reads the module's value per page.)
            monkeypatch.setattr(dashboard_html, "REFRESH_SECONDS", 1)
            await page.load(page.send("Page.reload", session=True))
            # The held request finishes; the page refreshes itself and shows it charged. (A refresh
            # already under way when the request settled may show the old figures; the next cannot.)
            sim.open_gate("held")
            await asyncio.to_thread(in_flight.join, 10)
            for _ in range(2):
                await asyncio.wait_for(page.expect("Page.loadEventFired"), 30)
                dom = json.loads(await page.js(READ_DOM))
                research = next(r for r in dom["rows"] if (r["scope"], r["dim"]) == ("research", "tokens"))
                if research["held"] == 0:
                    break
            assert (research["used"], research["held"]) == (5898, 0)
    finally:
        sim.open_gate("held")
        in_flight.join(10)
    for shot in (png, phone_png):
        assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    (tmp_path / "dashboard.png").write_bytes(png)
    (tmp_path / "dashboard-phone.png").write_bytes(phone_png)
    if target := os.environ.get("BUDGET_PROXY_SCREENSHOT"):
        Path(target).write_bytes(png)
        Path(target).with_name(Path(target).stem + "-phone.png").write_bytes(phone_png)
