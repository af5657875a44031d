"""CLI: serve, check-config, usage, hash-key, keygen."""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from proxy.config import ConfigError, LoadedConfig, key_digest, load_config


def default_config_path() -> str:
    return os.environ.get("BUDGET_PROXY_CONFIG", "config/proxy.yaml")


def load_or_exit(path: str) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"config {path} is invalid:", file=sys.stderr)
        for where, msg in err.problems:
            print(f"  {where or '<root>'}: {msg}", file=sys.stderr)
        sys.exit(2)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.app import create_app
    from proxy.logs import setup_logging

    setup_logging(args.log_format)
    loaded = load_or_exit(args.config)
    app = create_app(loaded)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            loop="auto", http="auto", lifespan="on",
                            timeout_graceful_shutdown=int(loaded.proxy.server.shutdown_grace_seconds) or None)
    uvicorn.Server(config).run()
    return 0


def _fmt_limit(v: object) -> str:
    return "-" if v is None else str(v)


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.path)
    cfg = loaded.proxy
    dims = ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps", "wall_clock", "period")
    rows = [("team", "key", *dims)]
    for team_name, team in cfg.teams.items():
        rows.append((team_name, "*", *(_fmt_limit(getattr(team.budget, d)) for d in dims)))
        for key_name, key in team.keys.items():
            rows.append((team_name, key_name, *(_fmt_limit(getattr(key.budget, d)) for d in dims)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"config {args.path} is valid: {len(cfg.teams)} teams, "
          f"{sum(len(t.keys) for t in cfg.teams.values())} keys")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    print(key_digest(args.key))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print("bp-" + secrets.token_urlsafe(24)[:32])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="budget-proxy", description="An LLM gateway that enforces budgets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default=default_config_path())
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("check-config", help="validate a config and print its budgets")
    p.add_argument("path", nargs="?", default=default_config_path())
    p.set_defaults(fn=cmd_check_config)
    p = sub.add_parser("hash-key", help="print the sha256: form of a key")
    p.add_argument("key")
    p.set_defaults(fn=cmd_hash_key)
    p = sub.add_parser("keygen", help="print a new random proxy key")
    p.set_defaults(fn=cmd_keygen)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
