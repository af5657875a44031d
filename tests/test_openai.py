"""POST /v1/chat/completions end to end (docs/http-api.md, docs/budgets.md): the official openai SDK
(3.57) against the real proxy under uvicorn, in front of the OpenAI simulator; the last tests
put the Anthropic simulator next to it, with one team budget shared by both routes.

Figures are worked out by hand. The input estimate of MSG is 7 tokens (checked below), and the
prices are config/pricing.yaml's, written out again here so that a change of the table or of
the arithmetic shows up as a failure: gpt-4.1 $2 in, $0.50 cached, $8 out; gpt-5-mini $0.25 in,
$2 out per million tokens ($X per Mtok = X * 1000 nano-dollars per token).

`pytest -s tests/test_openai.py` prints transcripts of a JSON call, a stream, a budget 429 that
is not retried and a mid-stream cut, and the figures of the concurrency tests.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import anthropic
import httpx
import openai
import pytest

from proxy.estimate import estimate_input_tokens, estimate_openai_input_tokens
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.simulator import Reply as AReply
from tests.simulator.openai import OpenAISimulator, Reply

MSG = [{"role": "user", "content": "Say hello"}]
EST = 7
GPT = "gpt-4.1"
HAIKU = "claude-haiku-4-5"
UPSTREAM_KEY = "sk-openai-upstream-secret"
SECRETS = (ALPHA_KEY, BETA_KEY, UPSTREAM_KEY, "sk-upstream-secret")
G_IN, G_CACHED, G_OUT = 2_000, 500, 8_000          # gpt-4.1, nanos per token
M_IN, M_OUT = 250, 2_000                           # gpt-5-mini
CHUNKS_12 = ["abcdefghijk "] * 40                  # 12 bytes a delta: 4 estimated tokens each


def test_the_input_estimate_these_figures_rest_on():
    assert estimate_openai_input_tokens({"model": GPT, "messages": MSG}) == EST
    assert estimate_input_tokens({"model": HAIKU, "max_tokens": 1, "messages": MSG}) == EST


# --- helpers -----------------------------------------------------------------------------------

def show(title: str, *lines: str) -> None:
    """A transcript for `pytest -s`."""
    print(f"\n=== {title} ===")
    for line in lines:
        print("  " + line)


def redact(text: str) -> str:
    for s in SECRETS:
        text = text.replace(s, s[:5] + "…")
    return text


def until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for a condition the test cannot be notified of (e.g. the proxy settling after the
    last byte of a stream went out). Polls; asserts nothing about time."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


class FakeClock:
    def __init__(self, when: dt.datetime) -> None:
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t


def teams(team: dict | None = None, alpha: dict | None = None) -> dict[str, Any]:
    return {"research": {"budget": team or {},
                         "keys": {"alpha": {"key": ALPHA_KEY, "budget": alpha or {}},
                                  "beta": {"key": BETA_KEY}}},
            "support": {"keys": {"gamma": {"key": GAMMA_KEY, "models": ["claude-haiku-*"]}}}}


@pytest.fixture
def osim():
    with OpenAISimulator() as s:
        yield s


@pytest.fixture
def up(start, sim, osim):
    """up(teams, **config) -> a proxy with both upstreams: Anthropic (`sim`) and OpenAI (`osim`)."""
    def _up(t: dict[str, Any] | None = None, **config: Any):
        upstreams = {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream-secret"},
                     "openai": {"base_url": osim.url, "api_key": UPSTREAM_KEY}}
        return start(teams=t or teams(), upstreams=upstreams, **config)
    return _up


def oai(p, key: str = ALPHA_KEY, max_retries: int = 0, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url + "/v1", api_key=key, max_retries=max_retries, **kw)


def recording_client(p, sent: list, **kw) -> openai.OpenAI:
    """A client at the SDK's defaults that records every attempt it makes."""
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    return openai.OpenAI(base_url=p.url + "/v1", api_key=ALPHA_KEY, http_client=http, **kw)


def budget(p, key: str = ALPHA_KEY) -> dict[str, Any]:
    r = httpx.get(p.url + "/budget", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def scope(p, kind: str = "team", key: str = ALPHA_KEY) -> dict[str, Any]:
    return next(s for s in budget(p, key)["scopes"] if s["scope"] == kind)


def no_holds(p, key: str = ALPHA_KEY) -> bool:
    return all(not any(s["held"].values()) for s in budget(p, key)["scopes"])


def settled(p, kind: str = "team", key: str = ALPHA_KEY) -> dict[str, Any]:
    """Used amounts once nothing is held any more (a stream settles just after its last byte)."""
    assert until(lambda: no_holds(p, key)), budget(p, key)
    u = dict(scope(p, kind, key)["used"])
    u.pop("wall_clock")
    return u


def cost_nanos(p, team: str = "research") -> int:
    return p.scope_states(team)[0].used.cost_nanos


def usage(tokens=0, input_tokens=0, output_tokens=0, cost_usd=0.0, steps=0) -> dict[str, Any]:
    return {"tokens": tokens, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cost_usd": cost_usd, "steps": steps}


def raw_post(p, body: dict | bytes, key: str | None = ALPHA_KEY, path: str = "/v1/chat/completions",
             **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(p.url + path, content=content, headers=headers, **kw)


def openai_error(r: httpx.Response, status: int, etype: str, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape: one `error` object, no top-level `type`, an x-request-id header."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) <= {"error", "budget"} and "type" not in body, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert (err["type"], err["code"], err["param"]) == (etype, code, None), err
    assert r.headers["x-request-id"].startswith("req_proxy_")
    assert not any(s in r.text for s in SECRETS)
    return body


# --- the simulator itself, straight from the SDK -----------------------------------------------

def test_simulator_speaks_chat_completions(osim):
    c = openai.OpenAI(base_url=osim.url + "/v1", api_key="sk-x", max_retries=0)
    osim.queue(Reply(text="Hi there friend", prompt_tokens=50, cached_tokens=32, reasoning_tokens=10))
    r = c.chat.completions.with_raw_response.create(model=GPT, messages=MSG)
    done = r.parse()
    assert r.headers["x-request-id"].startswith("req_") and done.model == GPT
    assert (done.usage.prompt_tokens, done.usage.prompt_tokens_details.cached_tokens,
            done.usage.completion_tokens, done.usage.completion_tokens_details.reasoning_tokens) == (50, 32, 14, 10)
    # a stream: usage only when asked, and then last, with empty choices
    plain = list(c.chat.completions.create(model=GPT, messages=MSG, stream=True))
    assert all(ch.choices and ch.usage is None for ch in plain)
    asked = list(c.chat.completions.create(model=GPT, messages=MSG, stream=True,
                                           stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.total_tokens == 25 + 8  # 32 bytes of text: 8 tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in asked[:-1]) == Reply().text
    # the limit truncates: reasoning first, then text, finish_reason "length"
    osim.queue(Reply(text="x" * 400, reasoning_tokens=30))
    cut = c.chat.completions.create(model=GPT, messages=MSG, max_tokens=40)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 40
    assert cut.choices[0].message.content == "x" * 40  # 10 of 100 visible tokens
    assert osim.streams_completed == 2


def test_simulator_errors_are_openai_shaped(osim):
    def post(body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(osim.url + "/v1/chat/completions", json=body,
                          headers={"authorization": "Bearer sk-x"} if headers is None else headers)

    r = post({"model": GPT, "messages": MSG}, headers={})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.headers["x-request-id"]
    r = post({"model": GPT, "messages": MSG, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert post({"model": GPT}).json()["error"]["param"] == "messages"
    assert httpx.post(osim.url + "/v1/nope", headers={"authorization": "Bearer k"}).status_code == 404
    osim.queue(Reply(status=503, error_message="overloaded"))
    with pytest.raises(openai.InternalServerError) as exc:
        openai.OpenAI(base_url=osim.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model=GPT, messages=MSG)
    assert exc.value.type == "server_error" and exc.value.message.endswith("overloaded")


# --- JSON and streams --------------------------------------------------------------------------

def test_json_call_is_charged_exactly_with_cached_input_at_the_cached_rate(up, osim):
    p = up(teams(team={"tokens": 100_000, "cost_usd": 10}))
    osim.queue(Reply(text="Hi!", prompt_tokens=1200, cached_tokens=1024, completion_tokens=40))
    sent: list = []
    r = recording_client(p, sent, max_retries=0).chat.completions.with_raw_response.create(
        model=GPT, messages=MSG, max_completion_tokens=100)
    c = r.parse()
    assert c.choices[0].message.content == "Hi!" and c.choices[0].finish_reason == "stop"
    assert (c.usage.prompt_tokens, c.usage.prompt_tokens_details.cached_tokens, c.usage.completion_tokens) \
        == (1200, 1024, 40)
    rec = osim.completions_requests()[-1]
    assert rec.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ALPHA_KEY not in json.dumps(rec.headers) and "x-api-key" not in rec.headers
    assert rec.body == sent[0].content  # nothing to change: forwarded byte for byte
    assert rec.headers["accept-encoding"] == "identity" and rec.headers["user-agent"].startswith("OpenAI/Python")
    assert r.headers["x-request-id"].startswith("req_") and not r.headers["x-request-id"].startswith("req_proxy")
    # at admission: 7 estimated input + 100 output held
    assert r.headers["x-budget-remaining-tokens"] == str(100_000 - EST - 100)
    assert r.headers["x-budget-remaining-cost-usd"] == "9.999186"  # 10 - (7 x 2000 + 100 x 8000) nanos
    assert "x-budget-clamped-max-tokens" not in r.headers
    expected = 176 * G_IN + 1024 * G_CACHED + 40 * G_OUT
    assert expected == 1_184_000
    assert cost_nanos(p) == expected
    assert settled(p) == usage(1240, 1200, 40, 0.001184, 1)
    assert settled(p, "key") == settled(p)
    show("JSON call (openai SDK 3.57 -> proxy -> OpenAI simulator)",
         f"client : POST /v1/chat/completions {sent[0].content.decode()}",
         f"         authorization: Bearer {redact(ALPHA_KEY)} (proxy key)",
         f"proxy  -> upstream: authorization: Bearer {redact(UPSTREAM_KEY)}; body forwarded byte for byte "
         f"({len(rec.body)} bytes)",
         f"client <- 200 x-request-id: {r.headers['x-request-id']} (the upstream's)",
         f"          x-budget-remaining-tokens: {r.headers['x-budget-remaining-tokens']}, "
         f"x-budget-remaining-cost-usd: {r.headers['x-budget-remaining-cost-usd']}",
         f"          content {c.choices[0].message.content!r}, usage prompt 1200 (cached 1024), completion 40",
         "charged: 176 x $2 + 1024 x $0.50 + 40 x $8 per Mtok = 1,184,000 nanos = $0.001184; "
         f"used {settled(p)}")


def test_stream_without_include_usage_never_shows_the_usage_chunk_yet_is_charged_exactly(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(text="one two three four", prompt_tokens=30, cached_tokens=16, completion_tokens=5))
    sent: list = []
    stream = recording_client(p, sent, max_retries=0).chat.completions.create(
        model=GPT, messages=MSG, max_completion_tokens=50, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "one two three four"
    assert all(ch.choices for ch in chunks) and all(ch.usage is None for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    client_body, up_body = json.loads(sent[0].content), osim.completions_requests()[-1].json
    assert "stream_options" not in client_body
    assert up_body == {**client_body, "stream_options": {"include_usage": True}}  # injected upstream
    assert osim.wait_idle(5) and osim.streams[-1].outcome == "completed"  # (its handler ends after the last byte)
    charged = settled(p)
    assert charged == usage(35, 30, 5, (14 * G_IN + 16 * G_CACHED + 5 * G_OUT) / 1e9, 1)
    # the wire, as a client without the SDK sees it: data lines only, no usage chunk, [DONE] last
    osim.queue(Reply(text="one two three four", prompt_tokens=30, completion_tokens=5))
    with httpx.stream("POST", p.url + "/v1/chat/completions", headers={"authorization": f"Bearer {ALPHA_KEY}"},
                      json={"model": GPT, "messages": MSG, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        wire = r.read().decode()
    events = [e for e in wire.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert not any(json.loads(e[6:]).get("choices") == [] for e in events[:-1])
    show("stream without include_usage",
         "client : stream=True, no stream_options",
         f"proxy  -> upstream: stream_options {up_body['stream_options']} (injected)",
         f"client <- {len(chunks)} chunks, every one with choices; usage chunk stripped; wire ends "
         f"{events[-1]!r}",
         f"charged the reported usage exactly: prompt 30 (cached 16), completion 5 -> used {charged}")


def test_stream_with_include_usage_gets_the_usage_chunk_and_the_bytes_go_through(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(text="Hi there", prompt_tokens=12, completion_tokens=3))
    sent: list = []
    chunks = list(recording_client(p, sent, max_retries=0).chat.completions.create(
        model=GPT, messages=MSG, max_completion_tokens=50, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (12, 3)
    assert osim.completions_requests()[-1].body == sent[0].content  # nothing to change
    assert settled(p) == usage(15, 12, 3, (12 * G_IN + 3 * G_OUT) / 1e9, 1)


async def test_async_client_stream(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(text="async hello", prompt_tokens=9, completion_tokens=3))
    c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key=ALPHA_KEY, max_retries=0)
    text = ""
    async for ch in await c.chat.completions.create(model=GPT, messages=MSG, stream=True):
        text += ch.choices[0].delta.content or ""
    await c.close()
    assert text == "async hello"
    assert settled(p)["tokens"] == 12


def test_tool_call_stream_is_metered_and_relayed(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(text="", tool_call={"city": "Paris", "unit": "C"}, prompt_tokens=40, completion_tokens=12))
    chunks = list(oai(p).chat.completions.create(model=GPT, messages=MSG, stream=True,
                                                 tools=[{"type": "function", "function": {"name": "get_weather"}}]))
    args = "".join(tc.function.arguments or "" for ch in chunks for tc in (ch.choices[0].delta.tool_calls or []))
    assert json.loads(args) == {"city": "Paris", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert settled(p)["tokens"] == 52


# --- the budget 429 ----------------------------------------------------------------------------

def test_budget_429_in_openai_shape_one_attempt_at_default_retries(up, osim):
    p = up(teams(team={"tokens": 100, "period": "day"}), clock=FakeClock(dt.datetime(2026, 11, 30, 12,
                                                                                     tzinfo=dt.timezone.utc)))
    osim.queue(Reply(prompt_tokens=7, completion_tokens=93))
    oai(p).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=93)
    upstream_before = len(osim.completions_requests())
    attempts: list = []
    c = recording_client(p, attempts)
    assert c.max_retries == 2  # the SDK's default
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=50)
    e = exc.value
    assert len(attempts) == 1 and attempts[0].headers["x-stainless-retry-count"] == "0"
    assert len(osim.completions_requests()) == upstream_before  # never reached upstream
    assert (e.status_code, e.type, e.code, e.param) == (429, "insufficient_quota", "budget_exceeded", None)
    assert e.body == e.response.json()["error"]  # the SDK's body is the inner error object
    body = openai_error(e.response, 429, "insufficient_quota", "budget_exceeded")
    assert body["budget"] == {"scope": "team", "name": "research", "dimension": "tokens", "limit": 100,
                              "used": 100, "resets_at": "2026-12-01T00:00:00Z"}
    h = e.response.headers
    assert h["x-should-retry"] == "false" and h["x-budget-exceeded"] == "tokens"
    assert h["x-budget-resets-at"] == "2026-12-01T00:00:00Z"
    assert "retry-after" not in h and "retry-after-ms" not in h
    assert h["x-request-id"] == e.request_id
    msg = e.message
    assert "research" in msg and "tokens" in msg and "2026-12-01T00:00:00Z" in msg
    # a stream is refused before the stream object exists, the same way
    attempts.clear()
    with pytest.raises(openai.RateLimitError) as exc2:
        c.chat.completions.create(model=GPT, messages=MSG, stream=True)
    assert exc2.value.code == "budget_exceeded" and len(attempts) == 1
    assert len(osim.completions_requests()) == upstream_before
    assert no_holds(p)
    show("budget 429, not retried (SDK default max_retries=2)",
         "client : POST /v1/chat/completions max_completion_tokens=50, team 'research' has used 100 of 100 tokens",
         f"client <- 429 x-should-retry: {h['x-should-retry']}, x-budget-exceeded: {h['x-budget-exceeded']}, "
         f"x-budget-resets-at: {h['x-budget-resets-at']}, x-request-id: {h['x-request-id']}",
         f"          {e.response.text}",
         f"SDK    : {type(e).__name__} code={e.code!r} after {len(attempts)} attempt; upstream reached 0 times")


# --- mid-stream cut ----------------------------------------------------------------------------

def test_clamping_off_cuts_a_stream_that_runs_past_its_hold(up, osim):
    p = up(teams(team={"tokens": 60}), admission={"clamp_max_tokens": False})
    # parked after 30 deltas (long past the hold), so that the proxy's closing it is seen
    osim.queue(Reply(chunks=CHUNKS_12, prompt_tokens=7, completion_tokens=200, gate="parked", gate_after=30))
    got = ""
    stream = oai(p).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=500, stream=True)
    assert "x-budget-clamped-max-tokens" not in stream.response.headers
    with pytest.raises(openai.APIError) as exc:
        for ch in stream:
            got += ch.choices[0].delta.content or ""
    e = exc.value
    assert type(e) is openai.APIError  # raised mid-stream: no status code
    assert (e.code, e.type) == ("budget_exceeded", "insufficient_quota")
    assert "budget exceeded mid-stream" in e.message and "research" in e.message
    assert osim.completions_requests()[-1].json["max_completion_tokens"] == 500  # as sent
    assert 0 < len(got) < 12 * 30
    assert osim.wait_stream_end() == "aborted"  # the upstream was closed at once, while parked
    u = settled(p)
    # at most one metering interval (one delta: 4 tokens) past the limit
    assert 60 < u["tokens"] <= 60 + 4 and u["steps"] == 1, u
    assert u["input_tokens"] == EST  # no usage chunk came: input at the estimate, output estimated
    show("mid-stream cut (clamping off)",
         "client : stream=True max_completion_tokens=500; team 'research' has 60 tokens, hold = 7 in + 53 out",
         f"client <- {len(got) // 12} deltas of 12 bytes (4 est. tokens each), then the cut chunk",
         f"SDK    : openai.APIError code={e.code!r} type={e.type!r}: {e.message}",
         f"upstream stream: {osim.streams[-1].outcome} after {osim.streams[-1].text_deltas_sent} of 40 deltas",
         f"used {u['tokens']} of 60 tokens (bound: 60 + 4)")
    osim.open_gate("parked")


def test_the_cut_on_the_wire(up, osim):
    p = up(teams(team={"tokens": 60}), admission={"clamp_max_tokens": False})
    osim.queue(Reply(chunks=CHUNKS_12, prompt_tokens=7, completion_tokens=200, gate="parked", gate_after=30))
    with httpx.stream("POST", p.url + "/v1/chat/completions", headers={"authorization": f"Bearer {ALPHA_KEY}"},
                      json={"model": GPT, "messages": MSG, "max_tokens": 500, "stream": True}) as r:
        wire = r.read()  # a complete chunked body: httpx would raise on a reset
    events = wire.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    err = json.loads(events[-3].removeprefix("data: "))
    assert set(err) == {"error"} and err["error"]["code"] == "budget_exceeded"
    assert err["error"]["type"] == "insufficient_quota" and err["error"]["param"] is None
    assert osim.wait_stream_end() == "aborted"
    osim.open_gate("parked")
    show("mid-stream cut on the wire (last three events)", *[e for e in events[-4:-1]])


def test_clamping_on_rewrites_max_completion_tokens(up, osim):
    p = up(teams(team={"tokens": 200}))
    osim.queue(Reply(prompt_tokens=7, completion_tokens=93))
    oai(p).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=93)
    osim.queue(Reply(prompt_tokens=7, completion_tokens=500))
    r = oai(p).chat.completions.with_raw_response.create(model=GPT, messages=MSG, max_completion_tokens=500)
    assert r.headers["x-budget-clamped-max-tokens"] == "93"
    assert r.parse().choices[0].finish_reason == "length" and r.parse().usage.completion_tokens == 93
    rec = osim.completions_requests()[-1].json
    assert rec == {"model": GPT, "messages": MSG, "max_completion_tokens": 93}
    assert settled(p)["tokens"] == 200
    # the legacy field is rewritten where the client put it, and nothing is added
    p2 = up(teams(team={"tokens": 60}))
    osim.queue(Reply(chunks=["a b c d "] * 10, prompt_tokens=7, completion_tokens=500))
    chunks = list(oai(p2).chat.completions.create(model=GPT, messages=MSG, max_tokens=500, stream=True))
    rec = osim.completions_requests()[-1].json
    assert rec["max_tokens"] == 53 and "max_completion_tokens" not in rec and rec["stream"] is True
    assert chunks[-1].choices[0].finish_reason == "length"
    assert settled(p2)["tokens"] == 60


def test_a_clamped_stream_that_runs_to_its_limit_is_not_cut(up, osim):
    """Real text runs ~4 bytes a token, the live estimate counts 3: a reply that uses its whole
    clamped limit is estimated a third above it. The upstream cannot pass the limit it was sent,
    so neither does the estimate: no cut, and the charge is the reported usage, to the token."""
    p = up(teams(team={"tokens": 60}))
    osim.queue(Reply(chunks=["abcdefghijk "] * 160, prompt_tokens=7, completion_tokens=480))
    chunks = list(oai(p).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=500, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert osim.completions_requests()[-1].json["max_completion_tokens"] == 53
    assert len(text) == 1920 * 53 // 480 and -(-len(text) // 3) > 53  # estimated 71 tokens: past the hold
    assert chunks[-1].choices[0].finish_reason == "length"
    assert settled(p) == usage(60, 7, 53, (7 * G_IN + 53 * G_OUT) / 1e9, 1)


def test_a_request_without_a_limit_gets_one_from_the_remaining_budget(up, osim):
    p = up(teams(team={"tokens": 100}))
    osim.queue(Reply(prompt_tokens=7, completion_tokens=1000))
    r = oai(p).chat.completions.with_raw_response.create(model=GPT, messages=MSG)
    assert r.headers["x-budget-clamped-max-tokens"] == "93"
    assert osim.completions_requests()[-1].json["max_completion_tokens"] == 93
    assert settled(p)["tokens"] == 100
    # with room for the model's whole output, no limit is injected (docs/budgets.md "Admission")
    p2 = up(teams(team={"tokens": 10_000_000}))
    r2 = oai(p2).chat.completions.with_raw_response.create(model=GPT, messages=MSG)
    sent = osim.completions_requests()[-1].json
    assert "max_completion_tokens" not in sent and "max_tokens" not in sent
    assert "x-budget-clamped-max-tokens" not in r2.headers


def test_hidden_reasoning_is_bounded_by_the_clamped_limit(up, osim):
    """Reasoning is billed as output without any visible text: the live estimate is a floor,
    the clamped limit the hard bound, and the reported usage the charge."""
    p = up(teams(team={"tokens": 100}))
    osim.queue(Reply(text="The answer is 4.", prompt_tokens=7, reasoning_tokens=500))
    chunks = list(oai(p).chat.completions.create(model="gpt-5-mini", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "length"
    assert osim.completions_requests()[-1].json["max_completion_tokens"] == 93
    assert settled(p) == usage(100, 7, 93, (7 * M_IN + 93 * M_OUT) / 1e9, 1)


# --- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("status,etype,code", [(429, "requests", "rate_limit_exceeded"), (500, "server_error", None),
                                               (400, "invalid_request_error", None)])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_pass_through_unchanged_and_charge_nothing(up, osim, status, etype, code, stream):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(status=status, error_type=etype, error_code=code, error_message="upstream says no",
                     extra_headers={"x-ratelimit-remaining-tokens": "0"}))
    with pytest.raises(openai.APIStatusError) as exc:
        oai(p).chat.completions.create(model=GPT, messages=MSG, stream=stream)
    e = exc.value
    assert (e.status_code, e.type, e.code, e.message.endswith("upstream says no")) == (status, etype, code, True)
    assert e.request_id.startswith("req_") and not e.request_id.startswith("req_proxy")
    assert e.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert settled(p) == usage()


def test_an_upstream_error_chunk_mid_stream_settles_what_was_generated(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(chunks=CHUNKS_12, error_chunk_after=3, error_type="server_error", error_message="boom"))
    got = []
    with pytest.raises(openai.APIError) as exc:
        for ch in oai(p).chat.completions.create(model=GPT, messages=MSG, stream=True):
            got.append(ch.choices[0].delta.content)
    assert exc.value.type == "server_error" and exc.value.message == "boom"
    assert got == ["", *CHUNKS_12[:3]]
    assert settled(p) == usage(EST + 12, EST, 12, settled(p)["cost_usd"], 1)


def test_upstream_drop_ends_the_stream_with_an_error_chunk_and_charges_the_estimate(up, osim):
    """Truncation is never silent: no APIConnectionError (the body ends cleanly), but an error chunk, not silence."""
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(chunks=CHUNKS_12, drop_after=5))
    got = []
    with pytest.raises(openai.APIError) as err:
        for ch in oai(p).chat.completions.create(model=GPT, messages=MSG, stream=True):
            got.append(ch.choices[0].delta.content)
    assert got == ["", *CHUNKS_12[:5]]
    assert err.value.code == "upstream_dropped" and "ended mid-stream" in err.value.message
    assert settled(p)["tokens"] == EST + 20
    osim.queue(Reply(text="still serving"))
    assert oai(p).chat.completions.create(model=GPT, messages=MSG).choices[0].message.content == "still serving"


def test_client_disconnect_closes_the_upstream_stream_and_charges_the_estimate(up, osim):
    p = up(teams(team={"tokens": 1000}))
    osim.queue(Reply(chunks=CHUNKS_12, gate="hold", gate_after=2, prompt_tokens=7))
    stream = oai(p).chat.completions.create(model=GPT, messages=MSG, stream=True)
    it = iter(stream)
    assert [next(it).choices[0].delta.content for _ in range(3)] == ["", *CHUNKS_12[:2]]
    assert osim.wait_at_gate("hold", 1)
    stream.close()
    assert osim.wait_stream_end() == "aborted"  # closed while parked at the gate
    u = settled(p)
    assert u["steps"] == 1 and EST + 8 <= u["tokens"] <= EST + 8 + 4  # the deltas sent, estimated
    osim.open_gate("hold")


# --- errors in OpenAI's shape ------------------------------------------------------------------

def test_401(up, osim):
    p = up()
    openai_error(raw_post(p, {"model": GPT, "messages": MSG}, key=None), 401, "invalid_request_error",
                 "invalid_api_key")
    with pytest.raises(openai.AuthenticationError) as exc:
        oai(p, key="bp-not-a-key").chat.completions.create(model=GPT, messages=MSG)
    assert exc.value.code == "invalid_api_key"
    r = httpx.post(p.url + "/v1/chat/completions", json={"model": GPT, "messages": MSG},
                   headers={"authorization": f"Bearer {ALPHA_KEY}", "x-api-key": BETA_KEY})
    openai_error(r, 401, "invalid_request_error", "invalid_api_key")
    assert osim.requests == []


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"messages": []}', b'{"model": "gpt-4.1"}',
                                  b'{"model": "gpt-4.1", "messages": {}}',
                                  b'{"model": "gpt-4.1", "messages": [], "max_tokens": 0}',
                                  b'{"model": "gpt-4.1", "messages": [], "max_completion_tokens": "5"}',
                                  b'{"model": "gpt-4.1", "messages": [], "max_completion_tokens": true}'])
def test_400_bad_bodies(up, osim, body):
    openai_error(raw_post(up(), body), 400, "invalid_request_error", None)
    assert osim.requests == []


def test_400_via_the_sdk(up, osim):
    with pytest.raises(openai.BadRequestError) as exc:
        oai(up()).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=0)
    assert "max_completion_tokens" in exc.value.message and osim.requests == []


def test_403_model_not_in_the_allow_list(up, osim):
    p = up()
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(p, key=GAMMA_KEY).chat.completions.create(model=GPT, messages=MSG)
    assert exc.value.code == "model_not_allowed" and "gpt-4.1" in exc.value.message
    openai_error(exc.value.response, 403, "invalid_request_error", "model_not_allowed")
    assert osim.requests == []


def test_404(up, start, osim):
    openai_error(raw_post(up(), {"model": GPT, "messages": MSG}, path="/v1/chat/nope"), 404,
                 "invalid_request_error", "not_found")
    anthropic_only = start()  # no openai upstream configured: the route does not exist
    with pytest.raises(openai.NotFoundError) as exc:
        oai(anthropic_only).chat.completions.create(model=GPT, messages=MSG)
    openai_error(exc.value.response, 404, "invalid_request_error", "not_found")
    assert osim.requests == []


def test_413_body_too_large(up, osim):
    p = up(limits={"max_body_bytes": 1024})
    with pytest.raises(openai.APIStatusError) as exc:
        oai(p).chat.completions.create(model=GPT, messages=[{"role": "user", "content": "x" * 4000}])
    openai_error(exc.value.response, 413, "invalid_request_error", "request_too_large")
    assert osim.requests == []


def test_unpriced_model_under_a_cost_budget(up, osim):
    r = raw_post(up(teams(team={"cost_usd": 1})), {"model": "gpt-unknown-9", "messages": MSG})
    openai_error(r, 400, "invalid_request_error", None)
    assert "gpt-unknown-9" in r.json()["error"]["message"] and osim.requests == []


# --- one team budget, both routes, concurrently ------------------------------------------------

def run_mixed(p, sim, osim, n_each: int, max_tokens: int, stream_every: int) -> dict[str, Any]:
    """n_each Anthropic and n_each OpenAI calls at once (every `stream_every`-th a stream); the
    admitted ones are held at the simulators' gates until every call is in flight or denied,
    then all are released together. Returns each call's outcome: completed, cut or denied
    (+ "/clamped" when the proxy lowered its max_tokens)."""
    def outcome(kind: str, headers: Any) -> str:
        return kind + ("/clamped" if "x-budget-clamped-max-tokens" in headers else "")

    def anth(i: int) -> str:
        c = anthropic.Anthropic(base_url=p.url, api_key=ALPHA_KEY if i % 2 else BETA_KEY, max_retries=0)
        headers: Any = {}
        try:
            if i % stream_every == 0:
                with c.messages.stream(model=HAIKU, max_tokens=max_tokens, messages=MSG) as s:
                    headers = s.response.headers
                    s.get_final_message()
            else:
                r = c.messages.with_raw_response.create(model=HAIKU, max_tokens=max_tokens, messages=MSG)
                headers = r.headers
        except anthropic.RateLimitError:
            return "denied"
        except anthropic.APIStatusError as e:
            assert e.status_code == 200 and e.type == "rate_limit_error"
            return outcome("cut", headers)
        return outcome("completed", headers)

    def oa(i: int) -> str:
        c = oai(p, key=ALPHA_KEY if i % 2 else BETA_KEY)
        headers: Any = {}
        try:
            if i % stream_every == 0:
                s = c.chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=max_tokens,
                                              stream=True)
                headers = s.response.headers
                for _ in s:
                    pass
            else:
                r = c.chat.completions.with_raw_response.create(model=GPT, messages=MSG,
                                                                max_completion_tokens=max_tokens)
                headers = r.headers
        except openai.RateLimitError:
            return "denied"
        except openai.APIError as e:
            assert e.code == "budget_exceeded"
            return outcome("cut", headers)
        return outcome("completed", headers)

    with ThreadPoolExecutor(2 * n_each) as pool:
        futs = [pool.submit(anth, i) for i in range(n_each)] + [pool.submit(oa, i) for i in range(n_each)]

        def arrived() -> int:
            return len(sim.messages_requests()) + len(osim.completions_requests())

        assert until(lambda: arrived() + sum(f.done() for f in futs) == 2 * n_each)
        a, o = len(sim.messages_requests()), len(osim.completions_requests())
        assert sim.wait_at_gate("go", a) and osim.wait_at_gate("go", o)
        in_flight = scope(p)
        sim.open_gate("go")
        osim.open_gate("go")
        results = [f.result(30) for f in futs]
    return {"anthropic": results[:n_each], "openai": results[n_each:], "all": results,
            "in_flight": in_flight, "upstream": (a, o)}


def count(results: list[str], word: str) -> int:
    return sum(word in r.split("/") for r in results)


def test_shared_team_budget_both_routes_concurrently_clamping_on(up, sim, osim):
    """12 calls (6 per route, JSON and streams) on one team budget of 1000 tokens; each asks
    7 (estimated) in + 100 out. 9 fit whole, the 10th is clamped to 30 out, 2 are denied.
    Both upstreams report 9 input tokens: 2 more than estimated, the input-estimate error that
    the overshoot bound allows per request in flight.

    A stream whose final report passes its hold while the team has nothing left is not cut
    once its message is finished (an OpenAI usage chunk comes after the finish chunk); an
    Anthropic stream still is, at its final message_delta, which precedes message_stop."""
    p = up(teams(team={"tokens": 1000}))
    sim.default = AReply(input_tokens=9, output_tokens=1000, gate="go")
    osim.default = Reply(prompt_tokens=9, completion_tokens=1000, gate="go")
    out = run_mixed(p, sim, osim, n_each=6, max_tokens=100, stream_every=2)
    results = out["all"]
    held = out["in_flight"]["held"]["tokens"]
    assert out["in_flight"]["used"]["tokens"] == 0 and held == 1000  # all in flight at once, none over
    admitted = len(results) - count(results, "denied")
    assert (admitted, count(results, "denied"), count(results, "clamped")) == (10, 2, 1)
    assert sum(out["upstream"]) == admitted  # denied ones never reached an upstream
    assert count(out["openai"], "cut") == 0  # each whole answer was sent before its usage chunk
    u = settled(p)
    bound = 1000 + 2 * admitted
    assert u["tokens"] == bound and u["steps"] == admitted  # every hold used to the token, + the error
    assert no_holds(p) and no_holds(p, BETA_KEY)
    show("shared team budget, Anthropic + OpenAI concurrently, clamping on",
         f"anthropic: {out['anthropic']}",
         f"openai   : {out['openai']}",
         f"admitted {admitted} (clamped {count(results, 'clamped')}), denied {count(results, 'denied')}, "
         f"cut {count(results, 'cut')}; held while all in flight: {held} of 1000 tokens",
         f"used {u['tokens']} of 1000 tokens (bound 1000 + 2 x {admitted} in flight = {bound}); holds back to 0")


def test_shared_team_budget_both_routes_concurrently_clamping_off(up, sim, osim):
    """8 streams (4 per route) on 1000 tokens, each asking 7 in + 200 out, clamping off. Four
    holds of 207 and one of 172 (what remained) fill the budget; 3 are denied. All five are
    parked mid-stream, then released: the one holding 165 out runs past its hold with nothing
    left to extend it and is cut within one metering interval (one 12-byte delta: 4 tokens)."""
    p = up(teams(team={"tokens": 1000}), admission={"clamp_max_tokens": False})
    chunks = ["abcdefghijk "] * 60  # 720 bytes; cut to 600 (200 tokens, est. 200) at max_tokens 200
    sim.default = AReply(chunks=chunks, input_tokens=7, output_tokens=240, gate="go", gate_after=2)
    osim.default = Reply(chunks=chunks, prompt_tokens=7, completion_tokens=240, gate="go", gate_after=2)
    out = run_mixed(p, sim, osim, n_each=4, max_tokens=200, stream_every=1)
    results = out["all"]
    admitted = len(results) - count(results, "denied")
    assert (admitted, count(results, "denied"), count(results, "cut")) == (5, 3, 1)
    assert out["in_flight"]["held"]["tokens"] + out["in_flight"]["used"]["tokens"] <= 1000
    u = settled(p)
    bound = 1000 + 4 * admitted
    assert 1000 < u["tokens"] <= 1000 + 4, u  # only the cut stream passed its hold, by one delta
    assert u["tokens"] <= bound and u["steps"] == admitted
    assert no_holds(p) and no_holds(p, BETA_KEY)
    show("shared team budget, Anthropic + OpenAI streams concurrently, clamping off",
         f"anthropic: {out['anthropic']}",
         f"openai   : {out['openai']}",
         f"admitted {admitted}, denied {count(results, 'denied')}, cut {count(results, 'cut')}",
         f"used {u['tokens']} of 1000 tokens (bound 1000 + one 4-token interval x {admitted} streams "
         f"= {bound}); holds back to 0")


def test_a_finished_stream_is_not_cut_at_its_final_usage_report(up, osim):
    """The whole answer has been sent when the usage chunk arrives; if it reports 2 input tokens
    more than estimated and the budget has no room for them, there is nothing left to stop:
    the client should get its usage chunk and [DONE], and the budget the exact charge."""
    p = up(teams(team={"tokens": 107}))  # exactly the hold: 7 estimated in + 100 out
    osim.queue(Reply(text="all of it", prompt_tokens=9, completion_tokens=100))
    chunks = list(oai(p).chat.completions.create(model=GPT, messages=MSG, max_completion_tokens=100,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 9
    assert settled(p)["tokens"] == 109


def test_a_request_for_n_choices_without_a_limit_holds_the_models_limit_n_times(up, osim):
    """Each of the n completions may run to the model's max_output_tokens: with room for one but
    not three, the proxy clamps (and forwards each choice its share) instead of holding too little."""
    from proxy.app import shipped_pricing_path
    import yaml

    table = yaml.safe_load(shipped_pricing_path().read_text())
    one = table["models"][GPT]["max_output_tokens"]
    p = up(teams(team={"tokens": EST + 2 * one}))
    oai(p).chat.completions.create(model=GPT, messages=MSG, n=3)
    sent = osim.completions_requests()[-1].json
    assert sent["max_completion_tokens"] == (2 * one) // 3  # clamped: 3 x one did not fit
