"""Where a Redis store connects: its URL parsed (RedisTarget), and the connections it opens there, over
TLS, through Sentinel, as an ACL user. The forms: redis://[user:password@]HOST:PORT/DB
[?prefix=...&hold_ttl=15&renew_every=5], rediss://... (TLS; ssl_ca_certs=PATH, ...), and
redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB."""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.store.resp import RespClient


class RedisTarget:
    """A store URL's connection parts (parse_redis_url). Its repr names no password."""

    __slots__ = ("scheme", "host", "port", "db", "username", "password", "query", "sentinels", "service")

    def __init__(self, scheme: str, host: str, port: int, db: int, username: str | None, password: str | None,
                 query: dict[str, str], sentinels: list[tuple[str, int]] | None = None, service: str = "") -> None:
        self.scheme, self.host, self.port, self.db = scheme, host, port, db
        self.username, self.password, self.query = username, password, query
        self.sentinels, self.service = sentinels, service

    def __repr__(self) -> str:
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels) if self.sentinels else f"{self.host}:{self.port}"
        return f"RedisTarget({self.scheme}://{where}/{self.service + '/' if self.service else ''}{self.db})"

    @property
    def sentinel_auth(self) -> dict[str, str]:
        """sentinel_password= (and sentinel_username=) in the query: the sentinels' own AUTH."""
        auth = {}
        if "sentinel_password" in self.query:
            auth["password"] = self.query["sentinel_password"]
            if "sentinel_username" in self.query:
                auth["username"] = self.query["sentinel_username"]
        return auth

    def ssl_context(self) -> Any:
        """rediss://: the SSLContext redis-py would build from the same query parameters (CA checked,
        hostname too unless ssl_check_hostname=false); None for redis://."""
        if self.scheme != "rediss":
            return None
        from redis.asyncio.connection import RedisSSLContext

        q = self.query
        check = q.get("ssl_check_hostname", "true").lower() not in ("0", "false", "no", "off")
        return RedisSSLContext(keyfile=q.get("ssl_keyfile"), certfile=q.get("ssl_certfile"),
                               cert_reqs=q.get("ssl_cert_reqs", "required"), ca_certs=q.get("ssl_ca_certs"),
                               ca_path=q.get("ssl_ca_path"), check_hostname=check).get()


def parse_redis_url(url: str) -> RedisTarget:
    """redis://[user:password@]HOST[:PORT][/DB], rediss://... (TLS), or
    redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]. ValueError (naming no
    password) when malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "redis+sentinel"):
        raise ValueError("store URL must be redis://, rediss:// or redis+sentinel://")
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else (unquote(user) if user else None)
        if not colon:  # (redis://PASSWORD@host, as redis-py reads it: a password alone)
            username = None
    query = dict(parse_qsl(query_text))

    parts = [p for p in path.split("/") if p]
    try:
        if scheme == "redis+sentinel":
            sentinels = [hostport(h, 26379) for h in hosts.split(",") if h]
            if not sentinels or not parts:
                raise ValueError("store URL: redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB")
            db = int(parts[1]) if len(parts) > 1 else 0
            return RedisTarget(scheme, sentinels[0][0], sentinels[0][1], db, username, password, query,
                               sentinels, unquote(parts[0]))
        host, port = hostport(hosts, 6379)
        db = int(parts[0]) if parts else int(query.get("db", 0))
    except ValueError as exc:
        if "store URL" in str(exc):
            raise
        raise ValueError("store URL: the DB is not a number") from None
    return RedisTarget(scheme, host, port, db, username, password, query)


def hostport(text: str, default: int) -> tuple[str, int]:
    """HOST[:PORT] or [V6]:PORT, the port `default` when none is given."""
    if text.startswith("["):  # [v6]:port
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError("store URL: a host is missing")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise ValueError("store URL: a port is not a number") from None


def connections(url: str) -> tuple[aioredis.Redis, RespClient]:
    """redis-py's client (the rest) and the pipelined one (the hot path) for `url`:
    redis:// and rediss:// ([user:password@]host:port/db, TLS options as redis-py's query
    parameters: ssl_ca_certs, ssl_cert_reqs, ssl_check_hostname, ssl_certfile, ssl_keyfile), or
    redis+sentinel://[user:password@]H:P[,H:P...]/SERVICE/DB (both follow the primary the
    sentinels name: redis-py's SentinelConnectionPool, and resp.py asking on every connect)."""
    opts = dict(decode_responses=True, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
    target = parse_redis_url(url)
    if target.sentinels is not None:
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(target.sentinels, socket_timeout=0.5, socket_connect_timeout=0.5,
                            sentinel_kwargs={"socket_timeout": 0.5, "socket_connect_timeout": 0.5,
                                             **target.sentinel_auth})
        client = sentinel.master_for(target.service, redis_class=aioredis.Redis, db=target.db,
                                     username=target.username, password=target.password, **opts)

        async def primary() -> tuple[str, int]:
            host, port = await sentinel.discover_master(target.service)
            return str(host), int(port)

        pipe = RespClient(target.sentinels[0][0], target.sentinels[0][1], target.db, target.username,
                          target.password, connect_timeout=0.5, read_timeout=1.0, resolve=primary,
                          min_backoff=0.05, max_backoff=1.0)
        return client, pipe
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=8, timeout=2.0, **opts)
    client = aioredis.Redis(connection_pool=pool)
    pipe = RespClient(target.host, target.port, target.db, target.username, target.password,
                      connect_timeout=0.5, read_timeout=1.0, ssl=target.ssl_context())
    return client, pipe
