"""The dashboard's routes (docs/http-api.md "Dashboard"): GET /admin/dashboard, GET and POST
/admin/login, POST /admin/logout.

Auth, in this order: no admin key configured -> 404 (as /admin); a key in x-api-key or
Authorization decides alone (admin -> page, proxy key -> 403, other -> 401); otherwise the
session cookie set by the login form; otherwise 303 to the login page."""
from __future__ import annotations

import logging
from html import escape
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from proxy.admin import usage_document
from proxy.auth import presented_secret
from proxy.dashboard_addresses import client_address, is_secure
from proxy.dashboard_data import load_runs, load_trends
from proxy.dashboard_html import (DIMS, MAX_TRENDS, Trend, fmt, login_form, page, render_dashboard, scope_cards,
                                  too_many_attempts)
from proxy.dashboard_sessions import (SESSION_SECONDS, LoginThrottle, SessionRevocations, issue_session,
                                      read_session)
from proxy.errors import AuthenticationError, NotFound, PermissionDenied, ProxyError, StoreUnavailable
from proxy.routes import RouteSet

__all__ = ["COOKIE", "DIMS", "MAX_TRENDS", "SESSION_SECONDS", "DashboardRoutes", "LoginThrottle",
           "SessionRevocations", "Trend", "fmt", "issue_session", "read_session", "render_dashboard"]

log = logging.getLogger("budget_proxy")
COOKIE = "bp_dashboard"
MAX_FORM_BYTES = 4096


class DashboardRoutes(RouteSet):
    """The four routes over one app's state; signed-out sessions and failed logins are this
    object's (per process)."""

    ROUTES = (("/admin/dashboard", "GET", "dashboard"), ("/admin/login", "GET", "login_page"),
              ("/admin/login", "POST", "login"), ("/admin/logout", "POST", "logout"))

    def __init__(self, state: Any, error_response: Any) -> None:
        super().__init__(state, error_response)
        self.revocations = SessionRevocations()
        self.throttle = LoginThrottle()

    def admin_key(self, request: Request) -> str:
        key = self.state.runtime.config.admin_key.get_secret_value()
        if not key:
            raise NotFound(f"No route for {request.method} {request.url.path}.")
        return key

    def trusted(self) -> list[str]:
        return self.state.runtime.config.server.trusted_proxies

    def session(self, request: Request, key: str) -> tuple[str, int] | None:
        """The request's live session: signed with the current admin key, unexpired, not revoked."""
        found = read_session(request.cookies.get(COOKIE, ""), key, self.state.clock())
        if found is None or self.revocations.is_revoked(*found):
            return None
        return found

    async def authorized(self, request: Request) -> bool:
        """True for the admin key in a header or a valid session cookie; raises 403/401."""
        key = self.admin_key(request)
        headers = dict(request.scope["headers"])
        if b"x-api-key" in headers or b"authorization" in headers:
            secret = presented_secret(headers)
            rt = self.state.runtime
            if rt.keyring.is_admin(secret):
                return True
            if rt.keyring.lookup(secret) is not None or await self.state.runtime_keys.is_key(secret):
                raise PermissionDenied("This route needs the admin key; a proxy key cannot use it.")
            raise AuthenticationError("Invalid admin key.")
        return self.session(request, key) is not None

    async def dashboard(self, request: Request) -> Response:
        try:
            if not await self.authorized(request):
                return RedirectResponse("login", status_code=303)
            doc, now = await usage_document(self.state), self.state.clock()
            config_keys = self.state.runtime.budgets.keys
            for team in doc["teams"]:
                for k in team["keys"]:
                    k["runtime"] = (team["name"], k["name"]) not in config_keys
            runs = await self.runs(doc, now)
            trends = await load_trends(self.state.store, scope_cards(doc), now)
        except StoreUnavailable as err:
            return page("budget-proxy: unavailable", f'<p class="error">{escape(err.message)}</p>', 503, True)
        except ProxyError as err:
            return self.error_response(err)
        return page("budget-proxy: budgets", render_dashboard(doc, now, trends, runs), refresh=True)

    async def runs(self, doc: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """The active runs the page lists; none when the store cannot say (the budgets still show)."""
        try:
            return await load_runs(self.state, doc, now)
        except Exception as exc:
            log.error("dashboard: runs unavailable: %s", exc.__class__.__name__)
            return []

    async def login_page(self, request: Request) -> Response:
        try:
            self.admin_key(request)
        except ProxyError as err:
            return self.error_response(err)
        return login_form()

    async def login(self, request: Request) -> Response:
        try:
            self.admin_key(request)
        except ProxyError as err:
            return self.error_response(err)
        addr = client_address(request, self.trusted())
        wait = self.throttle.wait_seconds(addr, self.state.clock())
        if wait > 0:
            return too_many_attempts(wait)
        presented = await self.form_key(request)
        if presented is None:
            return login_form("The form is too large.", 413)
        # Again, with no await between this check and the failure's record: attempts sent together
        # cannot get more than LOGIN_MAX_FAILURES keys checked while their bodies were being read.
        now = self.state.clock()
        wait = self.throttle.wait_seconds(addr, now)
        if wait > 0:
            return too_many_attempts(wait)
        if not self.state.runtime.keyring.is_admin(presented):
            self.throttle.failed(addr, now)
            return login_form("That is not the admin key.", 401)
        self.throttle.succeeded(addr)
        return self.signed_in(request, now)

    @staticmethod
    async def form_key(request: Request) -> str | None:
        """The login form's `key` field; None when the form is larger than MAX_FORM_BYTES."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
        return parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0].strip()

    def signed_in(self, request: Request, now: float) -> Response:
        """The redirect to the dashboard with a new session cookie."""
        key = self.state.runtime.config.admin_key.get_secret_value()  # the current one (a reload may have
        resp = RedirectResponse("dashboard", status_code=303)         # come while the form was read)
        resp.set_cookie(COOKIE, issue_session(key, now), max_age=SESSION_SECONDS, path="/admin",
                        httponly=True, samesite="strict", secure=is_secure(request, self.trusted()))
        return resp

    async def logout(self, request: Request) -> Response:
        key = self.state.runtime.config.admin_key.get_secret_value()
        found = self.session(request, key) if key else None
        if found is not None:
            self.revocations.revoke(*found, now=self.state.clock())
        resp = RedirectResponse("login", status_code=303)
        resp.delete_cookie(COOKIE, path="/admin", httponly=True, samesite="strict",
                           secure=is_secure(request, self.trusted()))
        return resp
