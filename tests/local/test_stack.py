"""kfloop up / status / down: the whole loop as real local processes, started, inspected and stopped."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kfloop.event_types import DRIFT_EVENT
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
        predict = functools.partial(httpx.post, f"http://127.0.0.1:{ports['http']}/v1/models/digits:predict",
                                    json={"instances": [[0.0] * 64]})
        answer = predict()
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
        probe_every_control_surface_without_the_token(home, ports)
        assert predict().status_code == 200  # still serving
        printed = kfloop_cli("token", "--home", str(home))
        assert printed.code == 0 and printed.stdout.strip() == (home / "token").read_text().strip()
        assert (home / "token").stat().st_mode & 0o777 == 0o600
        label_the_answer(answer, home, ports["watch"])
        status = kfloop_cli("status", "--home", str(home), "--json")
        assert status.code == 0, status.stderr
        state = status.json()
        assert (state["model"], state["version"], state["replicas"], state["runs_in_flight"]) == ("digits", "1", 1, 0)
        assert state["realised_accuracy"] == {"1": {"accuracy": 0.0, "labels": 1}}
        table = kfloop_cli("status", "--home", str(home)).stdout.splitlines()
        assert [line for line in table if "realised accuracy v1" in line and "0.000 over 1 labels" in line]
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


def label_the_answer(answer: httpx.Response, home: Path, watch_port: int) -> None:
    """A client labels an answer by its x-request-id (wrongly: the realised accuracy is 0), once the watch has it."""
    labels = f"http://127.0.0.1:{watch_port}/v2/models/digits/labels"
    wrong = "1" if answer.json()["predictions"][0] != "1" else "2"
    body = [{"id": answer.headers["x-request-id"], "label": wrong}]
    headers = {"authorization": f"Bearer {(home / 'token').read_text().strip()}"}
    deadline = time.time() + 15
    while (taken := httpx.post(labels, json=body, headers=headers)).status_code == 404 and time.time() < deadline:
        time.sleep(0.2)  # the answer's payload event is on its way to the watch
    assert taken.status_code == 200 and taken.json() == {"accepted": 1, "duplicate": 0}, taken.text


def probe_every_control_surface_without_the_token(home: Path, ports: dict[str, int]) -> None:
    """What a curious user on this machine tries: none of it acts, and what is stored stays."""
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    before = {name: httpx.get(url[name] + "/status").json() for name in ("admin", "watch", "trigger")}
    hijack = {"routes": [{"version": "1", "weight": 100, "upstreams": ["127.0.0.1:9"]}]}
    assert httpx.put(url["http"] + "/kfloop/routes", json=hijack).status_code == 404  # not on the client port
    for path, body in (("/traffic", {"weights": {"1": 100}}), ("/replicas", {"replicas": 3}), ("/version", {"version": "1"})):
        assert httpx.post(url["admin"] + path, json=body).status_code == 401, path
    alarm = {"specversion": "1.0", "id": "forged", "source": "me", "type": DRIFT_EVENT, "data": {"model": "digits"}}
    as_text = httpx.post(url["trigger"] + "/", content=json.dumps(alarm).encode(), headers={"content-type": "text/plain"})
    structured = httpx.post(url["trigger"] + "/", json=alarm, headers={"content-type": "application/cloudevents+json"})
    assert (as_text.status_code, structured.status_code) == (401, 401)
    assert "x-kfloop-outcome" not in as_text.headers and "x-kfloop-outcome" not in structured.headers
    forged_rows = httpx.post(url["watch"] + "/", json={"instances": [[99.0] * 64] * 50}, headers={
        "ce-specversion": "1.0", "ce-id": "forged", "ce-source": "me", "ce-type": "org.kubeflow.serving.inference.request"})
    assert forged_rows.status_code == 401
    assert httpx.post(url["watch"] + "/v2/models/digits/labels", json=[{"id": "x", "label": "1"}]).status_code == 401
    wrong = httpx.post(url["trigger"] + "/", json=alarm, headers={"content-type": "application/cloudevents+json",
                                                                  "authorization": "Bearer guessed"})
    assert wrong.status_code == 403
    after = {name: httpx.get(url[name] + "/status").json() for name in ("admin", "watch", "trigger")}
    assert after["trigger"]["runs"] == before["trigger"]["runs"] and after["trigger"]["pending"] == []
    assert after["watch"]["rows_in_window"] < before["watch"]["rows_in_window"] + 50  # (the client's own row may land)
    assert after["admin"]["traffic"] == before["admin"]["traffic"]
