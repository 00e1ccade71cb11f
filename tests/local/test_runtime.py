"""The local serving runtime (transformer + predictor replicas as supervised processes): scaling, version
switches and canaries under load fail no request, a crashed replica is restarted, and ``kfloop serve``
stops every process it started."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from testbed import tensor, v1
from kfloop.local.supervisor import free_port

pytestmark = pytest.mark.slow


def test_scaling_switching_and_canary_under_load_fail_no_request(stack):
    runtime = stack["runtime"]
    body = json.dumps(tensor(stack["holdout"].holdout_features[:1])).encode()
    outcomes: dict = {"ok": 0, "failed": []}
    versions_seen = set()

    async def load(seconds: float) -> None:
        async with aiohttp.ClientSession() as session:
            end = time.monotonic() + seconds

            async def worker() -> None:
                while time.monotonic() < end:
                    async with session.post(runtime.endpoints["v2"], data=body, headers={"content-type": "application/json"}) as answer:
                        text = await answer.read()
                        if answer.status == 200:
                            outcomes["ok"] += 1
                            versions_seen.add(json.loads(text)["model_version"])
                        else:
                            outcomes["failed"].append((answer.status, text[:200]))

            await asyncio.gather(*[worker() for _ in range(8)])

    loader = threading.Thread(target=asyncio.run, args=(load(16),))
    loader.start()
    time.sleep(1.5)
    runtime.switch_version("2")
    runtime.scale(3)
    runtime.set_traffic({"2": 70, "1": 30})
    runtime.scale(1)
    runtime.switch_version("1")
    loader.join()
    assert outcomes["failed"] == []
    assert outcomes["ok"] > 1000
    assert versions_seen == {"1", "2"}
    # The canary share of version 1 started with as many replicas as version 2 had then (3).
    assert runtime.version == "1" and runtime.replica_count() == 3


def test_a_crashed_replica_is_restarted_and_requests_keep_succeeding(stack):
    runtime = stack["runtime"]
    runtime.scale(2)
    victim = runtime.status()["traffic"][0]["replicas"][0]
    subprocess.run(["kill", "-9", str(victim["pid"])], check=True)
    for _ in range(30):
        assert v1(stack, {"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:
        replica = runtime.status()["traffic"][0]["replicas"][0]
        if replica["restarts"] == 1 and replica["alive"] and replica["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert (replica["restarts"], replica["alive"]) == (1, True)


def test_kfloop_serve_stops_every_process_it_started_on_sigterm(stack, tmp_path):
    registry = stack["registry"]
    http_port, admin_port = free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "kfloop", "serve", "--registry", registry.root, "--model", "leaf", "--replicas", "2",
         "--http-port", str(http_port), "--grpc-port", str(free_port()), "--admin-port", str(admin_port), "--home", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        status = None
        while time.time() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{admin_port}/status").json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status is not None, serve.stdout.read() if serve.poll() is not None else "not up"
        pids = [status["transformer"]["pid"]] + [r["pid"] for s in status["traffic"] for r in s["replicas"]]
        assert len(pids) == 3
        assert httpx.post(f"http://127.0.0.1:{http_port}/v1/models/leaf:predict", json={"instances": stack["holdout"].holdout_features[:1].tolist()}).status_code == 200
        scaled = httpx.post(f"http://127.0.0.1:{admin_port}/replicas", json={"replicas": 3}).json()
        assert scaled == {"replicas": 3}
        pids += [r["pid"] for s in httpx.get(f"http://127.0.0.1:{admin_port}/status").json()["traffic"] for r in s["replicas"]]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert serve.returncode == 0
    alive = [pid for pid in set(pids) if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == []
