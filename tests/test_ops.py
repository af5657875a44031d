"""Operations: admin API, `usage` CLI, /metrics, reload, graceful shutdown."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import anthropic
import httpx
import pytest
import yaml

from proxy.app import create_app
from proxy.config import load_config
from tests.conftest import ALPHA_KEY, BETA_KEY, GAMMA_KEY
from tests.harness import ProxyServer
from tests.simulator import Reply

ADMIN = "bp-admin-secret-key-9999"
MSG = [{"role": "user", "content": "hello"}]
ROOT = Path(__file__).resolve().parent.parent


def teams(alpha_tokens: int = 100_000) -> dict:
    return {
        "research": {"budget": {"tokens": 1_000_000, "period": "day"},
                     "keys": {"alpha": {"key": ALPHA_KEY, "budget": {"tokens": alpha_tokens, "steps": 50}},
                              "beta": {"key": BETA_KEY}}},
        "support": {"keys": {"gamma": {"key": GAMMA_KEY, "budget": {"cost_usd": 1}}}},
    }


def write_config(path: Path, sim_url: str, store: str, alpha_tokens: int = 100_000, **extra) -> Path:
    data = {"upstreams": {"anthropic": {"base_url": sim_url, "api_key": "sk-upstream-secret"}},
            "store": store, "admin_key": ADMIN, "teams": teams(alpha_tokens), **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def refuses_connections(url: str, attempts: int = 100) -> bool:
    for _ in range(attempts):
        try:
            httpx.get(url + "/healthz", timeout=1)
        except httpx.ConnectError:
            return True
        threading.Event().wait(0.05)
    return False


def client(proxy, key=ALPHA_KEY):
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0)


# --- admin API -------------------------------------------------------------------------------

@pytest.fixture
def admin_proxy(start):
    return start(teams=teams(), admin_key=ADMIN)


def test_admin_usage_shape_and_auth(admin_proxy, sim):
    sim.queue(Reply(input_tokens=10, output_tokens=5))
    client(admin_proxy).messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MSG)
    r = httpx.get(admin_proxy.url + "/admin/usage", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    doc = r.json()
    names = [t["name"] for t in doc["teams"]]
    assert names == ["research", "support"]
    research = doc["teams"][0]
    assert research["budget"]["used"]["tokens"] == 15 and research["budget"]["period"] == "day"
    alpha = next(k for k in research["keys"] if k["name"] == "alpha")
    assert alpha["budget"]["used"]["tokens"] == 15 and alpha["budget"]["limit"] == {"tokens": 100_000, "steps": 50}
    assert ALPHA_KEY not in r.text and ADMIN not in r.text
    # a proxy key is refused with 403, no key or a wrong one with 401
    assert httpx.get(admin_proxy.url + "/admin/usage", headers={"x-api-key": ALPHA_KEY}).status_code == 403
    assert httpx.get(admin_proxy.url + "/admin/usage").status_code == 401
    assert httpx.get(admin_proxy.url + "/admin/usage", headers={"x-api-key": "nope"}).status_code == 401


def test_admin_team_and_resets(admin_proxy, sim):
    sim.queue(Reply(input_tokens=10, output_tokens=5), Reply(input_tokens=7, output_tokens=3))
    client(admin_proxy).messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MSG)
    client(admin_proxy, BETA_KEY).messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MSG)
    h = {"x-api-key": ADMIN}
    team = httpx.get(admin_proxy.url + "/admin/teams/research", headers=h).json()
    assert team["budget"]["used"]["tokens"] == 25
    r = httpx.post(admin_proxy.url + "/admin/teams/research/keys/alpha/reset", headers=h)
    assert r.status_code == 200
    team = httpx.get(admin_proxy.url + "/admin/teams/research", headers=h).json()
    keys = {k["name"]: k["budget"]["used"]["tokens"] for k in team["keys"]}
    assert keys == {"alpha": 0, "beta": 10} and team["budget"]["used"]["tokens"] == 25
    assert httpx.post(admin_proxy.url + "/admin/teams/research/reset", headers=h).status_code == 200
    assert httpx.get(admin_proxy.url + "/admin/teams/research", headers=h).json()["budget"]["used"]["tokens"] == 0
    assert httpx.get(admin_proxy.url + "/admin/teams/nope", headers=h).status_code == 404
    assert httpx.post(admin_proxy.url + "/admin/teams/research/keys/nope/reset", headers=h).status_code == 404


def test_admin_disabled_without_admin_key(proxy):
    r = httpx.get(proxy.url + "/admin/usage", headers={"x-api-key": ALPHA_KEY})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_after_a_mixed_run(start, sim):
    proxy = start(teams=teams(alpha_tokens=200))
    sim.queue(Reply(input_tokens=10, output_tokens=5, cache_read=4))
    client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MSG)
    with pytest.raises(anthropic.RateLimitError):
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=20,
                                      messages=[{"role": "user", "content": "x" * 3000}])
    with pytest.raises(anthropic.AuthenticationError):
        client(proxy, "bp-wrong").messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MSG)
    sim.queue(Reply(input_tokens=3, output_tokens=2))
    client(proxy).messages.create(model="some-unknown-model-xyz", max_tokens=20, messages=MSG)
    text = httpx.get(proxy.url + "/metrics").text
    print("\n".join(line for line in text.splitlines() if line.startswith("budget_proxy_")
                    and not line.startswith("budget_proxy_upstream_seconds_bucket")))
    assert 'budget_proxy_requests_total{key="alpha",model="claude-haiku-4-5",outcome="completed",' \
           'route="/v1/messages",team="research"} 1.0' in text
    assert 'budget_proxy_tokens_total{key="alpha",kind="cache_read",model="claude-haiku-4-5",team="research"} 4.0' in text
    assert 'budget_proxy_denials_total{dimension="tokens",key="alpha",team="research"} 1.0' in text
    assert 'model="other"' in text and "some-unknown-model-xyz" not in text  # client input never a label
    assert 'budget_proxy_budget_remaining{dimension="tokens",name="research/alpha",scope="key"}' in text
    assert "budget_proxy_upstream_seconds_count" in text
    for secret in (ALPHA_KEY, "bp-wrong", "sk-upstream-secret"):
        assert secret not in text


# --- usage CLI ---------------------------------------------------------------------------------

def test_usage_cli_reads_the_store(tmp_path, sim):
    cfg = write_config(tmp_path / "proxy.yaml", sim.url, f"sqlite:///{tmp_path}/ledger.db")
    proxy = ProxyServer(create_app(load_config(cfg))).start()
    try:
        sim.queue(Reply(input_tokens=100, output_tokens=20))
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
    finally:
        proxy.stop()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "proxy", "usage", "--config", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["team", "key", "dimension", "used", "limit", "remaining", "resets"]
    assert any(l.split()[:6] == ["research", "alpha", "tokens", "120", "100000", "99880"] for l in lines)
    assert any(l.split()[:5] == ["research", "*", "tokens", "120", "1000000"] for l in lines)
    r = subprocess.run([sys.executable, "-m", "proxy", "usage", "--config", str(cfg), "--json"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["teams"][0]["budget"]["used"]["tokens"] == 120
    assert ALPHA_KEY not in r.stdout + r.stderr


# --- reload ----------------------------------------------------------------------------------

def test_reload_applies_new_budgets_and_keeps_used(tmp_path, sim):
    cfg = write_config(tmp_path / "proxy.yaml", sim.url, "memory://", alpha_tokens=100_000)
    proxy = ProxyServer(create_app(load_config(cfg))).start()
    try:
        sim.queue(Reply(input_tokens=100, output_tokens=20))
        client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
        # an invalid file is refused and the old config stays
        (tmp_path / "proxy.yaml").write_text("teams: {research: {keys: {alpha: {budget: {tokens: -5}}}}}")
        assert proxy.call(_reload(proxy, cfg)) is False
        assert client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
        # a new budget and a new key take effect; used survives
        write_config(cfg, sim.url, "memory://", alpha_tokens=150)
        data = yaml.safe_load(cfg.read_text())
        data["teams"]["support"]["keys"]["delta"] = {"key": "bp-new-key-delta-0004"}
        cfg.write_text(yaml.safe_dump(data))
        assert proxy.call(_reload(proxy, cfg)) is True
        budget = httpx.get(proxy.url + "/budget", headers={"x-api-key": ALPHA_KEY}).json()
        assert budget["scopes"][0]["limit"]["tokens"] == 150
        assert budget["scopes"][0]["used"]["tokens"] > 120
        with pytest.raises(anthropic.RateLimitError):
            client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSG)
        assert client(proxy, "bp-new-key-delta-0004").messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=MSG)
    finally:
        proxy.stop()


async def _reload(proxy, cfg):
    return proxy.state.reload(str(cfg))


def test_reload_lowering_a_limit_cuts_a_stream_in_flight(tmp_path, sim):
    cfg = write_config(tmp_path / "proxy.yaml", sim.url, "memory://", alpha_tokens=100_000)
    proxy = ProxyServer(create_app(load_config(cfg))).start()
    try:
        sim.queue(Reply(text="w " * 200, input_tokens=50, gate="reload", gate_after=5, event_delay=0.01))
        with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=1000, messages=MSG) as stream:
            it = iter(stream.text_stream)
            next(it)
            assert sim.wait_at_gate("reload")
            write_config(cfg, sim.url, "memory://", alpha_tokens=10)  # below what the stream has used
            assert proxy.call(_reload(proxy, cfg)) is True
            sim.open_gate("reload")
            with pytest.raises(anthropic.APIStatusError) as exc:
                for _ in it:
                    pass
        assert exc.value.type == "rate_limit_error" and "mid-stream" in str(exc.value)
        assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"
    finally:
        proxy.stop()


# --- graceful shutdown -----------------------------------------------------------------------

def test_shutdown_lets_a_stream_finish_then_charges_survive_restart(tmp_path, sim):
    cfg = write_config(tmp_path / "proxy.yaml", sim.url, f"sqlite:///{tmp_path}/ledger.db",
                       server={"shutdown_grace_seconds": 10})
    proxy = ProxyServer(create_app(load_config(cfg))).start()
    sim.queue(Reply(text="a b c d e f", input_tokens=40, output_tokens=12, gate="sd", gate_after=2))
    got: list[str] = []
    with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
        it = iter(stream.text_stream)
        got.append(next(it))
        assert sim.wait_at_gate("sd")
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()  # SIGTERM-equivalent: stop accepting, wait for in-flight requests
        assert refuses_connections(proxy.url)  # no longer accepting, while the stream is in flight
        sim.open_gate("sd")
        got.extend(it)
        final = stream.get_final_message()
    stopper.join(15)
    assert "".join(got) == "a b c d e f" and final.stop_reason == "end_turn"
    restarted = ProxyServer(create_app(load_config(cfg))).start()
    try:
        scopes = httpx.get(restarted.url + "/budget", headers={"x-api-key": ALPHA_KEY}).json()["scopes"]
        assert scopes[0]["used"]["tokens"] == 52 and scopes[0]["used"]["steps"] == 1
        assert all(v == 0 for v in scopes[0]["held"].values())
    finally:
        restarted.stop()


def test_shutdown_cuts_streams_still_running_after_the_grace_period(tmp_path, sim):
    cfg = write_config(tmp_path / "proxy.yaml", sim.url, f"sqlite:///{tmp_path}/ledger.db",
                       server={"shutdown_grace_seconds": 0.5})
    proxy = ProxyServer(create_app(load_config(cfg))).start()
    sim.queue(Reply(text="a b c d e f g h", input_tokens=40, gate="never", gate_after=2))
    with client(proxy).messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MSG) as stream:
        it = iter(stream.text_stream)
        first = next(it)
        assert sim.wait_at_gate("never")
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()
        with pytest.raises(anthropic.APIStatusError) as exc:
            for _ in it:
                pass
    stopper.join(15)
    assert exc.value.type == "api_error" and "shutting down" in str(exc.value)
    assert sim.wait_idle(5) and sim.streams[-1].outcome == "aborted"
    restarted = ProxyServer(create_app(load_config(cfg))).start()
    try:
        key = httpx.get(restarted.url + "/budget", headers={"x-api-key": ALPHA_KEY}).json()["scopes"][0]
        assert key["used"]["input_tokens"] == 40 and key["used"]["output_tokens"] >= len(first) // 3
        assert key["used"]["steps"] == 1 and all(v == 0 for v in key["held"].values())
    finally:
        restarted.stop()
        sim.open_gate("never")
