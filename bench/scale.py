"""The scale client: N concurrent streamed /v1/messages calls through one proxy, all started
at once, each read to its end and compared byte for byte with the fake upstream's stream.

    python -m bench.scale --url http://127.0.0.1:PORT --key KEY --body request.json --streams 1000

Prints one JSON object: errors by kind, the peak number of streams open at once, and the
time to headers and the whole-stream time (p50 / p99 / max, ms). Bounded: every stream has
a deadline and the run has one too."""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import payloads

EXPECTED = payloads.sse_body()


@dataclass
class Tally:
    open: int = 0
    peak: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    headers_ms: list[float] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)


async def one(session: object, url: str, body: bytes, headers: dict[str, str], tally: Tally) -> None:
    import aiohttp

    t0 = time.perf_counter()
    opened = False
    try:
        async with session.post(url, data=body, headers=headers) as resp:  # type: ignore[attr-defined]
            tally.headers_ms.append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                tally.errors[f"status {resp.status}"] += 1
                return
            opened = True
            tally.open += 1
            tally.peak = max(tally.peak, tally.open)
            got = bytearray()
            async for chunk in resp.content.iter_any():
                got += chunk
        if bytes(got) != EXPECTED:
            tally.errors["stream differs from the upstream's"] += 1
            return
        tally.ok += 1
        tally.stream_ms.append((time.perf_counter() - t0) * 1000)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.errors[exc.__class__.__name__] += 1
    finally:
        if opened:
            tally.open -= 1


def quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {"p50": round(s[len(s) // 2], 1), "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 1),
            "max": round(s[-1], 1)}


async def run(url: str, key: str, body: bytes, streams: int, deadline_s: float) -> dict[str, object]:
    import aiohttp

    tally = Tally()
    headers = {"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=deadline_s)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.ensure_future(one(session, url, body, headers, tally)) for _ in range(streams)]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s + 10)
        for t in pending:
            t.cancel()
        tally.errors["not finished by the deadline"] += len(pending)
    return {"streams": streams, "ok": tally.ok, "errors": dict(+tally.errors), "peak_open": tally.peak,
            "wall_s": round(time.perf_counter() - t0, 2), "headers_ms": quantiles(tally.headers_ms),
            "stream_ms": quantiles(tally.stream_ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--deadline-s", type=float, default=120.0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.streams * 2 + 1024)), hard))
    import uvloop

    out = uvloop.run(run(args.url + "/v1/messages", args.key, args.body.read_bytes(), args.streams, args.deadline_s))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
