"""CLI: serve, check-config, usage, hash-key, keygen, keys."""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from proxy import cli_history, cli_keys
from proxy.cli_table import print_table
from proxy.config import ConfigError, LoadedConfig, key_digest, load_config
from proxy.ledger import DIMENSIONS


def default_config_path() -> str:
    return os.environ.get("BUDGET_PROXY_CONFIG", "config/proxy.yaml")


def _print_problems(path: str, err: ConfigError) -> int:
    print(f"config {path} is invalid:", file=sys.stderr)
    for where, msg in err.problems:
        print(f"  {where or '<root>'}: {msg}", file=sys.stderr)
    return 2


def load_or_exit(path: str) -> LoadedConfig:
    """The config and its pricing table, both validated; exit 2 listing every problem."""
    from proxy.app import load_pricing

    try:
        loaded = load_config(path)
        load_pricing(loaded)
        return loaded
    except ConfigError as err:
        sys.exit(_print_problems(path, err))


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.logs import setup_logging
    from proxy.workers import Supervisor, reuse_port_socket, workers_problem

    setup_logging(args.log_format)
    loaded = load_or_exit(args.config)
    problem = workers_problem(args.workers, loaded.proxy.store)
    if problem:
        print(f"budget-proxy serve: {problem}", file=sys.stderr)
        return 2
    if args.workers == 1:
        return serve_one(args, loaded)
    try:
        reserved = reuse_port_socket(args.host, args.port)
    except OSError as err:
        print(f"budget-proxy serve: cannot bind {args.host}:{args.port}: {err.strerror}", file=sys.stderr)
        return 1
    supervisor_pid = os.getpid()
    return Supervisor(args.workers, reserved,
                      lambda sock: serve_one(args, loaded, sock, supervisor_pid)).run()


def serve_one(args: argparse.Namespace, loaded: LoadedConfig, sock: object = None,
              supervisor_pid: int | None = None) -> int:
    """One proxy process: on `sock` when a supervisor made it, else on --host/--port."""
    from proxy.app import create_app
    from proxy.logs import flush_access_log
    from proxy.server import GracefulServer

    try:
        app = create_app(loaded)
    except ConfigError as err:
        return _print_problems(args.config, err)
    server = GracefulServer(app, config_path=args.config, host=args.host, port=args.port, loop="auto", http="auto")
    server.supervisor_pid = supervisor_pid
    try:
        server.run(sockets=None if sock is None else [sock])
    finally:
        flush_access_log()
    return 0


def _fmt_limit(v: object) -> str:
    return "-" if v is None else str(v)


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.path)
    cfg = loaded.proxy
    dims = (*DIMENSIONS, "period")
    rows = [("team", "key", *dims)]
    for team_name, team in cfg.teams.items():
        rows.append((team_name, "*", *(_fmt_limit(getattr(team.budget, d)) for d in dims)))
        for key_name, key in team.keys.items():
            rows.append((team_name, key_name, *(_fmt_limit(getattr(key.budget, d)) for d in dims)))
    print_table(rows)
    print(f"config {args.path} is valid: {len(cfg.teams)} teams, "
          f"{sum(len(t.keys) for t in cfg.teams.values())} keys")
    for line in pricing_report(loaded):
        print(line)
    return 0


def pricing_report(loaded: LoadedConfig) -> list[str]:
    """The pricing file in use, its date, and every model a key's allow-list names (a glob
    without wildcards) that the table cannot price."""
    from proxy.app import load_pricing, shipped_pricing_path

    path = loaded.resolve(loaded.proxy.pricing) if loaded.proxy.pricing else shipped_pricing_path()
    table = load_pricing(loaded)
    checked = table.checked.isoformat() if table.checked else "no date"
    lines = [f"pricing {path}{'' if loaded.proxy.pricing else ' (shipped)'}: checked {checked}, "
             f"{len(table)} models, {len(table.aliases)} aliases"]
    unpriced = [(f"{team_name}/{key_name}", model)
                for team_name, team in loaded.proxy.teams.items()
                for key_name, key in team.keys.items()
                for model in key.models or ()
                if not any(c in model for c in "*?[") and model not in table]
    for where, model in unpriced:
        lines.append(f"  no price for {model!r}, allowed to {where}")
    if unpriced:
        policy = loaded.proxy.admission.unpriced_models
        effect = "cost 0" if policy == "allow" else "are refused where a cost budget applies"
        lines.append(f"{len(unpriced)} allowed model(s) have no price: requests for them {effect} "
                     f"(admission.unpriced_models: {policy})")
    return lines


def usage_rows(doc: dict) -> list[tuple[str, ...]]:
    rows = [("team", "key", "dimension", "used", "limit", "remaining", "resets")]
    for team in doc["teams"]:
        for key_name, view in [("*", team["budget"])] + [(k["name"], k["budget"]) for k in team["keys"]]:
            dims = list(view["limit"]) or ["tokens"]
            for dim in dims:
                used = view["used"].get(dim, 0)
                rows.append((team["name"], key_name, dim, _num(used), _num(view["limit"].get(dim)),
                             _num(view["remaining"].get(dim)), view["resets_at"] or "never"))
    return rows


def _num(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def cmd_usage(args: argparse.Namespace) -> int:
    import json
    import time
    from types import SimpleNamespace

    from proxy.admin import usage_document
    from proxy.app import build_runtime

    loaded = load_or_exit(args.config)
    runtime = build_runtime(loaded)
    if runtime.config.store == "memory://":
        print("the memory:// store keeps nothing outside the running proxy; use GET /admin/usage", file=sys.stderr)
        return 2
    if cli_history.wanted(args):  # --since / --by / --team / --key: the history (proxy/cli_history.py)
        return cli_history.run(args, runtime)

    async def read(store) -> dict:
        return await usage_document(SimpleNamespace(runtime=runtime, store=store, clock=time.time))

    doc = cli_history.read_store(runtime, read)
    if doc is None:
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = usage_rows(doc)
    print_table(rows)
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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument("--workers", type=int, default=int(os.environ.get("BUDGET_PROXY_WORKERS", "1")),
                   help="proxy processes sharing the port (more than 1 needs a redis:// store)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("check-config", help="validate a config and print its budgets")
    p.add_argument("path", nargs="?", default=default_config_path())
    p.set_defaults(fn=cmd_check_config)
    p = sub.add_parser("usage", help="print used / limit / remaining per team and key, from the store")
    p.add_argument("--config", default=default_config_path())
    p.add_argument("--json", action="store_true", help="the /admin/usage document instead of a table")
    cli_history.add_arguments(p)
    p.set_defaults(fn=cmd_usage)
    p = sub.add_parser("hash-key", help="print the sha256: form of a key")
    p.add_argument("key")
    p.set_defaults(fn=cmd_hash_key)
    p = sub.add_parser("keygen", help="print a new random proxy key")
    p.set_defaults(fn=cmd_keygen)
    cli_keys.add_parser(sub)
    from proxy import cli_alerts  # `alerts test`

    cli_alerts.add_parser(sub, default_config_path(), load_or_exit)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
