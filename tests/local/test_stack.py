"""kfloop up / status / down: the whole loop as real local processes, started, inspected and stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kfloop.local.supervisor import free_port

pytestmark = pytest.mark.slow


@pytest.mark.heavy
def test_up_trains_serves_and_down_stops_every_process(tmp_path, kfloop_cli, small_policy):
    home = tmp_path / "home"
    ports = {name: free_port() for name in ("http", "grpc", "admin", "watch", "trigger")}
    up = subprocess.Popen(
        [sys.executable, "-m", "kfloop", "up", "--policy", str(small_policy), "--home", str(home),
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--admin-port", str(ports["admin"]),
         "--watch-port", str(ports["watch"]), "--trigger-port", str(ports["trigger"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (home / "stack.json").exists():
            assert up.poll() is None, "kfloop up exited"
            time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{ports['http']}/v1/models/digits:predict", json={"instances": [[0.0] * 64]})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
        status = kfloop_cli("status", "--home", str(home), "--json")
        assert status.code == 0, status.stderr
        state = status.json()
        assert (state["model"], state["version"], state["replicas"], state["runs_in_flight"]) == ("digits", "1", 1, 0)
        children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 4  # watch, trigger, transformer, predictor
        down = kfloop_cli("down", "--home", str(home))
        assert down.code == 0 and "stopped the loop" in down.stderr
        up.wait(30)
    finally:
        if up.poll() is None:
            up.kill()
    alive = [c for c in children if Path(f"/proc/{c}").exists() and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]
    assert alive == [] and not (home / "stack.json").exists()
    again = kfloop_cli("status", "--home", str(home))
    assert again.code == 1 and "no loop is running" in again.stderr
