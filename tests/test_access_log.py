"""The access log through the real proxy (docs/http-api.md "Access log"): one JSON line
for every request it answers, on every kind of route, with the same top-level fields, and never
a secret, a prompt or a completion."""
from __future__ import annotations

import io
import json
import logging
import re
import time
from typing import Any, Callable

import anthropic
import httpx
import pytest

from proxy import logs
from proxy.logs import ACCESS_FIELDS, PATH_MAX, AccessSink, path_field
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.simulator import Reply

ADMIN_KEY = "bp-admin-secret-key-0009"
UPSTREAM_KEY = "sk-upstream-secret"
SECRETS = (ALPHA_KEY, BETA_KEY, GAMMA_KEY, ADMIN_KEY, UPSTREAM_KEY, "bp-wrong-key-0000")
PROMPT = "the-secret-prompt-words"
COMPLETION = "the-secret-completion-words"
MODEL = "claude-haiku-4-5"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class AccessLog:
    """The access sink's output, read from the test's thread while the proxy writes on its own."""

    def __init__(self) -> None:
        self.out = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first line `match` accepts, once the sink has written it (lines are batched:
        logs.FLUSH_SECONDS). Polls; asserts nothing about time."""
        end = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines() if match(line)]
            if found:
                assert len(found) == 1, found  # one line per request
                return found[0]
            assert time.monotonic() < end, f"no such line in {self.lines()}"
            time.sleep(0.01)

    def path(self, path: str, **fields: Any) -> dict[str, Any]:
        return self.wait(lambda line: line.get("path") == path and all(line[k] == v for k, v in fields.items()))


@pytest.fixture
def access(monkeypatch: pytest.MonkeyPatch):
    """The access log as `serve --log-format json` writes it, into a buffer."""
    log = AccessLog()
    monkeypatch.setattr(logs, "_access_sink", AccessSink(log.out))
    logger = logging.getLogger("budget_proxy.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield log
    logger.setLevel(level)
    text = log.out.getvalue()
    for secret in (*SECRETS, PROMPT, COMPLETION):  # whatever the test did
        assert secret not in text


def teams(alpha_tokens: int | None = None) -> dict[str, Any]:
    alpha: dict[str, Any] = {"key": ALPHA_KEY}
    if alpha_tokens is not None:
        alpha["budget"] = {"tokens": alpha_tokens, "period": "day"}
    return {"research": {"keys": {"alpha": alpha, "beta": {"key": BETA_KEY}}},
            "support": {"keys": {"gamma": {"key": GAMMA_KEY, "models": ["claude-haiku-*"]}}}}


@pytest.fixture
def proxy(start):
    return start(teams=teams(alpha_tokens=100_000), admin_key=ADMIN_KEY)


def client(proxy, key: str = ALPHA_KEY, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, default_headers=headers)


def msg(text: str = PROMPT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def assert_shape(line: dict[str, Any]) -> None:
    """Every line: the same fields in the same order, after time, level, logger and message."""
    assert list(line) == ["time", "level", "logger", "message", *ACCESS_FIELDS]
    assert TIME.fullmatch(line["time"]), line["time"]
    assert line["logger"] == "budget_proxy.access" and line["message"] == "request"
    assert line["request_id"] and line["client"] == "127.0.0.1"
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0


# --- metered routes ----------------------------------------------------------------------------

def test_a_metered_json_call_logs_its_charge_and_both_request_ids(proxy, sim, access):
    sim.queue(Reply(text=COMPLETION, input_tokens=12, output_tokens=7))
    raw = client(proxy, **{"x-budget-run": "run-42"}).messages.with_raw_response.create(
        model=MODEL, max_tokens=50, messages=msg())
    line = access.path("/v1/messages")
    assert_shape(line)
    assert raw.headers["request-id"].startswith("req_sim_")
    assert line["upstream_request_id"] == raw.headers["request-id"]  # the upstream's, as the client got it
    assert line["request_id"].startswith("req_proxy_") and line["request_id"] != line["upstream_request_id"]
    [row] = proxy.call(proxy.state.store.usage_log(10))
    assert row.request_id == line["request_id"]  # the usage log's id
    assert {k: line[k] for k in ("method", "status", "team", "key", "run", "model", "outcome", "error",
                                 "denied_scope", "denied_dimension", "input_tokens", "output_tokens", "steps")} == {
        "method": "POST", "status": 200, "team": "research", "key": "alpha", "run": "run-42", "model": MODEL,
        "outcome": "completed", "error": None, "denied_scope": None, "denied_dimension": None,
        "input_tokens": 12, "output_tokens": 7, "steps": 1}
    assert line["cost_usd"] == pytest.approx((12 * 1.00 + 7 * 5.00) / 1e6)  # claude-haiku-4-5's rates


def test_a_stream_is_logged_after_its_last_byte(proxy, sim, access):
    sim.queue(Reply(text=COMPLETION, chunks=[COMPLETION[:10], COMPLETION[10:]] * 4, event_delay=0.03))
    seen: list[float] = []
    with client(proxy).messages.stream(model=MODEL, max_tokens=50, messages=msg()) as s:
        for _ in s.text_stream:
            seen.append(time.monotonic())
    first_to_last_ms = (seen[-1] - seen[0]) * 1000
    line = access.path("/v1/messages")
    assert_shape(line)
    assert line["status"] == 200 and line["outcome"] == "completed" and line["steps"] == 1
    assert line["upstream_request_id"].startswith("req_sim_")
    # the proxy's duration holds the stream the client saw (less a little for the client's own
    # scheduling), and the upstream's pacing: 14 events 30 ms apart
    assert line["duration_ms"] >= first_to_last_ms - 25 and line["duration_ms"] >= 0.03 * 13 * 1000


def test_a_budget_429_names_the_scope_and_dimension(start, sim, access):
    proxy = start(teams=teams(alpha_tokens=100))
    with pytest.raises(anthropic.RateLimitError) as exc:
        client(proxy).messages.create(model=MODEL, max_tokens=500, messages=msg(PROMPT + " x" * 1000))
    line = access.path("/v1/messages")
    assert_shape(line)
    assert line["request_id"] == exc.value.body["request_id"]  # as in the response
    assert (line["status"], line["outcome"], line["error"]) == (429, "denied", "rate_limit_error")
    assert (line["denied_scope"], line["denied_dimension"]) == ("key", "tokens")
    assert (line["team"], line["key"], line["model"]) == ("research", "alpha", MODEL)
    assert (line["input_tokens"], line["output_tokens"], line["cost_usd"]) == (0, 0, 0.0)
    assert line["upstream_request_id"] is None and sim.messages_requests() == []


def test_a_stream_cut_by_a_budget_names_the_scope_and_dimension(start, sim, access):
    proxy = start(teams=teams(alpha_tokens=200), admission={"clamp_max_tokens": False})
    sim.queue(Reply(chunks=["abcdefghijk "] * 100, input_tokens=20, gate="parked", gate_after=80))
    with pytest.raises(anthropic.APIStatusError):
        with client(proxy).messages.stream(model=MODEL, max_tokens=1000, messages=msg()) as s:
            for _ in s.text_stream:
                pass
    sim.open_gate("parked")
    line = access.path("/v1/messages")
    assert (line["status"], line["outcome"]) == (200, "cut")
    assert (line["denied_scope"], line["denied_dimension"]) == ("key", "tokens")
    assert line["output_tokens"] > 0


def test_a_bad_key_on_a_metered_route_is_a_401_line_without_a_caller(proxy, sim, access):
    with pytest.raises(anthropic.AuthenticationError) as exc:
        client(proxy, "bp-wrong-key-0000").messages.create(model=MODEL, max_tokens=5, messages=msg())
    line = access.path("/v1/messages")
    assert_shape(line)
    assert line["request_id"] == exc.value.body["request_id"]
    assert (line["status"], line["outcome"], line["error"]) == (401, "rejected", "authentication_error")
    assert line["team"] is None and line["key"] is None and line["model"] is None


def test_an_invalid_run_id_is_not_logged(proxy, sim, access):
    bad = "run with spaces\r\nand-more"
    r = httpx.post(proxy.url + "/v1/messages", headers={"x-api-key": ALPHA_KEY, "x-budget-run": "bad run!"},
                   json={"model": MODEL, "max_tokens": 5, "messages": msg()})
    assert r.status_code == 400
    line = access.path("/v1/messages")
    assert line["status"] == 400 and line["run"] is None and line["key"] == "alpha"
    assert bad not in access.out.getvalue() and "bad run!" not in access.out.getvalue()


# --- routes answered through Starlette -------------------------------------------------------------

def test_count_tokens_and_models_are_logged_with_the_upstreams_request_id(proxy, sim, access):
    r = httpx.post(proxy.url + "/v1/messages/count_tokens?beta=true",
                   headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01"},
                   json={"model": MODEL, "messages": msg()})
    assert r.status_code == 200
    line = access.path("/v1/messages/count_tokens")  # (no query)
    assert_shape(line)
    assert line["upstream_request_id"] == r.headers["request-id"] and r.headers["request-id"].startswith("req_sim_")
    assert line["request_id"].startswith("req_proxy_") and line["request_id"] != line["upstream_request_id"]
    assert (line["method"], line["status"], line["team"], line["key"], line["model"], line["outcome"]) == \
        ("POST", 200, "research", "alpha", MODEL, "completed")
    # never charged: no token figures at all
    assert (line["input_tokens"], line["output_tokens"], line["cost_usd"], line["steps"]) == (None,) * 4

    r = httpx.get(proxy.url + "/v1/models/claude-haiku-4-5", headers={"x-api-key": BETA_KEY,
                                                                       "anthropic-version": "2023-06-01"})
    line = access.path("/v1/models/claude-haiku-4-5")
    assert_shape(line)
    assert (line["method"], line["status"], line["key"]) == ("GET", r.status_code, "beta")
    assert r.status_code == 200 and line["upstream_request_id"] == r.headers["request-id"]


def test_a_model_the_key_may_not_use_on_count_tokens_is_a_403_line(proxy, sim, access):
    r = httpx.post(proxy.url + "/v1/messages/count_tokens", headers={"x-api-key": GAMMA_KEY},
                   json={"model": "claude-opus-4-1", "messages": msg()})
    assert r.status_code == 403
    line = access.path("/v1/messages/count_tokens")
    assert line["request_id"] == r.json()["request_id"]
    assert (line["status"], line["error"], line["outcome"], line["key"]) == \
        (403, "permission_error", "rejected", "gamma")
    assert line["upstream_request_id"] is None


def test_budget_is_logged_with_its_caller_and_run(proxy, access):
    r = httpx.get(proxy.url + "/budget", headers={"authorization": f"Bearer {ALPHA_KEY}", "x-budget-run": "r1"})
    assert r.status_code == 200
    line = access.path("/budget")
    assert_shape(line)
    assert (line["method"], line["status"], line["team"], line["key"], line["run"], line["outcome"]) == \
        ("GET", 200, "research", "alpha", "r1", "completed")
    assert line["request_id"].startswith("req_proxy_")  # a new one: the response has none

    r = httpx.get(proxy.url + "/budget", headers={"x-api-key": "bp-wrong-key-0000"})
    assert r.status_code == 401
    line = access.path("/budget", status=401)
    assert line["request_id"] == r.json()["request_id"] and line["error"] == "authentication_error"
    assert line["team"] is None and line["key"] is None


def test_admin_routes_are_logged_without_the_admin_key(proxy, access):
    r = httpx.get(proxy.url + "/admin/usage", headers={"x-api-key": ADMIN_KEY})
    assert r.status_code == 200
    line = access.path("/admin/usage")
    assert_shape(line)
    assert (line["method"], line["status"], line["team"], line["key"]) == ("GET", 200, None, None)
    r = httpx.post(proxy.url + "/admin/teams/research/reset", headers={"x-api-key": "bp-wrong-key-0000"})
    line = access.path("/admin/teams/research/reset")
    assert (line["method"], line["status"]) == ("POST", r.status_code) and r.status_code in (401, 403)


def test_a_404_logs_the_path_without_its_query(proxy, access):
    r = httpx.get(proxy.url + f"/v1/nothing/here?key={ALPHA_KEY}", headers={"x-api-key": ALPHA_KEY})
    assert r.status_code == 404
    line = access.path("/v1/nothing/here")
    assert_shape(line)
    assert line["request_id"] == r.json()["request_id"]
    assert (line["status"], line["error"], line["outcome"]) == (404, "not_found_error", "rejected")
    r = httpx.get(proxy.url + "/v1/messages")  # (a metered path, another method)
    assert access.path("/v1/messages", method="GET")["status"] == 404


def test_a_hostile_path_is_bounded_and_escaped(proxy, access):
    long = "/v1/" + "a" * 1000
    assert httpx.get(proxy.url + long).status_code == 404
    assert httpx.get(proxy.url + "/v1/models/%2e%2e%00%0a%ff").status_code == 404
    lines = [access.wait(lambda line: line["path"].startswith("/v1/aaa")),
             access.wait(lambda line: line["path"].startswith("/v1/models/"))]
    assert lines[0]["path"] == long[:PATH_MAX] + "..."
    assert lines[1]["path"] == "/v1/models/%2e%2e%00%0a%ff"  # as sent: percent-encoding kept
    # decoded paths (no raw_path) escape bytes and controls
    assert path_field({"path": "/x\n\x00\udcff\u00e9"}) == "/x\\x0a\\x00\\udcff\\xc3\\xa9"


def test_metrics_is_logged_and_probes_only_when_they_fail(proxy, access):
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/readyz").status_code == 200
    assert httpx.get(proxy.url + "/metrics").status_code == 200
    line = access.path("/metrics")
    assert_shape(line)
    assert line["status"] == 200
    assert not [line for line in access.lines() if line["path"] in ("/healthz", "/readyz")]

    async def down() -> None:
        raise OSError("store down")
    proxy.state.store.ping = down
    assert httpx.get(proxy.url + "/readyz").status_code == 503
    assert access.path("/readyz")["status"] == 503


def test_the_dashboard_login_is_logged_without_the_form(proxy, access):
    r = httpx.post(proxy.url + "/admin/login", data={"admin_key": ADMIN_KEY, "key": ADMIN_KEY})
    line = access.path("/admin/login")
    assert (line["method"], line["status"]) == ("POST", r.status_code)


# --- the OpenAI route --------------------------------------------------------------------------

def test_the_openai_route_logs_the_upstreams_x_request_id(start, sim, access):
    from tests.simulator.openai import OpenAISimulator
    from tests.simulator.openai import Reply as OReply
    import openai

    with OpenAISimulator() as osim:
        proxy = start(teams=teams(), upstreams={
            "anthropic": {"base_url": sim.url, "api_key": UPSTREAM_KEY},
            "openai": {"base_url": osim.url, "api_key": UPSTREAM_KEY}})
        osim.queue(OReply(text=COMPLETION, prompt_tokens=9, completion_tokens=4))
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=ALPHA_KEY, max_retries=0)
        raw = oai.chat.completions.with_raw_response.create(model="gpt-5-mini", messages=msg())
        line = access.path("/v1/chat/completions")
    assert_shape(line)
    assert line["upstream_request_id"] == raw.headers["x-request-id"]
    assert (line["status"], line["key"], line["outcome"], line["input_tokens"], line["output_tokens"]) == \
        (200, "alpha", "completed", 9, 4)


# --- setup_logging -----------------------------------------------------------------------------

def test_setup_logging_writes_the_access_log_to_the_stream_it_is_given(proxy, monkeypatch):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    uvicorn_off = logging.getLogger("uvicorn.access").disabled
    out = io.StringIO()
    monkeypatch.setattr(logs, "_access_sink", None)
    try:
        logs.setup_logging("json", "INFO", stream=out)
        assert httpx.get(proxy.url + "/budget", headers={"x-api-key": ALPHA_KEY}).status_code == 200
        log = AccessLog()
        log.out = out
        line = log.path("/budget")
        assert_shape(line)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("uvicorn.access").disabled = uvicorn_off
