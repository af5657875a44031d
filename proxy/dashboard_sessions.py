"""The dashboard's sign-in state (docs/http-api.md "Dashboard"): session cookies, their revocation
and the throttle on failed logins.

A cookie never holds the admin key: it is `<session id>.<expiry>.<mac>`, the mac an HMAC-SHA256
keyed by the admin key over the id and the expiry (unix seconds), so a session ends by itself after
SESSION_SECONDS and a changed admin_key ends every session at once."""
from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
from collections import OrderedDict, deque

SESSION_SECONDS = 12 * 3600          # a login lasts this long (cookie Max-Age and server-side)
MAX_REVOKED_SESSIONS = 10_000        # signed-out sessions remembered until they expire
LOGIN_MAX_FAILURES = 10              # failed logins from one address within LOGIN_WINDOW_SECONDS ...
LOGIN_WINDOW_SECONDS = 60.0          # ... block it for this long after the last of them
MAX_TRACKED_ADDRESSES = 4096         # client addresses whose failed logins are remembered

_SESSION = re.compile(r"^([A-Za-z0-9_-]{16,64})\.([0-9]{1,12})\.([0-9a-f]{64})$")


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
