"""The CLI as a user runs it: `python -m proxy ...` in a subprocess."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "config/proxy.example.yaml"
DEMO_SECRETS = (
    "bp-demo-research-ci-bot-0000000000",
    "bp-demo-research-notebook-00000000",
    "bp-demo-support-agent-000000000000",
)
SECRET = "sk-cli-secret-5e1d9a7b3c2f80461122"
OTHER_SECRET = "sk-cli-secret-other-9a8b7c6d5e4f"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env={**base_env, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for command in ("serve", "check-config", "usage", "hash-key", "keygen"):
        assert command in r.stdout


def test_usage_command_exists() -> None:
    r = run("usage", "--help")
    assert r.returncode == 0, r.stderr


def test_check_config_example_valid() -> None:
    r = run("check-config", EXAMPLE)
    assert r.returncode == 0, r.stderr
    for name in ("research", "support", "ci-bot", "notebook", "agent"):
        assert name in r.stdout
    assert "2 teams" in r.stdout and "3 keys" in r.stdout
    out = r.stdout + r.stderr
    for s in DEMO_SECRETS:
        assert s not in out


def test_check_config_example_with_secrets_from_environment_prints_none() -> None:
    env = {"RESEARCH_CI_KEY": SECRET, "BUDGET_PROXY_ADMIN_KEY": OTHER_SECRET, "ANTHROPIC_API_KEY": "sk-ant-upstream-xyz"}
    r = run("check-config", EXAMPLE, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for s in (SECRET, OTHER_SECRET, "sk-ant-upstream-xyz"):
        assert s not in out


INVALID = f"""\
store: postgres://nope
teams:
  research:
    budget: {{period: daily}}
    keys:
      ci-bot:
        key: {SECRET}
        budget: {{tokens: -5, wall_clock: 2 fortnights, tokenz: 1}}
      notebook:
        key: {OTHER_SECRET}
        key_sha256: "sha256:{hashlib.sha256(OTHER_SECRET.encode()).hexdigest()}"
      agent:
        budget: {{steps: "{SECRET}"}}
        key: {OTHER_SECRET}x
"""
INVALID_PATHS = [
    "store",
    "teams.research.budget.period",
    "teams.research.keys.ci-bot.budget.tokens",
    "teams.research.keys.ci-bot.budget.wall_clock",
    "teams.research.keys.ci-bot.budget.tokenz",
    "teams.research.keys.notebook",
    "teams.research.keys.agent.budget.steps",
]


def test_check_config_invalid_lists_every_problem_without_secrets(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(INVALID)
    r = run("check-config", str(f))
    assert r.returncode == 2
    problem_lines = [line.strip() for line in r.stderr.splitlines() if line.startswith("  ")]
    assert sorted(line.split(":", 1)[0] for line in problem_lines) == sorted(INVALID_PATHS), r.stderr
    out = r.stdout + r.stderr
    assert SECRET not in out and OTHER_SECRET not in out


def test_check_config_missing_variable_exits_2_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "vars.yaml"
    f.write_text("teams:\n  research:\n    keys:\n      ci-bot:\n        key: ${CLI_TEST_UNSET_KEY}\n")
    r = run("check-config", str(f))
    assert r.returncode == 2
    assert "teams.research.keys.ci-bot.key" in r.stderr and "CLI_TEST_UNSET_KEY" in r.stderr


def test_check_config_not_yaml_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(f"teams: {{research: [{SECRET}\n")
    r = run("check-config", str(f))
    assert r.returncode == 2
    assert "YAML" in r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_hash_key() -> None:
    r = run("hash-key", "abc")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert r.stdout.strip() == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_hash_key_output_is_accepted_as_key_sha256(tmp_path: Path) -> None:
    digest = "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()  # what hash-key prints (test above)
    f = tmp_path / "ok.yaml"
    f.write_text(f"store: memory://\nteams:\n  t:\n    keys:\n      k:\n        key_sha256: \"{digest}\"\n")
    r = run("check-config", str(f))
    assert r.returncode == 0, r.stderr


def test_keygen_format_and_uniqueness() -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "proxy", "keygen"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)})
             for _ in range(2)]
    keys = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for k in keys:
        assert re.fullmatch(r"bp-[A-Za-z0-9_-]{32}", k), k
    assert keys[0] != keys[1]
