"""The proxy's own CPU per request, without sockets: the real app (config, store, relay, meter,
access log, metrics) driven through ASGI in one process, the upstream replaced by a canned
reply that costs nothing. It isolates what the proxy adds on top of any pass-through, and
profiles it with cProfile without py-spy's sampling noise.

    .venv/bin/python -m bench.inproc [--mode json|sse] [--store memory|sqlite|redis] [--requests 20000]
                                     [--concurrency 16] [--profile] [--runs N]

Not a load test: the figure is CPU µs per request of the proxy's logic alone."""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

from bench import payloads
from bench.targets import KEY, REDIS_DB, REDIS_URL, clear_redis, proxy_yaml

REDIS_PREFIX = f"bench-inproc-{os.getpid()}:"


class CannedReply:
    """An upstream answer already in memory (the UpstreamReply interface)."""

    __slots__ = ("status_code", "headers_raw", "content_type", "_chunks", "body_complete")

    def __init__(self, content_type: str, chunks: list[bytes]) -> None:
        self.status_code = 200
        size = sum(len(c) for c in chunks)
        self.headers_raw = ((b"Content-Type", content_type.encode()), (b"Content-Length", str(size).encode()),
                            (b"request-id", b"req_bench"), (b"anthropic-organization-id", b"org"))
        self.content_type = content_type
        self._chunks = chunks
        self.body_complete = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for i, c in enumerate(self._chunks):
            self.body_complete = i == len(self._chunks) - 1  # as the project's pool knows it
            yield c

    async def aread(self) -> bytes:
        return b"".join(self._chunks)

    async def aclose(self) -> None:
        pass


def build_app(store: str, tmp: Path, runs: int = 0) -> Any:
    from proxy.app import create_app
    from proxy.config import parse_config
    import yaml

    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp / 'ledger.db'}",
           "redis": f"{REDIS_URL}/{REDIS_DB}?prefix={REDIS_PREFIX}"}[store]
    data = yaml.safe_load(proxy_yaml("http://127.0.0.1:9", url))
    if runs:  # every request also charged to one of `runs` run scopes of the key
        data["teams"]["bench"]["keys"]["load"]["run_budget"] = {"tokens": 10**12, "steps": 10**9}
    loaded = parse_config(data, path=tmp / "proxy.yaml")
    return create_app(loaded)


async def drive(app: Any, mode: str, requests: int, concurrency: int, runs: int = 0) -> float:
    from proxy import relay as relay_mod

    if mode == "json":
        reply_chunks, body = [payloads.json_reply()], payloads.request_body(stream=False)
        ctype = "application/json"
    else:
        reply_chunks, body = [payloads.sse_body()], payloads.request_body(stream=True)
        ctype = "text/event-stream; charset=utf-8"

    async def canned_upstream(transport: Any, url: str, headers: Any, content: bytes) -> CannedReply:
        return CannedReply(ctype, reply_chunks)

    relay_mod.open_upstream = canned_upstream  # type: ignore[assignment]
    headers = [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
               (b"anthropic-version", b"2023-06-01"), (b"x-api-key", KEY.encode()),
               (b"content-length", str(len(body)).encode())]
    statuses: list[int] = []
    run_headers = [headers + [(b"x-budget-run", f"run-{i}".encode())] for i in range(runs)]
    counter = iter(range(1 << 62))

    async def one() -> None:
        with_run = run_headers[next(counter) % runs] if runs else headers
        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "query_string": b"",
                 "headers": with_run, "http_version": "1.1", "scheme": "http"}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                statuses.append(msg["status"])

        await app(scope, receive, send)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    lifespan = app.router.router.lifespan_context(app.router)
    async with lifespan:
        await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm-up
        statuses.clear()
        t0 = time.process_time()
        per = requests // concurrency
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
        cpu = time.process_time() - t0
        # a 200 is not enough: a stream the relay failed midway also began with one
        outcomes = {r.outcome for r in await app.state.store.usage_log(100)}
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{len(bad)} non-200 answers, e.g. {bad[0]}")
    if outcomes != {"completed"}:
        raise SystemExit(f"requests ended {sorted(outcomes)}, not all completed")
    return cpu / (per * concurrency) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("json", "sse"), default="json")
    p.add_argument("--store", choices=("memory", "sqlite", "redis"), default="sqlite")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--runs", type=int, default=0, help="send x-budget-run over this many runs (0: no header)")
    args = p.parse_args()
    import logging
    import uvloop

    from proxy.logs import setup_logging

    with tempfile.TemporaryDirectory(prefix="budget-proxy-inproc-") as tmp:
        import sys
        sys.stderr = open(Path(tmp) / "access.log", "w")  # the access log goes there, as `serve --log-format json`
        setup_logging("json")
        app = build_app(args.store, Path(tmp), args.runs)
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        us = uvloop.run(drive(app, args.mode, args.requests, args.concurrency, args.runs))
        if prof:
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(35)
            print(out.getvalue())
        logging.shutdown()
        if args.store == "redis":
            clear_redis(REDIS_PREFIX)
    sys.stderr = sys.__stderr__
    runs = f" runs={args.runs}" if args.runs else ""
    print(f"{args.mode} store={args.store} c={args.concurrency}{runs}: {us:.1f} µs CPU per request (proxy logic only)")


if __name__ == "__main__":
    main()
