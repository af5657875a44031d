"""The Dockerfile's install and start commands, run in a clean venv: `pip install .` (not
editable), then `budget-proxy serve` from another directory. No Docker engine runs here, so
this is what shows the image's contents are enough."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import anthropic
import httpx
import pytest
import yaml

from tests.harness import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    # A venv without pip of its own (ensurepip and a second pip's start-up were half the setup's CPU);
    # this venv's pip installs into it (`pip --python`): the same `pip install .` (isolated build,
    # dependency resolution) into an interpreter that sees only the package and its declared
    # dependencies. --no-compile: the processes below compile what they import, not every module.
    env_dir = tmp_path_factory.mktemp("clean") / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                        "--no-compile", "--no-input", str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return env_dir


def test_dockerfile_commands_use_only_what_is_installed(installed, tmp_path, sim):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    assert '"budget-proxy", "serve"' in dockerfile
    # The image copies pyproject, README, proxy/ and config/ only; run away from the checkout.
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({
        "upstreams": {"anthropic": {"base_url": sim.url, "api_key": "sk-upstream"}},
        "store": "sqlite:///" + str(tmp_path / "ledger.db"),  # an absolute path: four slashes
        "teams": {"t": {"budget": {"cost_usd": 1}, "keys": {"k": {"key": "bp-install-test-key"}}}},
    }))
    exe = str(installed / "bin" / "budget-proxy")
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    check = subprocess.run([exe, "check-config", str(cfg)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, proc), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
        # the shipped pricing table came with the package: a cost budget prices the call
        msg = anthropic.Anthropic(base_url=url, api_key="bp-install-test-key", max_retries=0).messages.create(
            model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        assert msg.content
        used = httpx.get(url + "/budget", headers={"x-api-key": "bp-install-test-key"}).json()
        assert used["scopes"][1]["used"]["cost_usd"] > 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert not os.path.exists(tmp_path / "config")  # nothing was read from a checkout-relative path
