"""`budget-proxy alerts test [--config PATH]`: POST a sample event (type "budget.test", marked
"test": true) to every webhook the config names, print each answer, exit 0 when all were 2xx.
The lines name each webhook by scheme, host and port, never its path, query or headers."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Callable

import httpx

from proxy import alerts as rules


def add_parser(sub: Any, default_config: str, load: Callable[[str], Any]) -> None:
    """`alerts test`; `load` reads and validates a config (exiting 2 with its problems)."""
    p = sub.add_parser("alerts", help="alert webhooks")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("test", help="send a sample event to each configured webhook and print its answer")
    t.add_argument("--config", default=default_config)
    t.set_defaults(fn=cmd_test, load=load)


async def send_samples(webhooks: list[Any], now: float,
                       transport: httpx.AsyncBaseTransport | None = None) -> list[tuple[Any, int | None, str | None]]:
    """(webhook, status, error) for each webhook, the sample POSTed to all of them at once."""
    from proxy.alerting import post_once

    body = rules.sample_body(now)
    async with httpx.AsyncClient(timeout=rules.TIMEOUT_S, follow_redirects=False, transport=transport) as client:
        answers = await asyncio.gather(*(
            post_once(client, w.url, {k: v.get_secret_value() for k, v in w.headers.items()}, body)
            for w in webhooks))
    return [(w, status, error) for w, (status, error) in zip(webhooks, answers)]


def cmd_test(args: argparse.Namespace) -> int:
    loaded = args.load(args.config)
    webhooks = loaded.proxy.alerts.webhooks
    if not webhooks:
        print(f"config {args.config} names no alert webhooks (alerts.webhooks)", file=sys.stderr)
        return 1
    results = asyncio.run(send_samples(webhooks, time.time()))
    ok = True
    for i, (w, status, error) in enumerate(results):
        where = f"webhook {i} ({rules.url_label(w.url)})"
        if status is None:
            print(f"{where}: failed: {error}")
            ok = False
        else:
            good = rules.is_success(status)
            ok = ok and good
            print(f"{where}: HTTP {status}" + ("" if good else " (not 2xx)"))
    return 0 if ok else 1
