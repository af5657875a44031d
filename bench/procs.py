"""Processes under test: start pinned to a core, wait for the port, read CPU and memory
from /proc, stop (only what this bench started, by pid)."""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds now."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile_soft_limit(pid: int) -> int:
    """The process's RLIMIT_NOFILE soft limit, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise KeyError("Max open files")


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, in a child before it execs (the bench's own
    processes only: the product's defaults are untouched). Raising the hard limit itself needs
    CAP_SYS_RESOURCE, which this does not attempt."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def status_kib(pid: int, field: str) -> int:
    """A memory figure from /proc/PID/status in KiB, e.g. VmHWM (peak RSS) or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(name: str, cmd: list[str], core: int | str, log: Path, env: dict[str, str] | None = None) -> Proc:
    """Run `cmd` pinned to one core or a taskset core list such as "0-1" (taskset execs it, so the pid
    is the program's own), with its RLIMIT_NOFILE soft limit at the hard limit (a scale run holds two sockets a stream)."""
    out = open(log, "ab")
    popen = subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, preexec_fn=raise_nofile)
    out.close()
    return Proc(name, popen, log)


def wait_port(proc: Proc, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:.0f}s:\n{proc.log_tail()}")
