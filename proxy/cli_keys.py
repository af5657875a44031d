"""`budget-proxy keys create|list|revoke`: runtime keys through the admin API (docs/http-api.md,
"Runtime keys"), authenticated with $BUDGET_PROXY_ADMIN_KEY."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

from proxy.cli_table import print_table

DEFAULT_URL = "http://127.0.0.1:8080"
_NUMBER_FIELDS = ("tokens", "input_tokens", "output_tokens", "steps")


def parse_budget(text: str) -> dict[str, Any]:
    """`tokens=100000,cost_usd=2.5,wall_clock=30m,period=day` as a budget object."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"not NAME=VALUE: {item!r}")
        out[name] = int(value) if name in _NUMBER_FIELDS and value.isdigit() else value
    return out


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke runtime keys (admin API)")
    keys.add_argument("--url", default=DEFAULT_URL, help=f"the proxy (default {DEFAULT_URL})")
    # --url is taken after the action too; there it overrides only when given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"the proxy (default {DEFAULT_URL})")
    actions = keys.add_subparsers(dest="action", required=True)
    p = actions.add_parser("create", parents=[common], help="mint a key; its secret is printed once")
    p.add_argument("--team", required=True)
    p.add_argument("--name")
    p.add_argument("--budget", type=parse_budget)
    p.add_argument("--run-budget", type=parse_budget)
    p.add_argument("--runs", choices=("optional", "required"))
    p.add_argument("--models", help="comma-separated allow-list globs")
    p.add_argument("--expires-in", help="e.g. 2h, 30m, 1d")
    p.set_defaults(fn=cmd_create)
    p = actions.add_parser("list", parents=[common], help="list keys (never a secret)")
    p.add_argument("--team")
    p.set_defaults(fn=cmd_list)
    p = actions.add_parser("revoke", parents=[common], help="revoke a runtime key")
    p.add_argument("team")
    p.add_argument("name")
    p.set_defaults(fn=cmd_revoke)


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> httpx.Response | None:
    admin_key = os.environ.get("BUDGET_PROXY_ADMIN_KEY", "")
    if not admin_key:
        print("set BUDGET_PROXY_ADMIN_KEY to the proxy's admin key", file=sys.stderr)
        return None
    try:
        return httpx.request(method, args.url.rstrip("/") + path, timeout=30,
                             headers={"authorization": f"Bearer {admin_key}"}, **kw)
    except httpx.HTTPError as exc:
        print(f"cannot reach {args.url}: {exc.__class__.__name__}", file=sys.stderr)
        return None


def _done(resp: httpx.Response | None, ok: int) -> int:
    if resp is None:
        return 1
    if resp.status_code != ok:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        print(f"error {resp.status_code}: {message}", file=sys.stderr)
        return 1
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"team": args.team}
    for field, value in (("name", args.name), ("budget", args.budget), ("run_budget", args.run_budget),
                         ("runs", args.runs), ("expires_in", args.expires_in)):
        if value is not None:
            body[field] = value
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    resp = _call(args, "POST", "/admin/keys", json=body)
    if _done(resp, 201):
        return 1
    print(json.dumps(resp.json(), indent=2))  # type: ignore[union-attr]
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    resp = _call(args, "GET", "/admin/keys", params={"team": args.team} if args.team else None)
    if _done(resp, 200):
        return 1
    keys = resp.json()["keys"]  # type: ignore[union-attr]
    rows = [("team", "name", "origin", "expires_at", "revoked")]
    rows += [(k["team"], k["name"], k["origin"], k.get("expires_at") or "-", "yes" if k.get("revoked") else "")
             for k in keys]
    print_table(rows)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    resp = _call(args, "DELETE", f"/admin/keys/{args.team}/{args.name}")
    if _done(resp, 204):
        return 1
    print(f"revoked {args.team}/{args.name}")
    return 0
