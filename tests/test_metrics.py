"""The metrics (docs/http-api.md "Metrics") through the real proxy: the budget gauges (used, limit, held) per config
scope, streams in flight, store errors where the relay and the app catch them, and alert
deliveries; labels stay bounded (runtime keys share key="(runtime)", runs are never a label)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth import Caller
from proxy.errors import StoreUnavailable
from proxy.ledger import Limits, Scope
from proxy.metrics import RUNTIME_KEY, key_label
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.simulator import Reply

MODEL = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Say hello"}]
ADMIN_KEY = "bp-admin-secret-key-0009"


def teams() -> dict[str, Any]:
    return {"research": {"budget": {"steps": 10, "period": "month"},
                         "keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": 1000, "cost_usd": 1,
                                                                          "period": "day"}},
                                  "beta": {"key": BETA_KEY}}},
            "support": {"keys": {"gamma": {"key": GAMMA_KEY, "models": ["claude-haiku-*"]}}}}


def samples(proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(proxy.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, metric: str, **labels: str) -> float | None:
    return found.get((metric, tuple(sorted(labels.items()))))


def gauge(found: dict, name: str, scope: str, team: str, key: str, dimension: str) -> float | None:
    return value(found, f"budget_proxy_budget_{name}", scope=scope, team=team, key=key, dimension=dimension)


def client(proxy, key: str = ALPHA_KEY, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, default_headers=headers)


def until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# --- the budget gauges -------------------------------------------------------------------------

def test_used_limit_and_held_after_known_traffic(start, sim):
    proxy = start(teams=teams())
    sim.queue(Reply(input_tokens=12, output_tokens=7))
    client(proxy, **{"x-budget-run": "run-77"}).messages.create(model=MODEL, max_tokens=20, messages=MSG)
    found = samples(proxy)
    key = ("key", "research", "alpha")
    team = ("team", "research", "")
    assert gauge(found, "used", *key, "tokens") == 19
    assert gauge(found, "used", *key, "input_tokens") == 12
    assert gauge(found, "used", *key, "output_tokens") == 7
    assert gauge(found, "used", *key, "steps") == 1
    assert gauge(found, "used", *key, "cost_usd") == pytest.approx((12 * 1.0 + 7 * 5.0) / 1e6)  # USD
    assert gauge(found, "used", *team, "steps") == 1 and gauge(found, "used", *team, "tokens") == 19
    assert gauge(found, "used", *key, "wall_clock") is not None
    # limits: only those configured, in their units
    assert gauge(found, "limit", *key, "tokens") == 1000 and gauge(found, "limit", *key, "cost_usd") == 1
    assert gauge(found, "limit", *team, "steps") == 10
    assert gauge(found, "limit", *key, "steps") is None and gauge(found, "limit", *team, "tokens") is None
    assert gauge(found, "limit", "key", "research", "beta", "tokens") is None
    # nothing is held once the call has settled
    assert all(gauge(found, "held", *s, d) == 0 for s in (key, team)
               for d in ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps"))
    # every config key and team has its series, the ones without traffic at 0
    assert gauge(found, "used", "key", "support", "gamma", "tokens") == 0
    assert gauge(found, "used", "team", "support", "", "tokens") == 0
    # remaining stays as it was: limit - used - held
    assert value(found, "budget_proxy_budget_remaining", scope="key", name="research/alpha",
                 dimension="tokens") == 1000 - 19
    # runs are never a label
    assert not any("run" in dict(labels) or "run-77" in str(labels) for _, labels in found)


def test_held_and_streams_in_flight_while_a_stream_runs(start, sim):
    proxy = start(teams=teams())
    sim.queue(Reply(chunks=["abcdefghijk "] * 6, input_tokens=10, gate="parked", gate_after=2))
    assert value(samples(proxy), "budget_proxy_streams_in_flight") == 0
    done = threading.Event()

    def stream() -> None:
        with client(proxy).messages.stream(model=MODEL, max_tokens=100, messages=MSG) as s:
            for _ in s.text_stream:
                pass
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert until(lambda: value(samples(proxy), "budget_proxy_streams_in_flight") == 1)
        found = samples(proxy)
        held = gauge(found, "held", "key", "research", "alpha", "tokens")
        assert held is not None and held > 0  # the output hold
        assert gauge(found, "held", "team", "research", "", "steps") + gauge(found, "used", "team", "research", "", "steps") == 1
    finally:
        sim.open_gate("parked")
        t.join(10)
    assert done.is_set()
    found = samples(proxy)
    assert value(found, "budget_proxy_streams_in_flight") == 0
    assert gauge(found, "held", "key", "research", "alpha", "tokens") == 0
    assert gauge(found, "used", "key", "research", "alpha", "steps") == 1


def test_a_reload_drops_the_series_of_a_removed_key(start, sim, tmp_path):
    import yaml

    proxy = start(teams=teams())
    assert gauge(samples(proxy), "used", "key", "research", "beta", "tokens") == 0
    smaller = teams()
    del smaller["research"]["keys"]["beta"]
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({"upstreams": {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream-secret"}},
                                   "store": "memory://", "teams": smaller}))
    assert proxy.state.reload(str(cfg))
    found = samples(proxy)
    assert gauge(found, "used", "key", "research", "beta", "tokens") is None
    assert gauge(found, "used", "key", "research", "alpha", "tokens") == 0


# --- store errors ------------------------------------------------------------------------------

def store_errors(proxy) -> float | None:
    return value(samples(proxy), "budget_proxy_store_errors_total")


def test_store_errors_are_counted_where_they_are_caught(start, sim):
    proxy = start(teams=teams(), admin_key=ADMIN_KEY)
    store = proxy.state.store
    assert store_errors(proxy) == 0

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("store down")

    # a reserve that fails: 503, nothing forwarded
    reserve, store.reserve = store.reserve, broken
    with pytest.raises(anthropic.InternalServerError) as exc:
        client(proxy).messages.create(model=MODEL, max_tokens=20, messages=MSG)
    assert exc.value.status_code == 503
    assert store_errors(proxy) == 1
    store.reserve = reserve

    # a settlement that cannot be persisted: the client still gets its answer
    settle, store.settle = store.settle, broken
    sim.queue(Reply(input_tokens=5, output_tokens=3))
    client(proxy).messages.create(model=MODEL, max_tokens=20, messages=MSG)
    assert until(lambda: store_errors(proxy) == 2)
    store.settle = settle

    # /budget, /admin and /metrics reading the states
    states, store.states = store.states, broken
    assert httpx.get(proxy.url + "/budget", headers={"x-api-key": ALPHA_KEY}).status_code == 503
    assert httpx.get(proxy.url + "/admin/usage", headers={"x-api-key": ADMIN_KEY}).status_code == 503
    found = samples(proxy)  # this scrape's own failure counts too, and the gauges keep their values
    assert value(found, "budget_proxy_store_errors_total") == 5
    assert gauge(found, "limit", "key", "research", "alpha", "tokens") == 1000
    store.states = states
    assert store_errors(proxy) == 5


def test_a_store_lost_mid_stream_is_counted(start, sim):
    proxy = start(teams=teams(), admission={"clamp_max_tokens": False})
    store = proxy.state.store

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("gone")

    store.charge = unavailable  # the first push (the stream runs past its hold) fails
    sim.queue(Reply(chunks=["abcdefghijk "] * 400, input_tokens=10))
    with pytest.raises(anthropic.APIStatusError):
        with client(proxy).messages.stream(model=MODEL, max_tokens=10_000, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    [row] = proxy.call(store.usage_log(10))
    assert row.outcome == "store_unavailable"
    assert store_errors(proxy) == 1


# --- alerts ------------------------------------------------------------------------------------

def test_alerts_are_declared_and_counted_with_bounded_labels(proxy):
    found = samples(proxy)
    for t in ("budget.threshold", "budget.exceeded"):
        for o in ("sent", "failed", "dropped"):
            assert value(found, "budget_proxy_alerts_total", type=t, outcome=o) == 0
    proxy.state.metrics.alert_sent("budget.threshold", "sent")
    proxy.state.observe_alert("budget.exceeded", "failed")
    proxy.state.observe_alert("budget.exceeded", "failed")
    proxy.state.metrics.alert_sent("made.up", "whatever")
    found = samples(proxy)
    assert value(found, "budget_proxy_alerts_total", type="budget.threshold", outcome="sent") == 1
    assert value(found, "budget_proxy_alerts_total", type="budget.exceeded", outcome="failed") == 2
    assert value(found, "budget_proxy_alerts_total", type="other", outcome="other") == 1


# --- runtime keys share one label --------------------------------------------------------------

def test_runtime_keys_share_the_runtime_key_label():
    scope = Scope("key", "minted-7", "key:research/minted-7", Limits(tokens=10), "day")
    assert key_label(Caller("research", "minted-7", None, scope=scope)) == RUNTIME_KEY
    assert key_label(Caller("research", "alpha", None)) == "alpha"


def test_runtime_keys_through_the_proxy(start, sim):
    proxy = start(teams=teams(), admin_key=ADMIN_KEY)
    r = httpx.post(proxy.url + "/admin/keys", headers={"x-api-key": ADMIN_KEY},
                   json={"team": "research", "name": "minted-1", "budget": {"tokens": 5000}})
    if r.status_code != 201:
        pytest.skip(f"runtime keys are not available here ({r.status_code})")
    secret = r.json()["key"]
    sim.queue(Reply(input_tokens=4, output_tokens=2))
    client(proxy, secret).messages.create(model=MODEL, max_tokens=20, messages=MSG)
    with pytest.raises(anthropic.RateLimitError):  # (the 5000 tokens cannot cover this one)
        client(proxy, secret).messages.create(model=MODEL, max_tokens=20,
                                              messages=[{"role": "user", "content": "x " * 20000}])
    found = samples(proxy)
    assert value(found, "budget_proxy_requests_total", team="research", key=RUNTIME_KEY, model=MODEL,
                 route="/v1/messages", outcome="completed") == 1
    assert value(found, "budget_proxy_tokens_total", team="research", key=RUNTIME_KEY, model=MODEL,
                 kind="output") == 2
    assert value(found, "budget_proxy_denials_total", team="research", key=RUNTIME_KEY, dimension="tokens") == 1
    assert not any("minted-1" in str(labels) for _, labels in found)  # nor a budget gauge of its own
