"""Client strings are validated (docs/http-api.md "What the proxy refuses"), as a property: whatever
body a client sends — arbitrary JSON values (lone surrogates, control characters, huge numbers, deep
nesting), arbitrary and huge model strings, repeated keys, raw byte mutations of a valid body, any
bytes at all — ONE proxy (started once for the module, memory store, in front of the project's
Anthropic simulator) answers either a 4xx of its own with nothing forwarded, or the simulator's own
answer; never a 5xx of its own. Meanwhile another key's ordinary calls, interleaved with the fuzz,
are each charged exactly, and /metrics keeps answering.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import pricing
from proxy.usage import Usage
from tests.conftest import ALPHA_KEY, BETA_KEY
from tests.harness import ProxyServer, make_config, start_proxy
from tests.simulator.anthropic import AnthropicSimulator

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
ORDINARY = json.dumps({"model": HAIKU, "max_tokens": 20, "messages": MSG}).encode()


class Env:
    def __init__(self, sim: AnthropicSimulator, proxy: ProxyServer) -> None:
        self.sim = sim
        self.proxy = proxy
        self.http = httpx.Client(base_url=proxy.url, timeout=30)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    sim = AnthropicSimulator().start()
    teams = {"research": {"keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 10**15}},
                                   "beta": {"key": BETA_KEY}}}}
    proxy = start_proxy(make_config(sim.url, teams, admission={"unpriced_models": "allow"}))
    e = Env(sim, proxy)
    try:
        yield e
    finally:
        e.http.close()
        proxy.stop()
        sim.stop()


# --- strategies ------------------------------------------------------------------------------

any_char = st.characters(exclude_categories=())  # every code point: lone surrogates, C0, DEL, C1
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
controls = st.sampled_from(["\x00", "\x07", "\n", "\x1f", "\x7f", "\x85", "\x9f"])
texts = st.one_of(
    st.text(any_char, max_size=12),
    st.tuples(st.text(max_size=6), surrogate | controls, st.text(max_size=6)).map("".join),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=15,
)
models = st.one_of(
    st.sampled_from([HAIKU, "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "gpt-4.1", "", " ", "c" * 256,
                     "c" * 257]),
    st.text(any_char, max_size=40),
    st.tuples(st.sampled_from([HAIKU, "x"]), surrogate | controls).map("".join),
    st.builds(lambda c, n: c * n, any_char, st.integers(200, 100_000)),  # huge ones
    json_values,
)
max_tokens = st.one_of(st.integers(1, 4096), st.integers(), json_values)
messages = st.one_of(
    st.just(MSG),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | texts,
                                    "content": texts | json_values}), max_size=3),
    json_values,
)


@st.composite
def encoded(draw: st.DrawFn, value: Any) -> bytes:
    """`value` as JSON bytes: escaped ASCII (surrogates as \\udXXX), or raw UTF-8 where a
    surrogate becomes invalid UTF-8 (surrogatepass)."""
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def built_bodies(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {"model": draw(models), "max_tokens": draw(max_tokens), "messages": draw(messages)}
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans() | json_values)
    body.update(draw(st.dictionaries(st.sampled_from(["system", "tools", "metadata", "thinking", "model"]) | texts,
                                     json_values, max_size=3)))
    return draw(encoded(body))


# Valid Unicode (no surrogates), so that a body built of them with a plain model is forwarded:
# what the proxy's estimate, clamp and relay do with strange but legal content.
clean_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
clean_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | clean_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(clean_text, inner, max_size=4),
    max_leaves=25,
)
content_blocks = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "thinking"]) | clean_text},
    optional={"text": clean_values, "source": clean_values, "input": clean_values, "content": clean_values,
              "cache_control": clean_values}), max_size=3)


@st.composite
def strange_but_legal(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from([HAIKU, "claude-sonnet-4-5", "zz-unpriced \u2028 \u00e9", "c" * 256])),
        "max_tokens": draw(st.integers(1, 10**18)),
        "messages": draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | clean_text,
                                                         "content": clean_text | content_blocks | clean_values}),
                                  max_size=3) | clean_values),
    }
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    body.update(draw(st.dictionaries(st.sampled_from(["system", "tools", "metadata", "thinking", "tool_choice"]),
                                     clean_values, max_size=3)))
    return draw(encoded(body))


@st.composite
def repeated_keys(draw: st.DrawFn) -> bytes:
    first, second = draw(encoded(draw(models))), draw(encoded(draw(models)))
    key = draw(st.sampled_from([b'"model"', b'"mod\\u0065l"', b'"max_tokens"', b'"messages"']))
    return (b'{"model": ' + first + b', "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], '
            + key + b": " + second + b"}")


VALID = [ORDINARY, json.dumps({"model": HAIKU, "max_tokens": 20, "messages": MSG, "stream": True}).encode(),
         json.dumps({"model": "zz-unpriced", "max_tokens": 5, "system": "s", "messages": MSG}).encode()]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b"\\udfff", b"\\u0000", b"\xff", b"\xed\xa0\x80", b'"model":"x",', b"\\"]))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            end = draw(st.integers(pos, len(data)))
            data[end:end] = data[pos:end]
    return bytes(data)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """Nesting near and past what a recursive parser, estimator or re-serialiser copes with."""
    depth = draw(st.integers(1, 5000))
    inner = "[" * depth + "]" * depth if draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth
    where = draw(st.sampled_from(["content", "system", "tools", "metadata"]))
    big = draw(st.sampled_from([20, 10**18]))  # 10**18: clamped, so the body is re-serialised
    head = f'{{"model": "{HAIKU}", "max_tokens": {big}, "messages": '
    if where == "content":
        return (head + f'[{{"role": "user", "content": {inner}}}]}}').encode()
    return (head + f'{json.dumps(MSG)}, "{where}": {inner}}}').encode()


bodies = st.one_of(deeply_nested(), strange_but_legal(), strange_but_legal(), built_bodies(), built_bodies(),
                   repeated_keys(), mutated(), mutated(), json_values.flatmap(encoded), st.binary(max_size=64))
routes = st.sampled_from(["/v1/messages"] * 4 + ["/v1/messages/count_tokens"])


# --- the property ----------------------------------------------------------------------------

def forwarded_is_clean(raw: bytes) -> None:
    """What reached the upstream passes the proxy's rules: UTF-8, no lone surrogate, a sane model."""
    text = raw.decode("utf-8")
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))  # the proxy's thread parsed nesting deeper than this one's
    try:                                      # stack (under pytest and hypothesis) has room for
        body = json.loads(text)
        # (encoding recurses as deep as parsing: inside the raised limit too)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate anywhere
    finally:
        sys.setrecursionlimit(old)
    assert isinstance(body, dict)
    model = body["model"]
    assert isinstance(model, str) and 0 < len(model) <= 256
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in model), repr(model)


def test_no_body_gets_a_5xx_of_the_proxys_own_or_costs_another_key_its_charges(env: Env):
    http, sim, proxy = env.http, env.sim, env.proxy
    beta: dict[str, int] = {"calls": 0, "input": 0, "output": 0}
    stats = {"examples": 0, "forwarded": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(body=bodies, route=routes)
    def one(body: bytes, route: str) -> None:
        stats["examples"] += 1
        before = len(sim.requests)
        r = http.post(route, content=body, headers={**HEADERS, "x-api-key": ALPHA_KEY})
        _ = r.content
        forwarded = r.headers.get("request-id", "").startswith("req_sim_")
        reached = sim.requests[before:]
        if forwarded:
            stats["forwarded"] += 1
            assert len(reached) == 1
            forwarded_is_clean(reached[0].body)
        else:
            stats["refused"] += 1
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:300], body[:200])
            assert r.json()["type"] == "error"
            assert reached == [], "a request the proxy refused reached the upstream"

        ok = http.post("/v1/messages", content=ORDINARY, headers={**HEADERS, "x-api-key": BETA_KEY})
        assert ok.status_code == 200, ok.text
        usage = ok.json()["usage"]
        beta["calls"] += 1
        beta["input"] += usage["input_tokens"]
        beta["output"] += usage["output_tokens"]

    one()
    print(f"\nhypothesis ran {stats['examples']} examples: {stats['forwarded']} forwarded, "
          f"{stats['refused']} refused by the proxy; beta made {beta['calls']} ordinary calls")
    assert stats["examples"] >= 100 and stats["refused"] > 0 and stats["forwarded"] > 0

    n, inp, out = beta["calls"], beta["input"], beta["output"]
    price = proxy.state.runtime.pricing.lookup(HAIKU)
    per_call = pricing.cost_nanos(price, Usage(input_tokens=inp // n, output_tokens=out // n))
    assert inp == n * (inp // n) and out == n * (out // n)  # every ordinary call reported the same usage
    r = http.get("/budget", headers={"x-api-key": BETA_KEY})
    assert r.status_code == 200, r.text
    key = next(s for s in r.json()["scopes"] if s["scope"] == "key")
    used = key["used"]
    assert (used["tokens"], used["input_tokens"], used["output_tokens"], used["steps"]) == (inp + out, inp, out, n)
    assert used["cost_usd"] == pytest.approx(n * per_call / 1e9, rel=1e-9)
    for k in (ALPHA_KEY, BETA_KEY):
        for scope in http.get("/budget", headers={"x-api-key": k}).json()["scopes"]:
            assert all(v == 0 for v in scope["held"].values()), scope
    m = http.get("/metrics")
    assert m.status_code == 200 and "budget_proxy_requests_total" in m.text
