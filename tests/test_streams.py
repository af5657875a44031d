"""Streams through the real proxy, driven by the official anthropic SDK (2.14, max_retries=0)
against the project's simulator: exact settlement, running totals, mid-stream cuts, every way a
stream can end, and the overshoot bound under concurrency (docs/http-api.md "Streams",
docs/budgets.md "Overshoot bound").

The overshoot bound these tests assert, derived from proxy/relay.py (Relay.enforce / Relay.pump)
and proxy/store/memory.py (Book.charge / Book.settle):

* While a stream skips a push, its live usage is within its hold in tokens, input_tokens and
  output_tokens (enforce pushes as soon as any of them passes the hold, at that very event).
* A push that would grow the footprint past what the scopes have left is refused (the footprint
  stays as it was, within the limit) and the stream is cut at that event; settlement then charges
  the live usage, which includes the content of that one event.
* So, in those dimensions, a stream whose input was not underestimated overshoots by at most the
  estimate of ONE content delta event (ceil(bytes / 3)); here every text delta is CHUNK, 12 ASCII
  bytes, i.e. PER_DELTA = 4 tokens. A scope's used amount is at most limit + PER_DELTA per stream
  cut (<= limit + PER_DELTA x streams in flight). In cost_usd it is that event's output cost when
  the input was priced as estimated. (PUSH_INTERVAL_SECONDS only bounds how stale the store's view
  is inside a hold; it does not widen the bound.)
* Reported figures are the provider's truth and can jump further: a message_start whose input far
  exceeds the estimate, or a running-usage message_delta (both tested below, settled as reported).
"""
from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import anthropic
import httpx
import pytest

from proxy.estimate import estimate_input_tokens
from proxy.ledger import ZERO, Amounts
from proxy.sse import SSEDecoder
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.simulator import Reply

# The SDK warns on every call with a deprecated model id; claude-sonnet-4-5 is priced here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

MODEL = "claude-sonnet-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
CHUNK = "abcdefghijk "          # 12 ASCII bytes: one text delta = 4 estimated output tokens
PER_DELTA = 4
EST = estimate_input_tokens({"model": MODEL, "max_tokens": 1000, "messages": MSG, "stream": True})
# config/pricing.yaml, USD per Mtok -> nanos per token is rate x 1000
SONNET = {"input": Decimal("3.00"), "output": Decimal("15.00"), "w5m": Decimal("3.75"),
          "w1h": Decimal("6.00"), "read": Decimal("0.30")}
HAIKU = {"input": Decimal("1.00"), "output": Decimal("5.00"), "w5m": Decimal("1.25"),
         "w1h": Decimal("2.00"), "read": Decimal("0.10")}
SEARCH_NANOS = 10 * 10**6  # web_search_per_1k: $10 -> $0.01 per search


def nanos(rates, input=0, output=0, w5m=0, w1h=0, read=0, searches=0) -> int:
    usd_mtok = (input * rates["input"] + output * rates["output"] + w5m * rates["w5m"] + w1h * rates["w1h"]
                + read * rates["read"])
    total = usd_mtok * 1000 + searches * SEARCH_NANOS
    assert total == int(total)
    return int(total)


def teams(key_budget=None, team_budget=None, beta_budget=None) -> dict:
    keys = {"alpha": {"key": ALPHA_KEY}, "beta": {"key": BETA_KEY}}
    if key_budget:
        keys["alpha"]["budget"] = key_budget
    if beta_budget:
        keys["beta"]["budget"] = beta_budget
    team: dict = {"keys": keys}
    if team_budget:
        team["budget"] = team_budget
    return {"research": team}


def client(proxy, key=ALPHA_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0)


def rows(proxy) -> list:
    return list(proxy.state.store.rows)


def kind(outcome: str) -> str:
    """An upstream 5xx before any message is logged as upstream_529 or upstream_5xx."""
    return "upstream_5xx" if outcome.startswith("upstream_5") else outcome


def wait_until(pred, what: str, timeout: float = 5.0) -> None:
    """A bounded wait for a condition; never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def wait_rows(proxy, n: int, timeout: float = 5.0) -> list:
    wait_until(lambda: len(proxy.state.store.rows) >= n, f"{n} usage-log rows", timeout)
    return rows(proxy)


def key_state(proxy, key="alpha"):
    return proxy.scope_states("research", key)[0]


def team_state(proxy):
    return proxy.scope_states("research")[0]


def assert_no_holds(proxy) -> None:
    for st in (key_state(proxy, "alpha"), key_state(proxy, "beta"), team_state(proxy)):
        assert st.held == ZERO
    assert proxy.state.store.book.in_flight == {}


def stream_text(proxy, key=ALPHA_KEY, max_tokens=1000, model=MODEL) -> str:
    with client(proxy, key).messages.stream(model=model, max_tokens=max_tokens, messages=MSG) as s:
        return "".join(s.text_stream)


def dropped_stream_text(proxy) -> str:
    """The text of a stream the upstream dropped, ending with the error event (docs/http-api.md "Truncated streams")."""
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with client(proxy, ALPHA_KEY).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
            for piece in s.text_stream:
                got.append(piece)
    assert err.value.type == "api_error" and err.value.body["error"]["details"]["error_code"] == "upstream_dropped"
    return "".join(got)


def raw_stream(proxy, max_tokens=1000) -> httpx.Response:
    """The whole streamed body read to its end (no SDK, so the client never hangs up early)."""
    return httpx.post(proxy.url + "/v1/messages",
                      json={"model": MODEL, "max_tokens": max_tokens, "messages": MSG, "stream": True},
                      headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01"}, timeout=10)


# --- exact settlement ------------------------------------------------------------------------

@pytest.mark.parametrize("model, rates", [("claude-sonnet-4-5", SONNET), ("claude-haiku-4-5", HAIKU)])
def test_stream_settles_exactly_with_both_cache_tiers(start, sim, model, rates):
    proxy = start(teams=teams(key_budget={"cost_usd": 100}, team_budget={"tokens": 10**6}))
    sim.queue(Reply(text="one two three four five six seven eight", input_tokens=120, cache_write_5m=1000,
                    cache_write_1h=2000, cache_read=3000, output_tokens=50))
    with client(proxy).messages.stream(model=model, max_tokens=1000, messages=MSG) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "one two three four five six seven eight"
    assert final.usage.output_tokens == 50 and final.usage.cache_read_input_tokens == 3000
    [row] = wait_rows(proxy, 1)
    cost = nanos(rates, input=120, output=50, w5m=1000, w1h=2000, read=3000)
    expected = Amounts(tokens=120 + 1000 + 2000 + 3000 + 50, input_tokens=6120, output_tokens=50,
                       cost_nanos=cost, steps=1)
    assert key_state(proxy).used == expected
    assert team_state(proxy).used == expected
    assert (row.input_tokens, row.cache_write_5m_tokens, row.cache_write_1h_tokens, row.cache_read_tokens,
            row.output_tokens, row.cost_nanos, row.steps, row.outcome) == (120, 1000, 2000, 3000, 50, cost, 1,
                                                                           "completed")
    assert row.model == model and row.key == "alpha" and row.team == "research"
    assert_no_holds(proxy)


def test_sonnet_cost_by_hand():
    # 120 in x $3 + 50 out x $15 + 1000 x $3.75 + 2000 x $6 + 3000 x $0.30, per Mtok, in nanos
    assert nanos(SONNET, input=120, output=50, w5m=1000, w1h=2000, read=3000) == \
        360_000 + 750_000 + 3_750_000 + 12_000_000 + 900_000 == 17_760_000


def test_several_running_usage_deltas_are_not_double_counted(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 10**6}))
    # 10 deltas of 12 bytes: the live estimate reaches 40; the provider reports 9, 18, 27, 36
    sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=30, output_tokens=36, message_delta_count=4))
    with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds.count("message_delta") == 4
    assert final.usage.output_tokens == 36
    [row] = wait_rows(proxy, 1)
    assert row.output_tokens == 36 and row.outcome == "completed"   # not 9+18+27+36 = 90, not the estimate 40
    assert key_state(proxy).used == Amounts(66, 30, 36, nanos(SONNET, input=30, output=36), 1)
    assert_no_holds(proxy)


def test_input_growing_in_the_last_delta_and_web_searches_settle_exactly(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 10**6}))
    sim.queue(Reply(chunks=[CHUNK] * 6, input_tokens=300, final_input_tokens=900, web_search_requests=2,
                    output_tokens=36, message_delta_count=3))
    stream_text(proxy)
    [row] = wait_rows(proxy, 1)
    assert (row.input_tokens, row.output_tokens, row.web_search_requests) == (900, 36, 2)
    cost = nanos(SONNET, input=900, output=36, searches=2)
    assert cost == 2_700_000 + 540_000 + 20_000_000
    assert key_state(proxy).used == Amounts(936, 900, 36, cost, 1)
    assert_no_holds(proxy)


# --- mid-stream cuts -------------------------------------------------------------------------

OUT_NANOS = 15_000  # claude-sonnet-4-5 output, nanos per token


@pytest.mark.parametrize("dim, limit", [("tokens", 120), ("output_tokens", 50), ("cost_usd", Decimal("0.001"))])
def test_mid_stream_cut_when_the_budget_runs_out(start, sim, dim, limit):
    proxy = start(teams=teams(key_budget={dim: limit}), admission={"clamp_max_tokens": False})
    # 100 deltas planned; the simulator parks after 60 of them, well past the cut point
    sim.queue(Reply(chunks=[CHUNK] * 100, input_tokens=EST, gate="parked", gate_after=60))
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
            for t in s.text_stream:
                received.append(t)
    err = exc.value
    assert type(err) is anthropic.APIStatusError            # chosen by HTTP status, which is 200
    assert err.status_code == 200 and err.type == "rate_limit_error"
    assert "budget exceeded mid-stream" in err.message and f"the {dim} budget of key 'alpha'" in err.message
    assert err.body["error"]["details"] == {"error_code": "budget_exceeded"}

    # The upstream was closed at once: the simulator, parked at its gate, was cancelled without
    # the gate ever opening.
    assert sim.wait_idle(5)
    info = sim.streams[-1]
    assert info.outcome == "aborted"
    # (the cut may land before the simulator has written all 60 deltas that precede its gate)
    assert info.events_sent < info.planned_events and info.text_deltas_sent <= 60
    sim.open_gate("parked")

    # The output hold (clamping off: what remains, at most max_tokens) ...
    if dim == "tokens":
        hold_out, limit_units, per_delta_units = limit - EST, limit, PER_DELTA
    elif dim == "output_tokens":
        hold_out, limit_units, per_delta_units = limit, limit, PER_DELTA
    else:
        limit_units = int(limit * 10**9)
        hold_out, per_delta_units = (limit_units - EST * 3000) // OUT_NANOS, PER_DELTA * OUT_NANOS
    # ... and the k-th delta is the first whose estimate passes it (no room beyond): it is metered
    # and charged, but replaced by the error event on the wire.
    k = hold_out // PER_DELTA + 1
    assert "".join(received) == CHUNK * (k - 1)
    [row] = wait_rows(proxy, 1)
    used = key_state(proxy).used
    assert used == Amounts(EST + PER_DELTA * k, EST, PER_DELTA * k, nanos(SONNET, input=EST, output=PER_DELTA * k), 1)
    assert limit_units < used.get(dim) <= limit_units + per_delta_units  # the bound: one content delta event
    assert row.outcome == "cut" and row.steps == 1 and row.output_tokens == PER_DELTA * k
    assert_no_holds(proxy)
    # nothing is left: the next request is refused before anything is forwarded
    with pytest.raises(anthropic.RateLimitError):
        stream_text(proxy)
    assert len(sim.messages_requests()) == 1


def test_cut_on_the_wire_replaces_the_next_event_and_ends_the_body_cleanly(start, sim):
    proxy = start(teams=teams(key_budget={"output_tokens": 20}), admission={"clamp_max_tokens": False})
    sim.queue(Reply(chunks=[CHUNK] * 30, input_tokens=EST, gate="parked", gate_after=20))
    r = raw_stream(proxy)         # a complete chunked body: httpx would raise on a torn one
    assert r.status_code == 200
    decoder = SSEDecoder()
    events = decoder.feed(r.content)
    assert decoder.pending == b"" and decoder.flush() == []
    names = [e.event for e in events]
    # 5 deltas (20 tokens) fit the hold; the 6th is replaced by the error event, which ends the body
    assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * 5 + ["error"]
    assert r.content.endswith(b"\n\n") and r.content.count(b"event: error") == 1
    body = json.loads(events[-1].data)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("budget exceeded mid-stream: ")
    assert body["error"]["details"] == {"error_code": "budget_exceeded"}
    assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"
    sim.open_gate("parked")
    [row] = wait_rows(proxy, 1)
    assert row.outcome == "cut" and row.output_tokens == 6 * PER_DELTA


def test_cut_at_a_running_usage_delta_settles_that_reported_total(start, sim):
    """Reported running totals 50, 100, 150, 200 against an output hold of 120: the third
    message_delta is refused; the settlement is the provider's total at that point (150), not the
    sum of the deltas and not the small text estimate."""
    proxy = start(teams=teams(key_budget={"tokens": EST + 120}), admission={"clamp_max_tokens": False})
    sim.queue(Reply(chunks=[CHUNK] * 3, input_tokens=EST, output_tokens=200, message_delta_count=4))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
            for e in s:
                seen.append(e.type)
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    assert seen.count("message_delta") == 2 and "message_stop" not in seen
    [row] = wait_rows(proxy, 1)
    assert row.outcome == "cut" and row.output_tokens == 150
    assert key_state(proxy).used == Amounts(EST + 150, EST, 150, nanos(SONNET, input=EST, output=150), 1)
    assert_no_holds(proxy)


class TickingClock:
    """A fake clock: each reading is `step` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1_700_000_000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("step", [1.0, 0.0])
def test_running_charge_is_pushed_while_the_stream_flows_at_most_once_a_second(start, sim, step):
    """In flight, the store's `used` is the live usage as of the end of the last chunk relayed once
    a second has passed since the last push (step=1: every clock reading is a second later);
    within the second (step=0: the clock stands still) only growth past the hold is pushed.
    Either way used + held is the hold."""
    proxy = start(teams=teams(key_budget={"tokens": 10**6}), clock=TickingClock(step))
    sim.queue(Reply(chunks=[CHUNK] * 100, input_tokens=25, gate="mid", gate_after=80))
    with client(proxy).messages.stream(model=MODEL, max_tokens=5000, messages=MSG) as s:
        it = iter(s.text_stream)
        for _ in range(80):
            next(it)
        assert sim.wait_at_gate("mid", 1)
        live = 25 + 80 * PER_DELTA
        st = key_state(proxy)
        if step:
            assert st.used.tokens == live
        else:  # only message_start reached the store (its input, 25 > the estimate, grew the hold)
            assert EST < 25 and st.used.output_tokens == 1 and st.used.tokens == 26
        assert st.used.steps == 1 and st.used.input_tokens == 25
        assert st.used.tokens + st.held.tokens == EST + 5000   # the footprint is the hold
        sim.open_gate("mid")
        rest = "".join(it)
    assert rest == CHUNK * 20
    [row] = wait_rows(proxy, 1)
    assert row.outcome == "completed"
    assert_no_holds(proxy)


def test_cut_when_reported_input_far_exceeds_the_estimate(start, sim):
    """The heuristic sees a tiny prompt (EST tokens); the provider reports 5000. The tokens budget
    (200) covered the estimate plus max_tokens, not the real input: cut at message_start."""
    proxy = start(teams=teams(key_budget={"tokens": 200}))
    assert EST + 100 <= 200
    sim.queue(Reply(chunks=[CHUNK] * 5, input_tokens=5000, gate="parked", gate_after=0))
    events = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(proxy).messages.stream(model=MODEL, max_tokens=100, messages=MSG) as s:
            for e in s:
                events.append(e.type)
    assert events == []                                      # message_start itself was replaced
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    assert "budget exceeded mid-stream" in exc.value.message
    assert sim.wait_idle(5)
    info = sim.streams[-1]
    assert info.outcome == "aborted" and info.events_sent < info.planned_events and info.text_deltas_sent == 0
    sim.open_gate("parked")
    [row] = wait_rows(proxy, 1)
    # the message started, so the reported input is owed (the input-estimate error: docs/budgets.md "Overshoot bound")
    assert key_state(proxy).used == Amounts(5001, 5000, 1, nanos(SONNET, input=5000, output=1), 1)
    assert row.outcome == "cut" and row.input_tokens == 5000
    assert_no_holds(proxy)


def test_clamped_stream_that_runs_to_its_max_tokens_is_not_cut(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 100}))   # clamping on (the default)
    # 300 reported output tokens planned, ~4 bytes each; the simulator truncates to the clamp
    sim.queue(Reply(chunks=[CHUNK] * 100, input_tokens=EST))
    with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
        final = s.get_final_message()
    assert s.response.headers["x-budget-clamped-max-tokens"] == str(100 - EST)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 100 - EST
    [row] = wait_rows(proxy, 1)
    assert row.outcome == "completed"
    assert key_state(proxy).used.tokens <= 100


# --- every other way a stream ends ------------------------------------------------------------

def test_client_disconnect_mid_stream(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 10**6}))
    sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=25, gate="hold", gate_after=2))
    with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
        it = iter(s.text_stream)
        got = next(it) + next(it)                            # both deltas were metered by the proxy
        assert sim.wait_at_gate("hold", 1)
    assert got == CHUNK * 2
    # leaving the block hung up; the proxy closed the upstream while it was parked
    assert sim.wait_idle(5)
    assert sim.streams[-1].outcome == "aborted"
    sim.open_gate("hold")
    [row] = wait_rows(proxy, 1)
    out = 2 * PER_DELTA                                      # no usage reported: the estimate of what was generated
    assert row.outcome == "client_disconnected" and row.steps == 1
    assert key_state(proxy).used == Amounts(25 + out, 25, out, nanos(SONNET, input=25, output=out), 1)
    assert_no_holds(proxy)


def test_upstream_error_event_sdk_raises_and_what_was_generated_is_settled(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 10**6}))
    sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=25, error_event_after=3))
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=MSG) as s:
            for t in s.text_stream:
                received.append(t)
    assert type(exc.value) is anthropic.APIStatusError
    assert exc.value.status_code == 200 and exc.value.type == "overloaded_error"
    assert "".join(received) == CHUNK * 3
    [row] = wait_rows(proxy, 1)
    out = 3 * PER_DELTA
    assert row.steps == 1
    assert key_state(proxy).used == Amounts(25 + out, 25, out, nanos(SONNET, input=25, output=out), 1)
    assert_no_holds(proxy)
    assert sim.streams[-1].outcome == "error_event"


def test_upstream_error_event_outcome(start, sim):
    """Read to the end without the SDK, so no client hang-up races the upstream's end."""
    proxy = start()
    sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=25, error_event_after=3))
    r = raw_stream(proxy)
    assert r.status_code == 200 and b"event: error" in r.content and b"overloaded_error" in r.content
    [row] = wait_rows(proxy, 1)
    assert row.outcome == "upstream_error" and (row.input_tokens, row.output_tokens, row.steps) == (25, 12, 1)
    assert_no_holds(proxy)


def test_upstream_drop_settles_the_estimate(start, sim):
    proxy = start(teams=teams(key_budget={"tokens": 10**6}))
    sim.queue(Reply(chunks=[CHUNK] * 10, input_tokens=25, drop_after=3))
    assert dropped_stream_text(proxy) == CHUNK * 3           # the proxy ends our body with an error event
    [row] = wait_rows(proxy, 1)
    out = 3 * PER_DELTA
    assert row.outcome == "upstream_dropped" and row.steps == 1
    assert key_state(proxy).used == Amounts(25 + out, 25, out, nanos(SONNET, input=25, output=out), 1)
    assert_no_holds(proxy)
    assert sim.streams[-1].outcome == "dropped"


def test_every_ending_settles_exactly_once(start, sim):
    proxy = start(teams=teams(beta_budget={"tokens": 60}), admission={"clamp_max_tokens": False})
    c = client(proxy)
    # completed stream, completed JSON
    sim.queue(Reply(chunks=[CHUNK] * 3, output_tokens=9))
    assert stream_text(proxy) == CHUNK * 3
    sim.queue(Reply(text="plain json", output_tokens=3))
    assert c.messages.create(model=MODEL, max_tokens=100, messages=MSG).content[0].text == "plain json"
    # upstream error event (read whole, see test_upstream_error_event_outcome)
    sim.queue(Reply(chunks=[CHUNK] * 5, error_event_after=2))
    assert b"overloaded_error" in raw_stream(proxy).content
    # upstream drop
    sim.queue(Reply(chunks=[CHUNK] * 5, drop_after=2))
    assert dropped_stream_text(proxy) == CHUNK * 2
    # client disconnect
    sim.queue(Reply(chunks=[CHUNK] * 5, gate="g", gate_after=1))
    with c.messages.stream(model=MODEL, max_tokens=100, messages=MSG) as s:
        next(iter(s.text_stream))
        assert sim.wait_at_gate("g", 1)
    assert sim.wait_idle(5)
    sim.open_gate("g")
    # upstream 529 before any message: no step
    sim.queue(Reply(status=529))
    with pytest.raises(anthropic.OverloadedError):
        stream_text(proxy)
    # beta: a cut (hold EST + 53 output), then a denial that never reaches the upstream
    sim.queue(Reply(chunks=[CHUNK] * 30, input_tokens=EST))
    with pytest.raises(anthropic.APIStatusError) as exc:
        stream_text(proxy, key=BETA_KEY)
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    forwarded = len(sim.messages_requests())
    with pytest.raises(anthropic.RateLimitError):
        stream_text(proxy, key=BETA_KEY)
    assert len(sim.messages_requests()) == forwarded == 7

    log = wait_rows(proxy, 7)
    assert sim.wait_idle(5)
    log = rows(proxy)
    assert len(log) == 7                                     # one row per admitted request, no more
    assert len({r.request_id for r in log}) == 7
    assert Counter(kind(r.outcome) for r in log) == Counter(
        ["completed", "completed", "upstream_error", "upstream_dropped", "client_disconnected", "upstream_5xx", "cut"])
    assert {kind(r.outcome): r.steps for r in log} == {"completed": 1, "upstream_error": 1, "upstream_dropped": 1,
                                                       "client_disconnected": 1, "upstream_5xx": 0, "cut": 1}
    assert [r for r in log if kind(r.outcome) == "upstream_5xx"][0].cost_nanos == 0
    assert key_state(proxy, "alpha").used.steps == 5 and key_state(proxy, "beta").used.steps == 1
    assert team_state(proxy).used.steps == 6
    # the store's totals are exactly the sum of the log
    used = team_state(proxy).used
    assert used.tokens == sum(r.input_tokens + r.cache_write_5m_tokens + r.cache_write_1h_tokens
                              + r.cache_read_tokens + r.output_tokens for r in log)
    assert used.cost_nanos == sum(r.cost_nanos for r in log)
    assert_no_holds(proxy)


# --- concurrency: the overshoot bound --------------------------------------------------------

def test_concurrent_streams_on_one_team_budget_keep_the_overshoot_bound(start, sim):
    """N streams on one team budget, clamping off, all in flight at once, each holding less than
    it needs (hold 63 output tokens, reply 80 estimated = 80 reported, max_tokens 100 >= both), and
    sharing SPARE tokens of room for the growth (17 each). Completed streams settle at their
    footprint (87), so nothing they finish frees room for the others: at most SPARE // 17 complete.

    Setup, deterministic (gates, bounded waits):
      1. C (max_tokens SPARE - EST) holds SPARE; N "A" requests (max_tokens 63) hold 70 each: the
         team is full. All parked at gates before headers; they end with an upstream 529 (no charge).
      2. Release A_i, wait for its settlement, admit B_i: it gets a hold of exactly 70 (63 output).
         B streams run 15 deltas (60 <= 63) and park at gate "b".
      3. Release C: SPARE tokens of room. Open "b": N streams race for it.
    """
    N, SPARE, NEED = 30, 170, 17
    HOLD_OUT = 63
    LIMIT = SPARE + N * (EST + HOLD_OUT)
    proxy = start(teams=teams(team_budget={"tokens": LIMIT}), admission={"clamp_max_tokens": False})
    a_gate = itertools.count()

    def responder(rec):
        mt = rec.json["max_tokens"]
        if mt == HOLD_OUT:
            return Reply(status=529, gate=f"a{next(a_gate)}")
        if mt == SPARE - EST:
            return Reply(status=529, gate="c")
        return Reply(chunks=[CHUNK] * 20, input_tokens=EST, output_tokens=80, gate="b", gate_after=15,
                     event_delay=0.001)

    sim.responder = responder
    sdk = anthropic.Anthropic(base_url=proxy.url, api_key=ALPHA_KEY, max_retries=0)
    sdk_beta = anthropic.Anthropic(base_url=proxy.url, api_key=BETA_KEY, max_retries=0)

    def call(c, max_tokens) -> str:
        try:
            with c.messages.stream(model=MODEL, max_tokens=max_tokens, messages=MSG) as s:
                for _ in s.text_stream:
                    pass
            return "completed"
        except anthropic.RateLimitError:
            return "denied"
        except anthropic.OverloadedError:
            return "upstream_529"
        except anthropic.APIStatusError as e:
            return "cut" if (e.status_code, e.type) == (200, "rate_limit_error") else f"error {e.status_code}"

    pool = ThreadPoolExecutor(max_workers=2 * N + 2)
    try:
        fc = pool.submit(call, sdk, SPARE - EST)
        assert sim.wait_at_gate("c", 1)
        fa = [pool.submit(call, sdk if i % 2 else sdk_beta, HOLD_OUT) for i in range(N)]
        for i in range(N):
            assert sim.wait_at_gate(f"a{i}", 1)
        st = team_state(proxy)
        assert st.held.tokens == LIMIT and st.used == ZERO   # the team is fully held

        fb = []
        for i in range(N):
            sim.open_gate(f"a{i}")
            wait_rows(proxy, i + 1)
            fb.append(pool.submit(call, sdk if i % 2 else sdk_beta, 100))
            assert sim.wait_at_gate("b", i + 1)
        assert [f.result(5) for f in fa] == ["upstream_529"] * N
        # every B holds exactly 70 (the room one A left), and all N are in flight at once
        in_flight = list(proxy.state.store.book.in_flight.values())
        assert len(in_flight) == N + 1                       # N streams + C
        assert sorted(r.hold.tokens for r in in_flight) == [EST + HOLD_OUT] * N + [SPARE]

        sim.open_gate("c")
        assert fc.result(5) == "upstream_529"
        wait_rows(proxy, N + 1)
        st = team_state(proxy)
        assert st.used.tokens + st.held.tokens == LIMIT - SPARE  # the spare is free now

        sim.open_gate("b")
        outcomes = Counter(f.result(10) for f in fb)
        log = wait_rows(proxy, 2 * N + 1)
    finally:
        for name in ["c", "b"] + [f"a{i}" for i in range(N)]:
            sim.open_gate(name)
        pool.shutdown(wait=True)

    cut, completed = outcomes["cut"], outcomes["completed"]
    assert cut + completed == N, outcomes
    assert completed <= SPARE // NEED and cut >= N - SPARE // NEED

    st = team_state(proxy)
    used = st.used.tokens
    per_stream_bound = PER_DELTA
    assert used <= LIMIT + cut * per_stream_bound             # derived: only a cut stream overshoots, by one delta
    assert used <= LIMIT + N * per_stream_bound  # one interval per stream in flight (docs/budgets.md "Overshoot bound")
    assert_no_holds(proxy)
    b_rows = [r for r in log if r.outcome in ("cut", "completed")]
    assert Counter(kind(r.outcome) for r in log) == Counter({"upstream_5xx": N + 1, "cut": cut, "completed": completed})
    assert all(r.steps == 1 for r in b_rows)
    assert all((r.input_tokens, r.output_tokens) == (EST, 80) for r in b_rows if r.outcome == "completed")
    assert all(HOLD_OUT < r.output_tokens <= 80 for r in b_rows if r.outcome == "cut")
    assert used == sum(r.input_tokens + r.output_tokens for r in b_rows)

    # The room left is below one delta: further requests are denied and never forwarded.
    assert LIMIT - used < PER_DELTA
    forwarded = len(sim.messages_requests())
    denied = [call(sdk if i % 2 else sdk_beta, 100) for i in range(5)]
    assert denied == ["denied"] * 5 and len(sim.messages_requests()) == forwarded
    admitted = 2 * N + 1
    print(f"\n[concurrency] requests={admitted + 5} admitted={admitted} (streams racing={N}, "
          f"holders released with 529={N + 1}) completed={completed} cut={cut} denied={len(denied)}; "
          f"team tokens used={used} limit={LIMIT} overshoot={used - LIMIT} "
          f"bound=limit+{cut}x{per_stream_bound}={LIMIT + cut * per_stream_bound} "
          f"(spec bound limit+{N}x{per_stream_bound}={LIMIT + N * per_stream_bound})")
