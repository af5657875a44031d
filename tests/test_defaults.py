"""Safe defaults: out of the box the proxy listens on loopback only. `budget-proxy serve`
and `make run` bind 127.0.0.1 (HOST=/PORT= override); the image binds 0.0.0.0 inside its container,
and the compose files publish it on the host's 127.0.0.1 only."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy.__main__ as cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.replicas.yml")


def published_ports(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """(service, entry) for every `ports:` entry of every service (YAML merge keys resolved)."""
    return [(name, entry) for name, service in doc["services"].items() for entry in (service or {}).get("ports", [])]


def host_ip(entry: Any) -> str | None:
    """The host address a compose port entry binds: short "[IP:]HOST:CONTAINER[/proto]" or long form."""
    if isinstance(entry, dict):
        return entry.get("host_ip")
    text = str(entry)
    if text.startswith("["):  # "[::1]:8080:8080"
        return text[1:text.index("]")]
    parts = text.split("/")[0].split(":")
    return parts[0] if len(parts) == 3 else None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_parse_and_publish_on_loopback_only(name):
    doc = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(doc, dict) and doc["services"]
    ports = published_ports(doc)
    assert ports, f"{name} publishes no port"
    for service, entry in ports:
        assert isinstance(entry, (str, dict)), (service, entry)  # a bare number would bind every address
        assert host_ip(entry) == "127.0.0.1", (name, service, entry)


def test_replicas_compose_keeps_the_store_url_whole():
    doc = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    for name, service in doc["services"].items():
        store = (service.get("environment") or {}).get("BUDGET_PROXY_STORE")
        if store is not None:
            assert store == "redis://redis:6379/0?prefix=budget-proxy:", name


def test_replicas_compose_publishes_only_the_load_balancer():
    """The replicas are reached through the balancer (deploy/nginx.conf), never directly from the host."""
    doc = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    published = {service for service, _ in published_ports(doc)}
    assert published == {name for name, s in doc["services"].items() if str(s.get("image", "")).startswith("nginx:")}
    assert not published & {name for name, s in doc["services"].items() if "build" in s or name == "redis"}


def test_host_ip_reads_every_form():
    assert host_ip("127.0.0.1:8080:8080") == "127.0.0.1"
    assert host_ip("127.0.0.1:8080:8080/tcp") == "127.0.0.1"
    assert host_ip("8080:8080") is None and host_ip("8080") is None
    assert host_ip("[::1]:8080:8080") == "::1"
    assert host_ip({"target": 8080, "published": 8080, "host_ip": "127.0.0.1"}) == "127.0.0.1"


def test_makefile_run_defaults_to_loopback_8080():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1\s*$", makefile, re.M)
    assert re.search(r"^PORT \?= 8080\s*$", makefile, re.M)
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no run target"
    serve = [line for line in recipe[1].splitlines() if "budget-proxy serve" in line]
    assert len(serve) == 1 and "--host $(HOST)" in serve[0] and "--port $(PORT)" in serve[0]


def make_run_command(*overrides: str) -> str:
    r = subprocess.run(["make", "-n", "--no-print-directory", "run", *overrides], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})  # no HOST/PORT from the environment
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "budget-proxy serve" in line]
    assert len(lines) == 1, r.stdout
    return lines[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_as_make_expands_it():
    assert make_run_command().endswith("--host 127.0.0.1 --port 8080")
    assert make_run_command("HOST=0.0.0.0", "PORT=9000").endswith("--host 0.0.0.0 --port 9000")


def test_dockerfile_cmd_listens_on_every_interface_of_the_container():
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    assert lines, "no CMD"
    cmd = json.loads(lines[-1][len("CMD "):])  # exec form: the last CMD is the one that counts
    assert cmd[:2] == ["budget-proxy", "serve"]
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_serve_defaults_to_loopback(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    assert cli.main(["serve"]) == 0
    assert (seen[0].host, seen[0].port) == ("127.0.0.1", 8080)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert (seen[1].host, seen[1].port) == ("0.0.0.0", 9000)
