"""The provider registry: a third provider, defined here and registered by this test only, is
served by the real proxy under uvicorn with no change to the relay or the app.

`compat` is an Anthropic-compatible upstream under another name: clients POST to
/compat/v1/messages, the proxy forwards to its base URL + /v1/messages with the key as
`Authorization: Bearer`, and the proxy's own errors come back in a shape of its own (a flat
`error.kind`, and the request id as `x-compat-request-id`), so that a test can tell them apart
from Anthropic's."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import pytest

from proxy.config import ConfigError, parse_config
from proxy.errors import ProxyError
from proxy.providers import PassRoute, Rendered, fixed_path, model_path, rendered
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.registry import DEFAULT, PROVIDERS, provider_for_path, register, unregister
from tests.conftest import ALPHA_KEY
from tests.simulator import Reply

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
COMPAT_KEY = "sk-compat-upstream-secret"
VERSION = {"anthropic-version": "2023-06-01"}


class CompatAdapter(AnthropicAdapter):
    """Anthropic's request, usage and stream handling; its own name, routes, auth and errors."""

    name = "compat"
    path = "/compat/v1/messages"
    upstream_path = "/v1/messages"
    route_prefix = "/compat/"
    default_base_url = "https://compat.invalid"
    count_tokens_path = "/v1/messages/count_tokens"
    passthrough_routes = (
        PassRoute("/compat/v1/models", "GET", fixed_path("/v1/models"), "/compat/v1/models"),
        PassRoute("/compat/v1/models/{model_id}", "GET", model_path("/compat/v1/models/", "/v1/models/"),
                  "/compat/v1/models/{id}"),
    )

    @staticmethod
    def upstream_auth(api_key: str) -> tuple[str, str]:
        return ("authorization", f"Bearer {api_key}")

    @staticmethod
    def render_error(err: ProxyError, request_id: str) -> Rendered:
        body = {"error": {"kind": err.kind, "message": err.message}, **err.extra_body()}
        return rendered(err, body, b"x-compat-request-id", request_id)


@pytest.fixture
def compat() -> Iterator[CompatAdapter]:
    adapter = CompatAdapter()
    register(adapter)
    try:
        yield adapter
    finally:
        unregister(adapter.name)


def upstreams(sim_url: str, **extra: Any) -> dict[str, Any]:
    return {"anthropic": {"base_url": sim_url, "api_key": "sk-upstream-secret"},
            "compat": {"base_url": sim_url, "api_key": COMPAT_KEY, **extra}}


def one_key_team(budget: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"t": {"budget": budget or {}, "keys": {"k": {"key": ALPHA_KEY}}}}


def post(proxy, body: dict[str, Any], path: str = "/compat/v1/messages", key: str = ALPHA_KEY) -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, headers={**VERSION, "x-api-key": key}, timeout=10)


def message(**kw: Any) -> dict[str, Any]:
    return {"model": HAIKU, "max_tokens": 100, "messages": MSG, **kw}


def assert_compat_error(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    body = r.json()
    assert r.status_code == status and body["error"]["kind"] == kind, body
    assert r.headers["x-compat-request-id"].startswith("req_proxy_") and "request-id" not in r.headers
    return body


# --- the registry and the config ----------------------------------------------------------------

def test_an_upstream_needs_a_registered_provider():
    with pytest.raises(ConfigError) as exc:
        parse_config({"upstreams": {"compat": {}}}, {})
    assert exc.value.problems[0][0].startswith("upstreams.compat")


def test_a_registered_provider_is_a_valid_upstream_with_its_default_base_url(compat):
    ups = parse_config({"upstreams": {"compat": {"api_key": "x"}}}, {}).proxy.upstreams
    assert ups["compat"].base_url == "https://compat.invalid"
    assert ups[DEFAULT].base_url == "https://api.anthropic.com"  # the default provider is always there


def test_unknown_paths_answer_in_the_shape_of_the_provider_whose_prefix_they_start_with(compat):
    assert provider_for_path("/compat/v1/nope") is compat
    assert provider_for_path("/v1/chat/nope").name == "openai"
    assert provider_for_path("/v1/nope").name == provider_for_path("/nope").name == DEFAULT


def test_the_default_provider_cannot_be_removed():
    with pytest.raises(ValueError):
        unregister(DEFAULT)
    assert DEFAULT in PROVIDERS


def test_the_relay_and_the_app_name_no_provider():
    """No provider's name or route is written in the relay, the app or the pass-through."""
    for module in ("relay", "app", "passthrough", "headers", "asgi", "errors"):
        text = (Path(__file__).parent.parent / "proxy" / f"{module}.py").read_text()
        assert not re.search(r"""["'](anthropic|openai)["']|["']/v1/""", text), module


# --- the third provider through the real proxy ----------------------------------------------------

def test_a_call_is_forwarded_with_the_providers_auth_and_metered(compat, start, sim):
    proxy = start(teams=one_key_team({"tokens": 1000}), upstreams=upstreams(sim.url))
    sim.queue(Reply(text="Hello from compat.", input_tokens=31, output_tokens=7))
    r = post(proxy, message())
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "Hello from compat."
    rec = sim.messages_requests()[-1]
    assert rec.path == "/v1/messages"
    assert rec.headers["authorization"] == f"Bearer {COMPAT_KEY}" and "x-api-key" not in rec.headers
    assert proxy.scope_states("t", "k")[0].used.get("tokens") == 38
    row = proxy.call(proxy.state.store.usage_log())[0]
    assert (row.route, row.input_tokens, row.output_tokens, row.outcome) == ("/compat/v1/messages", 31, 7, "completed")


def test_a_stream_is_metered_through_the_sdk(compat, start, sim):
    proxy = start(teams=one_key_team({"tokens": 1000}), upstreams=upstreams(sim.url))
    sim.queue(Reply(text="one two three four", input_tokens=12, output_tokens=9))
    client = anthropic.Anthropic(base_url=proxy.url + "/compat", api_key=ALPHA_KEY, max_retries=0)
    with client.messages.stream(model=HAIKU, max_tokens=100, messages=MSG) as stream:
        text = "".join(stream.text_stream)
    assert text == "one two three four"
    assert proxy.scope_states("t", "k")[0].used.get("tokens") == 21


def test_a_budget_refusal_is_rendered_in_the_providers_shape_and_forwards_nothing(compat, start, sim):
    proxy = start(teams=one_key_team({"tokens": 5}), upstreams=upstreams(sim.url))
    r = post(proxy, message())
    body = assert_compat_error(r, 429, "rate_limit_error")
    assert body["budget"]["dimension"] == "tokens" and body["budget"]["limit"] == 5
    assert sim.messages_requests() == []


def test_proxy_errors_are_rendered_in_the_providers_shape(compat, start, sim):
    proxy = start(teams=one_key_team(), upstreams=upstreams(sim.url))
    assert_compat_error(post(proxy, message(), key="bp-not-a-key"), 401, "authentication_error")
    assert_compat_error(post(proxy, {"model": HAIKU, "messages": MSG}), 400, "invalid_request_error")
    assert_compat_error(post(proxy, message(), path="/compat/v1/nope"), 404, "not_found_error")
    anthropic_404 = post(proxy, message(), path="/v1/nope")
    assert anthropic_404.json()["type"] == "error" and "request-id" in anthropic_404.headers


def test_pass_through_routes_use_the_providers_paths_and_auth(compat, start, sim):
    proxy = start(teams=one_key_team(), upstreams=upstreams(sim.url))
    r = httpx.get(proxy.url + "/compat/v1/models/claude-haiku-4-5", headers={**VERSION, "x-api-key": ALPHA_KEY})
    assert r.status_code == 200 and r.json()["id"] == "claude-haiku-4-5"
    rec = sim.requests[-1]
    assert rec.path == "/v1/models/claude-haiku-4-5" and rec.headers["authorization"] == f"Bearer {COMPAT_KEY}"
    r = httpx.get(proxy.url + "/compat/v1/models/bad%20id", headers={**VERSION, "x-api-key": ALPHA_KEY})
    assert_compat_error(r, 404, "not_found_error")


def test_count_tokens_admission_asks_the_providers_counter(compat, start, sim):
    proxy = start(teams=one_key_team({"tokens": 1000}), upstreams=upstreams(sim.url),
                  admission={"input_estimate": "count_tokens"})
    sim.count_tokens_reply = 40
    sim.queue(Reply(text="counted", input_tokens=40, output_tokens=2))
    assert post(proxy, message()).status_code == 200
    counted = [r for r in sim.requests if r.path == "/v1/messages/count_tokens"]
    assert len(counted) == 1 and counted[0].headers["authorization"] == f"Bearer {COMPAT_KEY}"


def test_a_registered_provider_that_is_not_configured_has_no_routes(compat, start, sim):
    proxy = start(teams=one_key_team())  # (only the default upstream)
    assert_compat_error(post(proxy, message()), 404, "not_found_error")
    r = httpx.get(proxy.url + "/compat/v1/models", headers={**VERSION, "x-api-key": ALPHA_KEY})
    assert_compat_error(r, 404, "not_found_error")
    assert sim.requests == []
