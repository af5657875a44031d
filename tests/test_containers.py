"""The container files, checked without a Docker engine: the Dockerfile's
COPY/ENV lines are read to build the image's file tree (.dockerignore applied), the compose files
and deploy/nginx.conf are parsed, the image's entry command runs on that tree in a clean
environment, and nginx (when installed) runs deploy/nginx.conf in front of two local backends.
The CMD's --host and the loopback-only ports are checked in tests/test_defaults.py; `pip install .`
in a clean venv in tests/test_install.py."""
from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from proxy.config import load_config
from tests.harness import free_port, stop_process, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "proxy.example.yaml"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.replicas.yml")
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


# --- reading the Dockerfile and .dockerignore ------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def exec_or_shell_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in dockerfile():
        if instr != "ENV":
            continue
        words = shlex.split(args)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, in Docker's syntax: `*` and `?` within one path
    segment, `**` any number of segments, a leading `!` re-includes."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        parts = posixpath.normpath(line.lstrip("!").strip().lstrip("/")).split("/")
        rx = ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "**":
                rx += ".*" if last else "(?:[^/]+/)*"
                continue
            rx += re.sub(r"\\\*|\\\?|\\\[(.*?)\\\]",
                         lambda m: "[^/]*" if m[0] == "\\*" else "[^/]" if m[0] == "\\?" else f"[{m[1]}]",
                         re.escape(part))
            rx += "" if last else "/"
        rules.append((negated, re.compile(rx + r"\Z")))
    return rules


def dockerignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `rel` out: the last rule matching it or a parent decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not negated
    return out


def image_files() -> dict[str, Path]:
    """Absolute path in the image -> the context file the Dockerfile's COPY lines put there."""
    rules = dockerignore_rules()
    files: dict[str, Path] = {}
    workdir = "/"
    for instr, args in dockerfile():
        if instr == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if instr not in ("COPY", "ADD"):
            continue
        words = exec_or_shell_words(args)
        if any(w.startswith("--from") for w in words):
            continue
        *sources, dest = [w for w in words if not w.startswith("--")]
        dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for src in sources:
            for path in sorted(ROOT.glob(src)):
                rel = path.relative_to(ROOT).as_posix()
                if dockerignored(rel, rules):
                    continue
                if path.is_dir():
                    for f in sorted(p for p in path.rglob("*") if p.is_file()):
                        inner = f.relative_to(path).as_posix()
                        if not dockerignored(f"{rel}/{inner}", rules):
                            files[posixpath.join(dest_abs, inner)] = f
                else:
                    files[posixpath.join(dest_abs, path.name) if into_dir else dest_abs] = path
    return files


def materialize(files: dict[str, Path], root: Path) -> Path:
    for image_path, src in files.items():
        target = root / image_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return root


def test_dockerignore_reader_follows_docker_syntax():
    rules = [(False, re.compile(r"data\Z"))]
    assert dockerignored("data/ledger.db", rules) and not dockerignored("proxy/data.py", rules)
    assert image_files()  # the Dockerfile has COPY lines this reader understands


# --- the image ---------------------------------------------------------------------------------


def test_dockerignore_keeps_out_venv_data_git_and_caches():
    lines = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", ".git"} <= lines
    rules = dockerignore_rules()
    for rel in (".venv/bin/python", "data/ledger.db", ".git/HEAD", "proxy/__pycache__/config.cpython-311.pyc",
                ".pytest_cache/v/x", ".hypothesis/examples/x", "bench/out/r.json", "tests/test_config.py",
                "build/lib/proxy/app.py", "budget_proxy.egg-info/PKG-INFO", "config/proxy.yaml"):
        assert dockerignored(rel, rules), rel
    for rel in ("pyproject.toml", "README.md", "proxy/__main__.py", "proxy/store/sqlite.py",
                "config/pricing.yaml", "config/proxy.example.yaml"):
        assert not dockerignored(rel, rules), rel


def test_image_contains_what_it_installs_and_runs_and_nothing_else():
    files = image_files()
    for needed in ("/app/pyproject.toml", "/app/README.md", "/app/proxy/__main__.py", "/app/proxy/config.py",
                   "/app/config/pricing.yaml"):
        assert needed in files, needed
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy").rglob("*.py")}
    assert package <= {f"{p.relative_to(ROOT).as_posix()}" for p in files.values()}
    for image_path in files:
        assert not re.search(r"/(\.venv|\.git|data|tests|__pycache__)/", image_path), image_path


def test_image_default_config_is_the_shipped_example():
    env, files = image_env(), image_files()
    config = env["BUDGET_PROXY_CONFIG"]
    # a file the image holds, at the path compose mounts a config over (docker-compose.yml)
    assert config == "/app/config/proxy.yaml"
    assert config in files, f"{config} is not put into the image by any COPY line"
    assert files[config].read_bytes() == EXAMPLE.read_bytes()
    assert env["BUDGET_PROXY_STORE"] == "sqlite:////data/ledger.db"
    volumes = [json.loads(a) if a.startswith("[") else a.split() for i, a in dockerfile() if i == "VOLUME"]
    assert any("/data" in v for v in volumes)


def test_image_default_config_needs_only_the_provider_key():
    """`docker run -e ANTHROPIC_API_KEY=... IMAGE`: the image's ENV and that one variable."""
    env = {**image_env(), "ANTHROPIC_API_KEY": "sk-ant-test-0001"}
    cfg = load_config(image_files()[env["BUDGET_PROXY_CONFIG"]], env=env).proxy
    assert cfg.store == "sqlite:////data/ledger.db"
    assert cfg.upstreams["anthropic"].api_key.get_secret_value() == "sk-ant-test-0001"
    assert cfg.teams


def run_in_image_tree(args: list[str], app: Path, env: dict[str, str], **kw: Any) -> Any:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=app, env=env, capture_output=True,
                          text=True, timeout=60, **kw)


def test_image_entry_command_serves_the_example_config(tmp_path):
    """The image's files (COPY lines, .dockerignore) in a directory standing for /, the entry
    command run from WORKDIR with only the provider key set: check-config, then serve."""
    image = materialize(image_files(), tmp_path / "image")
    app = image / "app"
    assert not (app / "tests").exists() and not (app / "data").exists()
    base_env = {"PATH": "/usr/bin:/bin", "ANTHROPIC_API_KEY": "sk-ant-test-0001"}

    check = run_in_image_tree(["check-config", "config/proxy.example.yaml"], app, base_env)
    assert check.returncode == 0, check.stderr
    assert "is valid" in check.stdout and "sk-ant-test-0001" not in check.stdout + check.stderr

    default_config = image / image_env()["BUDGET_PROXY_CONFIG"].lstrip("/")
    ledger = tmp_path / "volume" / "ledger.db"
    port = free_port()
    env = {**base_env, "BUDGET_PROXY_CONFIG": str(default_config), "BUDGET_PROXY_STORE": f"sqlite:///{ledger}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=app, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        healthy = wait_healthy(url, proc, timeout=30)
        assert healthy, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no /healthz in 30 s"
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200
        demo_key = "bp-demo-support-agent-000000000000"  # config/proxy.example.yaml
        assert httpx.get(url + "/budget", headers={"x-api-key": demo_key}, timeout=5).status_code == 200
        assert httpx.get(url + "/budget", headers={"x-api-key": "bp-not-a-key"}, timeout=5).status_code == 401
    finally:
        stop_process(proc, 30)
    assert ledger.exists()  # the store the image's ENV names, not a path relative to WORKDIR
    assert not (app / "data").exists()


# --- compose -------------------------------------------------------------------------------------


def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def proxy_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile."""
    return {name: s for name, s in doc["services"].items() if s.get("build") in (".", {"context": "."})}


def compose_seconds(value: str) -> float:
    """A compose duration: 40s, 1m30s, 1h, 500ms."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), value
    return sum(float(n) * units[u] for n, u in parts)


def mounted_config(service: dict[str, Any]) -> Path:
    """The host file a service reads its config from: the mount at its BUDGET_PROXY_CONFIG, else the
    image's default."""
    target = (service.get("environment") or {}).get("BUDGET_PROXY_CONFIG", image_env()["BUDGET_PROXY_CONFIG"])
    for volume in service.get("volumes", []):
        src, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            assert src.startswith("./"), volume
            return ROOT / src
    return image_files()[target]


def test_compose_seconds_reads_compose_durations():
    assert compose_seconds("40s") == 40 and compose_seconds("1m30s") == 90 and compose_seconds("500ms") == 0.5


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_proxy_service_mounts_an_existing_config_where_it_reads_it(name):
    services = proxy_services(compose(name))
    assert services, f"{name} runs no budget-proxy"
    for service_name, service in services.items():
        path = mounted_config(service)
        assert path.is_file(), (service_name, path)
        load_config(path, env={})  # valid with nothing set


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_stop_grace_period_outlasts_the_shutdown_grace(name):
    for service_name, service in proxy_services(compose(name)).items():
        grace = load_config(mounted_config(service), env={}).proxy.server.shutdown_grace_seconds
        assert "stop_grace_period" in service, f"{service_name}: docker's default is 10 s, below {grace} s"
        assert compose_seconds(service["stop_grace_period"]) > grace, service_name


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_the_open_file_limit_holds_every_upstream_connection_twice(name):
    """Two descriptors a stream: what the proxy's startup check asks of RLIMIT_NOFILE."""
    from proxy.app import descriptors_wanted

    for service_name, service in proxy_services(compose(name)).items():
        nofile = service.get("ulimits", {}).get("nofile", {})
        wanted = descriptors_wanted(load_config(mounted_config(service), env={}).proxy)
        assert min(nofile.get("soft", 0), nofile.get("hard", 0)) >= wanted, (service_name, nofile, wanted)


def test_replicas_redis_has_a_healthcheck_the_replicas_wait_on():
    doc = compose("docker-compose.replicas.yml")
    redis = doc["services"]["redis"]
    test = redis["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "redis-cli" in " ".join(test) and "ping" in " ".join(test)
    replicas = proxy_services(doc)
    assert len(replicas) == 2
    for name, service in replicas.items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["environment"]["BUDGET_PROXY_STORE"].startswith("redis://redis:6379/")


def load_balancer(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    lbs = [(n, s) for n, s in doc["services"].items() if str(s.get("image", "")).startswith(("nginx:", "haproxy:"))]
    assert len(lbs) == 1, "the replicas file runs one nginx or HAProxy load balancer"
    return lbs[0]


def test_replicas_load_balancer_fronts_both_replicas_with_its_config_mounted():
    doc = compose("docker-compose.replicas.yml")
    name, lb = load_balancer(doc)
    assert {"./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"} <= set(lb["volumes"])
    assert NGINX_CONF.is_file()
    # `server NAME:PORT resolve` needs nginx >= 1.27.3 (a recreated replica gets a new address)
    version = re.match(r"nginx:(\d+)\.(\d+)", lb["image"])
    assert version and (int(version[1]), int(version[2])) >= (1, 28), lb["image"]
    replicas = proxy_services(doc)
    assert set(lb["depends_on"]) == set(replicas)
    assert lb["ports"] and all("ports" not in s for s in replicas.values())  # only the balancer is reachable
    assert compose_seconds(lb["stop_grace_period"]) > 30 and lb.get("stop_signal") == "SIGQUIT"
    conf = NGINX_CONF.read_text()
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", conf, re.M)
    assert sorted(servers) == sorted((r, "8080") for r in replicas)
    assert re.search(r"^\s*listen\s+8080;", conf, re.M)
    assert any(str(p).endswith(":8080") for p in lb["ports"])


def nginx_directives(conf: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in conf.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([a-z_]+)\s+([^{]*?);$", line)
        if m:
            out.setdefault(m[1], []).append(m[2].strip())
    return out


def test_nginx_config_streams_unbuffered_and_keeps_the_client_keys():
    d = nginx_directives(NGINX_CONF.read_text())
    assert d["proxy_buffering"] == ["off"]
    assert d["proxy_request_buffering"] == ["off"]
    assert d["proxy_http_version"] == ["1.1"]
    assert 'Connection ""' in d["proxy_set_header"]  # keep-alive to the replicas
    assert compose_seconds(d["proxy_read_timeout"][0]) >= 600  # upstreams.*.timeout_seconds default
    assert d["client_max_body_size"] == ["0"]  # the proxy answers 413 itself (limits.max_body_bytes)
    assert "off" not in d.get("proxy_pass_request_headers", [])
    for header in d["proxy_set_header"]:
        assert header.split()[0].lower() not in ("authorization", "x-api-key"), header
    assert "gzip" not in d or d["gzip"] == ["off"]


# --- nginx itself, when installed ----------------------------------------------------------------


class Backend:
    """A replica stand-in: records each request's headers; /stream sends one SSE event, then
    waits for `gate` before the second."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.gate = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                backend.requests.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/stream":
                    body = json.dumps({"port": backend.port}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                time.sleep(0.3)  # the headers reach nginx on their own, the events after them
                for event in (b"event: one\ndata: {}\n\n", b"event: two\ndata: {}\n\n"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    backend.gate.wait(10)
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nginx_lb(tmp_path) -> Iterator[tuple[str, list[Backend]]]:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe is None:
        if os.environ.get("BUDGET_PROXY_REQUIRE_NGINX"):
            pytest.fail("nginx is required (BUDGET_PROXY_REQUIRE_NGINX) but not installed")
        pytest.skip("nginx is not installed (set BUDGET_PROXY_REQUIRE_NGINX to fail instead)")
    backends = [Backend(), Backend()]
    conf = NGINX_CONF.read_text()
    for i, b in enumerate(backends, 1):  # `resolve` needs Docker's DNS (and nginx >= 1.27.3)
        conf, n = re.subn(rf"budget-proxy-{i}:8080(\s+resolve)?", f"127.0.0.1:{b.port}", conf)
        assert n == 1
    port = free_port()
    conf, n = re.subn(r"listen\s+8080;", f"listen 127.0.0.1:{port};", conf)
    assert n == 1
    temp = "".join(f"    {kind}_temp_path {tmp_path / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([exe, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail("nginx exited: " + proc.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
            try:
                httpx.get(url + "/ready", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not listen in 15 s"
                time.sleep(0.05)
        for b in backends:
            b.requests.clear()
        yield url, backends
    finally:
        stop_process(proc, 10)
        for b in backends:
            b.close()


def test_nginx_balances_both_replicas_and_passes_the_client_keys(nginx_lb):
    url, backends = nginx_lb
    headers = {"authorization": "Bearer bp-lb-test-key-0001", "x-api-key": "bp-lb-test-key-0002"}
    ports = {httpx.get(url + "/budget", headers=headers, timeout=5).json()["port"] for _ in range(4)}
    assert ports == {b.port for b in backends}
    for b in backends:
        assert b.requests
        for seen in b.requests:
            assert seen["authorization"] == headers["authorization"]
            assert seen["x-api-key"] == headers["x-api-key"]


def test_nginx_passes_a_stream_event_by_event(nginx_lb):
    url, backends = nginx_lb
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
        with client.stream("POST", url + "/stream", json={"stream": True}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            first = next(chunks)  # arrives while the backend still holds the second event back
            assert first.startswith(b"event: one")
            for b in backends:
                b.gate.set()
            rest = b"".join(chunks)
    assert (first + rest).endswith(b"event: two\ndata: {}\n\n")
