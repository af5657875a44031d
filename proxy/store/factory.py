"""open_store(url): the store a URL names (memory://, sqlite:///PATH, redis://HOST:PORT/DB,
rediss://... (TLS), redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB). Apart
from proxy/store/base.py, which every store imports: the stores are imported only when named."""
from __future__ import annotations

from proxy.store.base import LedgerStore


def open_store(url: str) -> LedgerStore:
    if url == "memory://":
        from proxy.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from proxy.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from proxy.store.redis import RedisStore

        return RedisStore.from_url(url)
    raise ValueError(f"unknown store URL scheme: {url.split(':', 1)[0]}")
