"""The only streaming loop: admit -> forward -> pump + meter -> settle (exactly once, whatever is cancelled).

A plain ASGI callable on the hot path (Starlette's StreamingResponse costs measurable throughput and cancels
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
from proxy.billing import NO_BILL, Bill, bill_cost_nanos, dearest_price, one_call_may_be_long, price_for
from proxy.asgi import ASGIScope, ClientGone, Receive, Send, read_body, send_error
from proxy.denials import budget_error
from proxy.errors import (InvalidRequest, PermissionDenied, ProxyError, StoreUnavailable, UpstreamTimeout,
                          UpstreamUnavailable, new_request_id)
from proxy.headers import downstream_headers, upstream_headers
from proxy.logs import upstream_request_id
from proxy.ledger import REMAINING_HEADERS, ZERO, Amounts, Ask, Denied, admit
from proxy.providers import Provider, RequestFacts
from proxy.sse import SSEError
from proxy.store.base import Reservation, UsageRow
from proxy.stream_policy import CUT, PUSH, RELAY, StreamPolicy, stream_usage
from proxy.upstream import UpstreamReply, open_upstream, pool_failure
from proxy.usage import Usage

log = logging.getLogger("budget_proxy.access")

# (How often a stream's running charge is pushed, PUSH_INTERVAL_SECONDS, and how far an output
# estimate may run past max_tokens, ESTIMATE_TOLERANCE, are stream policy: proxy/stream_policy.py.)
LARGE_BODY_BYTES = 256 * 1024
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
    long_ok: bool | None = None    # one_call_may_be_long(price, betas), once worked out
    # for the access log (AppState.observe_done)
    upstream_request_id: str | None = None  # the upstream's request-id / x-request-id
    denied: Any = None             # the Denied a stream was cut for
    charged: Any = None            # (input tokens, output tokens, cost nanos, steps) as settled


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
        path = self.adapter.count_tokens_path
        body = None if path is None else self.adapter.count_tokens_body(facts)
        if path is None or body is None:  # (no counter upstream: the heuristic it is)
            return None
        up = self.state.runtime.upstreams[self.provider]
        try:
            resp = await open_upstream(self.state.transport_for(self.provider), up.base_url + path,
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
            max_tokens = (getattr(price, "max_output_tokens", None) or self.adapter.default_max_tokens) * facts.choices
        least = self.adapter.min_output(facts) if self.state.runtime.config.admission.clamp_max_tokens else 1
        if price is None:
            return Ask(input_tokens, 0, max_tokens, Decimal(0), least)
        kind = self.adapter.input_kind(raw)
        return Ask(input_tokens, pricing_mod.input_cost_nanos(price, input_tokens, kind), max_tokens,
                   pricing_mod.output_nanos_per_token(price, input_tokens), least)

    # --- the route ---------------------------------------------------------------------------
    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        started = self.state.clock()
        seen: dict[str, Any] = {}
        try:
            call, body, facts = await self.admit(scope, receive, request_id, started, seen)
        except ClientGone:
            self.state.observe_rejection(None, seen.get("caller"), seen.get("model"), self.route, scope,
                                         request_id, started)
            return
        except ProxyError as err:
            try:
                await send_error(send, err, request_id, self.provider)
            finally:
                self.state.observe_rejection(err, seen.get("caller"), seen.get("model"), self.route, scope,
                                             request_id, started)
            return
        try:
            await self.forward(call, scope, receive, send, body, facts)
        finally:
            try:
                if not call.res.settled:  # every path below settles; this is the backstop
                    await asyncio.shield(self.settle(call, None, Usage()))
            finally:
                self.state.observe_done(call, scope)  # (after the response's last byte)

    async def admit(self, scope: ASGIScope, receive: Receive, request_id: str, now: float, seen: dict[str, Any]):
        rt = self.state.runtime
        headers = dict(scope["headers"])
        secret = presented_secret(headers)
        # a config key without awaiting (the hot path); any other through the store's runtime keys
        caller = seen["caller"] = rt.keyring.lookup(secret) or await self.state.runtime_caller(secret)
        self.state.upstream_for(self.provider)  # 502 at once when no upstream key is configured
        raw = await read_body(receive, rt.config.limits.max_body_bytes, headers)
        facts = self.adapter.parse_request(raw)
        seen["model"] = facts.model
        if not caller.may_use(facts.model):
            raise PermissionDenied(f"Key '{caller.key}' may not use model '{facts.model}'.")
        scopes = rt.runs.with_run(caller, headers, rt.budgets.scopes_for(caller))
        price = dearest_price(rt.pricing, rt.pricing.lookup(facts.model), facts.body)
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
            self.state.observe_denial(caller, res.dimension, res)
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
                    betas=b",".join([v for k, v in scope["headers"] if k == b"anthropic-beta"]))
        return call, raw, facts

    async def too_little_output(self, scopes: Any, ask: Ask, caller: Caller, now: float) -> ProxyError:
        """The 429 for a request the budget admits only with less output than it can be forwarded
        with (extended thinking): the scope and dimension as the pure ledger words it."""
        states = await self.state.store.states(scopes, now)
        denied = admit(ask, list(zip(scopes, states)), now)
        ran_out = denied if isinstance(denied, Denied) else None  # (a budget that ran out: its alert)
        if not isinstance(denied, Denied):  # (room came free meanwhile: name the tightest anyway)
            denied = Denied(scopes[0], "output_tokens", ask.min_output, 0, 0, ask.min_output)
        self.state.observe_denial(caller, denied.dimension, ran_out)
        return budget_error(denied, caller, now)

    def budget_headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        rem = call.res.remaining
        out = []
        for dim, header, scale in REMAINING_HEADERS:  # (the dimensions declared with a header)
            v = rem.get(dim)
            if v is not None:
                # (formatted straight from stored units: in_unit()'s round(x, 9) first only doubles the cost)
                out.append((header, (str(v) if scale == 1 else f"{v / scale:.6f}").encode()))
        if call.clamped_to is not None:
            out.append((b"x-budget-clamped-max-tokens", str(call.clamped_to).encode()))
        return out

    async def forward(self, call: Call, scope: ASGIScope, receive: Receive, send: Send, body: bytes,
                      facts: RequestFacts) -> None:
        rt = self.state.runtime
        up = rt.upstreams[self.provider]
        qs = scope.get("query_string", b"")
        url = up.base_url + self.adapter.upstream_path + ("?" + qs.decode("latin-1") if qs else "")
        t0 = time.perf_counter()
        watch = ClientWatch(call, receive)
        try:
            resp = await watch.until_done(open_upstream(self.state.transport_for(self.provider), url,
                                          upstream_headers(scope["headers"], self.provider, up.api_key), body))
        except ClientGone:
            call.outcome = "client_disconnected"  # before any response: the hold goes back, nothing charged
            await self.settle(call, None, Usage())
            return
        except httpx.PoolTimeout as exc:  # (a TimeoutException: before it) no connection came free
            await self.fail(call, send, *pool_failure(exc))
            return
        except httpx.TimeoutException:
            await self.fail(call, send, "upstream_timeout", UpstreamTimeout("The upstream API timed out."))
            return
        except httpx.HTTPError:
            await self.fail(call, send, "upstream_unreachable", UpstreamUnavailable("The upstream API is unreachable."))
            return
        try:
            headers = downstream_headers(resp.headers_raw)
            call.upstream_request_id = upstream_request_id(headers)
            headers += self.budget_headers(call)
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
        """Relay a stream through its StreamPolicy (proxy/stream_policy.py), which decides what
        each chunk sends on, when the running charge is pushed and where the stream is cut; the
        IO is here. The head goes out with the first body bytes (one write, not two: server.
        CoalescingTransport), and what ends the body goes out once the charge is settled, as for
        a whole reply: a stream that arrives whole is settled before any of it is sent."""
        ratio_key = (call.caller.team + "/" + call.caller.key, call.price.model_id if call.price else call.model)
        ratios = self.state.output_ratios
        meter = self.adapter.new_meter(facts, call.res.admitted.hold.input_tokens,
                                       ratios.bytes_per_token_milli(*ratio_key))
        policy = StreamPolicy(call, meter, self.adapter, facts, self.state, self.cost)
        call.status = 200
        head: dict[str, Any] | None = {"type": "http.response.start", "status": 200, "headers": headers}
        call.upstream = resp
        self.state.active_streams.add(call)
        try:
            head = await self.relay_stream(call, resp, receive, send, policy, head)
        finally:
            self.state.active_streams.discard(call)
            await resp.aclose()
            usage = stream_usage(call, meter)
            # (no shield, which costs a task per stream: settle survives this task's cancellation)
            await self.settle(call, usage, usage if usage is not None else Usage(), meter.bill)
            if meter.complete and meter.usage_reported and usage is not None:
                ratios.learn(*ratio_key, usage.output_tokens, meter.output_bytes)
        if policy.ending is not None:  # (None: a cut has ended the body already)
            if head is not None:
                await send(head)
            await send({"type": "http.response.body", "body": policy.ending, "more_body": False})

    async def relay_stream(self, call: Call, resp: UpstreamReply, receive: Receive, send: Send,
                           policy: StreamPolicy, head: dict[str, Any] | None) -> dict[str, Any] | None:
        """pump's loop: each upstream chunk to the policy, the store calls it asks for, the bytes it
        relays to the client. Returns the head while it is still to be sent."""
        # The client is watched from the first chunk on (a provider sends message_start at once),
        # and only while the message is unfinished: a stream that arrives whole needs no watcher.
        watcher: asyncio.Future[None] | None = None
        feed, meter = policy.feed, policy.meter
        try:
            async for chunk in resp.aiter_raw():
                step = feed(chunk, resp.body_complete)
                while step != RELAY:
                    if step == CUT:
                        if policy.denied is not None:
                            self.state.observe_cut(call, policy.denied)
                        if head is not None:
                            await send(head)
                            head = None
                        await send({"type": "http.response.body", "body": policy.out, "more_body": False})
                        return None
                    step = await self.check(call, policy, step)
                out = policy.out
                if out:
                    if head is not None:
                        await send(head)
                        head = None
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if watcher is None and not meter.finished:
                    watcher = asyncio.ensure_future(self.watch_client(call, resp, receive))
            policy.flush()
        except (httpx.HTTPError, SSEError):
            policy.fail("upstream_dropped")
        except Exception as exc:  # a bug must not tear the client's body or lose the charge
            log.error("stream relay failed: request_id=%s error=%s", call.request_id, exc.__class__.__name__)
            policy.fail("proxy_error")
        finally:
            if watcher is not None:
                watcher.cancel()
        policy.end()
        return head

    @staticmethod
    async def watch_client(call: Call, resp: UpstreamReply, receive: Receive) -> None:
        """A client gone mid-stream: the provider stops generating at once (the relay then ends
        the stream as client_disconnected)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        call.client_gone = True
        await resp.aclose()

    async def check(self, call: Call, policy: StreamPolicy, step: int) -> int:
        """Make the store call the stream's policy stopped for (PUSH: charge the running usage;
        RECHECK: the limits after a reload) and hand it the answer; returns its next step. A
        store that cannot be reached cuts the stream: it is not metered blind."""
        try:
            if step == PUSH:
                answer = await self.state.store.charge(call.res, policy.amounts, policy.now)
            else:
                answer = await self.recheck_limits(call)
        except StoreUnavailable:
            self.state.observe_store_error()
            return policy.store_unavailable()
        return policy.charged(answer) if step == PUSH else policy.rechecked(answer)

    async def recheck_limits(self, call: Call) -> Denied | None:
        """After a reload: adopt the new limits for this call, and cut it if a scope is now overspent."""
        call.generation = self.state.generation
        budgets = self.state.runtime.budgets
        current = {s.id: s for s in (*budgets.teams.values(), *budgets.keys.values())}
        scopes = tuple(current.get(s.id, s) for s in call.res.scopes)
        call.res = call.res._replace(scopes=scopes)
        states = await self.state.store.states(scopes, self.state.clock())
        for scope, st in zip(scopes, states):
            for dim, limit in scope.limits.metered():
                if st.used.get(dim) > limit:
                    return Denied(scope, dim, limit, st.used.get(dim), st.held.get(dim), 0)
        return None

    def cost(self, call: Call, usage: Usage) -> int:
        """The running charge, at the rates admission reserved at."""
        if call.price is None:
            return 0
        if call.long_ok is None:  # (worked out once a call: the running charge is priced often)
            call.long_ok = one_call_may_be_long(call.price, call.betas)
        return pricing_mod.cost_nanos(call.price, usage, call.long_ok)

    def billed_cost(self, call: Call, usage: Usage, bill: Bill) -> int:
        """The settled charge: at the served model's rates, each itemised call at its own."""
        table = self.state.runtime.pricing
        served = price_for(table, bill.model, call.price)
        whole = served is not None and one_call_may_be_long(served, call.betas)
        return bill_cost_nanos(table, call.price, bill, usage, whole)

    async def settle(self, call: Call, usage: Usage | None, charged: Usage, bill: Bill = NO_BILL) -> None:
        """Charge `charged` (+ one step when a message was produced, i.e. usage is not None) and
        release the rest of the hold; log one usage row. Runs once per call."""
        res = call.res
        if res.settled:
            return
        steps = 1 if usage is not None else 0
        cost = self.billed_cost(call, charged, bill)
        actual = Amounts.of_usage(charged, cost, steps)
        now = self.state.clock()
        row = UsageRow(now, call.caller.team, call.caller.key, call.model, call.route, charged.input_tokens,
                       charged.cache_write_5m_tokens, charged.cache_write_1h_tokens, charged.cache_read_tokens,
                       charged.output_tokens, charged.web_search_requests, cost, steps, now - call.started,
                       call.outcome, call.request_id,
                       res.scopes[0].name if res.scopes and res.scopes[0].kind == "run" else "")  # (a run's first)
        # (marked before the store is awaited: a settle takes effect when called, and the backstop in
        # __call__ must not settle again if this task is cancelled meanwhile)
        call.res = res.as_settled()
        try:
            await self.state.store.settle(res, actual, row)
        except asyncio.CancelledError:
            # The store has it (LedgerStore.settle takes effect when called); so do the metrics and log.
            self.state.observe_settled(call, charged, cost, steps)
            raise
        except Exception as exc:
            # Never silently lost: the in-process ledger holds it; the log says it is not durable.
            self.state.observe_store_error()
            log.error("settlement not persisted: request_id=%s outcome=%s error=%s", call.request_id,
                      call.outcome, exc.__class__.__name__)
        self.state.observe_settled(call, charged, cost, steps)
