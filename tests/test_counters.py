"""proxy/counters.py against prometheus_client's own Counter and Histogram: fed the same
requests and observations, the exposition is the same text (creation times aside), so replacing
the library's children on the request path changed nothing a scraper sees."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import UPSTREAM_SECONDS_BUCKETS, Metrics
from proxy.usage import Usage

TOKEN_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")
labels = st.tuples(st.sampled_from(("research", "support")), st.sampled_from(("alpha", "(runtime)")),
                   st.sampled_from(("claude-haiku-4-5", "other")), st.sampled_from(("/v1/messages", "/v1/chat/completions")),
                   st.sampled_from(("completed", "cut", "denied", "upstream_5xx")))
tokens = st.integers(min_value=0, max_value=10**9)
settlement = st.tuples(labels, st.booleans(), st.tuples(*(tokens,) * 5), st.integers(min_value=0, max_value=10**13))
# the bounds themselves, either side of them, and anything else
seconds = st.one_of(st.sampled_from(UPSTREAM_SECONDS_BUCKETS),
                    st.floats(min_value=0, max_value=1e4, allow_nan=False))


def without_created(text: bytes) -> list[str]:
    return sorted(line for line in text.decode().splitlines() if "_created" not in line)


def families(text: bytes, *names: str) -> list[str]:
    return [line for line in without_created(text) if any(n in line for n in names)]


@settings(max_examples=200, deadline=None)
@given(st.lists(settlement, max_size=30))
def test_requests_tokens_and_cost_read_as_prometheus_client_counters_would(events: list) -> None:
    ours = Metrics()
    ref = CollectorRegistry()
    requests = Counter("budget_proxy_requests", "Requests by outcome", ["team", "key", "model", "route", "outcome"],
                       registry=ref)
    tokens_c = Counter("budget_proxy_tokens", "Tokens charged", ["team", "key", "model", "kind"], registry=ref)
    cost_c = Counter("budget_proxy_cost_usd", "Money charged (USD)", ["team", "key", "model"], registry=ref)
    for (team, key, model, route, outcome), refused, counts, cost_nanos in events:
        requests.labels(team, key, model, route, outcome).inc()
        if refused:
            ours.refused(team, key, model, route, outcome)
            continue
        ours.settled(team, key, model, route, outcome, Usage(*counts), cost_nanos)
        for kind, n in zip(TOKEN_KINDS, counts):
            if n:
                tokens_c.labels(team, key, model, kind).inc(n)
        if cost_nanos:
            cost_c.labels(team, key, model).inc(cost_nanos / 1e9)
    names = ("budget_proxy_requests", "budget_proxy_tokens", "budget_proxy_cost_usd")
    got, want = families(ours.exposition(), *names), families(generate_latest(ref), *names)
    assert [l for l in got if l.startswith("#")] == [l for l in want if l.startswith("#")]  # HELP, TYPE
    got, want = [l.rsplit(" ", 1) for l in got if l[0] != "#"], [l.rsplit(" ", 1) for l in want if l[0] != "#"]
    assert [series for series, _ in got] == [series for series, _ in want]
    # cost: the reference adds floats one by one, ours sums exact nanodollars and divides once
    for (_, g), (_, w) in zip(got, want):
        assert abs(float(g) - float(w)) <= 1e-9 * max(1.0, float(w))
    if any(not refused and sum(counts) for _, refused, counts, _ in events):
        assert any("budget_proxy_tokens_total" in series for series, _ in got)


def test_cost_is_summed_exactly_before_it_is_turned_into_dollars() -> None:
    m = Metrics()
    for _ in range(10):  # 0.1 + 0.1 + ... in floats is 0.9999999999999999
        m.settled("t", "k", "other", "/v1/messages", "completed", Usage(1, 0, 0, 0, 0), 100_000_000)
    assert 'budget_proxy_cost_usd_total{key="k",model="other",team="t"} 1.0' in m.exposition().decode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("/v1/messages", "/v1/chat/completions")), seconds), max_size=40))
def test_upstream_seconds_buckets_read_as_a_prometheus_client_histogram_would(observed: list) -> None:
    ours = Metrics()
    ref = CollectorRegistry()
    hist = Histogram("budget_proxy_upstream_seconds", "Time from forwarding to the end of the upstream response",
                     ["route"], registry=ref, buckets=UPSTREAM_SECONDS_BUCKETS)
    for route, s in observed:
        ours.observe_upstream_seconds(route, s)
        hist.labels(route).observe(s)
    name = "budget_proxy_upstream_seconds"
    assert families(ours.exposition(), name) == families(generate_latest(ref), name)
    created = [line for line in ours.exposition().decode().splitlines() if line.startswith(name + "_created")]
    assert len(created) == len({route for route, _ in observed})
