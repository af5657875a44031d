"""`budget-proxy serve --workers N`: N proxy processes on one port, one supervisor.

Each worker is a forked process running the whole proxy (its own event loop, upstream pool and
store connection) on its own listening socket; SO_REUSEPORT has the kernel spread new
connections over the workers. Budgets are shared only through a store every process reads and
writes atomically, so more than one worker needs a Redis store (docs/configuration.md
"Workers"). The supervisor forwards SIGTERM/SIGINT (graceful stop) and SIGHUP (reload) to every
worker and starts a new worker when one dies; a worker whose supervisor is gone stops itself."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

log = logging.getLogger("budget_proxy")

SHARED_STORE_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")
# A worker that dies this soon after its start is restarted only after this pause, so a worker
# that cannot start (a port taken, a broken upstream setting) does not spin the CPU.
RESTART_PAUSE_SECONDS = 1.0


def workers_problem(workers: int, store_url: str) -> str | None:
    """Why `workers` processes cannot share this store's budgets, or None when they can."""
    if workers < 1:
        return "--workers must be 1 or more"
    if workers > 1 and not store_url.startswith(SHARED_STORE_SCHEMES):
        scheme = store_url.split(":", 1)[0]
        return (f"--workers {workers} needs a redis:// store: a {scheme} store keeps budgets in one "
                f"process's memory, so {workers} processes would each spend the whole budget")
    return None


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Forks `count` workers, each calling `run_worker(sock)` with its own listening socket on the
    port `reserved` is bound to; restarts the ones that die until told to stop."""

    def __init__(self, count: int, reserved: socket.socket, run_worker: Callable[[socket.socket], int]) -> None:
        self.count = count
        self.reserved = reserved  # bound, never listening: holds the port while workers come and go
        self.run_worker = run_worker
        self.pids: dict[int, float] = {}  # worker pid -> when it started
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for _ in range(self.count):
            self._start_worker()
        log.info("supervisor %d: %d workers on port %d", os.getpid(), self.count, self.reserved.getsockname()[1])
        while self.pids:
            try:
                pid, status = os.waitpid(-1, 0)  # (retried after a signal handler returns)
            except ChildProcessError:
                break
            self._reap(pid, status)
        return 0

    def _on_signal(self, sig: int, frame: object) -> None:
        """SIGTERM/SIGINT: every worker stops gracefully, then so does the supervisor. SIGHUP: every
        worker reloads."""
        if sig != signal.SIGHUP:
            self.stopping = True
        forwarded = signal.SIGTERM if sig == signal.SIGINT else sig
        for pid in list(self.pids):
            try:
                os.kill(pid, forwarded)
            except ProcessLookupError:
                pass

    def _reap(self, pid: int, status: int) -> None:
        started = self.pids.pop(pid, None)
        if started is None:
            return
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        log.error("worker %d exited (%s); starting another", pid,
                  f"signal {-code}" if code < 0 else f"code {code}")
        if time.monotonic() - started < RESTART_PAUSE_SECONDS:
            time.sleep(RESTART_PAUSE_SECONDS)
        if not self.stopping:
            self._start_worker()

    def _start_worker(self) -> None:
        host, port = self.reserved.getsockname()[:2]
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                self.reserved.close()
                sock = reuse_port_socket(host, port)
                code = self.run_worker(sock)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = time.monotonic()
