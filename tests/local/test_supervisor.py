"""ManagedProcess directly, with a real child process (a tiny HTTP server): it waits until the server answers,
says why when it exits before that, backs off over restarts in a row, and stops by its PID -- also a child that
ignores SIGTERM -- leaving no process behind."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from kfloop.errors import UpstreamError
from kfloop.local.supervisor import RESTART_BACKOFF, STABLE_UPTIME, ManagedProcess, free_port, restart_delay

SERVER = """
import http.server, signal, sys
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def server(tmp_path, mode: str = "plain") -> ManagedProcess:
    port = free_port()
    return ManagedProcess(f"server-{mode}", [sys.executable, "-c", SERVER, str(port), mode],
                          f"http://127.0.0.1:{port}/", tmp_path / f"{mode}.log")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie until its parent reaps it: Popen.wait in stop() does
    return open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_it_waits_until_the_server_answers_and_stops_it_by_its_pid(tmp_path):
    process = server(tmp_path)
    process.spawn()
    process.wait_ready(timeout=30)
    assert process.alive()
    pid = process.pid
    process.stop()
    assert not process.alive() and gone(pid)


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
    process = server(tmp_path, "stubborn")
    process.spawn()
    process.wait_ready(timeout=30)
    started = time.monotonic()
    process.stop(timeout=1.0)
    assert process.process.returncode == -signal.SIGKILL and time.monotonic() - started < 10


def test_a_process_that_exits_before_it_answers_is_an_upstream_error_naming_its_log(tmp_path):
    process = ManagedProcess("broken", [sys.executable, "-c", "raise SystemExit(3)"], f"http://127.0.0.1:{free_port()}/",
                             tmp_path / "broken.log")
    process.spawn()
    with pytest.raises(UpstreamError, match=f"broken exited with code 3; see {tmp_path / 'broken.log'}"):
        process.wait_ready(timeout=30)


def test_restarts_in_a_row_back_off_and_a_stable_run_ends_the_row(tmp_path):
    steps = RESTART_BACKOFF.steps
    assert [restart_delay(n) for n in range(len(steps) + 2)] == [*steps, steps[-1], steps[-1]]
    process = server(tmp_path)
    process.spawn()
    process.wait_ready(timeout=30)
    delays = []
    for _ in range(3):
        process.process.kill()
        process.process.wait()
        delays.append(process.exited())
        process.respawn()
    assert delays == list(RESTART_BACKOFF.steps[:3]) and (process.restarts, process.restarts_in_a_row) == (3, 3)
    process.started -= STABLE_UPTIME  # as if this run had lasted long enough
    process.process.kill()
    process.process.wait()
    assert process.exited() == RESTART_BACKOFF.steps[0]
    process.stop()


def test_free_ports_lie_below_the_ephemeral_range_where_no_client_connection_can_take_them():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(20000 <= port < low for port in ports)
    assert len(set(ports)) > 40  # chosen at random, not one after another
