"""The only streaming loop: admit -> forward -> pump + meter -> settle (exactly once, whatever is cancelled).

A plain ASGI callable on the hot path (Starlette's StreamingResponse costs ~20% and cancels
the body iterator on disconnect, which is no place to settle money)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from proxy import pricing as pricing_mod
from proxy.auth import Caller, presented_secret
from proxy.billing import NO_BILL, Bill, bill_cost_nanos, one_call_may_be_long, price_for
from proxy.asgi import ClientGone, Receive, Scope, Send, read_body, send_error
from proxy.denials import budget_error, cut_message
from proxy.errors import (AuthenticationError, InvalidRequest, PermissionDenied, ProxyError,
                          StoreUnavailable, UpstreamTimeout, UpstreamUnavailable, new_request_id)
from proxy.headers import downstream_headers, upstream_headers
from proxy.ledger import NANOS_PER_USD, ZERO, Amounts, Ask, Denied, admit
from proxy.meter import GREW, REPORTED, UNCHANGED
from proxy.providers import Provider, RequestFacts
from proxy.sse import SSEDecoder, SSEError, SSERun, split
from proxy.store.base import Reservation, UsageRow
from proxy.upstream import UpstreamReply, open_upstream
from proxy.usage import Usage

log = logging.getLogger("budget_proxy.access")

# A stream's running charge is pushed to the store at the end of a chunk once a second has passed
# since the last push, so /budget shows streams in flight. This only bounds how stale that view
# is: the hold already covers the stream, growth past the hold is checked at the very event, and
# reported usage that outgrows the hold is pushed when it comes. Each push prices the usage and
# updates every scope (on Redis, a round trip), so pushing per event cost ~40% of the SSE relay,
# and stopping the meter inside a chunk only to look at the clock cost ~10%.
PUSH_INTERVAL_SECONDS = 1.0
LARGE_BODY_BYTES = 256 * 1024
# The live estimate runs ahead of the real count (bytes / 3 against ~4 bytes a token of English), so
# up to this multiple of the forwarded max_tokens it is charged as max_tokens (the provider cannot
# generate more). Past it the upstream is generating past the limit it was sent: every estimated
# token counts, and the stream is cut once it passes its hold, as with clamping off.
ESTIMATE_TOLERANCE = 1.5
# A client still waiting for the response headers this long is watched for a disconnect, which
# cancels the upstream request and releases the hold (earlier, the answer is usually in).
HEADERS_WATCH_SECONDS = 0.25


@dataclass(slots=True, eq=False)
class Call:
    """One metered request as it moves through the relay."""

    request_id: str
    caller: Caller
    model: str
    route: str
    started: float
    price: Any
    res: Reservation
    clamped_to: int | None
    hold_room: int = -1            # live output within the hold
    pushed_at: float = 0.0         # when the running charge was last pushed to the store
    pushed_output: int = 0         # the live output figure then
    client_gone: bool = False
    outcome: str = "completed"
    status: int = 0
    output_cap: int | None = None  # the max_tokens the upstream was sent: it cannot generate more
    generation: int = 0            # the config generation this call was admitted under
    shutting_down: bool = False    # set when the proxy's grace period ends
    upstream: Any = None           # the upstream response while a stream is relayed
    betas: bytes = b""             # the request's anthropic-beta header (a long context is opted into)


class ClientWatch:
    """Awaits the upstream's response headers for a call and, from HEADERS_WATCH_SECONDS on, watches
    the client too: a client gone before the headers cancels the upstream request (ClientGone).
    Most answers come sooner, so most requests pay for one timer, not for a watching task."""

    __slots__ = ("call", "receive", "task", "watcher", "gone")

    def __init__(self, call: Call, receive: Receive) -> None:
        self.call = call
        self.receive = receive
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Future[None] | None = None
        self.gone = False

    async def until_done(self, opening: Any) -> UpstreamReply:
        self.task = asyncio.current_task()
        timer = asyncio.get_running_loop().call_later(HEADERS_WATCH_SECONDS, self._start)
        try:
            return await opening
        except asyncio.CancelledError:
            if not self.gone:
                raise
            self.task.uncancel()  # type: ignore[union-attr]
            raise ClientGone from None
        finally:
            timer.cancel()
            if self.watcher is not None:
                self.watcher.cancel()

    def _start(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = self.call.client_gone = True
        self.task.cancel()  # type: ignore[union-attr]


class Relay:
    """Handles one metered route for one provider. `state.runtime` is the current config
    (swapped whole on reload); `adapter` knows the provider's API."""

    def __init__(self, state: Any, adapter: Provider) -> None:
        self.state = state
        self.adapter = adapter
        self.provider = adapter.name
        self.route = adapter.path

    # --- admission ---------------------------------------------------------------------------
    def authenticate(self, headers: dict[bytes, bytes]) -> Caller:
        rt = self.state.runtime
        caller = rt.keyring.lookup(presented_secret(headers))
        if caller is None:
            raise AuthenticationError("Invalid proxy key.")
        return caller

    async def estimate_input(self, facts: RequestFacts, raw: bytes,
                             client_headers: list[tuple[bytes, bytes]]) -> int:
        rt = self.state.runtime
        if rt.config.admission.input_estimate == "count_tokens":
            counted = await self.count_tokens_upstream(facts, client_headers)
            if counted is not None:
                return counted
        if len(raw) > LARGE_BODY_BYTES:  # PDFs get decoded and scanned: keep that off the event loop
            return await asyncio.to_thread(self.adapter.estimate_input, facts)
        return self.adapter.estimate_input(facts)

    async def count_tokens_upstream(self, facts: RequestFacts,
                                    client_headers: list[tuple[bytes, bytes]]) -> int | None:
        body = self.adapter.count_tokens_body(facts)
        if body is None:
            return None
        up = self.state.runtime.upstreams[self.provider]
        try:
            resp = await open_upstream(self.state.transport_for(self.provider),
                                       up.base_url + self.adapter.path + "/count_tokens",
                                       upstream_headers(client_headers, self.provider, up.api_key), body)
            raw = await resp.aread()
            await resp.aclose()
            if resp.status_code == 200:
                n = json.loads(raw).get("input_tokens")
                if isinstance(n, int) and n >= 0:
                    return n
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        log.warning("count_tokens upstream failed; using the heuristic estimate")
        return None

    def ask_for(self, facts: RequestFacts, raw: bytes, input_tokens: int, price: Any) -> Ask:
        max_tokens = facts.max_tokens
        if max_tokens is None:  # no limit sent: the model's own bounds it (nothing is injected)
            max_tokens = getattr(price, "max_output_tokens", None) or self.adapter.default_max_tokens
        least = self.adapter.min_output(facts) if self.state.runtime.config.admission.clamp_max_tokens else 1
        if price is None:
            return Ask(input_tokens, 0, max_tokens, Decimal(0), least)
        kind = "input"
        if b'"cache_control"' in raw:
            kind = "cache_write_1h" if b'"1h"' in raw else "cache_write_5m"
        return Ask(input_tokens, pricing_mod.input_cost_nanos(price, input_tokens, kind), max_tokens,
                   pricing_mod.output_nanos_per_token(price, input_tokens), least)

    # --- the route ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        started = self.state.clock()
        seen: dict[str, Any] = {}
        try:
            call, body, facts = await self.admit(scope, receive, request_id, started, seen)
        except ClientGone:
            return
        except ProxyError as err:
            self.state.observe_rejection(err, seen.get("caller"), seen.get("model"), self.route)
            await send_error(send, err, request_id, self.provider)
            return
        try:
            await self.forward(call, scope, receive, send, body, facts)
        finally:
            if not call.res.settled:  # every path below settles; this is the backstop
                await asyncio.shield(self.settle(call, None, Usage()))

    async def admit(self, scope: Scope, receive: Receive, request_id: str, now: float, seen: dict[str, Any]):
        rt = self.state.runtime
        headers = dict(scope["headers"])
        caller = seen["caller"] = self.authenticate(headers)
        self.state.upstream_for(self.provider)  # 502 at once when no upstream key is configured
        raw = await read_body(receive, rt.config.limits.max_body_bytes, headers)
        facts = self.adapter.parse_request(raw)
        seen["model"] = facts.model
        if not caller.may_use(facts.model):
            raise PermissionDenied(f"Key '{caller.key}' may not use model '{facts.model}'.")
        scopes = rt.budgets.scopes_for(caller)
        price = rt.pricing.lookup(facts.model)
        if price is None and rt.budgets.has_cost_limit(scopes) and rt.config.admission.unpriced_models == "deny":
            raise InvalidRequest(f"Model '{facts.model}' has no price in the pricing table and a cost budget "
                                 "applies; add it to the pricing file or set admission.unpriced_models: allow.")
        input_tokens = await self.estimate_input(facts, raw, scope["headers"])
        ask = self.ask_for(facts, raw, input_tokens, price)
        try:
            res = await self.state.store.reserve(scopes, ask, now, request_id)
        except StoreUnavailable:
            raise
        except Exception as exc:  # a store that fails in any way fails closed
            log.error("store reserve failed: %s", exc.__class__.__name__)
            raise StoreUnavailable("The budget ledger is unavailable; nothing was forwarded.") from None
        if isinstance(res, Denied):
            self.state.observe_denial(caller, res.dimension)
            raise budget_error(res, caller, now)
        clamped_to = None
        if res.admitted.clamped and rt.config.admission.clamp_max_tokens:
            clamped_to = res.admitted.output_tokens
            if clamped_to < min(ask.min_output, ask.max_tokens):  # (a store that does not know min_output)
                await self.state.store.settle(res, ZERO, None)
                raise await self.too_little_output(scopes, ask, caller, now)
        try:
            raw = self.adapter.upstream_body(facts, raw, clamped_to)
        except Exception:  # (a body at the edge of what json can nest) never leave the hold behind
            await self.state.store.settle(res, ZERO, None)
            raise InvalidRequest("The request body could not be rewritten to fit the budget.") from None
        call = Call(request_id, caller, facts.model, self.route, now, price, res, clamped_to,
                    output_cap=clamped_to if clamped_to is not None else ask.max_tokens,
                    generation=self.state.generation, pushed_at=now,  # (the reserve told the store)
                    betas=headers.get(b"anthropic-beta", b""))
        return call, raw, facts

    async def too_little_output(self, scopes: Any, ask: Ask, caller: Caller, now: float) -> ProxyError:
        """The 429 for a request the budget admits only with less output than it can be forwarded
        with (extended thinking): the scope and dimension as the pure ledger words it."""
        states = await self.state.store.states(scopes, now)
        denied = admit(ask, list(zip(scopes, states)), now)
        if not isinstance(denied, Denied):  # (room came free meanwhile: name the tightest anyway)
            denied = Denied(scopes[0], "output_tokens", ask.min_output, 0, 0, ask.min_output)
        self.state.observe_denial(caller, denied.dimension)
        return budget_error(denied, caller, now)

    def budget_headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        rem = call.res.remaining
        out = []
        if "tokens" in rem:
            out.append((b"x-budget-remaining-tokens", str(rem["tokens"]).encode()))
        if "cost_usd" in rem:
            # (formatted straight from nanos: usd()'s round(x, 9) first only doubles the cost)
            out.append((b"x-budget-remaining-cost-usd", f"{rem['cost_usd'] / NANOS_PER_USD:.6f}".encode()))
        if "steps" in rem:
            out.append((b"x-budget-remaining-steps", str(rem["steps"]).encode()))
        if call.clamped_to is not None:
            out.append((b"x-budget-clamped-max-tokens", str(call.clamped_to).encode()))
        return out

    async def forward(self, call: Call, scope: Scope, receive: Receive, send: Send, body: bytes,
                      facts: RequestFacts) -> None:
        rt = self.state.runtime
        up = rt.upstreams[self.provider]
        qs = scope.get("query_string", b"")
        url = up.base_url + self.adapter.path + ("?" + qs.decode("latin-1") if qs else "")
        t0 = time.perf_counter()
        watch = ClientWatch(call, receive)
        try:
            resp = await watch.until_done(open_upstream(self.state.transport_for(self.provider), url,
                                          upstream_headers(scope["headers"], self.provider, up.api_key), body))
        except ClientGone:
            call.outcome = "client_disconnected"  # before any response: the hold goes back, nothing charged
            await self.settle(call, None, Usage())
            return
        except httpx.TimeoutException:
            await self.fail(call, send, "upstream_timeout", UpstreamTimeout("The upstream API timed out."))
            return
        except httpx.HTTPError:
            await self.fail(call, send, "upstream_unreachable", UpstreamUnavailable("The upstream API is unreachable."))
            return
        try:
            headers = downstream_headers(resp.headers_raw) + self.budget_headers(call)
            if resp.status_code == 200 and resp.content_type.startswith("text/event-stream"):
                await self.pump(call, resp, headers, receive, send, facts)
            else:
                await self.relay_whole(call, resp, headers, send)
        finally:
            await resp.aclose()
            self.state.observe_upstream_seconds(call.route, time.perf_counter() - t0)

    async def fail(self, call: Call, send: Send, outcome: str, err: ProxyError) -> None:
        """The upstream failed before any message: nothing is charged and the hold is released."""
        call.outcome, call.status = outcome, err.status
        await self.settle(call, None, Usage())
        await send_error(send, err, call.request_id, self.provider)

    async def relay_whole(self, call: Call, resp: UpstreamReply, headers: list[tuple[bytes, bytes]],
                          send: Send) -> None:
        try:
            payload = await resp.aread()
        except httpx.TimeoutException:
            await self.fail(call, send, "upstream_timeout", UpstreamTimeout("The upstream API timed out."))
            return
        except httpx.HTTPError:
            await self.fail(call, send, "upstream_dropped", UpstreamUnavailable("The upstream connection failed."))
            return
        call.status = resp.status_code
        if resp.status_code != 200:
            call.outcome = f"upstream_{resp.status_code // 100}xx"
            await self.settle(call, None, Usage())  # an upstream error before any message charges nothing
        else:
            reported = self.adapter.usage_from_response(payload)
            if reported is None:
                # A message came back but says nothing of its usage: charge what was held (the
                # worst case admission allowed) rather than nothing.
                call.outcome = "usage_unknown"
                hold = call.res.admitted.hold
                usage, bill = Usage(input_tokens=hold.input_tokens, output_tokens=hold.output_tokens), NO_BILL
            else:
                usage, bill = reported
            await self.settle(call, usage, usage, bill)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def pump(self, call: Call, resp: UpstreamReply, headers: list[tuple[bytes, bytes]],
                   receive: Receive, send: Send, facts: RequestFacts) -> None:
        """Relay a stream event by event, metering each; cut it in place of the next event when a
        budget runs out, the config lowers a limit below what is used, or the proxy shuts down."""
        ratio_key = (call.caller.team + "/" + call.caller.key, call.price.model_id if call.price else call.model)
        ratios = self.state.output_ratios
        meter = self.adapter.new_meter(facts, call.res.admitted.hold.input_tokens,
                                       ratios.bytes_per_token_milli(*ratio_key))
        decoder = SSEDecoder(runs=self.adapter.event_runs)
        call.status = 200
        # The head goes out with the first bytes of the body: one write (server.CoalescingTransport)
        # instead of two; for a stream that arrives whole, once its charge is settled.
        head: dict[str, Any] | None = {"type": "http.response.start", "status": 200, "headers": headers}

        async def watch_client() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            call.client_gone = True
            await resp.aclose()  # stop the provider generating at once

        # Started after the first chunk (a provider sends message_start at once), and only while
        # the message is unfinished: a stream that arrives whole needs no watcher.
        watcher: asyncio.Future[None] | None = None
        call.upstream = resp
        self.state.active_streams.add(call)
        deadline = call.res.deadline
        state = self.state
        filters = self.adapter.filters_events
        tail = b""
        carry = b""  # the last chunk's bytes, held back to go out with the end of the body
        ending: bytes | None = None  # what ends the client's body, sent once the charge is settled
        try:
            try:
                async for chunk in resp.aiter_raw():
                    events = decoder.feed(chunk)
                    n = len(events)
                    done = 0  # events[:done] are metered and will be relayed
                    cut: bytes | None = None
                    while done < n:
                        if done == 0 and ((deadline is not None and state.clock() >= deadline)
                                          or call.generation != state.generation):
                            # A wall-clock or reload decision is due at this chunk's first event.
                            if type(events[0]) is SSERun:
                                events[0:1] = split(events[0], 0)
                                n = len(events)
                            done, grew = meter.feed_events(events[:1], 0, call.hold_room)
                            at_event = True
                        else:
                            # The meter runs through the chunk's events until one needs a decision
                            # (splitting a run of text deltas in `events` where one passes the room).
                            done, grew = meter.feed_events(events, done, call.hold_room)
                            n = len(events)
                            at_event = grew != UNCHANGED  # else it ran out of events: a cut follows them
                            if (not at_event and deadline is None and call.generation == state.generation
                                    and not self.push_due(call, meter)):
                                break  # (the end of the chunk, and check() would find nothing to do)
                        try:
                            denied = await self.check(call, meter, grew, deadline)
                        except StoreUnavailable:
                            # Fail closed: a stream the ledger cannot follow is not metered blind.
                            cut = self.adapter.cut_event("the budget ledger is unavailable; the stream was cut",
                                                         error_type="api_error", error_code="store_unavailable")
                            call.outcome = "store_unavailable"
                        else:
                            if denied is not None and not meter.finished:
                                # (a message already finished is not cut: nothing is left to stop, and
                                # its reported usage settles as reported)
                                cut = self.adapter.cut_event(cut_message(denied, call.caller))
                                call.outcome = "cut"
                                state.observe_cut(call.caller, denied.dimension)
                        if cut is not None:
                            if at_event:
                                done -= 1  # the cut takes the place of the event that ran the budget out
                            break
                    relayed = events[:done] if done < len(events) else events
                    if filters:
                        out = b"".join([ev.raw for ev in relayed if self.adapter.forwardable(ev, facts)])
                    else:
                        out = b"".join([ev.raw for ev in relayed])
                    if carry:
                        out, carry = carry + out, b""
                    if cut is not None:
                        if head is not None:
                            await send(head)
                            head = None
                        await send({"type": "http.response.body", "body": out + cut, "more_body": False})
                        return
                    if resp.body_complete:
                        carry = out  # the upstream's body has ended: one write for the rest and the end
                    elif out:
                        if head is not None:
                            await send(head)
                            head = None
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    if watcher is None and not meter.finished:
                        watcher = asyncio.ensure_future(watch_client())
                rest = decoder.flush()
                for ev in rest:
                    meter.feed(ev)
                tail = b"".join(ev.raw for ev in rest if self.adapter.forwardable(ev, facts))
                call.outcome = ("completed" if meter.complete else
                                "upstream_error" if meter.upstream_error else "upstream_dropped")
                if call.outcome == "completed":
                    tail += decoder.pending  # (bytes after the end: passed through as they came)
            except (httpx.HTTPError, SSEError):
                call.outcome = "upstream_dropped"
            except Exception as exc:  # a bug must not tear the client's body or lose the charge
                log.error("stream relay failed: request_id=%s error=%s", call.request_id, exc.__class__.__name__)
                call.outcome = "proxy_error"
            if call.outcome in ("upstream_dropped", "proxy_error") and not call.client_gone:
                # Truncation is never silent: an SDK would take what came as a complete message.
                # (An unfinished event's bytes are not relayed: the error event must parse.)
                tail += self.adapter.cut_event("the upstream connection ended mid-stream", error_type="api_error",
                                               error_code="upstream_dropped")
            if call.client_gone:
                call.outcome = "client_disconnected"
            elif call.shutting_down and not meter.finished:
                call.outcome = "shutdown"
                tail = self.adapter.cut_event("the proxy is shutting down; the stream was cut and charged for "
                                              "what was generated", error_type="api_error",
                                              error_code="proxy_shutdown")
            # End the client's body cleanly whatever happened upstream (below, once settled).
            ending = carry + tail
        finally:
            self.state.active_streams.discard(call)
            if watcher is not None:
                watcher.cancel()
            await resp.aclose()
            usage = self.stream_usage(call, meter)
            # (no shield, which costs a task per stream: settle survives this task's cancellation)
            await self.settle(call, usage, usage if usage is not None else Usage(), meter.bill)
            if meter.complete and meter.usage_reported and usage is not None:
                ratios.learn(*ratio_key, usage.output_tokens, meter.output_bytes)
        # As for a whole reply, the charge is committed before the response ends (SPEC §6).
        if head is not None:
            await send(head)
        await send({"type": "http.response.body", "body": ending, "more_body": False})

    async def check(self, call: Call, meter: Any, grew: int, deadline: float | None) -> Denied | None:
        """After the meter stopped at an event (or ran out of events): push, and decide whether
        the stream may go on. Raises StoreUnavailable when the store cannot be reached."""
        state = self.state
        denied = None
        if grew == REPORTED:
            if not meter.finished:  # (the final usage report needs no push: settle follows at once)
                denied = await self.enforce(call, meter)
        elif grew == GREW:  # the live output passed call.hold_room
            denied = await self.enforce(call, meter)
        elif self.push_due(call, meter):  # (the end of a chunk)
            denied = await self.enforce(call, meter)
        if denied is None and deadline is not None and state.clock() >= deadline:
            denied = self.wall_clock_denial(call)
        if denied is None and call.generation != state.generation:
            denied = await self.recheck_limits(call)
        return denied

    def push_due(self, call: Call, meter: Any) -> bool:
        """The running charge has grown since the last push, a second or more ago."""
        return (meter.live_output_tokens() > call.pushed_output
                and self.state.clock() - call.pushed_at >= PUSH_INTERVAL_SECONDS)

    async def recheck_limits(self, call: Call) -> Denied | None:
        """After a reload: adopt the new limits for this call, and cut it if a scope is now overspent."""
        call.generation = self.state.generation
        budgets = self.state.runtime.budgets
        current = {s.id: s for s in (*budgets.teams.values(), *budgets.keys.values())}
        scopes = tuple(current.get(s.id, s) for s in call.res.scopes)
        call.res.scopes = scopes
        states = await self.state.store.states(scopes, self.state.clock())
        for scope, st in zip(scopes, states):
            for dim, limit in scope.limits.metered():
                if st.used.get(dim) > limit:
                    return Denied(scope, dim, limit, st.used.get(dim), st.held.get(dim), 0)
        return None

    def live_usage(self, call: Call, meter: Any) -> Usage:
        """The running charge: the meter's figure, its input at least what admission estimated
        until the provider reports one (a stream without message_start is no cheaper)."""
        u = meter.live_usage()
        if not meter.started:
            estimated = call.res.admitted.hold.input_tokens
            if u.total_input_tokens < estimated:
                u = u._replace(input_tokens=u.input_tokens + estimated - u.total_input_tokens)
        return self.capped(call, u)

    def stream_usage(self, call: Call, meter: Any) -> Usage | None:
        """What a stream that ended is charged; None when it produced no message (no step). A
        stream that never sent its message start but relayed output is charged the estimate of
        that output plus the input admission estimated: an upstream lie does not make it free."""
        if meter.started:
            usage = meter.final_usage()
            return usage if meter.usage_reported else self.capped(call, usage)
        live = self.live_usage(call, meter)
        return None if live.output_tokens == 0 else live

    @staticmethod
    def capped(call: Call, u: Usage) -> Usage:
        """The running estimate errs high; an honest upstream never generates past the max_tokens
        it was sent, so an estimate within ESTIMATE_TOLERANCE of it counts as max_tokens. Reported
        figures are settled as reported."""
        cap = call.output_cap
        if cap is None or u.output_tokens <= cap or u.output_tokens > cap * ESTIMATE_TOLERANCE:
            return u
        return u.with_output(cap)

    async def enforce(self, call: Call, meter: Any) -> Denied | None:
        """Push the running charge to the store when it outgrows the hold (the store may grow
        the hold or refuse: a cut) or the last push is a second old, then work out how far
        output may grow before the next decision. Between decisions the meter compares one
        integer per event (see pump)."""
        u = self.live_usage(call, meter)
        amounts = Amounts.of_usage(u, self.cost(call, u), 1)
        now = self.state.clock()
        if now - call.pushed_at < PUSH_INTERVAL_SECONDS and amounts.within(call.res.hold):
            denied = None  # inside the hold, and the store heard from this call less than a second ago
        else:
            denied = await self.state.store.charge(call.res, amounts, now)
            if denied is None:
                # (the live figure, uncapped, as check() compares it: past the cap nothing is pushed again)
                call.pushed_at, call.pushed_output = now, meter.live_output_tokens()
        if denied is None:
            call.hold_room = self.hold_room(call, u)
        return denied

    def hold_room(self, call: Call, u: Usage) -> int:
        """The live output figure up to which this stream stays inside its hold in every dimension."""
        hold = call.res.hold
        total_input = u.total_input_tokens
        room = min(hold.output_tokens, hold.tokens - total_input)
        price = call.price
        if price is not None:
            spare = hold.cost_nanos - pricing_mod.cost_nanos(price, u.with_output(0))
            affordable = pricing_mod.output_tokens_within(price, spare, total_input)
            if affordable is not None and affordable < room:
                room = affordable
        cap = call.output_cap
        if cap is not None and room >= cap:
            # Up to the tolerance the charged output never counts past the cap (capped()), so it
            # stays inside this hold; past it, the next decision charges the estimate in full.
            return int(cap * ESTIMATE_TOLERANCE)
        return room

    def wall_clock_denial(self, call: Call) -> Denied:
        scope = next(s for s in call.res.scopes if s.limits.wall_clock is not None)
        return Denied(scope, "wall_clock", scope.limits.wall_clock or 0, scope.limits.wall_clock or 0, 0, 0)

    def cost(self, call: Call, usage: Usage) -> int:
        """The running charge, at the rates admission reserved at."""
        if call.price is None:
            return 0
        return pricing_mod.cost_nanos(call.price, usage, one_call_may_be_long(call.price, call.betas))

    def billed_cost(self, call: Call, usage: Usage, bill: Bill) -> int:
        """The settled charge: at the served model's rates, each itemised call at its own."""
        table = self.state.runtime.pricing
        served = price_for(table, bill.model, call.price)
        whole = served is not None and one_call_may_be_long(served, call.betas)
        return bill_cost_nanos(table, call.price, bill, usage, whole)

    async def settle(self, call: Call, usage: Usage | None, charged: Usage, bill: Bill = NO_BILL) -> None:
        """Charge `charged` (+ one step when a message was produced, i.e. usage is not None) and
        release the rest of the hold; log one usage row. Runs once per call."""
        if call.res.settled:
            return
        steps = 1 if usage is not None else 0
        cost = self.billed_cost(call, charged, bill)
        actual = Amounts.of_usage(charged, cost, steps)
        now = self.state.clock()
        row = UsageRow(now, call.caller.team, call.caller.key, call.model, call.route, charged.input_tokens,
                       charged.cache_write_5m_tokens, charged.cache_write_1h_tokens, charged.cache_read_tokens,
                       charged.output_tokens, charged.web_search_requests, cost, steps, now - call.started,
                       call.outcome, call.request_id)
        try:
            await self.state.store.settle(call.res, actual, row)
        except asyncio.CancelledError:
            # The store has it (LedgerStore.settle takes effect when called); so do the metrics and log.
            self.state.observe_settled(call, charged, cost, steps)
            raise
        except Exception as exc:
            # Never silently lost: the in-process ledger holds it; the log says it is not durable.
            log.error("settlement not persisted: request_id=%s outcome=%s error=%s", call.request_id,
                      call.outcome, exc.__class__.__name__)
        self.state.observe_settled(call, charged, cost, steps)
