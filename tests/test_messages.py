"""/v1/messages and the unmetered routes through the real proxy under uvicorn, driven by the
official anthropic SDK against the project's simulator."""
from __future__ import annotations

import json
import re

import anthropic
import httpx
import pytest

from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.simulator import Reply

MSG = [{"role": "user", "content": "Say hello"}]


def client(proxy, key=ALPHA_KEY, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **kw)


def aclient(proxy, key=ALPHA_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)


def test_create_json_sync(proxy, sim):
    sim.queue(Reply(text="Hello there, friend.", input_tokens=31, output_tokens=7))
    msg = client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSG)
    assert msg.content[0].text == "Hello there, friend."
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (31, 7)
    assert msg._request_id.startswith("req_sim_")  # upstream request-id passes through


async def test_create_json_async(proxy, sim):
    sim.queue(Reply(text="Async hello."))
    msg = await aclient(proxy).messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSG)
    assert msg.content[0].text == "Async hello."


def test_stream_sync_helper(proxy, sim):
    sim.queue(Reply(text="one two three four five six seven eight", input_tokens=12,
                    cache_write_5m=3, cache_read=4, output_tokens=9))
    with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "one two three four five six seven eight"
    assert final.usage.output_tokens == 9 and final.usage.cache_read_input_tokens == 4


async def test_stream_async_create(proxy, sim):
    sim.queue(Reply(text="streamed async reply"))
    stream = await aclient(proxy).messages.create(model="claude-haiku-4-5", max_tokens=100, messages=MSG,
                                                  stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds


def test_stream_bytes_are_the_upstreams(proxy, sim):
    """Relayed bytes equal the simulator's own bytes for the same reply."""
    reply = Reply(text="exact bytes \u2028 with a line separator inside JSON", thinking="hmm, let me think")
    body = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": MSG, "stream": True}
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    sim.queue(reply)
    direct = httpx.post(sim.url + "/v1/messages", json=body, headers={**headers, "x-api-key": "k"}).content
    sim.queue(reply)
    via = httpx.post(proxy.url + "/v1/messages", json=body, headers={**headers, "x-api-key": ALPHA_KEY}).content
    norm = lambda b: re.sub(rb"msg_sim_\w+|req_sim_\w+", b"ID", b)  # noqa: E731  (ids differ per call)
    assert b"\xe2\x80\xa8" in via and via.count(b"event: ") > 10
    assert norm(via) == norm(direct)


def test_events_are_relayed_as_they_arrive(proxy, sim):
    """The client sees the first deltas while the upstream is still held at a gate."""
    sim.queue(Reply(text="a b c d e f g h", gate="mid", gate_after=2))
    with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
        it = iter(stream.text_stream)
        first = next(it) + next(it)
        assert sim.wait_at_gate("mid", 1)  # upstream is parked mid-stream, yet we already have text
        sim.open_gate("mid")
        rest = "".join(it)
    assert first + rest == "a b c d e f g h"


def test_upstream_sees_upstream_key_never_proxy_key(proxy, sim):
    client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    rec = sim.messages_requests()[-1]
    assert rec.headers["x-api-key"] == "sk-upstream-secret"
    assert "authorization" not in rec.headers
    assert ALPHA_KEY not in json.dumps(rec.headers) and ALPHA_KEY.encode() not in rec.body
    assert rec.headers["accept-encoding"] == "identity"
    assert rec.headers["anthropic-version"]


def test_x_api_key_style_and_query_string(proxy, sim):
    """SDK 1.x sends x-api-key and calls beta endpoints with ?beta=true."""
    r = httpx.post(proxy.url + "/v1/messages?beta=true",
                   json={"model": "claude-haiku-4-5", "max_tokens": 10, "messages": MSG},
                   headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01",
                            "anthropic-beta": "some-beta-2026", "accept-encoding": "gzip, deflate"})
    assert r.status_code == 200, r.text
    assert "content-encoding" not in r.headers
    rec = sim.messages_requests()[-1]
    assert rec.query == "beta=true" and rec.headers["anthropic-beta"] == "some-beta-2026"


def test_upstream_errors_pass_through_unchanged(proxy, sim):
    sim.queue(Reply(status=529, extra_headers={"retry-after": "7"}))
    with pytest.raises(anthropic.OverloadedError) as exc:
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert exc.value.response.headers["retry-after"] == "7"
    assert exc.value.request_id.startswith("req_sim_")


def test_count_tokens_and_models_are_forwarded(proxy, sim):
    sim.count_tokens_reply = 4242
    c = client(proxy)
    assert c.messages.count_tokens(model="claude-haiku-4-5", messages=MSG).input_tokens == 4242
    ids = [m.id for m in c.models.list()]
    assert ids and c.models.retrieve(ids[0]).id == ids[0]
    with pytest.raises(anthropic.NotFoundError):
        c.models.retrieve("no-such-model")
    paths = [r.path for r in sim.requests]
    assert "/v1/messages/count_tokens" in paths and "/v1/models" in paths


def test_upstream_drop_ends_the_stream_with_an_error_event_and_proxy_keeps_serving(proxy, sim):
    """Truncation is never silent (docs/http-api.md "Truncated streams"). The body still ends cleanly
    (no RemoteProtocolError), with an api_error event the SDK raises, after the text that did come."""
    sim.queue(Reply(text="a b c d e f g h", drop_after=3))
    got = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
            for piece in stream.text_stream:
                got.append(piece)
    assert err.value.type == "api_error" and err.value.status_code == 200
    assert err.value.body["error"]["details"] == {"error_code": "upstream_dropped"}
    assert got and "".join(got) != "a b c d e f g h"
    assert client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG).content


def test_client_disconnect_closes_the_upstream_stream(proxy, sim):
    sim.queue(Reply(text="a b c d e f g h i j k l", gate="hold", gate_after=2))
    with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
        it = iter(stream.text_stream)
        next(it)
        assert sim.wait_at_gate("hold", 1)
    # Leaving the context closed our connection; the proxy must close the upstream one while the
    # upstream is still parked at the gate (the simulator notices a closed connection at once).
    assert sim.wait_idle(5)
    assert sim.streams[-1].outcome == "aborted"
    sim.open_gate("hold")


def test_healthz_and_readyz(proxy):
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/readyz").json() == {"status": "ready"}


# --- every error row of docs/http-api.md "Errors" that does not depend on budgets ----------

def _raw(proxy, body, headers=None, path="/v1/messages"):
    h = {"anthropic-version": "2023-06-01", "content-type": "application/json", "x-api-key": ALPHA_KEY}
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    return httpx.post(proxy.url + path, content=body, headers=h)


def _shape(r, status, etype):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == etype and body["error"]["message"]
    assert body["request_id"] == r.headers["request-id"]
    return body


def test_401_missing_key(proxy):
    _shape(_raw(proxy, b"{}", {"x-api-key": None}), 401, "authentication_error")


def test_401_unknown_key_sdk(proxy):
    with pytest.raises(anthropic.AuthenticationError):
        client(proxy, key="bp-not-a-key").messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)


def test_401_two_different_keys(proxy):
    b = _shape(_raw(proxy, b"{}", {"authorization": f"Bearer {BETA_KEY}"}), 401, "authentication_error")
    assert ALPHA_KEY not in json.dumps(b) and BETA_KEY not in json.dumps(b)


def test_404_unknown_path(proxy):
    _shape(_raw(proxy, b"{}", path="/v1/nope"), 404, "not_found_error")


def test_413_body_too_large(start):
    proxy = start(limits={"max_body_bytes": 1024})
    body = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "x" * 4000}]}).encode()
    _shape(_raw(proxy, body), 413, "request_too_large")


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"max_tokens": 5, "messages": []}',
                                  b'{"model": "claude-haiku-4-5", "max_tokens": 0, "messages": []}',
                                  b'{"model": "claude-haiku-4-5", "max_tokens": "5", "messages": []}',
                                  b'{"model": "claude-haiku-4-5", "max_tokens": true, "messages": []}'])
def test_400_bad_bodies(proxy, sim, body):
    _shape(_raw(proxy, body), 400, "invalid_request_error")
    assert sim.messages_requests() == []


def test_403_model_not_allowed(proxy, sim):
    with pytest.raises(anthropic.PermissionDeniedError):
        client(proxy, key=GAMMA_KEY).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MSG)
    assert sim.messages_requests() == []
    assert client(proxy, key=GAMMA_KEY).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)


def test_order_of_checks_401_before_413_before_400(start):
    proxy = start(limits={"max_body_bytes": 64})
    _shape(_raw(proxy, b"x" * 100, {"x-api-key": "wrong"}), 401, "authentication_error")
    _shape(_raw(proxy, b"x" * 100), 413, "request_too_large")
    _shape(_raw(proxy, b"x" * 10), 400, "invalid_request_error")


def test_502_upstream_unreachable(start):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proxy = start(upstream_url=f"http://127.0.0.1:{port}")
    with pytest.raises(anthropic.InternalServerError) as exc:
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert exc.value.status_code == 502 and exc.value.type == "api_error"


def test_504_upstream_timeout(start, sim):
    proxy = start(timeout_seconds=0.3)
    sim.queue(Reply(gate="never"))
    with pytest.raises(anthropic.APIStatusError) as exc:
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    assert exc.value.status_code == 504 and exc.value.type == "api_error"
    sim.open_gate("never")
