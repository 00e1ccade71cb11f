"""The trigger service as a real process running real kfp.local pipeline runs: alarm CloudEvents in,
admission outcomes out (one run for a burst, then cooldown and budget), ignored and malformed events, and a
run interrupted by a restart run again; who may send alarms, with its app in this process."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from testbed import DRIFT, InProcessTrigger, Trigger, write_policy

pytestmark = pytest.mark.slow

COOLDOWN = 45  # seconds: longer than a run takes on a busy 2-core machine (warm search, 3 task starts: ~20 s)


@pytest.mark.heavy
def test_a_burst_of_alarms_starts_one_run_then_cooldown_and_budget_hold(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    policy = write_policy(tmp_path / "p.yaml", full, cooldown_seconds=COOLDOWN, max_runs_per_day=2)
    trigger = Trigger(tmp_path / "home", registry, policy)
    try:
        ids = [str(uuid.uuid4()) for _ in range(50)]
        with ThreadPoolExecutor(16) as pool:  # 100 near-simultaneous alarms, each id twice
            outcomes = list(pool.map(lambda i: trigger.alarm(i).headers["x-kfloop-outcome"], ids + ids))
        assert outcomes.count("started") == 1
        assert outcomes.count("duplicate") == 50
        assert set(outcomes) <= {"started", "duplicate", "coalesced"}
        runs = trigger.wait_idle(1)
        assert len(runs) == 1 and runs[0]["outcome"] == "promoted" and runs[0]["version"] == "2"
        assert trigger.alarm().headers["x-kfloop-outcome"] == "cooldown", runs[0]
        time.sleep(max(0.0, runs[0]["started"] + COOLDOWN - time.time()) + 1)
        assert trigger.alarm().headers["x-kfloop-outcome"] == "started"
        assert len(trigger.wait_idle(2)) == 2
        assert trigger.alarm().headers["x-kfloop-outcome"] == "budget"  # also inside the cooldown: the budget is named
        ignored = trigger.alarm(event_type="io.kfloop.something.else")
        assert ignored.status_code == 204 and "does not trigger retraining" in ignored.headers["x-kfloop-ignored"]
        assert httpx.post(trigger.url + "/", content=b"nope", headers=trigger.auth).status_code == 400
    finally:
        trigger.stop()


def test_alarms_without_the_local_token_start_nothing(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    trigger = InProcessTrigger(tmp_path / "home", registry, write_policy(tmp_path / "p.yaml", full))
    try:
        missing = trigger.alarm(auth={})
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert "kfloop token" in missing.json()["error"]
        assert trigger.alarm(auth={"authorization": "Bearer not-the-token"}).status_code == 403
        assert trigger.alarm(auth={"authorization": "Basic dXNlcjpwdw=="}).status_code == 401
        # What a web page can send cross-site without a preflight: a text/plain POST, no credentials.
        form = httpx.post(trigger.url + "/", content=json.dumps({"specversion": "1.0", "id": "x", "source": "s", "type": DRIFT}),
                          headers={"content-type": "text/plain"})
        assert form.status_code == 401 and "x-kfloop-outcome" not in form.headers
        # DNS rebinding: the right token through a foreign Host name is still refused.
        rebound = trigger.alarm(auth=trigger.auth | {"host": "attacker.example:8095"})
        assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]
        # A name that only starts like a loopback address is a DNS name an attacker can rebind.
        assert trigger.alarm(auth=trigger.auth | {"host": "127.0.0.1.nip.io"}).status_code == 403
        # Headers are bounded before anything is parsed: 431 and the connection closed, the server unharmed.
        padded = httpx.post(trigger.url + "/", content=b"{}", headers={"x-pad": "x" * (1 << 20)})
        assert padded.status_code == 431
        assert httpx.get(trigger.url + "/healthz").status_code == 200
        status = trigger.status()
        assert status["pending"] == [] and status["runs"] == []
        assert (tmp_path / "home" / "token").stat().st_mode & 0o777 == 0o600
    finally:
        trigger.stop()


@pytest.mark.heavy
def test_a_run_interrupted_by_a_restart_is_run_again(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    policy = write_policy(tmp_path / "p.yaml", full)
    trigger = Trigger(tmp_path / "home", registry, policy)
    assert trigger.alarm("first").headers["x-kfloop-outcome"] == "started"
    deadline = time.time() + 30
    while time.time() < deadline and not trigger.status()["runs"]:
        time.sleep(0.1)
    trigger.stop()  # mid-run
    state = json.loads((tmp_path / "home" / "trigger" / "trigger-state.json").read_text())
    assert [r["outcome"] for r in state["runs"]] == ["running"]
    trigger = Trigger(tmp_path / "home", registry, policy, port=trigger.port)
    try:
        runs = trigger.wait_idle(1)
        assert runs[0]["restarted"] is True and runs[0]["event_id"] == "first"
        assert runs[0]["outcome"] == "promoted"
        assert trigger.alarm("first").headers["x-kfloop-outcome"] == "duplicate"
    finally:
        trigger.stop()
