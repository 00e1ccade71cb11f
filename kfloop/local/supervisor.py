"""Supervised local processes: start a server, wait until it answers, stop it by its PID.

:class:`ManagedProcess` is one server process of the local loop (a predictor
replica, the transformer, the watch, the trigger). Children are started
from one long-lived thread with ``PR_SET_PDEATHSIG``, so none outlives the
process that started it.

A process that exits is started again by its owner (the serving runtime)
after a back-off (:meth:`ManagedProcess.exited`, :func:`restart_delay`) over
its restarts *in a row*: a run that lasted ``STABLE_UPTIME`` ends the row, so
a crash hours after the last one waits 0.5 s again; ``restarts`` keeps the
total.

A process supervisor was written here rather than taken from circus: the
runtime needs per-replica dynamic ports, readiness gates between steps and a
traffic swap in the transformer, which circus' static watchers would only
wrap, at the cost of a pyzmq control plane.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kfloop.errors import UpstreamError
from kfloop.http_clients import http_client
from kfloop.lifetimes import die_with_parent
from kfloop.retry import Backoff

__all__ = ["READY_TIMEOUT", "RESTART_BACKOFF", "STABLE_UPTIME", "ManagedProcess", "free_port", "restart_delay"]

READY_TIMEOUT = 60.0
RESTART_BACKOFF = Backoff((0.5, 1.0, 2.0, 5.0, 10.0))  # before the 1st, 2nd, ... restart in a row
STABLE_UPTIME = 30.0  # seconds: a run this long ends a row of restarts
FIRST_CHOSEN_PORT = 20000  # free_port chooses from here up to the ephemeral range (below: well-known services)
_choice = random.SystemRandom()


def restart_delay(restarts_in_a_row: int) -> float:
    """Seconds to wait before restarting a process that exited after ``restarts_in_a_row`` restarts with no stable run."""
    return RESTART_BACKOFF.delay(restarts_in_a_row + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, below the kernel's ephemeral range when it can be.

    A server binds its port seconds after it is chosen (imports first). Outgoing connections take their source
    ports from the ephemeral range, so a port from that range can be taken by any client meanwhile (the server
    then fails with EADDRINUSE); a port below it can only be taken by another listener.
    """
    low = _ephemeral_ports()[0]
    for _ in range(64):
        if low <= FIRST_CHOSEN_PORT:
            break
        port = _choice.randrange(FIRST_CHOSEN_PORT, low)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # no room below the range: let the kernel choose
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux's default where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """Popen from one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: a
    child started from a short-lived admin-request thread would be killed as
    soon as that request was answered.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfloop-spawn")
    return _spawner.submit(subprocess.Popen, *args, preexec_fn=die_with_parent, **kwargs).result()


@dataclass
class ManagedProcess:
    """One supervised server process."""

    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0  # in all (what status shows)
    restarts_in_a_row: int = 0  # since a run last lasted STABLE_UPTIME (what the back-off counts)
    started: float = 0.0
    stopping: bool = False

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        try:
            self.process = _popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        self.started = time.monotonic()

    def exited(self) -> float:
        """Note that the process has just exited; the seconds to wait before :meth:`respawn`."""
        if time.monotonic() - self.started >= STABLE_UPTIME:
            self.restarts_in_a_row = 0
        return restart_delay(self.restarts_in_a_row)

    def respawn(self) -> None:
        """Start the process again after it exited."""
        self.restarts += 1
        self.restarts_in_a_row += 1
        self.spawn()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with http_client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise UpstreamError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")
                try:
                    if client.get(self.ready_url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise UpstreamError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping = True
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
