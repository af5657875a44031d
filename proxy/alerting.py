"""Budget alert webhooks (docs/budgets.md "Alerts"): noticing and sending.

Never on a request's path. The relay's hooks (AppState.observe_settled, observe_denial,
observe_cut) only note, in O(1), which scopes a request touched and which budget denied or cut it
(`Alerts.touched`, `Alerts.exceeded`). A background task (`Alerts.tick`, every CHECK_EVERY_S) reads
the touched scopes' states from the store, finds the thresholds they have reached
(proxy/alerts.py), claims each event in the store (`claim_alert`: once per scope, dimension,
threshold and period, across replicas on Redis) and queues it for every webhook that wants it.

Each webhook has its own sender (`WebhookSender`): a bounded queue (the oldest event is dropped,
with a log line, when it is full), first attempts one at a time in order, each failure retried on
its own schedule (1, 2, 4 ... 60 s apart for up to 10 minutes) so that one stuck event does not
hold the others. A receiver that hangs costs a proxied request nothing: the hooks never wait, and
the queues are bounded. Logs name a webhook by scheme, host and port only, never its path, query or
headers (they may hold secrets)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

import httpx

from proxy import alerts as rules
from proxy.ledger import Denied, Scope
from proxy.periods import period_bounds

log = logging.getLogger("budget_proxy.alerts")

CHECK_EVERY_S = 1.0          # how often the touched scopes are looked at
TOUCHED_MAX = 10_000         # scopes noted between two looks (more: the rest wait for their next request)
EXCEEDED_MAX = 10_000        # denied / cut (scope, dimension) pairs noted between two looks
WATCH_MAX = 10_000           # scopes whose wall clock is watched between requests
KNOWN_MAX = 100_000          # event keys this process knows are claimed (by it or another replica)
QUEUE_MAX = 1_000            # events waiting for a webhook's first attempt
RETRYING_MAX = 256           # events of a webhook waiting to be tried again
DRAIN_ON_STOP_S = 2.0        # at shutdown, how long queued events may still take to go out

Sleep = Callable[[float], Awaitable[Any]]


async def post_once(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any],
                    timeout: float = rules.TIMEOUT_S) -> tuple[int | None, str | None]:
    """One POST of `body`: (status, None) when answered, (None, why not) when not; never raises but
    for cancellation. The whole exchange is bounded by `timeout`, however the answer trickles in."""
    try:
        resp = await asyncio.wait_for(client.post(url, json=body, headers=headers), timeout)
    except asyncio.TimeoutError:
        return None, f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return None, exc.__class__.__name__
    except Exception as exc:  # (a receiver must never break the sender)
        return None, exc.__class__.__name__
    return resp.status_code, None


class WebhookSender:
    """One webhook's queue and deliveries. `sleep` and `clock` (monotonic seconds) are injectable:
    tests run the retry schedule without waiting it."""

    def __init__(self, url: str, headers: dict[str, str], client: httpx.AsyncClient, *,
                 observe: Callable[[str, str], None] = lambda type, outcome: None,
                 sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic,
                 timeout: float = rules.TIMEOUT_S, queue_max: int = QUEUE_MAX,
                 retrying_max: int = RETRYING_MAX) -> None:
        self.url, self.headers, self.client = url, headers, client
        self.label = rules.url_label(url)
        self.observe, self.sleep, self.clock, self.timeout = observe, sleep, clock, timeout
        self.queue_max, self.retrying_max = queue_max, retrying_max
        self.outbox: deque[dict[str, Any]] = deque()
        self.retrying: dict[asyncio.Task[None], dict[str, Any]] = {}  # (insertion order: the oldest first)
        self.attempting = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def enqueue(self, body: dict[str, Any]) -> None:
        """Queue an event (never waits); the oldest queued one is dropped when the queue is full."""
        if len(self.outbox) >= self.queue_max:
            old = self.outbox.popleft()
            log.warning("alert webhook %s: queue full (%d events); dropped the oldest %s event", self.label,
                        self.queue_max, old.get("type"))
            self.observe(str(old.get("type")), "dropped")
        self.outbox.append(body)
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self.outbox and not self.retrying and not self.attempting

    async def _run(self) -> None:
        while True:
            while not self.outbox:
                self._wake.clear()
                await self._wake.wait()
            body = self.outbox.popleft()
            first_at = self.clock()
            self.attempting = True
            try:
                ok = await self.attempt(body, 1)
            finally:
                self.attempting = False
            if not ok:
                self._retry_later(body, first_at)

    async def attempt(self, body: dict[str, Any], n: int) -> bool:
        """Attempt `n` at delivering `body`: True when the receiver answered 2xx."""
        status, error = await post_once(self.client, self.url, self.headers, body, self.timeout)
        if status is not None and rules.is_success(status):
            self.observe(body["type"], "sent")
            log.info("alert webhook %s: %s sent (attempt %d)", self.label, body["type"], n)
            return True
        self.observe(body["type"], "failed")
        why = error if status is None else f"HTTP {status}"
        (log.warning if n == 1 else log.info)("alert webhook %s: %s not delivered (attempt %d: %s); will retry",
                                              self.label, body["type"], n, why)
        return False

    def _retry_later(self, body: dict[str, Any], first_at: float) -> None:
        if len(self.retrying) >= self.retrying_max:
            oldest = next(iter(self.retrying))
            oldest.cancel()
            dropped = self.retrying.pop(oldest)
            log.warning("alert webhook %s: too many events being retried (%d); dropped the oldest %s event",
                        self.label, self.retrying_max, dropped.get("type"))
            self.observe(str(dropped.get("type")), "dropped")
        task = asyncio.ensure_future(self._retry(body, first_at))
        self.retrying[task] = body
        task.add_done_callback(lambda t: self.retrying.pop(t, None))

    async def _retry(self, body: dict[str, Any], first_at: float) -> None:
        failures = 1
        while True:
            delay = rules.next_attempt(failures, first_at, self.clock())
            if delay is None:
                log.error("alert webhook %s: %s dropped after %d attempts over %.0f s", self.label, body["type"],
                          failures, self.clock() - first_at)
                self.observe(body["type"], "dropped")
                return
            await self.sleep(delay)
            failures += 1
            if await self.attempt(body, failures):
                return

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for the queue's first attempts (not the retries) to be made."""
        deadline = time.monotonic() + timeout
        while (self.outbox or self.attempting) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        undelivered = len(self.outbox) + len(self.retrying) + (1 if self.attempting else 0)
        tasks = [t for t in (self._task, *self.retrying) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if undelivered:
            log.warning("alert webhook %s: %d events not delivered at shutdown", self.label, undelivered)
            for body in self.outbox:
                self.observe(body["type"], "dropped")
        self.outbox.clear()


class Alerts:
    """The app's alerting: O(1) hooks for the request path, a background detector and the senders.
    `now` is the app's clock (event times and periods); `sleep` / `clock` go to the senders."""

    def __init__(self, state: Any, *, sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.state = state
        self.sleep, self.clock = sleep, clock
        self.interval = interval
        self._touched: dict[str, tuple[Scope, str, str]] = {}                 # scope id -> (scope, team, key)
        self._exceeded: dict[tuple[str, str], tuple[Denied, str, str, float]] = {}  # (scope id, dim) -> ...
        self._watch: dict[str, tuple[Scope, str, str, float]] = {}            # wall-clock scopes between requests
        self._known: dict[str, float] = {}                                     # event key -> claim ends (app clock)
        self._senders: dict[tuple[str, tuple[tuple[str, str], ...]], WebhookSender] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the hooks: O(1), never await, never raise ---------------------------------------------
    def _webhooks(self) -> list[Any]:
        return self.state.runtime.config.alerts.webhooks

    def touched(self, caller: Any, scopes: tuple[Scope, ...]) -> None:
        """A request of `caller` settled, charged to `scopes`."""
        if not self.state.runtime.config.alerts.webhooks:
            return
        touched = self._touched
        for s in scopes:
            lim = s.limits
            if (lim.metered() or lim.wall_clock is not None) and s.id not in touched and len(touched) < TOUCHED_MAX:
                touched[s.id] = (s, caller.team, caller.key)

    def exceeded(self, caller: Any, denied: Denied) -> None:
        """A request of `caller` was denied, or its stream cut, by `denied`'s scope and dimension.
        The scope is looked at too: a threshold it has reached goes out before the exceeded event."""
        if not self.state.runtime.config.alerts.webhooks:
            return
        k = (denied.scope.id, denied.dimension)
        if k not in self._exceeded and len(self._exceeded) < EXCEEDED_MAX:
            self._exceeded[k] = (denied, caller.team, caller.key, self.state.clock())
            s = denied.scope
            if s.id not in self._touched and len(self._touched) < TOUCHED_MAX:
                self._touched[s.id] = (s, caller.team, caller.key)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """One last look (what settled in the last second), a short drain, then every task ends."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            try:
                await asyncio.wait_for(self.tick(), DRAIN_ON_STOP_S)
            except Exception:
                log.warning("alerts: the last look at the budgets failed at shutdown")
            await asyncio.gather(*(s.drain(DRAIN_ON_STOP_S) for s in self._senders.values()))
        for s in self._senders.values():
            await s.close()
        self._senders.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval if self.interval is not None else CHECK_EVERY_S)
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one failure
                log.exception("alerts: a look at the budgets failed")

    # --- detection ----------------------------------------------------------------------------------
    async def tick(self) -> None:
        """One look: the thresholds the touched (and watched) scopes have reached, and the denials
        noted since the last look; each event claimed, then queued for its webhooks."""
        webhooks = self._webhooks()
        touched, self._touched = self._touched, {}
        exceeded, self._exceeded = self._exceeded, {}
        if not webhooks:
            self._watch.clear()
            return
        now = self.state.clock()
        union = sorted({t for w in webhooks for t in w.thresholds})
        # (event key, type, threshold, scope, owner, dimension, used, limit, when: its period and body's time)
        candidates: list[tuple[str, str, float | None, Scope, rules.Owner, str, Any, Any, float]] = []
        if touched:
            entries = list(touched.values())
            try:
                states = await self.state.store.states([e[0] for e in entries], now)
            except Exception as exc:
                log.warning("alerts: cannot read budgets (%s); will look again", exc.__class__.__name__)
                for sid, e in touched.items():  # (noted again, unless newer notes took the room)
                    if len(self._touched) < TOUCHED_MAX:
                        self._touched.setdefault(sid, e)
                states = None
            if states is not None:
                for (scope, team, key), st in zip(entries, states):
                    owner = rules.owner_of(scope, team, key)
                    self._thresholds(candidates, union, scope, owner, rules.measured(scope, st, now), now)
                    self._watch_clock(scope, team, key, st.first_request_at)
        self._watched(candidates, union, touched, now)
        for (denied, team, key, at) in exceeded.values():
            scope = denied.scope
            ek = rules.event_key(rules.EXCEEDED, scope.id, denied.dimension, period_bounds(scope.period, at)[0])
            candidates.append((ek, rules.EXCEEDED, None, scope, rules.owner_of(scope, team, key), denied.dimension,
                               denied.used, denied.limit, at))
        for cand in candidates:
            await self._claim_and_queue(cand, webhooks, now)
        self._prune_known(now)

    def _thresholds(self, out: list[Any], union: list[float], scope: Scope, owner: rules.Owner,
                    measured: list[tuple[str, Any, Any]], now: float) -> None:
        start = period_bounds(scope.period, now)[0]
        for dim, used, limit in measured:
            for t in rules.crossed(union, used, limit):
                ek = rules.event_key(rules.THRESHOLD, scope.id, dim, start, t)
                if ek not in self._known:
                    out.append((ek, rules.THRESHOLD, t, scope, owner, dim, used, limit, now))

    def _watch_clock(self, scope: Scope, team: str, key: str, first_request_at: float | None) -> None:
        """A scope with a wall-clock limit is looked at every tick, not only when a request settles:
        its clock runs between requests (needs no store read: seconds since its first request)."""
        if scope.limits.wall_clock is None or first_request_at is None:
            return
        if scope.id in self._watch or len(self._watch) < WATCH_MAX:
            self._watch[scope.id] = (scope, team, key, first_request_at)

    def _watched(self, out: list[Any], union: list[float], touched: dict[str, Any], now: float) -> None:
        for sid, (scope, team, key, first) in list(self._watch.items()):
            limit = scope.limits.wall_clock
            start, _ = period_bounds(scope.period, now)
            if first < start or limit is None:  # a new period: its first request starts the clock again
                del self._watch[sid]
                continue
            if sid in touched:
                continue  # (looked at just now, with the store's state)
            used = max(0.0, now - first)
            self._thresholds(out, union, scope, rules.owner_of(scope, team, key), [("wall_clock", used, limit)], now)
            if not union or used >= union[-1] * limit:
                del self._watch[sid]  # (every threshold reached: nothing more to watch for)

    async def _claim_and_queue(self, cand: tuple[Any, ...], webhooks: list[Any], now: float) -> None:
        ek, type, threshold, scope, owner, dim, used, limit, when = cand
        if ek in self._known:
            return
        ttl = rules.claim_ttl(scope.period, when)
        try:
            won = await self.state.store.claim_alert(ek, ttl)
        except Exception as exc:
            log.warning("alerts: cannot claim an event (%s); will try again", exc.__class__.__name__)
            if type == rules.EXCEEDED:  # (a threshold is found again by the scope's next look)
                k = (scope.id, dim)
                if len(self._exceeded) < EXCEEDED_MAX:
                    self._exceeded.setdefault(k, (rules_denied(scope, dim, used, limit), owner.team,
                                                  owner.key or "", when))
            else:
                self._touched.setdefault(scope.id, (scope, owner.team, owner.key or ""))
            return
        self._known[ek] = when + ttl
        if not won:
            return  # (another replica, or an earlier life of this one, sent it)
        body = rules.body(type, threshold, scope, owner, dim, used, limit, when)
        for w in webhooks:
            if type == rules.EXCEEDED or threshold in w.thresholds:
                self._sender(w).enqueue(body)

    def _prune_known(self, now: float) -> None:
        known = self._known
        if len(known) > KNOWN_MAX:
            for ek in [ek for ek, until in known.items() if until <= now]:
                del known[ek]
            while len(known) > KNOWN_MAX:  # (still full: forget the oldest; a claim answers for them)
                del known[next(iter(known))]

    # --- senders ------------------------------------------------------------------------------------
    def _sender(self, webhook: Any) -> WebhookSender:
        headers = {k: v.get_secret_value() for k, v in webhook.headers.items()}
        ident = (webhook.url, tuple(sorted(headers.items())))
        sender = self._senders.get(ident)
        if sender is None:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=rules.TIMEOUT_S, follow_redirects=False)
            sender = self._senders[ident] = WebhookSender(webhook.url, headers, self._client, observe=self._observe,
                                                          sleep=self.sleep, clock=self.clock)
            sender.start()
        return sender

    def _observe(self, type: str, outcome: str) -> None:
        alert_sent = getattr(self.state.metrics, "alert_sent", None)
        if alert_sent is not None:
            alert_sent(type, outcome)

    @property
    def idle(self) -> bool:
        """Nothing noted, queued, being sent or retried (tests wait for it)."""
        return not self._touched and not self._exceeded and all(s.idle for s in self._senders.values())


def rules_denied(scope: Scope, dim: str, used: Any, limit: Any) -> Denied:
    """A denial noted again after its claim failed (what the event needs of it)."""
    return Denied(scope, dim, limit, used, 0, 0)
