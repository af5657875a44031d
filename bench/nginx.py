"""The fast fake upstream: nginx answering POST /v1/messages with a fixed body per mode,
`?mode=json` (the 2.1 kB reply) or `?mode=sse` (the 8.4 kB stream written at once).

nginx cannot take a config token over 4 kB, so each body is cut into `set` pieces that
`return 200` joins again; nothing is read from disk per request."""
from __future__ import annotations

from pathlib import Path

from bench import payloads

PIECE = 1_500  # characters of body per `set`, well under nginx's 4 kB token limit once escaped


def quoted(text: str) -> str:
    if "$" in text:
        raise ValueError("a body for nginx must not contain '$'")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def answer(prefix: str, body: bytes) -> str:
    text = body.decode()
    pieces = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
    sets = "".join(f"        set ${prefix}{i} {quoted(p)};\n" for i, p in enumerate(pieces))
    joined = "".join(f"${prefix}{i}" for i in range(len(pieces)))
    return f'{sets}        return 200 "{joined}";\n'


def config(workdir: Path, port: int) -> str:
    d = workdir
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
error_log {d}/nginx-error.log error;
pid {d}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/messages {{
            if ($arg_mode = sse) {{ rewrite ^ /_sse last; }}
            default_type application/json;
{answer("json", payloads.json_reply())}        }}
        location = /_sse {{
            internal;
            default_type "text/event-stream; charset=utf-8";
{answer("sse", payloads.sse_body())}        }}
    }}
}}
"""


def command(workdir: Path, port: int) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(config(workdir, port))
    return ["nginx", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(conf)]
