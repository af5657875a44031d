"""`make demo`: the proxy in front of the loopback Anthropic simulator, driven by the anthropic SDK.

No provider key and no network: both servers run in this process on free loopback ports, with
a memory store. Run from the repository root: `python -m tests.demo`."""
from __future__ import annotations

from typing import Any

import anthropic
import httpx
import httpx2  # the anthropic SDK 2.x's HTTP client

from tests.harness import make_config, start_proxy
from tests.simulator import AnthropicSimulator, Reply

AGENT_KEY = "bp-demo-agent-key-000000000000000"
WRITER_KEY = "bp-demo-writer-key-00000000000000"
MODEL = "claude-haiku-4-5"
STORY = ("Once upon a time a small proxy stood between a busy team and a very large model. "
         "Every token that passed was counted twice, once on the way in and once on the way out, "
         "and when the budget ran dry the proxy said so politely and closed the door.")

TEAMS = {
    "demo": {
        "budget": {"cost_usd": 1, "period": "day"},
        "keys": {
            "agent": {"key": AGENT_KEY, "budget": {"tokens": 5000, "steps": 3}},
            "writer": {"key": WRITER_KEY, "budget": {"output_tokens": 24}},
        },
    },
}


def say(line: str = "") -> None:
    print(line, flush=True)


def sdk(proxy_url: str, key: str, attempts: list[str] | None = None) -> anthropic.Anthropic:
    """An SDK client with its default retries; `attempts` records every HTTP request it sends."""
    hooks = {"request": [lambda req: attempts.append(req.url.path)]} if attempts is not None else {}
    return anthropic.Anthropic(base_url=proxy_url, api_key=key, http_client=httpx2.Client(event_hooks=hooks))


def remaining_headers(headers: Any) -> str:
    return ", ".join(f"{k.removeprefix('x-budget-remaining-')}={v}"
                     for k, v in headers.items() if k.startswith("x-budget-remaining-"))


def calls(proxy_url: str, sim: AnthropicSimulator) -> None:
    say("== 1. three calls with key 'agent' (budget: 5000 tokens, 3 steps; team: $1/day) ==")
    say("(the x-budget-remaining-* headers are taken at admission, after reserving the call's worst case)")
    client = sdk(proxy_url, AGENT_KEY)
    sim.queue(Reply(text="Paris.", input_tokens=120, output_tokens=4),
              Reply(text="It is on the Seine.", input_tokens=150, output_tokens=9),
              Reply(text="About 2.1 million people.", input_tokens=180, output_tokens=11))
    for n, question in enumerate(("Capital of France?", "Which river?", "Population?"), 1):
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": question}])
        msg = raw.parse()
        say(f"call {n}: {question!r} -> {msg.content[0].text!r}")
        say(f"        usage: input={msg.usage.input_tokens} output={msg.usage.output_tokens}; "
            f"x-budget-remaining-*: {remaining_headers(raw.headers)}")


def money(dim: str, v: float) -> str:
    return f"${v:.6f}".rstrip("0").rstrip(".") if dim == "cost_usd" else str(v)


def budget_view(proxy_url: str, key: str) -> None:
    doc = httpx.get(proxy_url + "/budget", headers={"x-api-key": key}).json()
    say(f"GET /budget as key '{doc['key']}' of team '{doc['team']}':")
    for s in doc["scopes"]:
        limited = ", ".join(f"{d} {money(d, s['used'][d])}/{money(d, lim)} (remaining {money(d, s['remaining'][d])})"
                            for d, lim in s["limit"].items())
        resets = f"resets {s['resets_at']}" if s["resets_at"] else "no reset period"
        say(f"  {s['scope']} {s['name']}: {limited}; {resets}")


def denial(proxy_url: str, sim: AnthropicSimulator) -> None:
    say("== 3. a fourth call: the step budget is spent ==")
    attempts: list[str] = []
    upstream_before = len(sim.messages_requests())
    try:
        sdk(proxy_url, AGENT_KEY, attempts).messages.create(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "One more?"}])
        say("unexpected: the call went through")
    except anthropic.RateLimitError as err:
        h = err.response.headers
        say(f"HTTP {err.status_code} {err.body['error']['type']}: {err.body['error']['message']}")
        say("headers: " + " ".join(f"{k}={h[k]}" for k in ("x-should-retry", "x-budget-exceeded",
                                                           "x-budget-resets-at", "retry-after") if k in h))
    say(f"the SDK (max_retries=2) made {len(attempts)} attempt(s); requests that reached the upstream: "
        f"{len(sim.messages_requests()) - upstream_before}")


def stream_cut(proxy_url: str, sim: AnthropicSimulator) -> None:
    say("== 4. a stream cut mid-way: key 'writer' may produce 24 output tokens, asks for max_tokens=400 ==")
    say("(clamp_max_tokens is off: max_tokens is forwarded as sent and the stream is metered live)")
    # The simulator pauses after 30 words, as if still generating: the cut must come before that.
    sim.queue(Reply(text=STORY, chunks=[w + " " for w in STORY.split()], input_tokens=30,
                    gate="story", gate_after=30))
    received: list[str] = []
    try:
        with sdk(proxy_url, WRITER_KEY).messages.stream(
                model=MODEL, max_tokens=400, messages=[{"role": "user", "content": "Tell a story."}]) as stream:
            for text in stream.text_stream:
                received.append(text)
        say("unexpected: the stream was not cut")
    except anthropic.APIStatusError as err:
        say(f"text received before the cut: {''.join(received).strip()!r}")
        say(f"SDK raised {type(err).__name__}: status={err.status_code} type={err.type}")
        body = err.body if isinstance(err.body, dict) else {}
        say(f"  message: {body.get('error', {}).get('message', err.message)}")
    sim.wait_idle(5)
    info = sim.streams[-1]
    say(f"upstream stream outcome: {info.outcome} (the proxy closed the connection; the rest of the "
        "story was never generated)")
    sim.open_gate("story")
    budget_view(proxy_url, WRITER_KEY)
    say("(with clamping off, a stream may pass its budget by at most one metering interval)")


def main() -> None:
    sim = AnthropicSimulator()
    sim.start()
    config = make_config(sim.url, TEAMS, admission={"clamp_max_tokens": False})
    proxy = start_proxy(config)
    try:
        say(f"simulated Anthropic API on {sim.url}; budget-proxy on {proxy.url} (memory store)")
        say()
        calls(proxy.url, sim)
        say()
        say("== 2. what is left ==")
        budget_view(proxy.url, AGENT_KEY)
        say()
        denial(proxy.url, sim)
        say()
        stream_cut(proxy.url, sim)
    finally:
        proxy.stop()
        sim.stop()


if __name__ == "__main__":
    main()
