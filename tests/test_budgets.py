"""Budgets end to end (docs/budgets.md, docs/http-api.md): the real proxy under uvicorn in front of the Anthropic
simulator, driven by the official anthropic SDK (2.14).

Every figure asserted here is worked out by hand: the simulator reports the usage, the input
estimate of MSG is the heuristic's (checked below to be 7 tokens), and the prices are those of
config/pricing.yaml, written out again in this file (claude-sonnet-4-6, as 4-5: $3 in, $15 out,
$3.75 5m write, $6 1h write, $0.30 read per million tokens) so that a change of the table or
of the arithmetic shows up as a failure here.
"""
from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import pytest

from proxy.estimate import estimate_input_tokens
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.harness import FakeClock, utc
from tests.simulator import Reply

MSG = [{"role": "user", "content": "Say hello"}]
EST = 7                   # heuristic input estimate of MSG: 4 per message + ceil(9 bytes / 3)
HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"   # priced as claude-sonnet-4-5 (which the SDK warns is deprecated)
SECRETS = (ALPHA_KEY, BETA_KEY, "sk-upstream-secret")

# claude-sonnet-4-6 in nano-dollars per token ($X per Mtok = X * 1000 nanos per token)
S_IN, S_OUT, S_W5M, S_W1H, S_READ = 3_000, 15_000, 3_750, 6_000, 300


def test_the_input_estimate_these_figures_rest_on():
    assert estimate_input_tokens({"model": HAIKU, "max_tokens": 1, "messages": MSG}) == EST


# --- helpers -----------------------------------------------------------------------------------

def teams(team: dict | None = None, alpha: dict | None = None, beta: dict | None = None) -> dict[str, Any]:
    return {"research": {"budget": team or {},
                         "keys": {"alpha": {"key": ALPHA_KEY, "budget": alpha or {}},
                                  "beta": {"key": BETA_KEY, "budget": beta or {}}}}}


def client(proxy, key: str = ALPHA_KEY, max_retries: int = 0, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=max_retries, **kw)


def create(proxy, max_tokens: int = 100, key: str = ALPHA_KEY, model: str = HAIKU, **kw):
    """messages.create through the proxy; returns the raw response (headers) with .parse()."""
    return client(proxy, key).messages.with_raw_response.create(model=model, max_tokens=max_tokens,
                                                                messages=MSG, **kw)


def stream_text(proxy, max_tokens: int = 100, key: str = ALPHA_KEY, model: str = HAIKU):
    with client(proxy, key).messages.stream(model=model, max_tokens=max_tokens, messages=MSG) as s:
        text = "".join(s.text_stream)
        return text, s.get_final_message()


def raw_post(proxy, max_tokens: int = 100, key: str = ALPHA_KEY, model: str = HAIKU) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/messages",
                      json={"model": model, "max_tokens": max_tokens, "messages": MSG},
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"})


def budget(proxy, key: str = ALPHA_KEY) -> dict[str, Any]:
    r = httpx.get(proxy.url + "/budget", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()


def scope(proxy, kind: str, key: str = ALPHA_KEY) -> dict[str, Any]:
    return next(s for s in budget(proxy, key)["scopes"] if s["scope"] == kind)


def used(proxy, kind: str = "team", key: str = ALPHA_KEY) -> dict[str, Any]:
    u = dict(scope(proxy, kind, key)["used"])
    u.pop("wall_clock")
    return u


ZERO_HELD = {"tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "steps": 0}


def assert_no_holds(proxy, key: str = ALPHA_KEY) -> None:
    for s in budget(proxy, key)["scopes"]:
        assert s["held"] == ZERO_HELD, s


def usage(tokens=0, input_tokens=0, output_tokens=0, cost_usd=0.0, steps=0) -> dict[str, Any]:
    return {"tokens": tokens, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cost_usd": cost_usd, "steps": steps}


def deny(proxy, dimension: str, scope_kind: str, max_tokens: int = 100, key: str = ALPHA_KEY,
         model: str = HAIKU) -> dict[str, Any]:
    """The request is refused with a budget 429 naming (scope, dimension) and never reaches upstream."""
    before = len(proxy.sim.messages_requests())
    with pytest.raises(anthropic.RateLimitError) as exc:
        client(proxy, key).messages.create(model=model, max_tokens=max_tokens, messages=MSG)
    e = exc.value
    assert e.status_code == 429 and e.error_code == "budget_exceeded", e.body
    assert e.body["budget"]["dimension"] == dimension and e.body["budget"]["scope"] == scope_kind, e.body
    assert e.response.headers["x-budget-exceeded"] == dimension
    assert len(proxy.sim.messages_requests()) == before, "a denied request reached upstream"
    return e.body


@pytest.fixture
def up(start, sim):
    """up(teams, **config) -> a proxy in front of `sim` (as `.sim`, for deny())."""
    def _up(t: dict[str, Any] | None = None, **config: Any):
        p = start(teams=t or teams(), **config)
        p.sim = sim
        return p
    return _up


def sent_max_tokens(sim) -> int:
    return sim.messages_requests()[-1].json["max_tokens"]


# --- each dimension ----------------------------------------------------------------------------

def test_tokens_budget(up, sim):
    p = up(teams(team={"tokens": 100}))
    sim.queue(Reply(input_tokens=5, cache_write_5m=1, cache_read=1, output_tokens=40))
    r = create(p, max_tokens=40)
    assert r.parse().usage.output_tokens == 40
    assert r.headers["x-budget-remaining-tokens"] == str(100 - (EST + 40))  # the tightest, after its own hold
    assert used(p) == usage(47, 7, 40, used(p)["cost_usd"], 1)
    assert used(p, "key") == used(p)
    # exactly what is left: admitted unclamped, and the budget is then spent to the token
    sim.queue(Reply(input_tokens=7, output_tokens=46))
    r = create(p, max_tokens=46)
    assert "x-budget-clamped-max-tokens" not in r.headers and sent_max_tokens(sim) == 46
    assert r.headers["x-budget-remaining-tokens"] == "0"
    assert used(p)["tokens"] == 100
    body = deny(p, "tokens", "team")
    assert body["budget"]["limit"] == 100 and body["budget"]["used"] == 100
    assert len(sim.messages_requests()) == 2
    assert_no_holds(p)
    print(f"\ntokens: used {used(p)['tokens']} of 100")


def test_input_tokens_budget(up, sim):
    p = up(teams(alpha={"input_tokens": 20}))
    sim.queue(Reply(input_tokens=4, cache_write_1h=2, cache_read=1, output_tokens=30),
              Reply(input_tokens=7, output_tokens=30))
    for _ in range(2):
        r = create(p, max_tokens=30)
        assert sent_max_tokens(sim) == 30  # output is not limited: nothing clamped
        assert "x-budget-clamped-max-tokens" not in r.headers
        assert "x-budget-remaining-tokens" not in r.headers  # input_tokens has no header of its own
    u = used(p, "key")
    assert (u["input_tokens"], u["output_tokens"], u["tokens"], u["steps"]) == (14, 60, 74, 2)
    deny(p, "input_tokens", "key")  # 6 left < 7 estimated
    assert used(p, "key")["input_tokens"] == 14 and used(p, "team")["input_tokens"] == 14
    assert_no_holds(p)


def test_output_tokens_budget(up, sim):
    p = up(teams(alpha={"output_tokens": 50}))
    sim.queue(Reply(input_tokens=7, output_tokens=30), Reply(input_tokens=7, output_tokens=30))
    create(p, max_tokens=30)
    r = create(p, max_tokens=30)
    assert r.headers["x-budget-clamped-max-tokens"] == "20" and sent_max_tokens(sim) == 20
    msg = r.parse()
    assert msg.usage.output_tokens == 20 and msg.stop_reason == "max_tokens"
    u = used(p, "key")
    assert (u["output_tokens"], u["input_tokens"], u["tokens"]) == (50, 14, 64)
    deny(p, "output_tokens", "key")
    assert_no_holds(p)


def test_cost_budget_prices_every_token_kind_and_clamps_to_what_the_dollars_buy(up, sim):
    p = up(teams(team={"cost_usd": 0.05}))
    sim.queue(Reply(input_tokens=1000, cache_write_5m=2000, cache_write_1h=3000, cache_read=4000, output_tokens=500))
    r = create(p, max_tokens=600, model=SONNET)
    assert "x-budget-clamped-max-tokens" not in r.headers
    first = 1000 * S_IN + 2000 * S_W5M + 3000 * S_W1H + 4000 * S_READ + 500 * S_OUT
    assert first == 37_200_000  # $0.0372
    u = used(p)
    assert u == usage(10_500, 10_000, 500, 0.0372, 1)
    # $0.0128 left: the estimated input (7 x $3/M) first, the rest buys floor(12_779_000 / 15_000) output tokens
    left = 50_000_000 - first
    clamp = (left - EST * S_IN) // S_OUT
    assert clamp == 851
    sim.queue(Reply(input_tokens=7, output_tokens=1000))
    r = create(p, max_tokens=1000, model=SONNET)
    assert r.headers["x-budget-clamped-max-tokens"] == str(clamp) and sent_max_tokens(sim) == clamp
    hold = EST * S_IN + clamp * S_OUT
    assert r.headers["x-budget-remaining-cost-usd"] == f"{(left - hold) / 1e9:.6f}" == "0.000014"
    assert r.parse().usage.output_tokens == clamp
    second = 7 * S_IN + clamp * S_OUT
    assert used(p)["cost_usd"] == (first + second) / 1e9 == 0.049986
    body = deny(p, "cost_usd", "team", model=SONNET)  # 14_000 nanos left < 21_000 + 15_000
    assert body["budget"]["limit"] == 0.05 and body["budget"]["used"] == 0.049986
    assert_no_holds(p)
    print(f"\ncost_usd: used {used(p)['cost_usd']} of 0.05 (clamped to {clamp})")


def test_cost_of_a_stream_with_both_cache_tiers(up, sim):
    """The 5m/1h split comes from message_start; a final message_delta with the cache total
    (no breakdown) must not move 1h tokens to the cheaper 5m rate."""
    p = up(teams(team={"cost_usd": 1}))
    sim.queue(Reply(text="a b c d e f", input_tokens=100, cache_write_5m=200, cache_write_1h=300,
                    cache_read=400, output_tokens=50, full_delta_usage=True))
    _, final = stream_text(p, model=SONNET)
    assert final.usage.output_tokens == 50
    cost = 100 * S_IN + 200 * S_W5M + 300 * S_W1H + 400 * S_READ + 50 * S_OUT
    assert used(p) == usage(1050, 1000, 50, cost / 1e9, 1)
    assert_no_holds(p)


def test_steps_budget(up, sim):
    p = up(teams(alpha={"steps": 2}))
    sim.queue(Reply(status=500))  # produced no message: no step
    with pytest.raises(anthropic.InternalServerError):
        create(p)
    r = create(p)
    assert r.headers["x-budget-remaining-steps"] == "1"
    stream_text(p)  # a stream is a step too
    assert used(p, "key")["steps"] == 2
    deny(p, "steps", "key")
    assert len(sim.messages_requests()) == 3
    assert_no_holds(p)


def test_wall_clock_budget(up, sim):
    clock = FakeClock(utc(2026, 11, 30, 12, 0, 0))
    p = up(teams(alpha={"wall_clock": "60s"}), clock=clock)
    assert scope(p, "key")["used"]["wall_clock"] == 0  # the clock starts at the first request
    clock.advance(1000)
    create(p)
    clock.advance(30)
    s = scope(p, "key")
    assert s["used"]["wall_clock"] == 30.0 and s["remaining"]["wall_clock"] == 30.0 and s["limit"]["wall_clock"] == 60.0
    create(p)
    clock.advance(29.5)
    create(p)
    clock.advance(0.5)
    body = deny(p, "wall_clock", "key")
    assert body["budget"]["limit"] == 60.0 and body["budget"]["used"] == 60.0
    assert body["budget"]["resets_at"] is None
    assert used(p, "key")["steps"] == 3
    assert_no_holds(p)


def test_wall_clock_restarts_with_the_period(up, sim):
    clock = FakeClock(utc(2026, 11, 30, 10, 15))
    p = up(teams(alpha={"wall_clock": "10m", "period": "hour"}), clock=clock)
    create(p)
    clock.advance(600)
    body = deny(p, "wall_clock", "key")
    assert body["budget"]["resets_at"] == "2026-11-30T11:00:00Z"
    clock.set(utc(2026, 11, 30, 11, 0, 5))
    s = scope(p, "key")
    assert s["used"]["wall_clock"] == 0 and s["remaining"]["wall_clock"] == 600.0
    create(p)  # the first request of the new period starts its clock
    clock.advance(599)
    create(p)
    clock.advance(1)
    deny(p, "wall_clock", "key")


def test_wall_clock_running_out_cuts_a_stream_in_flight(up, sim):
    clock = FakeClock(utc(2026, 11, 30, 12, 0, 0))
    p = up(teams(alpha={"wall_clock": "60s"}), clock=clock)
    sim.queue(Reply(text="a b c d e f g h", input_tokens=7, gate="mid", gate_after=2))
    with client(p).messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
        it = iter(s.text_stream)
        got = next(it) + next(it)
        assert sim.wait_at_gate("mid", 1)
        clock.advance(61)
        sim.open_gate("mid")
        with pytest.raises(anthropic.APIStatusError) as exc:
            for t in it:
                got += t
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    assert "wall_clock" in str(exc.value)
    assert got and got != "a b c d e f g h"  # cut at the first event after the deadline
    assert sim.wait_idle(5)
    u = used(p, "key")
    assert u["steps"] == 1 and u["input_tokens"] == 7 and u["output_tokens"] >= 1
    assert_no_holds(p)


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5:DeprecationWarning")
def test_long_context_and_web_search_are_priced(up, sim):
    """claude-sonnet-4-5 above 200K input with the 1M-context beta: the whole request at $6 / $22.50
    (read $0.60). The estimate was tiny: the provider's usage is the final truth. Without the beta,
    or with server tools (here 3 web searches at $10 per 1000: the input is a loop's sum), no single
    call passed 200K (docs/configuration.md `pricing`): the standard $3 / $15 (read $0.30)."""
    p = up(teams(team={"cost_usd": 5}))
    beta = {"anthropic-beta": "files-api-2025-04-14, context-1m-2025-08-07"}
    sim.queue(Reply(input_tokens=150_000, cache_read=60_000, output_tokens=100))
    create(p, model="claude-sonnet-4-5-20250929", max_tokens=100, extra_headers=beta)
    long = 150_000 * 6_000 + 60_000 * 600 + 100 * 22_500
    assert long == 938_250_000
    assert used(p) == usage(210_100, 210_000, 100, 0.93825, 1)
    sim.queue(Reply(input_tokens=150_000, cache_read=60_000, output_tokens=100, web_search_requests=3))
    create(p, model="claude-sonnet-4-5-20250929", max_tokens=100, extra_headers=beta)
    looped = 150_000 * 3_000 + 60_000 * 300 + 100 * 15_000 + 3 * 10_000_000
    assert looped == 499_500_000
    sim.queue(Reply(input_tokens=150_000, cache_read=60_000, output_tokens=100))
    create(p, model="claude-sonnet-4-5-20250929", max_tokens=100)
    no_beta = 150_000 * 3_000 + 60_000 * 300 + 100 * 15_000
    assert no_beta == 469_500_000
    assert used(p) == usage(3 * 210_100, 3 * 210_000, 300, 1.907250, 3)


def test_stream_usage_totals_are_running_totals_not_summed(up, sim):
    """Three message_delta events with cumulative output and a final, larger input (server tools):
    charged once at the final totals."""
    p = up(teams(team={"tokens": 10_000, "cost_usd": 1}))
    sim.queue(Reply(text="a b c d e f", input_tokens=7, final_input_tokens=40, cache_read=5, output_tokens=60,
                    message_delta_count=3, web_search_requests=2))
    _, final = stream_text(p, model=SONNET, max_tokens=100)
    assert final.usage.output_tokens == 60 and final.usage.input_tokens == 40
    cost = 40 * S_IN + 5 * S_READ + 60 * S_OUT + 2 * 10_000_000
    assert used(p) == usage(105, 45, 60, cost / 1e9, 1)
    assert_no_holds(p)


ENGLISH = "The quick brown fox jumps over the lazy dog. " * 9  # 405 bytes: about 100 tokens of English


def test_a_stream_within_its_hold_is_not_cut_by_the_output_estimate(up, sim):
    """English runs ~4 bytes a token; the live estimate (bytes / 3) runs ahead of the real count.
    The forwarded max_tokens bounds the output, so a stream whose hold covers it is never cut.
    (So the estimate is capped at the forwarded max_tokens.)"""
    p = up(teams(team={"tokens": EST + 100}))
    chunks = [ENGLISH[i:i + 40] for i in range(0, len(ENGLISH), 40)]
    sim.queue(Reply(chunks=chunks, input_tokens=EST, output_tokens=100))
    text, final = stream_text(p, max_tokens=100)  # admitted with its whole max_tokens held
    assert text == ENGLISH and final.usage.output_tokens == 100
    assert used(p)["tokens"] == EST + 100


def test_a_cut_stream_never_takes_a_scope_past_its_limit_with_clamping_on(up, sim):
    """docs/budgets.md "Overshoot bound": with clamping on, used <= limit + the input-estimate error (here none)."""
    p = up(teams(team={"tokens": EST + 100}))
    chunks = [ENGLISH[i:i + 40] for i in range(0, len(ENGLISH), 40)]
    sim.queue(Reply(chunks=chunks, input_tokens=EST, output_tokens=100))
    try:
        stream_text(p, max_tokens=100)
    except anthropic.APIStatusError:
        pass  # cut or not, the bound below must hold
    u = used(p)
    print(f"\nclamping on, English stream of 100 tokens: used {u['tokens']} of {EST + 100}")
    assert u["tokens"] <= EST + 100


# --- team and key scopes ----------------------------------------------------------------------

def test_two_keys_share_the_team_budget(up, sim):
    p = up(teams(team={"tokens": 200}))
    sim.queue(Reply(input_tokens=7, output_tokens=93), Reply(input_tokens=7, output_tokens=93))
    create(p, max_tokens=93, key=ALPHA_KEY)
    r = create(p, max_tokens=150, key=BETA_KEY)
    assert r.headers["x-budget-clamped-max-tokens"] == "93"
    assert used(p, "team", ALPHA_KEY)["tokens"] == used(p, "team", BETA_KEY)["tokens"] == 200
    assert used(p, "key", ALPHA_KEY)["tokens"] == used(p, "key", BETA_KEY)["tokens"] == 100
    for k in (ALPHA_KEY, BETA_KEY):
        body = deny(p, "tokens", "team", key=k)
        assert body["budget"]["name"] == "research"


def test_key_tighter_than_team(up, sim):
    p = up(teams(team={"tokens": 1000}, alpha={"tokens": 50}))
    sim.queue(Reply(input_tokens=7, output_tokens=43))
    r = create(p, max_tokens=100)
    assert r.headers["x-budget-clamped-max-tokens"] == "43"
    assert r.headers["x-budget-remaining-tokens"] == "0"  # the tightest scope, the key's
    body = deny(p, "tokens", "key")
    assert body["budget"]["name"] == "alpha" and body["budget"]["limit"] == 50
    r = create(p, max_tokens=100, key=BETA_KEY)  # the team still has room for the other key
    assert r.headers["x-budget-remaining-tokens"] == str(1000 - 50 - (EST + 100))


def test_team_tighter_than_key(up, sim):
    p = up(teams(team={"tokens": 50}, alpha={"tokens": 1000}))
    sim.queue(Reply(input_tokens=7, output_tokens=43))
    r = create(p, max_tokens=100)
    assert r.headers["x-budget-clamped-max-tokens"] == "43"
    body = deny(p, "tokens", "team")
    assert body["budget"]["name"] == "research" and body["budget"]["limit"] == 50
    deny(p, "tokens", "team", key=BETA_KEY)


def test_key_scope_is_named_before_team_scope_and_dimensions_in_spec_order(up, sim):
    p = up(teams(team={"steps": 1, "tokens": 50}, alpha={"steps": 1, "output_tokens": 43, "tokens": 50}))
    sim.queue(Reply(input_tokens=7, output_tokens=43))
    create(p, max_tokens=43)
    body = deny(p, "tokens", "key")  # key: tokens, output_tokens and steps all spent; team too
    assert body["budget"]["name"] == "alpha"
    deny(p, "tokens", "team", key=BETA_KEY)  # beta's own scope has no limit: the team's first dimension


# --- periods -----------------------------------------------------------------------------------

PERIODS = {
    #        a time far from the reset    the reset                   the reset after it
    "hour": (utc(2026, 11, 30, 10, 15), utc(2026, 11, 30, 11, 0), utc(2026, 11, 30, 12, 0)),
    "day": (utc(2026, 11, 30, 8, 0), utc(2026, 12, 1), utc(2026, 12, 2)),
    "week": (utc(2026, 12, 2, 8, 0), utc(2026, 12, 7), utc(2026, 12, 14)),  # weeks start on Monday
    "month": (utc(2026, 11, 10, 8, 0), utc(2026, 12, 1), utc(2027, 1, 1)),
    "month-dec": (utc(2026, 12, 31, 8, 0), utc(2027, 1, 1), utc(2027, 2, 1)),
}


def z(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("name", list(PERIODS))
def test_periods_reset_at_utc_boundaries(up, sim, name):
    period = name.split("-")[0]
    far, reset, after = PERIODS[name]
    clock = FakeClock(far)
    p = up(teams(team={"tokens": 100, "period": period}), clock=clock)
    s = scope(p, "team")
    assert (s["period"], s["resets_at"]) == (period, z(reset))
    sim.queue(Reply(input_tokens=7, output_tokens=93))
    create(p, max_tokens=93)
    # far from the reset: a reset time, but no retry-after (an SDK would sleep until then)
    body = deny(p, "tokens", "team")
    r = raw_post(p)
    assert r.status_code == 429
    assert body["budget"]["resets_at"] == r.headers["x-budget-resets-at"] == z(reset)
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert z(reset) in body["error"]["message"]
    # 30 s before the reset: retry-after says so
    clock.set(reset - dt.timedelta(seconds=30))
    r = raw_post(p)
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    # at the boundary the used amounts start again at zero; history stays
    clock.set(reset)
    s = scope(p, "team")
    assert s["used"]["tokens"] == 0 and s["remaining"] == {"tokens": 100} and s["resets_at"] == z(after)
    sim.queue(Reply(input_tokens=7, output_tokens=50))
    r = create(p, max_tokens=50)
    assert r.headers["x-budget-remaining-tokens"] == str(100 - 57)
    assert used(p)["tokens"] == 57
    clock.set(reset - dt.timedelta(seconds=1))  # the old period still holds what it held
    assert used(p)["tokens"] == 100


def test_retry_after_only_within_60_seconds_of_the_reset(up, sim):
    reset = utc(2026, 12, 1)
    clock = FakeClock(reset - dt.timedelta(days=1))
    p = up(teams(alpha={"steps": 1, "period": "day"}), clock=clock)
    create(p)
    for before, expected in [(3600, None), (61, None), (60.5, None), (60, "60"), (59.2, "60"), (1, "1"), (0.25, "1")]:
        clock.set(reset - dt.timedelta(seconds=before))
        r = raw_post(p)
        assert r.status_code == 429 and r.headers["x-budget-resets-at"] == z(reset)
        assert r.headers.get("retry-after") == expected, before


def test_retry_after_within_a_minute_does_not_make_the_sdk_retry(up, sim):
    reset = utc(2026, 12, 1)
    clock = FakeClock(reset - dt.timedelta(hours=1))
    p = up(teams(alpha={"steps": 1, "period": "day"}), clock=clock)
    create(p)
    clock.set(reset - dt.timedelta(seconds=5))
    attempts: list[str] = []
    hc = anthropic.DefaultHttpxClient(event_hooks={"request": [lambda r: attempts.append(r.url.path)]})
    c = anthropic.Anthropic(base_url=p.url, api_key=ALPHA_KEY, http_client=hc)  # max_retries: default (2)
    with pytest.raises(anthropic.RateLimitError) as exc:
        c.messages.create(model=HAIKU, max_tokens=10, messages=MSG)
    assert exc.value.response.headers["retry-after"] == "5"
    assert attempts == ["/v1/messages"]


def test_no_period_means_no_reset(up, sim):
    p = up(teams(team={"tokens": 100}))
    s = scope(p, "team")
    assert s["period"] == "none" and s["resets_at"] is None
    assert scope(p, "key")["resets_at"] is None
    sim.queue(Reply(input_tokens=7, output_tokens=93))
    create(p, max_tokens=93)
    r = raw_post(p)
    assert r.status_code == 429 and r.json()["budget"]["resets_at"] is None
    assert "x-budget-resets-at" not in r.headers and "retry-after" not in r.headers
    assert "no reset" in r.json()["error"]["message"] or "never" in r.json()["error"]["message"]


# --- clamping ----------------------------------------------------------------------------------

def test_clamping_on_lowers_the_forwarded_max_tokens_json_and_stream(up, sim):
    p = up(teams(team={"tokens": 200}))
    sim.queue(Reply(input_tokens=7, output_tokens=93))
    create(p, max_tokens=93)
    r = create(p, max_tokens=500)  # 100 left: 7 estimated input + 93 output
    assert r.headers["x-budget-clamped-max-tokens"] == "93"
    rec = sim.messages_requests()[-1]
    assert rec.json["max_tokens"] == 93 and rec.json["messages"] == MSG and rec.json["model"] == HAIKU
    assert_no_holds(p)
    # a stream keeps "stream": true and gets the same treatment
    p2 = up(teams(team={"tokens": 60}))
    sim.queue(Reply(text="a b c d", input_tokens=7, output_tokens=500))
    with client(p2).messages.stream(model=HAIKU, max_tokens=500, messages=MSG) as s:
        assert s.response.headers["x-budget-clamped-max-tokens"] == "53"
        final = s.get_final_message()
    rec = sim.messages_requests()[-1]
    assert rec.json["max_tokens"] == 53 and rec.json["stream"] is True
    assert final.usage.output_tokens == 53
    assert used(p2)["tokens"] == 60


def test_clamping_off_forwards_max_tokens_unchanged(up, sim):
    p = up(teams(team={"tokens": 100}), admission={"clamp_max_tokens": False})
    sim.queue(Reply(input_tokens=7, output_tokens=40, gate="g"))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(create, p, 500)
        assert sim.wait_at_gate("g", 1)
        s = scope(p, "team")
        assert s["held"]["tokens"] == 100 and s["held"]["output_tokens"] == 93  # the hold is what remains
        assert s["remaining"] == {"tokens": 0}
        assert sim.messages_requests()[-1].json["max_tokens"] == 500
        sim.open_gate("g")
        r = fut.result(10)
    assert "x-budget-clamped-max-tokens" not in r.headers
    assert r.headers["x-budget-remaining-tokens"] == "0"
    assert used(p)["tokens"] == 47
    assert_no_holds(p)


def test_clamping_off_cuts_a_stream_that_runs_past_its_hold(up, sim):
    p = up(teams(team={"tokens": 60}), admission={"clamp_max_tokens": False})
    chunks = ["abcdefghijk "] * 40  # 12 bytes a delta: 4 estimated tokens each
    # parked after 30 deltas (long past the hold), so that the proxy's closing it is seen
    sim.queue(Reply(chunks=chunks, input_tokens=7, output_tokens=200, gate="parked", gate_after=30))
    got = ""
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client(p).messages.stream(model=HAIKU, max_tokens=500, messages=MSG) as s:
            assert "x-budget-clamped-max-tokens" not in s.response.headers
            for t in s.text_stream:
                got += t
    assert exc.value.status_code == 200 and exc.value.type == "rate_limit_error"
    assert exc.value.body["error"]["details"] == {"error_code": "budget_exceeded"}
    assert sim.messages_requests()[-1].json["max_tokens"] == 500
    assert 0 < len(got) < 12 * 30
    assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"  # the upstream was closed at once
    sim.open_gate("parked")
    u = used(p)
    # at most one metering interval (here one delta: 4 tokens) past the limit
    assert 60 - 4 < u["tokens"] <= 60 + 4, u
    assert u["steps"] == 1
    assert_no_holds(p)
    print(f"\nclamping off, stream cut: used {u['tokens']} of 60 tokens")


# --- x-budget-remaining-* headers -----------------------------------------------------------

@pytest.mark.parametrize("team_budget,expected", [
    ({}, {}),
    ({"input_tokens": 1000, "output_tokens": 1000, "wall_clock": "1h"}, {}),
    ({"tokens": 1000}, {"x-budget-remaining-tokens": str(1000 - EST - 100)}),
    ({"cost_usd": 1}, {"x-budget-remaining-cost-usd": "0.998479"}),  # 1 - (7 x 3000 + 100 x 15000) nanos
    ({"steps": 5}, {"x-budget-remaining-steps": "4"}),
    ({"tokens": 1000, "cost_usd": 1, "steps": 5}, {"x-budget-remaining-tokens": "893",
                                                   "x-budget-remaining-cost-usd": "0.998479",
                                                   "x-budget-remaining-steps": "4"}),
])
def test_remaining_headers_only_for_limited_dimensions(up, sim, team_budget, expected):
    p = up(teams(team=team_budget))
    r = create(p, max_tokens=100, model=SONNET)
    got = {k: v for k, v in r.headers.items() if k.startswith("x-budget-")}
    assert got == expected


def test_remaining_headers_take_the_tightest_scope(up, sim):
    p = up(teams(team={"tokens": 500, "steps": 10}, alpha={"tokens": 5000, "steps": 3}))
    r = create(p, max_tokens=100)
    assert r.headers["x-budget-remaining-tokens"] == str(500 - EST - 100)
    assert r.headers["x-budget-remaining-steps"] == "2"


# --- GET /budget ------------------------------------------------------------------------------

def test_budget_endpoint_exact_shape(up, sim):
    clock = FakeClock(utc(2026, 11, 30, 12, 0, 0))
    p = up(teams(team={"cost_usd": 5, "period": "month"},
                 alpha={"tokens": 1000, "steps": 10, "wall_clock": "2h", "period": "day"}), clock=clock)
    sim.queue(Reply(input_tokens=5, cache_read=2, output_tokens=20))
    create(p, max_tokens=100, model=SONNET)
    clock.advance(12.5)
    cost = 5 * S_IN + 2 * S_READ + 20 * S_OUT  # 315_600 nanos
    u = {"tokens": 27, "input_tokens": 7, "output_tokens": 20, "cost_usd": cost / 1e9, "steps": 1, "wall_clock": 12.5}
    assert budget(p) == {
        "key": "alpha", "team": "research",
        "scopes": [
            {"scope": "key", "name": "alpha", "period": "day", "resets_at": "2026-12-01T00:00:00Z",
             "limit": {"tokens": 1000, "steps": 10, "wall_clock": 7200.0},
             "used": u, "held": ZERO_HELD,
             "remaining": {"tokens": 973, "steps": 9, "wall_clock": 7187.5}},
            {"scope": "team", "name": "research", "period": "month", "resets_at": "2026-12-01T00:00:00Z",
             "limit": {"cost_usd": 5.0},
             "used": u, "held": ZERO_HELD,
             "remaining": {"cost_usd": (5_000_000_000 - cost) / 1e9}},
        ]}
    # beta has not called yet: its key scope is empty, the team scope is shared
    b = budget(p, BETA_KEY)
    assert b["key"] == "beta" and b["scopes"][0]["limit"] == {} and b["scopes"][0]["remaining"] == {}
    assert b["scopes"][0]["used"] == {**usage(), "wall_clock": 0}
    assert b["scopes"][1]["used"] == u


def test_budget_shows_holds_of_requests_in_flight(up, sim):
    p = up(teams(team={"tokens": 1000, "steps": 10}))
    sim.queue(Reply(input_tokens=7, output_tokens=30, gate="g"))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(create, p, 200)
        assert sim.wait_at_gate("g", 1)
        s = scope(p, "team")
        assert s["held"] == {"tokens": EST + 200, "input_tokens": EST, "output_tokens": 200,
                             "cost_usd": s["held"]["cost_usd"], "steps": 1}
        assert s["held"]["cost_usd"] == (EST * 1000 + 200 * 5000) / 1e9  # haiku-4-5: $1 in, $5 out
        assert s["used"]["tokens"] == 0
        assert s["remaining"] == {"tokens": 1000 - EST - 200, "steps": 9}
        sim.open_gate("g")
        fut.result(10)
    s = scope(p, "team")
    assert s["held"] == ZERO_HELD and s["remaining"] == {"tokens": 963, "steps": 9}


def test_a_spent_key_can_still_call_budget_count_tokens_and_models(up, sim):
    p = up(teams(alpha={"steps": 1}))
    create(p)
    deny(p, "steps", "key")
    c = client(p)
    sim.count_tokens_reply = 321
    assert c.messages.count_tokens(model=HAIKU, messages=MSG).input_tokens == 321
    assert [m.id for m in c.models.list()]
    assert c.models.retrieve(HAIKU).id == HAIKU
    assert scope(p, "key")["remaining"] == {"steps": 0}
    assert used(p, "key")["steps"] == 1  # none of those was charged


# --- the 429 contract ---------------------------------------------------------------------------

def test_budget_429_contract_with_sdk_default_retries(up, sim):
    clock = FakeClock(utc(2026, 11, 30, 12, 0, 0))
    p = up(teams(team={"tokens": 100, "period": "day"}), clock=clock)
    sim.queue(Reply(input_tokens=7, output_tokens=93))
    create(p, max_tokens=93)
    upstream_before = len(sim.messages_requests())
    attempts: list[dict[str, str]] = []
    hc = anthropic.DefaultHttpxClient(event_hooks={"request": [lambda r: attempts.append(dict(r.headers))]})
    c = anthropic.Anthropic(base_url=p.url, api_key=ALPHA_KEY, http_client=hc)
    assert c.max_retries == 2
    with pytest.raises(anthropic.RateLimitError) as exc:
        c.messages.create(model=HAIKU, max_tokens=50, messages=MSG)
    e = exc.value
    assert len(attempts) == 1 and attempts[0]["x-stainless-retry-count"] == "0"
    assert len(sim.messages_requests()) == upstream_before
    assert e.status_code == 429 and e.type == "rate_limit_error" and e.error_code == "budget_exceeded"
    body = e.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["details"] == {"error_code": "budget_exceeded"}
    assert body["budget"] == {"scope": "team", "name": "research", "dimension": "tokens", "limit": 100,
                              "used": 100, "resets_at": "2026-12-01T00:00:00Z"}
    h = e.response.headers
    assert h["x-should-retry"] == "false"
    assert h["x-budget-exceeded"] == "tokens"
    assert h["x-budget-resets-at"] == "2026-12-01T00:00:00Z"
    assert "retry-after" not in h and "retry-after-ms" not in h
    assert h["request-id"] == body["request_id"] == e.request_id and h["request-id"].startswith("req_")
    assert h["content-type"].startswith("application/json")
    msg = body["error"]["message"]
    assert "research" in msg and "tokens" in msg and "2026-12-01T00:00:00Z" in msg
    text = e.response.text + json.dumps(dict(h))
    assert not any(secret in text for secret in SECRETS)
    # the same for a stream: refused before the stream object exists, one attempt
    attempts.clear()
    with pytest.raises(anthropic.RateLimitError) as exc:
        with c.messages.stream(model=HAIKU, max_tokens=50, messages=MSG) as s:
            s.get_final_message()
    assert exc.value.error_code == "budget_exceeded" and len(attempts) == 1
    assert len(sim.messages_requests()) == upstream_before
    print(f"\n429 contract: 1 attempt at the proxy, 0 upstream; message: {msg}")


def test_budget_429_message_of_a_key_scope_names_key_team_and_dimension(up, sim):
    p = up(teams(alpha={"output_tokens": 10}))
    sim.queue(Reply(output_tokens=10))
    create(p, max_tokens=10)
    body = deny(p, "output_tokens", "key")
    msg = body["error"]["message"]
    assert "alpha" in msg and "research" in msg and "output_tokens" in msg
    assert not any(secret in msg for secret in SECRETS)


def test_budget_429_message_of_a_team_scope_names_the_key_too(up, sim):
    """docs/http-api.md "The budget 429": messages say for which key and team, also when the team's budget ran out."""
    p = up(teams(team={"output_tokens": 10}))
    sim.queue(Reply(output_tokens=10))
    create(p, max_tokens=10)
    msg = deny(p, "output_tokens", "team")["error"]["message"]
    assert "research" in msg and "output_tokens" in msg
    assert "alpha" in msg


# --- models without a price ------------------------------------------------------------------

UNPRICED = "claude-experimental-zz-1"


def test_unpriced_model_under_a_cost_budget_is_refused_before_forwarding(up, sim):
    p = up(teams(team={"cost_usd": 10}))
    with pytest.raises(anthropic.BadRequestError) as exc:
        create(p, model=UNPRICED)
    assert exc.value.status_code == 400 and exc.value.type == "invalid_request_error"
    assert UNPRICED in exc.value.message
    assert sim.messages_requests() == []
    assert_no_holds(p)
    assert used(p) == usage()


def test_unpriced_model_without_a_cost_budget_passes(up, sim):
    p = up(teams(team={"tokens": 1000}))
    sim.queue(Reply(input_tokens=7, output_tokens=10))
    create(p, model=UNPRICED)
    assert used(p) == usage(17, 7, 10, 0.0, 1)


def test_unpriced_models_allow_lets_it_through_at_cost_zero(up, sim):
    p = up(teams(team={"cost_usd": 10, "tokens": 1000}), admission={"unpriced_models": "allow"})
    sim.queue(Reply(input_tokens=7, output_tokens=10))
    r = create(p, model=UNPRICED)
    assert r.headers["x-budget-remaining-cost-usd"] == "10.000000"
    assert "x-budget-clamped-max-tokens" not in r.headers and sent_max_tokens(sim) == 100
    assert used(p) == usage(17, 7, 10, 0.0, 1)
    assert_no_holds(p)


# --- failed calls -----------------------------------------------------------------------------

def test_an_upstream_error_before_any_message_charges_nothing(up, sim):
    p = up(teams(team={"tokens": 1000, "steps": 5, "cost_usd": 1}))
    for status in (400, 500, 529):
        for stream in (False, True):
            sim.reset()
            sim.queue(*[Reply(status=status)] * 3)
            retries = 2 if status == 529 and not stream else 0
            c = client(p, max_retries=retries)  # the SDK retries a 529 (3 attempts): each must be free
            with pytest.raises(anthropic.APIStatusError) as exc:
                if stream:
                    with c.messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as s:
                        s.get_final_message()
                else:
                    c.messages.create(model=HAIKU, max_tokens=100, messages=MSG)
            assert exc.value.status_code == status
            assert exc.value.request_id.startswith("req_sim_")  # the upstream's own error came back
            assert len(sim.messages_requests()) == 1 + retries
            assert used(p) == usage(), (status, stream)
            assert_no_holds(p)
    sim.reset()
    sim.queue(Reply(input_tokens=7, output_tokens=3))
    create(p)  # the budget is whole: the next call is charged as usual
    assert used(p)["steps"] == 1 and used(p)["tokens"] == 10


def test_a_mid_stream_upstream_error_settles_what_was_generated_and_counts_a_step(up, sim):
    p = up(teams(team={"tokens": 1000, "steps": 5}))
    sim.queue(Reply(text="a b c d e f g h", input_tokens=7, cache_read=0, error_event_after=3))
    with pytest.raises(anthropic.APIStatusError) as exc:
        stream_text(p)
    assert exc.value.status_code == 200 and exc.value.type == "overloaded_error"
    u = used(p)
    assert u["steps"] == 1 and u["input_tokens"] == 7 and 1 <= u["output_tokens"] <= 100
    assert_no_holds(p)


def test_a_client_that_leaves_mid_stream_is_charged_for_what_was_generated(up, sim):
    p = up(teams(team={"tokens": 1000, "steps": 5}))
    sim.queue(Reply(text="a b c d e f g h", input_tokens=7, cache_read=3, gate="hold", gate_after=2))
    with client(p).messages.stream(model=HAIKU, max_tokens=200, messages=MSG) as s:
        it = iter(s.text_stream)
        next(it)
        assert sim.wait_at_gate("hold", 1)
        held = scope(p, "team")["held"]
        assert held["tokens"] > 0
    # leaving the context closed the connection: the proxy settles and closes the upstream
    assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"
    sim.open_gate("hold")
    deadline = dt.datetime.now() + dt.timedelta(seconds=5)
    while scope(p, "team")["held"] != ZERO_HELD:  # settlement runs as the proxy notices the disconnect
        assert dt.datetime.now() < deadline, "the hold of a departed client was never released"
    u = used(p)
    assert u["steps"] == 1 and u["input_tokens"] == 10 and 1 <= u["output_tokens"] <= 200


def test_upstream_unreachable_charges_nothing(start, sim):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = start(teams=teams(team={"tokens": 1000, "steps": 3}), upstream_url=f"http://127.0.0.1:{port}")
    with pytest.raises(anthropic.InternalServerError):
        client(p).messages.create(model=HAIKU, max_tokens=10, messages=MSG)
    assert used(p) == usage()
    assert_no_holds(p)


# --- input_estimate: count_tokens -----------------------------------------------------------

def test_count_tokens_input_estimate_is_used_for_admission(up, sim):
    p = up(teams(team={"tokens": 1000}), admission={"input_estimate": "count_tokens"})
    sim.count_tokens_reply = 500
    sim.queue(Reply(input_tokens=500, output_tokens=800))
    r = create(p, max_tokens=800)  # heuristic (7) would fit 800 unclamped; the count (500) leaves 500
    assert r.headers["x-budget-clamped-max-tokens"] == "500"
    paths = [rec.path for rec in sim.requests]
    assert paths == ["/v1/messages/count_tokens", "/v1/messages"]
    ct = sim.requests[0]
    assert ct.json["messages"] == MSG and "max_tokens" not in ct.json
    assert ct.headers["x-api-key"] == "sk-upstream-secret"
    assert sent_max_tokens(sim) == 500
    assert used(p)["tokens"] == 1000
    # a fresh proxy: the counted input alone fills the budget -> 429, and nothing is forwarded
    p2 = up(teams(team={"tokens": 1000}), admission={"input_estimate": "count_tokens"})
    sim.count_tokens_reply = 1000
    n = len(sim.messages_requests())
    body = deny(p2, "tokens", "team")
    assert "1001" in body["error"]["message"]  # 1000 counted + one output token needed
    assert len(sim.messages_requests()) == n
    sim.count_tokens_reply = 999
    sim.queue(Reply(input_tokens=999, output_tokens=50))
    r = create(p2, max_tokens=50)
    assert r.headers["x-budget-clamped-max-tokens"] == "1"
    assert used(p2)["tokens"] == 1000


def test_with_clamping_on_the_only_overshoot_is_the_input_estimate_error(up, sim):
    p = up(teams(team={"tokens": 1000}), admission={"input_estimate": "count_tokens"})
    sim.count_tokens_reply = 100
    sim.queue(Reply(input_tokens=150, output_tokens=2000))  # 50 more input than counted
    r = create(p, max_tokens=2000)
    assert r.headers["x-budget-clamped-max-tokens"] == "900"
    u = used(p)
    print(f"\ninput 50 above the estimate: used {u['tokens']} of 1000")
    assert u["tokens"] - 1000 == 150 - 100
