"""Managed Redis: an ACL user with a password, TLS with a private CA, Sentinel failover.

Every case runs its own redis-server processes on free ports (bounded startup polls; teardown
kills them), never the shared 127.0.0.1:6379. Without a redis-server binary (or one built without
TLS) the cases skip, unless BUDGET_PROXY_REQUIRE_REDIS is set (CI), when they fail.

- a wrong password: the proxy serves, /readyz 503, metered requests 503, and the password appears
  in no log line, traceback or response; the right one: ready, requests charged in that Redis.
- a store down at startup: /readyz 503 until it comes up, then ready without a restart.
- rediss:// with ssl_ca_certs (self-signed CA made with the openssl CLI) and an ACL user; a client
  that does not trust the server's CA is not ready.
- redis+sentinel://: one primary, one replica, one sentinel; charges, SENTINEL FAILOVER, the store
  follows the new primary (bounded poll), and later charges land there. Prints a transcript.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import redis

from tests.conftest import ALPHA_KEY
from tests.harness import ProxyServer, ended_after, free_port

PASSWORD = "Pw-s3cret-7f1c2e9a-ZZ"
USER = "budget"
MSG = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
TEAMS = {"research": {"budget": {"tokens": 10_000_000, "period": "day"}, "keys": {"alpha": {"key": ALPHA_KEY}}}}


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("BUDGET_PROXY_REQUIRE_REDIS"):
            pytest.fail(f"{why} (required: BUDGET_PROXY_REQUIRE_REDIS)")
        pytest.skip(why)


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 (polling)
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class RedisProc:
    """One redis-server (or sentinel) on a free port, killed at teardown."""

    def __init__(self, tmp: Path, name: str, *args: str, port: int | None = None, conf: str | None = None,
                 tls: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.tls = tls
        self.log = self.dir / "server.log"
        if conf is not None:
            path = self.dir / "redis.conf"
            path.write_text(conf.replace("{port}", str(self.port)))
            argv = ["redis-server", str(path), *args]
        elif tls is not None:
            argv = ["redis-server", "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", tls["cert"],
                    "--tls-key-file", tls["key"], "--tls-ca-cert-file", tls["ca"], "--tls-auth-clients", "no", *args]
        else:
            argv = ["redis-server", "--port", str(self.port), *args]
        argv += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--logfile", str(self.log)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def client(self, **kw: Any) -> redis.Redis:
        if self.tls is not None:
            kw.update(ssl=True, ssl_ca_certs=self.tls["ca"])
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1,
                           decode_responses=True, **kw)

    def wait_up(self, timeout: float = 10.0, **kw: Any) -> RedisProc:
        def up() -> bool:
            assert self.proc.poll() is None, f"redis-server exited: {self.log.read_text()[-2000:]}"
            with self.client(**kw) as c:
                return bool(c.ping())
        wait_for(up, timeout, f"redis on port {self.port}")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisProc]]:
    _need(shutil.which("redis-server") is not None, "redis-server is not installed")

    def make(name: str, *args: str, **kw: Any) -> RedisProc:
        return RedisProc(tmp_path, name, *args, **kw)

    yield from ended_after(make, RedisProc.kill)


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record, whatever its logger, level DEBUG and up."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, root = Keep(logging.DEBUG), logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    loggers = [logging.getLogger(n) for n in ("budget_proxy", "budget_proxy.store")]
    extra = [lg for lg in loggers if not lg.propagate]
    for lg in extra:
        lg.addHandler(handler)
    yield records
    root.removeHandler(handler)
    root.setLevel(old)
    for lg in extra:
        lg.removeHandler(handler)


def _text(records: list[logging.LogRecord]) -> str:
    out = []
    for r in records:
        out.append(r.getMessage())
        out.append(repr(getattr(r, "fields", "")))
        if r.exc_info and r.exc_info[1] is not None:
            out.append("".join(traceback.format_exception(r.exc_info[1])))
    return "\n".join(out)


def acl_user(server: RedisProc) -> None:
    with server.client() as c:
        c.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
        c.execute_command("ACL", "SETUSER", "default", "off")  # only the ACL user gets in


def metered(proxy: ProxyServer) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/messages", json=MSG, timeout=10,
                      headers={"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01"})


def readyz(proxy: ProxyServer) -> int:
    return httpx.get(proxy.url + "/readyz", timeout=5).status_code


def used_tokens(proxy: ProxyServer) -> int:
    return proxy.scope_states("research")[0].used.tokens


# --- ACL user and password ---------------------------------------------------------------------
def test_wrong_password_serves_503_and_never_logs_it_right_password_works(servers, start, logs) -> None:
    srv = servers("acl").wait_up()
    acl_user(srv)
    srv.wait_up(username=USER, password=PASSWORD)

    wrong = start(teams=TEAMS, store=f"redis://{USER}:wrong-{PASSWORD}@127.0.0.1:{srv.port}/0")
    bodies = []
    for _ in range(3):
        r = httpx.get(wrong.url + "/readyz", timeout=5)
        assert r.status_code == 503
        bodies.append(r.text)
        m = metered(wrong)
        assert m.status_code == 503, m.text
        bodies.append(m.text)
    assert httpx.get(wrong.url + "/healthz", timeout=5).status_code == 200  # serving all the same

    right = start(teams=TEAMS, store=f"redis://{USER}:{PASSWORD}@127.0.0.1:{srv.port}/3")
    assert wait_for(lambda: readyz(right) == 200, 10, "readyz with the right password")
    before = used_tokens(right)
    m = metered(right)
    assert m.status_code == 200, m.text
    assert used_tokens(right) > before
    with srv.client(username=USER, password=PASSWORD, db=3) as c:
        assert c.dbsize() > 0  # the charges are in that Redis, DB 3

    text = _text(logs) + "\n".join(bodies)
    assert "redis store" in text  # (the store did log its failures)
    assert PASSWORD not in text and "wrong-" not in text


def test_a_store_down_at_startup_becomes_ready_without_a_restart(servers, start) -> None:
    port = free_port()
    proxy = start(teams=TEAMS, store=f"redis://127.0.0.1:{port}/0")
    assert readyz(proxy) == 503
    assert metered(proxy).status_code == 503
    servers("late", port=port).wait_up()
    t0 = time.monotonic()
    wait_for(lambda: readyz(proxy) == 200, 15, "readyz after Redis came up")
    print(f"\nstore came up: ready after {time.monotonic() - t0:.2f}s")
    assert metered(proxy).status_code == 200


# --- TLS ---------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> dict[str, str]:
    """A self-signed CA and a server certificate it signs, for 127.0.0.1 and localhost."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={name} test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return {"ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key")}


def _redis_has_tls() -> bool:
    out = subprocess.run(["redis-server", "--port", "0", "--tls-port", "1", "--save", ""], capture_output=True,
                         text=True, timeout=10)  # exits at once: no certificate configured (or no TLS built in)
    return "tls-cert-file" in (out.stdout + out.stderr)


def test_tls_with_a_private_ca_and_an_acl_user(servers, start, tmp_path, logs) -> None:
    _need(shutil.which("openssl") is not None, "the openssl CLI is not installed")
    _need(shutil.which("redis-server") is not None and _redis_has_tls(), "redis-server is built without TLS")
    tls = make_ca(tmp_path / "pki", "budget")
    other = make_ca(tmp_path / "other", "stranger")
    srv = servers("tls", tls=tls).wait_up()
    acl_user(srv)

    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{srv.port}/2?ssl_ca_certs={tls['ca']}"
    proxy = start(teams=TEAMS, store=url)
    assert wait_for(lambda: readyz(proxy) == 200, 10, "readyz over TLS")
    before = used_tokens(proxy)
    m = metered(proxy)
    assert m.status_code == 200, m.text
    assert used_tokens(proxy) > before
    assert proxy.state.store._pipe.ssl is not None  # the hot path itself speaks TLS
    with srv.client(username=USER, password=PASSWORD, db=2) as c:
        assert c.dbsize() > 0

    untrusting = start(teams=TEAMS, store=f"rediss://{USER}:{PASSWORD}@127.0.0.1:{srv.port}/2"
                                          f"?ssl_ca_certs={other['ca']}")
    assert readyz(untrusting) == 503
    assert metered(untrusting).status_code == 503
    plain = start(teams=TEAMS, store=f"redis://{USER}:{PASSWORD}@127.0.0.1:{srv.port}/2")  # no TLS: refused
    assert readyz(plain) == 503
    assert PASSWORD not in _text(logs)


# --- Sentinel ----------------------------------------------------------------------------------
SENTINEL_CONF = """port {port}
sentinel monitor mymaster 127.0.0.1 %d 1
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 10000
sentinel parallel-syncs mymaster 1
"""


def test_sentinel_failover_the_store_follows_the_new_primary(servers, start) -> None:
    primary = servers("primary").wait_up()
    replica = servers("replica", "--replicaof", "127.0.0.1", str(primary.port)).wait_up()
    with replica.client() as c:
        wait_for(lambda: c.info("replication").get("master_link_status") == "up", 15, "the replica in sync")
    sentinel = servers("sentinel", "--sentinel", conf=SENTINEL_CONF % primary.port).wait_up()
    sc = sentinel.client()

    def replica_known() -> bool:
        reps = sc.execute_command("SENTINEL", "REPLICAS", "mymaster")
        return any(str(r.get("port") if isinstance(r, dict) else dict(zip(r[::2], r[1::2])).get("port"))
                   == str(replica.port) for r in reps)
    wait_for(replica_known, 20, "the sentinel to discover the replica", every=0.2)

    proxy = start(teams=TEAMS, store=f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0")
    assert wait_for(lambda: readyz(proxy) == 200, 10, "readyz through Sentinel")
    lines = [f"primary 127.0.0.1:{primary.port}, replica 127.0.0.1:{replica.port}, sentinel :{sentinel.port}"]
    for i in range(3):
        r = metered(proxy)
        assert r.status_code == 200, r.text
        lines.append(f"before failover: charge {i + 1} -> {r.status_code}, team used {used_tokens(proxy)} tokens")
    before = used_tokens(proxy)
    with primary.client() as c:
        assert c.dbsize() > 0

    t0 = time.monotonic()
    assert sc.execute_command("SENTINEL", "FAILOVER", "mymaster") in (True, "OK", b"OK")

    def promoted() -> bool:
        host, port = sc.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return int(port) == replica.port
    wait_for(promoted, 30, "the sentinel to name the replica as primary", every=0.1)
    with replica.client() as c:
        wait_for(lambda: c.info("replication")["role"] == "master", 30, "the replica promoted")
    t_promoted = time.monotonic() - t0
    lines.append(f"SENTINEL FAILOVER: sentinel names 127.0.0.1:{replica.port} after {t_promoted:.2f}s")

    pipe = proxy.state.store._pipe
    # /readyz pings the connection the requests use: it follows as they would
    wait_for(lambda: readyz(proxy) == 200 and pipe.port == replica.port, 30,
             "the store's connection on the new primary", every=0.1)
    t_follow = time.monotonic() - t0
    lines.append(f"store's connection on the new primary {t_follow:.2f}s after FAILOVER, readyz {readyz(proxy)}")
    mid = used_tokens(proxy)
    assert mid == before  # what was charged before the failover is on the new primary (replicated)
    for i in range(3):
        r = metered(proxy)
        assert r.status_code == 200, r.text
        lines.append(f"after failover: charge {i + 1} -> {r.status_code}, team used {used_tokens(proxy)} tokens")
    after = used_tokens(proxy)
    assert after == before * 2  # three charges of the same size before and after
    # the totals live on the new primary, which holds the charges from before (replicated) and after
    assert pipe.port == replica.port
    with replica.client() as c:
        assert c.info("replication")["role"] == "master"
        assert c.dbsize() > 0
    # (Sentinel demotes the old primary at its next periodic look, ~10 s later: Redis's behaviour,
    # not the store's, so it is not waited for here.)
    lines.append(f"team used before failover {before}, after {after}; the store's connection is on "
                 f":{pipe.port} (the new primary)")
    sc.close()
    print("\n--- Sentinel failover transcript ---\n" + "\n".join(lines))


# --- URLs (no server) ----------------------------------------------------------------------------
def test_store_urls_parse_and_their_errors_name_no_password() -> None:
    from proxy.config import ConfigError, parse_config
    from proxy.store.redis import parse_redis_url

    t = parse_redis_url(f"rediss://{USER}:{PASSWORD}@redis.example:6380/4?ssl_ca_certs=/etc/ca.pem")
    assert (t.scheme, t.host, t.port, t.db, t.username, t.password) == ("rediss", "redis.example", 6380, 4, USER,
                                                                          PASSWORD)
    assert t.query["ssl_ca_certs"] == "/etc/ca.pem" and PASSWORD not in repr(t)
    t = parse_redis_url(f"redis+sentinel://:{PASSWORD}@s1:26379,s2:26380,[::1]:26381/mymaster/2")
    assert t.sentinels == [("s1", 26379), ("s2", 26380), ("::1", 26381)] and (t.service, t.db) == ("mymaster", 2)
    assert t.password == PASSWORD and t.username is None and PASSWORD not in repr(t)
    for good in ("redis://127.0.0.1:6379/0", f"redis://{USER}:{PASSWORD}@h:1/0", "rediss://h:6380/0",
                 "redis+sentinel://h:26379/mymaster/0"):
        assert parse_config({"store": good}, env={}).proxy.store == good
    for bad in (f"redis://{USER}:{PASSWORD}@h:port/0", f"redis+sentinel://{USER}:{PASSWORD}@h:1",
                f"rediss://{USER}:{PASSWORD}@h:1/db", f"redis+sentinel://{USER}:{PASSWORD}@/svc/0"):
        with pytest.raises(ConfigError) as err:
            parse_config({"store": bad}, env={})
        assert PASSWORD not in str(err.value) and PASSWORD not in repr(err.value.problems)
