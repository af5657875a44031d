"""Replay corpus (issue 16 item 7): responses of today's provider APIs, served byte for byte by a
loopback upstream (tests/replay_upstream.py) behind the real proxy, and the charge the proxy
books for each compared with a charge worked out by hand (docs/budgets.md "What is charged").

Each recording in tests/replay/ is the exact upstream body: a JSON document, or SSE text exactly
as on the wire (event: lines and data-only, keep-alive comments, the whitespace padding the real
API puts inside its JSON). They were built from public recordings (SDK and framework test
fixtures, VCR cassettes; `source` in each row names repository, revision and path): every usage
figure, model id, stop reason, id, block and event order is the recording's; free text (prose,
thinking, signatures, encrypted blobs, page titles and urls, tool input and output) is replaced
by short placeholders — the corpus carries figures and shapes, not third-party content.

Every recording is sent twice: with the official SDK (anthropic 2.14 / openai 3.57) and with a raw
httpx request; the raw response must be the file's bytes, and both usage rows the proxy writes
must carry the hand-computed cost to the nano-dollar, and the token counts below.

Rules applied by hand (docs/budgets.md "What is charged"):
* `usage.iterations` present: the charge is the sum over the iterations, each at its own `model`
  (else the response's `model`); the top-level figures are not added again. A declined hop of a
  server-side fallback (a `message` iteration naming the refused model, output 0, followed by a
  `fallback_message`) is not billed: Anthropic does not bill a refusal that generated no output
  (Claude Platform release note), and the recorded top-level usage equals the fallback iteration
  alone. No field marks it; see NOT_BILLED below.
* otherwise the top-level usage (the final message_delta of a stream: every field a running
  total), priced at the model the response names, not the requested one;
* long context only where one sampling call is over the threshold: per iteration, or for the
  whole request when the request named the beta that allows it; summed inputs of server-tool
  loops (web search, code execution) never trigger it;
* cache writes at their TTL's rate (no 5m/1h split: all at 5m); web searches at $10 per 1k;
* OpenAI: uncached input = prompt_tokens - cached_tokens - cache_write_tokens; completion_tokens
  already includes reasoning_tokens.

Rates (tests/replay/pricing.yaml), nano-dollars per token ($X per Mtok = X*1000):
  claude-fable-5          in 10000  cw5m 12500  cw1h 20000  read 1000  out 50000
  claude-opus-4-5..4-8, 5 in  5000  cw5m  6250  cw1h 10000  read  500  out 25000
  claude-sonnet-4..5      in  3000  cw5m  3750  cw1h  6000  read  300  out 15000
    sonnet-4 / 4-5 > 200K with context-1m beta: in 6000, cw5m 7500, cw1h 12000, read 600, out 22500
  claude-haiku-4-5        in  1000  cw5m  1250  cw1h  2000  read  100  out  5000
  web search: 10_000_000 nanos per search ($10 per 1k)
  gpt-5.6-sol in 5000 read 500 write 6250 out 30000 · gpt-5 in 1250 read 125 out 10000
  gpt-5-mini in 250 read 25 out 2000 · gpt-5-nano in 50 read 5 out 400 · o3-mini in 1100 read 550
  out 4400 · gpt-4o-mini in 150 read 75 out 600 · gpt-4.1-nano in 100 read 25 out 400
  x-ai/grok-4 in 3000 read 750 out 15000

Run: .venv/bin/python -m pytest tests/test_replay.py -s   (prints the table; also written to
tests/replay/TABLE.md).
"""
from __future__ import annotations

import json
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import anthropic
import httpx
import openai
import pytest
import yaml

from proxy.pricing import PricingError, parse_price_table
from tests.harness import ProxyServer, make_config, start_proxy
from tests.replay_upstream import ReplayUpstream

REPLAY = Path(__file__).parent / "replay"
KEY = "bp-replay-key-0001"
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
SEARCH = 10_000_000  # nanos per web search ($10 per 1k)

VERCEL = "vercel/ai@ed857f50f112:packages/anthropic/src/__fixtures__/"
VERCEL_OAI = "vercel/ai@ed857f50f112:packages/openai/src/chat/__fixtures__/"
PYD = "pydantic/pydantic-ai@4fda38988f29:tests/models/cassettes/"
ASDK = "anthropics/anthropic-sdk-python@009b035305e0:tests/"

# How the provider marks an iteration as not billed: it does not, explicitly. The recordings show
# the declined hop of a server-side fallback as {"type": "message", "model": <refused model>,
# "output_tokens": 0, ...} followed by {"type": "fallback_message", ...}, with top-level usage equal
# to the fallback_message entry alone; a refusal that generated no output is not billed.
NOT_BILLED = "declined fallback hop: type 'message', model != served model, output_tokens 0, before a 'fallback_message'"


Tokens = namedtuple("Tokens", "input cw5m cw1h read output searches", defaults=(0,) * 6)  # a usage row's figures


class Rate(NamedTuple):
    """Nano-dollars per token of each kind, and per web search: the rates in the docstring above,
    typed in by hand (never read from pricing.yaml or proxy code)."""

    input: int
    cw5m: int
    cw1h: int
    read: int
    output: int
    searches: int = SEARCH

    def __call__(self, **tokens: int) -> tuple[Rate, Tokens]:
        """One billed sampling call at this rate: `SONNET(input=92, output=196)`."""
        return self, Tokens(**tokens)


FABLE = Rate(10000, 12500, 20000, 1000, 50000)    # claude-fable-5
OPUS = Rate(5000, 6250, 10000, 500, 25000)        # claude-opus-4-5 .. 4-8, 5
SONNET = Rate(3000, 3750, 6000, 300, 15000)       # claude-sonnet-4 .. 5 (never long context below)
HAIKU = Rate(1000, 1250, 2000, 100, 5000)         # claude-haiku-4-5
GPT56_SOL = Rate(5000, 6250, 0, 500, 30000, 0)
GPT5 = Rate(1250, 0, 0, 125, 10000, 0)
GPT5_MINI = Rate(250, 0, 0, 25, 2000, 0)
GPT5_NANO = Rate(50, 0, 0, 5, 400, 0)
O3_MINI = Rate(1100, 0, 0, 550, 4400, 0)
GPT4O_MINI = Rate(150, 0, 0, 75, 600, 0)
GPT41_NANO = Rate(100, 0, 0, 25, 400, 0)
GROK4 = Rate(3000, 0, 0, 750, 15000, 0)           # x-ai/grok-4


@dataclass(frozen=True)
class Rec:
    file: str
    route: str
    model: str                 # the request's model
    max_tokens: int
    calls: list[tuple[Rate, Tokens]]  # each billed call, at its own model's rate (the rules above)
    source: str
    betas: tuple[str, ...] = ()
    note: str = ""
    name: str = ""             # row id when one file is replayed under another request

    @property
    def id(self) -> str:
        return self.name or self.file

    @property
    def sse(self) -> bool:
        return self.file.endswith(".sse")

    @property
    def expected_nanos(self) -> int:
        """Worked out by hand from the calls and the rates above, never by proxy code."""
        return sum(r * n for rate, tokens in self.calls for r, n in zip(rate, tokens))

    @property
    def tokens(self) -> Tokens:
        """What the usage row must hold: the calls' figures summed."""
        return Tokens(*map(sum, zip(*(tokens for _, tokens in self.calls))))


COMPACT = ("compact-2026-01-12",)
ADVISOR = ("advisor-tool-2026-03-01",)
FALLBACK = ("server-side-fallback-2026-07-01",)
CODE_EXEC = ("code-execution-2025-08-25",)
SKILLS = ("code-execution-2025-08-25", "skills-2025-10-02")
CACHE_1H = ("extended-cache-ttl-2025-04-11",)
VERCEL_1H = "vercel/ai@ed857f50f112:examples/ai-functions/src/generate-text/anthropic/cache-control-beta-1h.ts "

CORPUS: list[Rec] = [
    # ---------------------------------------------------------------- Anthropic, JSON
    Rec("a_compaction.json", MESSAGES, "claude-opus-4-6", 4096,
        [OPUS(input=60385, output=592), OPUS(input=682, output=1320)],
        VERCEL + "anthropic-compaction.1.json", COMPACT,
        "compaction iteration 60385/592 is not in the top-level 682/1320"),
    Rec("a_compaction_cache_write.json", MESSAGES, "claude-sonnet-4-6", 4096,
        [SONNET(input=100, cw5m=55096, output=131), SONNET(input=229, output=5)],
        PYD + "test_anthropic/test_anthropic_compaction_usage_with_cache.yaml#0", COMPACT,
        "the compaction iteration wrote 55096 tokens to the 5m cache; top-level shows 0"),
    Rec("a_advisor_opus47.json", MESSAGES, "claude-sonnet-4-6", 4096,
        [SONNET(input=1051, output=35), OPUS(input=2728, output=874), SONNET(input=1363, output=3165)],
        VERCEL + "anthropic-advisor-20260301.1.json", ADVISOR,
        "advisor_message priced at its own model claude-opus-4-7"),
    Rec("a_advisor_fable.json", MESSAGES, "claude-sonnet-5", 4096,
        [SONNET(input=1128, output=155), FABLE(input=2564, output=99), SONNET(input=1354, output=11)],
        PYD + "test_anthropic/test_anthropic_advisor_tool_redacted.yaml#0", ADVISOR,
        "advisor claude-fable-5 under a claude-sonnet-5 executor"),
    Rec("a_fallback.json", MESSAGES, "claude-fable-5", 1024, [OPUS(input=412, output=264)],
        VERCEL + "anthropic-fallback.json", FALLBACK,
        "served by claude-opus-4-8; declined claude-fable-5 hop (408 in, 0 out) not billed "
        "(if it were: +408*10000)"),
    Rec("a_pause_turn_search.json", MESSAGES, "claude-sonnet-4-5", 15000, [SONNET(input=401468, output=792, searches=10)],
        PYD + "test_anthropic/test_pause_turn_web_search_vcr.yaml#0", (),
        "pause_turn, 10 searches; 401K summed over the loop, no 1M beta: standard rates"),
    Rec("a_pause_turn_resume.json", MESSAGES, "claude-sonnet-4-5", 15000, [SONNET(input=494549, output=1245, searches=5)],
        PYD + "test_anthropic/test_pause_turn_web_search_vcr.yaml#1", (),
        "the resumed turn: 495K summed, no 1M beta: standard rates"),
    Rec("a_code_exec_skill.json", MESSAGES, "claude-sonnet-4-5", 16000, [SONNET(input=950648, output=13856)],
        VERCEL + "anthropic-code-execution-20250825.pptx-skill.json", SKILLS,
        "code execution loop, 951K summed, no 1M beta: standard rates"),
    Rec("a_code_exec_skill.json", MESSAGES, "claude-sonnet-4-5", 16000, [SONNET(input=950648, output=13856)],
        VERCEL + "anthropic-code-execution-20250825.pptx-skill.json", SKILLS + ("context-1m-2025-08-07",),
        "same bytes, request names context-1m: still standard (summed server-tool inputs never trigger it)",
        name="a_code_exec_skill.json+context-1m"),
    Rec("a_code_exec.json", MESSAGES, "claude-sonnet-4-5", 4096, [SONNET(input=7881, output=608)],
        VERCEL + "anthropic-code-execution-20250825.1.json", CODE_EXEC),
    Rec("a_thinking_opus5.json", MESSAGES, "claude-opus-5", 4096, [OPUS(input=51, output=1699)],
        VERCEL + "anthropic-claude-opus-5-reasoning-high.1.json", (),
        "thinking_tokens 139 are inside output_tokens 1699"),
    Rec("a_redacted_thinking.json", MESSAGES, "claude-sonnet-4-5-20250929", 4096, [SONNET(input=92, output=196)],
        PYD + "test_anthropic/test_anthropic_model_thinking_part_redacted.yaml#0"),
    Rec("a_cache_5m_read.json", MESSAGES, "claude-sonnet-4-5", 4096, [SONNET(input=3, cw5m=418, read=1111, output=33)],
        PYD + "test_anthropic/test_anthropic_cache_real_api.yaml#1"),
    Rec("a_cache_1h_write.json", MESSAGES, "claude-haiku-4-5", 4096, [HAIKU(input=10, cw1h=2177, output=285)],
        VERCEL_1H + "(printed usage of a real call) in the documented usage shape", CACHE_1H),
    Rec("a_cache_1h_read.json", MESSAGES, "claude-haiku-4-5", 4096, [HAIKU(input=8, read=2177, output=317)],
        VERCEL_1H + "(second call) in the documented usage shape", CACHE_1H),
    Rec("a_web_search_citations.json", MESSAGES, "claude-sonnet-4-0", 4096, [SONNET(input=8984, output=520, searches=1)],
        PYD + "test_anthropic/test_anthropic_web_search_tool.yaml#0", (),
        "requested alias claude-sonnet-4-0, served claude-sonnet-4-20250514; text blocks carry citations"),
    Rec("a_tool_use.json", MESSAGES, "claude-haiku-4-5", 1024, [HAIKU(input=1151, output=87)],
        VERCEL + "anthropic-json-tool.1.json"),
    Rec("a_web_fetch.json", MESSAGES, "claude-sonnet-4-6", 4096, [SONNET(input=7204, output=162)],
        VERCEL + "anthropic-web-fetch-tool-20260209.1.json", (),
        "web_fetch_requests 1: tokens only, no per-fetch price"),
    # ---------------------------------------------------------------- Anthropic, SSE with event: lines
    Rec("a_compaction.sse", MESSAGES, "claude-opus-4-6", 4096,
        [OPUS(input=60385, output=522), OPUS(input=612, output=2819)],
        VERCEL + "anthropic-compaction.1.chunks.txt", COMPACT,
        "message_start says 60385 in; the final message_delta 612 + iterations"),
    Rec("a_advisor.sse", MESSAGES, "claude-sonnet-5", 4096,
        [SONNET(input=1128, output=135), OPUS(input=2543, output=18), SONNET(input=1283, output=10)],
        PYD + "test_anthropic/test_anthropic_advisor_tool_stream.yaml#0", ADVISOR,
        "iterations in the final message_delta; advisor claude-opus-4-8"),
    Rec("a_fallback.sse", MESSAGES, "claude-fable-5", 1024, [OPUS(input=412, output=264)],
        VERCEL + "anthropic-fallback.chunks.txt", FALLBACK,
        "message_start names claude-fable-5; fallback_message iteration claude-opus-4-8 served"),
    Rec("a_pause_turn_search.sse", MESSAGES, "claude-sonnet-4-5", 15000, [SONNET(input=404500, output=943, searches=10)],
        PYD + "test_anthropic/test_pause_turn_web_search_streaming_vcr.yaml#0", (),
        "start 2479 in, final delta 404500 (running total), pause_turn, no 1M beta"),
    Rec("a_pause_turn_resume.sse", MESSAGES, "claude-sonnet-4-5", 15000, [SONNET(input=482529, output=1310, searches=5)],
        PYD + "test_anthropic/test_pause_turn_web_search_streaming_vcr.yaml#1"),
    Rec("a_code_exec_skill.sse", MESSAGES, "claude-sonnet-4-5", 16000, [SONNET(input=320032, output=5558)],
        VERCEL + "anthropic-code-execution-20250825.pptx-skill.chunks.txt", SKILLS,
        "code execution loop, 320K summed, no 1M beta"),
    Rec("a_code_exec_cache.sse", MESSAGES, "claude-sonnet-5", 4096, [SONNET(input=6, cw5m=3337, read=6289, output=198)],
        VERCEL + "anthropic-code-execution-20260120-prompt-cache.1.chunks.txt (last at 4bfb386e2dd0)", (),
        "start: 3068 written (5m); final delta: 3337 written, no split -> all 5m; 6289 read"),
    Rec("a_redacted_thinking.sse", MESSAGES, "claude-sonnet-4-5-20250929", 4096, [SONNET(input=92, output=189)],
        PYD + "test_anthropic/test_anthropic_model_thinking_part_redacted_stream.yaml#0", (),
        "message_start output_tokens 88, final 189"),
    Rec("a_web_search_citations.sse", MESSAGES, "claude-sonnet-4-0", 4096, [SONNET(input=31772, output=644, searches=2)],
        PYD + "test_anthropic/test_anthropic_web_search_tool_stream.yaml#0", (),
        "citations_delta events; served claude-sonnet-4-20250514"),
    Rec("a_tool_use.sse", MESSAGES, "claude-sonnet-4-20250514", 1024, [SONNET(input=377, output=65)],
        ASDK + "lib/streaming/fixtures/tool_use_response.txt"),
    Rec("a_refusal_thinking.sse", MESSAGES, "claude-fable-5", 1024, [FABLE(input=28, output=106)],
        ASDK + "fixtures/fable-fallback/stream-a-refusal.sse", (),
        "refusal after 106 output tokens (67 thinking): generated output is billed"),
    Rec("a_thinking_sonnet5.sse", MESSAGES, "claude-sonnet-5", 4096, [SONNET(input=47, output=373)],
        VERCEL + "anthropic-claude-sonnet-5-reasoning-summarized.chunks.txt (last at 96b0fc8ad5b3^)"),
    # ---------------------------------------------------------------- Anthropic, data-only SSE
    Rec("a_text_dataonly.sse", MESSAGES, "claude-sonnet-4-5", 1024, [SONNET(input=12, output=30)],
        VERCEL + "anthropic-text.chunks.txt (rendered data-only)", (),
        "no event: lines; the data's type names the event"),
    Rec("a_advisor_dataonly.sse", MESSAGES, "claude-sonnet-4-6", 8192,
        [SONNET(input=1051, output=35), OPUS(input=2728, output=3880), SONNET(input=3676, output=3356)],
        VERCEL + "anthropic-advisor-20250301.1.chunks.txt (rendered data-only)", ADVISOR,
        "data-only and iterations at once"),
    Rec("a_delta_input_dataonly.sse", MESSAGES, "claude-opus-4-5", 1024, [OPUS(input=61, output=2)],
        VERCEL + "anthropic-message-delta-input-tokens.chunks.txt (rendered data-only)", (),
        "input grows in message_delta: 43 -> 61"),
    # ---------------------------------------------------------------- OpenAI Chat Completions
    Rec("o_cache_read.json", CHAT, "gpt-5.6-sol", 1024, [GPT56_SOL(input=4020-4012, read=4012, output=4)],
        PYD + "test_openai_prompt_cache/test_openai_chat_prompt_cache_e2e.yaml#1", (),
        "cached_tokens 4012 of prompt_tokens 4020"),
    Rec("o_cache_write.json", CHAT, "gpt-5.6-sol", 1024, [GPT56_SOL(input=4020-4012, cw5m=4012, output=4)],
        PYD + "test_openai_prompt_cache/test_openai_chat_prompt_cache_e2e.yaml#0", (),
        "cache_write_tokens 4012 of prompt_tokens 4020"),
    Rec("o_reasoning_o3mini.json", CHAT, "o3-mini", 4096, [O3_MINI(input=11, output=809)],
        PYD + "test_openai/test_openai_model_without_system_prompt.yaml#0", (),
        "reasoning_tokens 768 inside completion_tokens 809"),
    Rec("o_reasoning_gpt5mini.json", CHAT, "gpt-5-mini", 4096, [GPT5_MINI(input=132, output=589)],
        PYD + "test_tool_choice_matrix/test_tool_choice_matrix[none-openai].yaml#0", (),
        "reasoning_tokens 384 inside 589"),
    Rec("o_reasoning_gpt5.json", CHAT, "gpt-5", 4096, [GPT5(input=12, output=1888)],
        PYD + "test_openai/test_openai_moderation_flagged.yaml#0", (),
        "reasoning_tokens 1600 inside 1888"),
    Rec("o_stream_usage.sse", CHAT, "gpt-4.1-nano", 1024, [GPT41_NANO(input=16, output=300)],
        VERCEL_OAI + "openai-text.chunks.txt (rendered, + data: [DONE])", (),
        "include_usage chunk with choices []"),
    Rec("o_stream_tool_call.sse", CHAT, "gpt-4o-mini", 1024, [GPT4O_MINI(input=53, output=15)],
        PYD + "test_openai/test_run_stream_sync_streams_real_model.yaml#0"),
    Rec("o_stream_reasoning_router.sse", CHAT, "model-router", 1024, [GPT5_NANO(input=15, output=78)],
        VERCEL_OAI + "azure-model-router.1.chunks.txt (rendered, + data: [DONE])", (),
        "requested model-router (unpriced), served gpt-5-nano-2025-08-07; first chunk has model ''"),
    Rec("o_stream_cached_reasoning.sse", CHAT, "google/gemini-2.0-flash-exp:free", 1024,
        [GROK4(input=687-679, read=679, output=187)],
        PYD + "test_openrouter/test_openrouter_stream_with_native_options.yaml#0", (),
        "gateway stream: requested gemini, served x-ai/grok-4; cached 679, reasoning 118; ': ' keep-alives"),
]


# ------------------------------------------------------------------------------------- fixtures

@dataclass
class Outcome:
    rec: Rec
    charged: dict[str, int | None]
    tokens: dict[str, Any]
    bytes_ok: bool | None = None
    error: str = ""
    models: dict[str, str | None] | None = None   # the model each usage row names
    sdk_saw: str = ""                             # what the official SDK made of the response


def _pricing_path(tmp: Path) -> tuple[Path, str]:
    """Our pricing file; if the proxy does not accept requires_beta / max_output_tokens yet, a copy
    without them (noted in the table)."""
    path = REPLAY / "pricing.yaml"
    data = yaml.safe_load(path.read_text())
    try:
        parse_price_table(data)
        return path, ""
    except PricingError as err:
        unknown = [p for p, m in err.problems if m == "unknown field"]
        if not unknown or len(unknown) != len(err.problems):
            raise
        dropped = sorted({p.rsplit(".", 1)[-1] for p in unknown})
        for model in data["models"].values():
            for f in dropped:
                model.pop(f, None)
                if isinstance(model.get("long_context"), dict):
                    model["long_context"].pop(f, None)
        parse_price_table(data)
        stripped = tmp / "pricing.yaml"
        stripped.write_text(yaml.safe_dump(data))
        return stripped, f"pricing.yaml fields not accepted by the proxy yet, dropped: {', '.join(dropped)}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ReplayUpstream]:
    with ReplayUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def pricing_note(tmp_path_factory) -> tuple[Path, str]:
    return _pricing_path(tmp_path_factory.mktemp("replay-pricing"))


@pytest.fixture(scope="module")
def proxy(upstream: ReplayUpstream, pricing_note) -> Iterator[ProxyServer]:
    path, _ = pricing_note
    teams = {"replay": {"budget": {"cost_usd": 100000}, "keys": {"replayer": {"key": KEY}}}}
    upstreams = {"anthropic": {"base_url": upstream.url, "api_key": "sk-replay-upstream-a", "timeout_seconds": 30},
                 "openai": {"base_url": upstream.url, "api_key": "sk-replay-upstream-o"}}
    loaded = make_config(upstream.url, teams, upstreams=upstreams, pricing=str(path),
                         admission={"unpriced_models": "allow"})
    server = start_proxy(loaded)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def table(pricing_note) -> Iterator[list[Outcome]]:
    results: list[Outcome] = []
    yield results
    text = render_table(results, pricing_note[1])
    print("\n" + text)
    (REPLAY / "TABLE.md").write_text(text)


# ------------------------------------------------------------------------------------- helpers

def _seen(proxy: ProxyServer) -> set[str]:
    return {r.request_id for r in proxy.call(proxy.state.store.usage_log(1000))}


def _new_row(proxy: ProxyServer, before: set[str], timeout: float = 5.0):
    """The usage row the last request settled into (a stream settles just after its last byte)."""
    end = time.monotonic() + timeout
    while True:
        rows = [r for r in proxy.call(proxy.state.store.usage_log(1000)) if r.request_id not in before]
        if rows or time.monotonic() > end:
            return rows[-1] if rows else None
        time.sleep(0.01)


def _row_tokens(row) -> Tokens:
    return Tokens(row.input_tokens, row.cache_write_5m_tokens, row.cache_write_1h_tokens, row.cache_read_tokens,
                  row.output_tokens, row.web_search_requests)


def _headers(rec: Rec) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if rec.route == MESSAGES:
        h.update({"x-api-key": KEY, "anthropic-version": "2023-06-01"})
        if rec.betas:
            h["anthropic-beta"] = ",".join(rec.betas)
    else:
        h["authorization"] = f"Bearer {KEY}"
    return h


def _body(rec: Rec) -> dict[str, Any]:
    msgs = [{"role": "user", "content": "replay"}]
    if rec.route == MESSAGES:
        body: dict[str, Any] = {"model": rec.model, "max_tokens": rec.max_tokens, "messages": msgs}
        if rec.sse:
            body["stream"] = True
    else:
        body = {"model": rec.model, "max_completion_tokens": rec.max_tokens, "messages": msgs}
        if rec.sse:
            body.update({"stream": True, "stream_options": {"include_usage": True}})
    return body


def _send_sdk(proxy: ProxyServer, rec: Rec) -> str:
    """The request through the official SDK; returns what the SDK made of it."""
    if rec.route == MESSAGES:
        client = anthropic.Anthropic(base_url=proxy.url, api_key=KEY, max_retries=0, timeout=30)
        extra = {"anthropic-beta": ",".join(rec.betas)} if rec.betas else None
        kw = dict(model=rec.model, max_tokens=rec.max_tokens, messages=_body(rec)["messages"], extra_headers=extra)
        if rec.sse:
            events = [e.type for e in client.messages.create(stream=True, **kw)]
            return f"{len(events)} events" + (f" ({events[0]}..{events[-1]})" if events else "")
        msg = client.messages.create(**kw)
        return f"{msg.model} {msg.stop_reason} out={msg.usage.output_tokens}"
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    kw = dict(model=rec.model, max_completion_tokens=rec.max_tokens, messages=_body(rec)["messages"])
    if rec.sse:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        usage = next((c.usage for c in reversed(chunks) if c.usage), None)
        return f"{len(chunks)} chunks, usage completion={usage and usage.completion_tokens}"
    resp = client.chat.completions.create(**kw)
    return f"{resp.model} completion={resp.usage.completion_tokens}"


def render_table(results: list[Outcome], note: str) -> str:
    lines = ["# Replay corpus: hand-computed charge vs the proxy's",
             "",
             "Generated by `.venv/bin/python -m pytest tests/test_replay.py -s` (tests/test_replay.py).",
             "Charges in nano-dollars (1 USD = 10^9). `sdk` / `httpx`: the usage row of the request sent",
             "with the official SDK / with raw httpx. Sources and the arithmetic are in tests/test_replay.py.",
             ""]
    if note:
        lines += [f"Note: {note}.", ""]
    lines += ["| recording | route | expected nanos | charged (sdk) | charged (httpx) | bytes | tokens | row model | "
              "SDK saw | result |",
              "|---|---|---:|---:|---:|---|---|---|---|---|"]
    passed = 0
    for o in results:
        exp = o.rec.expected_nanos
        ok = (o.charged.get("sdk") == exp and o.charged.get("httpx") == exp and o.bytes_ok
              and all(t == o.rec.tokens for t in o.tokens.values()))
        passed += bool(ok)
        tok = "ok" if all(t == o.rec.tokens for t in o.tokens.values()) else \
            "; ".join(f"{k}: {tuple(t) if t else None}" for k, t in o.tokens.items() if t != o.rec.tokens) + \
            f" (want {tuple(o.rec.tokens)})"
        result = "PASS" if ok else ("FAIL" + (f": {o.error}" if o.error else ""))
        models = sorted({m for m in (o.models or {}).values()}, key=str)
        lines.append(f"| {o.rec.id} | {o.rec.route} | {exp} | {o.charged.get('sdk')} | {o.charged.get('httpx')} "
                     f"| {'ok' if o.bytes_ok else o.bytes_ok} | {tok} | {' / '.join(map(str, models))} "
                     f"| {o.sdk_saw} | {result} |")
    lines += ["", f"{passed} of {len(results)} rows pass.", "", "## Sources", "",
              "| recording | request | source | what it shows |", "|---|---|---|---|"]
    for o in results:
        r = o.rec
        req = f"{r.model}, max {r.max_tokens}" + (f", beta {','.join(r.betas)}" if r.betas else "")
        lines.append(f"| {r.id} | {req} | {r.source} | {r.note} |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the test

def test_corpus_has_the_required_shapes():
    files = {r.file for r in CORPUS}
    assert len(files) >= 30
    for f in files:
        assert (REPLAY / f).is_file(), f
    texts = {f: (REPLAY / f).read_text() for f in files}
    assert any('"type": "compaction"' in t or '"type":"compaction"' in t for t in texts.values())
    assert any("advisor_message" in t for t in texts.values())
    assert any("fallback_message" in t for t in texts.values())
    assert any("pause_turn" in t for t in texts.values())
    assert any(f.endswith(".sse") and "event: " not in t and "message_start" in t for f, t in texts.items())


@pytest.mark.parametrize("rec", CORPUS, ids=lambda r: r.id)
def test_replay_charge(rec: Rec, upstream: ReplayUpstream, proxy: ProxyServer, table: list[Outcome]):
    wire = (REPLAY / rec.file).read_bytes()
    upstream.serve(wire, sse=rec.sse)
    outcome = Outcome(rec, {"sdk": None, "httpx": None}, {"sdk": None, "httpx": None}, models={})
    table.append(outcome)
    errors = []

    before = _seen(proxy)
    try:
        outcome.sdk_saw = _send_sdk(proxy, rec)
    except Exception as exc:  # recorded in the table, asserted below
        errors.append(f"sdk: {type(exc).__name__}: {str(exc)[:120]}")
    row = _new_row(proxy, before)
    outcome.charged["sdk"] = row and row.cost_nanos
    outcome.tokens["sdk"] = row and _row_tokens(row)
    outcome.models["sdk"] = row and row.model

    before = _seen(proxy)
    r = httpx.post(proxy.url + rec.route, headers=_headers(rec), content=json.dumps(_body(rec)), timeout=30)
    outcome.bytes_ok = r.status_code == 200 and r.content == wire
    if r.status_code != 200:
        errors.append(f"httpx: HTTP {r.status_code} {r.text[:120]}")
    row = _new_row(proxy, before)
    outcome.charged["httpx"] = row and row.cost_nanos
    outcome.tokens["httpx"] = row and _row_tokens(row)
    outcome.models["httpx"] = row and row.model
    outcome.error = " / ".join(errors)

    assert not errors, errors
    assert outcome.bytes_ok, "the client did not receive the upstream's bytes"
    assert outcome.charged == {"sdk": rec.expected_nanos, "httpx": rec.expected_nanos}, rec.note
    assert outcome.tokens == {"sdk": rec.tokens, "httpx": rec.tokens}, rec.note
