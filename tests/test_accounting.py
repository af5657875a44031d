"""Accounting truth (docs/budgets.md "What is charged"): thinking-aware clamping, what a response bills
(iterations, the model that served, the long-context tier), and SSE event typing.

The end-to-end tests run the real proxy under uvicorn in front of the Anthropic simulator and
drive it with the official anthropic SDK (or raw httpx where the bytes matter). The pure tests
call proxy/billing.py and proxy/providers/anthropic.py directly, on a price table written out in
this file, and every expected figure is worked out by hand next to the assertion:
$X per million tokens is X * 1000 nano-dollars per token; $10 per 1,000 searches is 10**7
nano-dollars per search.
"""
from __future__ import annotations

import json
from decimal import Decimal as D

import anthropic
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.billing import Bill, bill_cost_nanos, one_call_may_be_long, total_of
from proxy.ledger import ZERO
from proxy.meter import REPORTED
from proxy.pricing import ModelPrice, PriceTable, Rates
from proxy.providers import RequestFacts
from proxy.providers.anthropic import (
    THINKING_MIN_BUDGET, AnthropicStreamMeter, event_type, iterations_from, min_output, ran_server_tools,
    thinking_budget, usage_from_response, with_max_tokens,
)
from proxy.sse import SSEDecoder
from proxy.usage import Usage
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.harness import wait_rows
from tests.simulator import Reply

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
EST = 7  # heuristic input estimate of MSG (tests/test_budgets.py checks it)


# --- helpers -------------------------------------------------------------------------------------

def teams(alpha: dict | None = None, beta: dict | None = None) -> dict:
    return {"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": alpha or {}},
                                  "beta": {"key": BETA_KEY, "budget": beta or {}}}}}


def client(proxy, key: str = ALPHA_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0)


def key_state(proxy, key: str = "alpha"):
    return proxy.scope_states("research", key)[0]


def assert_nothing_held(proxy) -> None:
    for key in ("alpha", "beta"):
        assert key_state(proxy, key).held == ZERO
    assert proxy.state.store.book.in_flight == {}


def thinking_call(proxy, thinking: dict, max_tokens: int = 8000, stream: bool = False):
    """One call with a thinking config; returns the x-budget-clamped-max-tokens header (or None)."""
    c = client(proxy)
    if stream:
        with c.messages.stream(model=HAIKU, max_tokens=max_tokens, thinking=thinking, messages=MSG) as s:
            s.get_final_message()
            return s.response.headers.get("x-budget-clamped-max-tokens")
    r = c.messages.with_raw_response.create(model=HAIKU, max_tokens=max_tokens, thinking=thinking, messages=MSG)
    r.parse()
    return r.headers.get("x-budget-clamped-max-tokens")


def facts(body: dict) -> RequestFacts:
    return RequestFacts(body, body["model"], body["max_tokens"], body.get("stream") is True)


# --- thinking-aware clamping, end to end (docs/budgets.md "Admission") --------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("budget", [{"output_tokens": 3000}, {"tokens": EST + 3000}])
def test_clamping_lowers_the_thinking_budget_below_the_clamped_max_tokens(start, sim, budget, stream):
    """Room for 3000 output tokens: max_tokens 8000 -> 3000, and budget_tokens 4000 (which the API
    requires to be below max_tokens) -> 2999. Everything else in the body is as sent."""
    p = start(teams=teams(alpha=budget))
    thinking = {"type": "enabled", "budget_tokens": 4000}
    assert thinking_call(p, thinking, stream=stream) == "3000"
    [rec] = sim.messages_requests()
    assert rec.json["max_tokens"] == 3000
    assert rec.json["thinking"] == {"type": "enabled", "budget_tokens": 2999}
    assert rec.json["messages"] == MSG and rec.json["model"] == HAIKU
    assert rec.json.get("stream", False) is stream
    assert_nothing_held(p)


def test_a_thinking_budget_already_below_the_clamp_is_left_alone(start, sim):
    p = start(teams=teams(alpha={"output_tokens": 3000}))
    assert thinking_call(p, {"type": "enabled", "budget_tokens": 2000}) == "3000"
    rec = sim.messages_requests()[-1]
    assert rec.json["max_tokens"] == 3000 and rec.json["thinking"] == {"type": "enabled", "budget_tokens": 2000}


def test_the_least_a_thinking_request_can_be_clamped_to_is_1025(start, sim):
    """1025 output tokens left: forwarded with max_tokens 1025 and budget_tokens 1024, the API's
    minimum. 1024 left: budget_tokens cannot go below 1024 and must stay below max_tokens, so the
    request cannot be forwarded: 429, nothing reaches the upstream, nothing stays held."""
    p = start(teams=teams(alpha={"output_tokens": 1025}, beta={"output_tokens": 1024}))
    assert thinking_call(p, {"type": "enabled", "budget_tokens": 4000}) == "1025"
    [rec] = sim.messages_requests()
    assert rec.json["max_tokens"] == 1025 and rec.json["thinking"]["budget_tokens"] == 1024

    with pytest.raises(anthropic.RateLimitError) as exc:
        client(p, BETA_KEY).messages.create(model=HAIKU, max_tokens=8000, messages=MSG,
                                            thinking={"type": "enabled", "budget_tokens": 4000})
    err = exc.value
    assert err.status_code == 429 and err.body["error"]["details"]["error_code"] == "budget_exceeded"
    assert err.body["budget"]["dimension"] == "output_tokens" and err.body["budget"]["scope"] == "key"
    assert "at least 1025 needed" in err.body["error"]["message"], err.body
    assert len(sim.messages_requests()) == 1, "a thinking request that cannot fit was forwarded"
    assert_nothing_held(p)
    assert key_state(p, "beta").used == ZERO


def test_a_thinking_request_with_less_room_than_1025_is_refused_by_a_cost_budget_too(start, sim):
    """claude-haiku-4-5: $1 in, $5 out per Mtok -> 1000 and 5000 nanos per token. A cost budget of
    7 x 1000 + 1000 x 5000 nanos buys the input estimate and 1000 output tokens: too few."""
    limit_usd = D(EST * 1000 + 1000 * 5000) / 10**9
    p = start(teams=teams(alpha={"cost_usd": limit_usd}))
    with pytest.raises(anthropic.RateLimitError) as exc:
        client(p).messages.create(model=HAIKU, max_tokens=8000, messages=MSG,
                                  thinking={"type": "enabled", "budget_tokens": 4000})
    assert exc.value.body["budget"]["dimension"] == "cost_usd"
    assert sim.messages_requests() == []
    assert_nothing_held(p)


def test_with_clamping_off_a_thinking_body_is_forwarded_byte_for_byte(start, sim):
    p = start(teams=teams(alpha={"output_tokens": 3000}, beta={"output_tokens": 500}),
              admission={"clamp_max_tokens": False})
    raw = json.dumps({"model": HAIKU, "max_tokens": 8000, "messages": MSG,
                      "thinking": {"type": "enabled", "budget_tokens": 4000}}).encode()
    for key in (ALPHA_KEY, BETA_KEY):  # 3000 left, and 500 left (fewer than 1025: not refused either)
        r = httpx.post(p.url + "/v1/messages", content=raw,
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                                "content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert "x-budget-clamped-max-tokens" not in r.headers
        assert sim.messages_requests()[-1].body == raw
    assert_nothing_held(p)


@pytest.mark.parametrize("room", [3000, 500])
def test_adaptive_thinking_is_never_touched(start, sim, room):
    """Adaptive thinking has no budget_tokens: only max_tokens is clamped, to any figure."""
    p = start(teams=teams(alpha={"output_tokens": room}))
    thinking = {"type": "adaptive"}
    assert thinking_call(p, thinking) == str(room)
    rec = sim.messages_requests()[-1]
    assert rec.json["max_tokens"] == room and rec.json["thinking"] == {"type": "adaptive"}
    assert_nothing_held(p)


# --- with_max_tokens / min_output, pure -----------------------------------------------------------

def test_with_max_tokens_and_min_output_by_hand():
    body = {"model": HAIKU, "max_tokens": 8000, "messages": MSG, "metadata": {"user_id": "u1"},
            "thinking": {"type": "enabled", "budget_tokens": 4000, "display": "summarized"}}
    f = facts(body)
    assert thinking_budget(body) == 4000 and min_output(f) == THINKING_MIN_BUDGET + 1 == 1025

    def sent(max_tokens: int) -> dict:
        return json.loads(with_max_tokens(f, max_tokens))

    out = sent(3000)
    assert out == {**body, "max_tokens": 3000,
                   "thinking": {"type": "enabled", "budget_tokens": 2999, "display": "summarized"}}
    assert sent(5000)["thinking"]["budget_tokens"] == 4000   # already below max_tokens: as sent
    assert sent(4001)["thinking"]["budget_tokens"] == 4000
    assert sent(4000)["thinking"]["budget_tokens"] == 3999   # equal is refused by the API: lowered
    assert sent(1025)["thinking"]["budget_tokens"] == 1024   # the least the relay forwards
    assert body["max_tokens"] == 8000 and body["thinking"]["budget_tokens"] == 4000  # not mutated

    for thinking in ({"type": "adaptive"}, {"type": "disabled"}, {"type": "enabled"},
                     {"type": "enabled", "budget_tokens": True}, "enabled"):
        other = {**body, "thinking": thinking}
        assert min_output(facts(other)) == 1
        assert json.loads(with_max_tokens(facts(other), 500)) == {**other, "max_tokens": 500}
    plain = {"model": HAIKU, "max_tokens": 100, "messages": MSG}
    assert min_output(facts(plain)) == 1
    assert json.loads(with_max_tokens(facts(plain), 7)) == {**plain, "max_tokens": 7}


@given(budget=st.integers(THINKING_MIN_BUDGET, 200_000), max_tokens=st.integers(1025, 200_000))
@settings(max_examples=300, deadline=None)
def test_with_max_tokens_keeps_the_thinking_budget_valid(budget, max_tokens):
    """For every clamp the relay may forward (>= min_output), the API's rule holds:
    1024 <= budget_tokens < max_tokens, and the budget is only lowered, and only as far as needed."""
    body = {"model": HAIKU, "max_tokens": 300_000, "messages": MSG,
            "thinking": {"type": "enabled", "budget_tokens": budget}}
    out = json.loads(with_max_tokens(facts(body), max_tokens))
    got = out["thinking"]["budget_tokens"]
    assert out["max_tokens"] == max_tokens
    assert THINKING_MIN_BUDGET <= got < max_tokens
    assert got == (budget if budget < max_tokens else max_tokens - 1)


# --- billing, pure (proxy/billing.py) ------------------------------------------------------------

def price(inp, out, w5m, w1h, read, model_id, long=None, above=None, beta=None) -> ModelPrice:
    return ModelPrice(Rates(D(inp), D(out), D(w5m), D(w1h), D(read)), web_search_per_1k=D(10),
                      long_context_above=above, long_context=None if long is None else Rates(*map(D, long)),
                      model_id=model_id, long_context_beta=beta)


#                                          nanos per token: in    out    5m    1h    read
A = price(1, 5, "1.25", 2, "0.1", "model-a")                 # 1000  5000  1250  2000  100
B = price(3, 15, "3.75", 6, "0.3", "model-b")                # 3000 15000  3750  6000  300
LONG = (6, "22.5", "7.5", 12, "0.6")                          # 6000 22500  7500 12000  600 above 200K input
LC_BETA = price(3, 15, "3.75", 6, "0.3", "model-lc", LONG, 200_000, "context-1m-2025-08-07")
LC_OPEN = price(3, 15, "3.75", 6, "0.3", "model-lc-open", LONG, 200_000)  # a 1M window without a beta
TABLE = PriceTable(None, {"model-a": A, "model-b": B, "model-lc": LC_BETA, "model-lc-open": LC_OPEN})
SEARCH = 10**7  # nanos per web search


def test_bill_prices_the_model_that_served_not_the_one_requested():
    u = Usage(input_tokens=100, output_tokens=10)
    # requested model-a, served model-b: 100 x 3000 + 10 x 15000
    assert bill_cost_nanos(TABLE, A, Bill("model-b"), u, True) == 450_000
    # served a model with no price, or named none: the requested price (100 x 1000 + 10 x 5000)
    assert bill_cost_nanos(TABLE, A, Bill("model-unpriced"), u, True) == 150_000
    assert bill_cost_nanos(TABLE, A, Bill(None), u, True) == 150_000
    # a dated id of a priced model is that model (docs/configuration.md `pricing`)
    assert bill_cost_nanos(TABLE, A, Bill("model-b-20260101"), u, True) == 450_000
    # nothing priced at all: 0
    assert bill_cost_nanos(TABLE, None, Bill("model-unpriced"), u, True) == 0


def test_bill_prices_each_iteration_at_its_own_model_and_never_the_top_level_again():
    parts = (
        ("model-a", Usage(input_tokens=1000, output_tokens=200)),              # 1000x1000 + 200x5000   = 2,000,000
        (None, Usage(input_tokens=500, cache_read_tokens=2000, output_tokens=100)),
        # ^ unnamed: the served model-b: 500x3000 + 2000x300 + 100x15000                               = 3,600,000
        ("model-unpriced", Usage(input_tokens=10, output_tokens=1)),            # -> model-b: 30000+15000 = 45,000
    )
    total = total_of(parts, 0)
    assert total == Usage(input_tokens=1510, cache_read_tokens=2000, output_tokens=301)
    assert bill_cost_nanos(TABLE, A, Bill("model-b", parts), total, True) == 2_000_000 + 3_600_000 + 45_000
    # (the same total priced whole at model-b would be 1510x3000 + 2000x300 + 301x15000 = 9,645,000)
    assert bill_cost_nanos(TABLE, A, Bill("model-b"), total, True) == 9_645_000


def test_bill_searches_the_iterations_do_not_itemise_are_priced_at_the_served_model():
    parts = (("model-a", Usage(input_tokens=100, output_tokens=10, web_search_requests=2)),)
    usage = Usage(input_tokens=100, output_tokens=10, web_search_requests=5)
    # the part: 100x1000 + 10x5000 + 2 searches; the 3 searches left over: at model-b (same search rate)
    assert bill_cost_nanos(TABLE, A, Bill("model-b", parts), usage, True) == 150_000 + 2 * SEARCH + 3 * SEARCH
    # total_of: parts that itemise no searches take the request's count
    plain = (("model-a", Usage(input_tokens=100)),)
    t = total_of(plain, 4)
    assert t == Usage(input_tokens=100, web_search_requests=4)
    assert bill_cost_nanos(TABLE, A, Bill("model-b", plain), t, True) == 100_000 + 4 * SEARCH


def test_bill_long_context_tier_per_iteration():
    """Each itemised call is one sampling call: the tier applies to it alone, whatever the request
    as a whole is; summed inputs of several calls never trigger it."""
    long_part = Usage(input_tokens=210_000, output_tokens=2000)   # 210000x6000 + 2000x22500 = 1,305,000,000
    short_part = Usage(input_tokens=150_000, output_tokens=1000)  # 150000x3000 + 1000x15000 =   465,000,000
    parts = (("model-lc", short_part), ("model-lc", long_part))
    for whole in (True, False):
        assert bill_cost_nanos(TABLE, None, Bill("model-lc", parts), total_of(parts, 0), whole) == 1_770_000_000
    two_short = (("model-lc-open", short_part), ("model-lc-open", short_part))  # 300K summed, neither long
    assert bill_cost_nanos(TABLE, None, Bill("model-lc-open", two_short), total_of(two_short, 0), True) == 930_000_000


def test_bill_a_server_tool_loop_disables_the_whole_request_tier():
    u = Usage(input_tokens=250_000, output_tokens=1000)
    long_cost = 250_000 * 6000 + 1000 * 22_500     # 1,522,500,000
    base_cost = 250_000 * 3000 + 1000 * 15_000     #   765,000,000
    assert bill_cost_nanos(TABLE, None, Bill("model-lc-open"), u, True) == long_cost
    assert bill_cost_nanos(TABLE, None, Bill("model-lc-open", tool_loop=True), u, True) == base_cost
    assert bill_cost_nanos(TABLE, None, Bill("model-lc-open"), u, False) == base_cost
    # searches of a tool loop are never at long rates either: + 3 searches
    s = u._replace(web_search_requests=3)
    assert bill_cost_nanos(TABLE, None, Bill("model-lc-open", tool_loop=True), s, True) == base_cost + 3 * SEARCH


@pytest.mark.parametrize("betas, expected", [
    (b"", False),
    (b"context-1m-2025-08-07", True),
    (b"prompt-caching-2024-07-31,context-1m-2025-08-07", True),
    (b"prompt-caching-2024-07-31, context-1m-2025-08-07 , files-api-2025-04-14", True),
    (b"context-1m-2025-08-07,", True),
    (b"context-1m", False),
    (b"context-1m-2025-08-07-x", False),
    (b"xcontext-1m-2025-08-07", False),
    (b"context-1m-2025-08-07;q=1", False),
])
def test_one_call_may_be_long_needs_the_named_beta(betas, expected):
    assert one_call_may_be_long(LC_BETA, betas) is expected
    assert one_call_may_be_long(LC_OPEN, betas) is True     # no beta needed
    assert one_call_may_be_long(A, betas) is True           # no tier at all: nothing to decide
    whole = one_call_may_be_long(LC_BETA, betas)
    u = Usage(input_tokens=250_000, output_tokens=1000)
    assert bill_cost_nanos(TABLE, None, Bill("model-lc"), u, whole) == (1_522_500_000 if expected else 765_000_000)


def it(kind: str, model: str | None, inp: int, out: int, **extra) -> dict:
    d = {"type": kind, "input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0, **extra}
    if model is not None:
        d["model"] = model
    return d


def test_iterations_from_by_hand():
    assert iterations_from(None) is None
    assert iterations_from({"input_tokens": 5}) is None
    assert iterations_from({"iterations": []}) is None
    assert iterations_from({"iterations": "no"}) is None
    # compaction + message (no model named: None, priced at the response's model)
    u = {"iterations": [it("compaction", None, 100, 131, cache_creation_input_tokens=55_096),
                        it("message", None, 229, 5)]}
    assert iterations_from(u) == ((None, Usage(100, 55_096, 0, 0, 131)), (None, Usage(229, 0, 0, 0, 5)))
    # billed: false is left out; billed: true / null is kept; a non-dict item is skipped
    u = {"iterations": [it("message", "model-b", 100, 50), it("advisor_message", "model-a", 1000, 20, billed=False),
                        it("message", "", 7, 1, billed=True), "junk", it("message", "model-a", 3, 2, billed=None)]}
    assert iterations_from(u) == (("model-b", Usage(100, output_tokens=50)), (None, Usage(7, output_tokens=1)),
                                  ("model-a", Usage(3, output_tokens=2)))


def test_iterations_from_drops_only_a_declined_fallback_attempt():
    declined = it("message", "model-b", 408, 0)
    served = it("fallback_message", "model-a", 412, 264)
    assert iterations_from({"iterations": [declined, served]}) == (("model-a", Usage(412, output_tokens=264)),)
    # the fallback need not follow at once
    assert iterations_from({"iterations": [declined, 7, served]}) == (("model-a", Usage(412, output_tokens=264)),)
    # an attempt that generated output is billed even though a fallback followed
    tried = it("message", "model-b", 408, 3)
    assert iterations_from({"iterations": [tried, served]}) == (("model-b", Usage(408, output_tokens=3)),
                                                                ("model-a", Usage(412, output_tokens=264)))
    # an empty message with no fallback after it is billed (its input was read)
    assert iterations_from({"iterations": [it("compaction", None, 10, 5), declined]}) == (
        (None, Usage(10, output_tokens=5)), ("model-b", Usage(408)))
    # only `message` iterations are declined attempts
    adv = it("advisor_message", "model-b", 50, 0)
    assert iterations_from({"iterations": [adv, served]}) == (("model-b", Usage(50)),
                                                              ("model-a", Usage(412, output_tokens=264)))


def test_a_fallback_response_bills_the_model_that_served_only():
    """The a_fallback.json shape on this file's table: the declined model-b attempt costs nothing,
    the model-a answer 412 x 1000 + 264 x 5000 = 1,732,000; the top-level figures are not added."""
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "model-a",
            "content": [{"type": "fallback", "from": {"model": "model-b"}, "to": {"model": "model-a"}},
                        {"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 412, "output_tokens": 264, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0,
                      "iterations": [it("message", "model-b", 408, 0), it("fallback_message", "model-a", 412, 264)]}}
    usage, bill = usage_from_response(json.dumps(body).encode())
    assert usage == Usage(412, output_tokens=264)
    assert bill == Bill("model-a", (("model-a", Usage(412, output_tokens=264)),), False)
    assert bill_cost_nanos(TABLE, B, bill, usage, True) == 1_732_000
    # an advisor iteration marked billed: false adds nothing: 100 x 3000 + 50 x 15000 = 1,050,000
    body["model"] = "model-b"
    body["usage"]["iterations"] = [it("message", "model-b", 100, 50),
                                   it("advisor_message", "model-a", 9000, 900, billed=False)]
    usage, bill = usage_from_response(json.dumps(body).encode())
    assert usage == Usage(100, output_tokens=50) and bill_cost_nanos(TABLE, A, bill, usage, True) == 1_050_000


@pytest.mark.parametrize("usage, content, expected", [
    ({"server_tool_use": {"web_search_requests": 1}}, b"", True),
    ({"server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 2}}, b"", True),
    ({"server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0}}, b"", False),
    ({"server_tool_use": {"web_search_requests": True}}, b"", False),   # not a count
    ({"server_tool_use": {"web_search_requests": -3}}, b"", False),
    ({"server_tool_use": "3"}, b"", False),
    ({}, b'{"content":[{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search"}]}', True),
    ({}, b'{"content":[{"type": "server_tool_use","id":"srvtoolu_1"}]}', True),
    (None, b'{"type":"content_block_start","index":1,"content_block":{"type":"server_tool_use"}}', True),
    ({}, b'{"content":[{"type":"tool_use","name":"server_tool_use"}]}', False),
    ({}, b'{"content":[{"type":"text","text":"type: server_tool_use"}]}', False),
    (None, b"", False),
])
def test_ran_server_tools(usage, content, expected):
    assert ran_server_tools(usage, content) is expected


def test_a_whole_reply_that_ran_server_tools_is_never_long_as_a_whole():
    body = {"id": "m", "type": "message", "model": "model-lc-open",
            "content": [{"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}}],
            "usage": {"input_tokens": 250_000, "output_tokens": 1000,
                      "server_tool_use": {"web_search_requests": 2}}}
    usage, bill = usage_from_response(json.dumps(body).encode())
    assert bill.tool_loop and usage.web_search_requests == 2
    # 250000 x 3000 + 1000 x 15000 + 2 searches
    assert bill_cost_nanos(TABLE, None, bill, usage, True) == 765_000_000 + 2 * SEARCH


# --- event typing (an event without `event:` is typed by its data's `type`) ----------------

def test_event_type_reads_the_data_type():
    assert event_type('{"type":"message_delta","delta":{}}') == "message_delta"
    assert event_type('{ "type" : "message_stop" }') == "message_stop"
    assert event_type('{"index":0,"type":"content_block_delta","delta":{}}') == "content_block_delta"
    assert event_type('{"type":7}') is None and event_type("[DONE]") is None and event_type("") is None
    assert event_type('["type"]') is None


def sim_stream_bytes(reply: Reply) -> bytes:
    """The SSE body the simulator would send for `reply` (the framing its `data_only` knob picks)."""
    from tests.simulator.anthropic import plan_reply, sse, sse_data_only
    frame = sse_data_only if reply.data_only else sse
    plan = plan_reply(reply, {"model": HAIKU, "max_tokens": 1000, "messages": MSG})
    return b"".join(frame(name, payload) for name, payload in plan.events)


@pytest.mark.parametrize("split", [1, 7, 10**6])
def test_meter_is_the_same_with_and_without_event_lines(split):
    reply = dict(chunks=["The quick ", "brown fox ", "jumps over ", "the lazy dog."], thinking="let me see",
                 input_tokens=30, cache_read=5, output_tokens=40, message_delta_count=2)
    meters = []
    for data_only in (False, True):
        raw = sim_stream_bytes(Reply(**reply, data_only=data_only))
        assert (b"event: " in raw) is not data_only
        m, d, results = AnthropicStreamMeter(3000), SSEDecoder(), []
        for i in range(0, len(raw), split):
            results += [m.feed(ev) for ev in d.feed(raw[i:i + split])]
        results += [m.feed(ev) for ev in d.flush()]
        meters.append((m.complete, m.finished, m.usage_reported, m.started, m.output_bytes, m.final_usage(),
                       m.live_usage(), m.bill, results))
    assert meters[0] == meters[1]
    complete, finished, reported, started, out_bytes, final, _, _, results = meters[0]
    assert complete and finished and reported and started and results.count(REPORTED) == 3
    assert final == Usage(30, 0, 0, 5, 40)
    assert out_bytes == len("let me see") + len("The quick brown fox jumps over the lazy dog.")


def raw_stream(proxy, key: str = ALPHA_KEY) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/messages",
                      json={"model": HAIKU, "max_tokens": 1000, "messages": MSG, "stream": True},
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"}, timeout=10)


CHUNK = "abcdefghijk "  # 12 bytes: 4 tokens at the unlearned bytes / 3


@pytest.mark.parametrize("case", ["completed", "dropped", "error_event", "cut"])
def test_a_data_only_stream_is_metered_as_the_same_stream_with_event_lines(start, sim, case):
    """The same answer, framed with and without `event:` lines, through two fresh proxies (the same
    budgets, nothing learned): the same usage row, charge and client-visible ending."""
    knobs = {"completed": {}, "dropped": {"drop_after": 4}, "error_event": {"error_event_after": 4},
             "cut": {}}[case]
    budget = {"output_tokens": 20} if case == "cut" else {"tokens": 10**6}
    seen = []
    for data_only in (False, True):
        p = start(teams=teams(alpha=budget), admission={"clamp_max_tokens": False})
        sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=25, cache_read=3, output_tokens=33,
                        message_delta_count=2, data_only=data_only, **knobs))
        r = raw_stream(p)
        assert r.status_code == 200
        assert (b"event: message_start" in r.content) is not data_only
        [row] = wait_rows(p, 1)
        events = SSEDecoder().feed(r.content)
        last = json.loads(events[-1].data)
        seen.append((row.outcome, row.input_tokens, row.cache_read_tokens, row.output_tokens, row.cost_nanos,
                     row.steps, last["type"], last.get("error", {}).get("type")))
        assert_nothing_held(p)
    assert seen[0] == seen[1], seen
    outcome, inp, read, out, cost, steps, last_type, err = seen[0]
    expected = {  # (outcome, output tokens, last event, error type); haiku: 1000 in, 100 read, 5000 out
        "completed": ("completed", 33, "message_stop", None),
        "dropped": ("upstream_dropped", 16, "error", "api_error"),       # 4 deltas x 4 tokens
        "error_event": ("upstream_error", 16, "error", "overloaded_error"),
        "cut": ("cut", 24, "error", "rate_limit_error"),                 # the 6th delta passes 20
    }[case]
    assert (outcome, out, last_type, err) == expected
    assert (inp, read, steps) == (25, 3, 1)
    assert cost == 25 * 1000 + 3 * 100 + out * 5000


# --- admission of a requested fallback chain ---------------------------------------------------

def test_admission_reserves_at_the_dearest_model_a_requested_fallback_chain_names():
    """Any model of the chain may serve, so the hold is priced at the dearest
    (claude-opus-4-1 outputs at $75 per Mtok against haiku's $5); names without a price and
    a body that names no fallback change nothing."""
    import yaml

    from proxy.app import shipped_pricing_path
    from proxy.billing import dearest_price
    from proxy.pricing import parse_price_table

    table = parse_price_table(yaml.safe_load(shipped_pricing_path().read_text()))
    haiku = table.lookup("claude-haiku-4-5")
    assert dearest_price(table, haiku, {"model": "claude-haiku-4-5"}) is haiku
    chain = {"model": "claude-haiku-4-5", "fallbacks": ["no-such-model", "claude-opus-4-1"]}
    assert dearest_price(table, haiku, chain).model_id == "claude-opus-4-1"
    tool = {"model": "claude-haiku-4-5", "tools": [{"type": "fallback_2026", "model": "claude-sonnet-4-5"}]}
    assert dearest_price(table, haiku, tool).model_id == "claude-sonnet-4-5"
    assert dearest_price(table, None, {"model": "x", "fallback": {"models": ["claude-sonnet-4-5"]}}).model_id \
        == "claude-sonnet-4-5"
