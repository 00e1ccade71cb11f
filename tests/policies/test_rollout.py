"""Rollouts: drift retrains and rolls out by canary against the real local serving runtime with no failed
request, worse or failing versions do not stay, a canary with too few answers is rolled back, and on a
cluster a rollout is a KServe patch."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import httpx
import pytest

from testbed import Trigger, register_version, write_policy
from kfloop.policies import Policy
from kfloop.registry import ModelRegistry
from kfloop.local.runtime import AdminServer, ServingRuntime
from kfloop.credentials import local_token
from kfloop.local.supervisor import free_port


@pytest.mark.slow
@pytest.mark.heavy
def test_drift_retrains_and_rolls_out_by_canary_with_no_failed_request_and_worse_or_failing_versions_do_not_stay(tmp_path, registry_with_weak_v1):
    registry, small, full = registry_with_weak_v1
    runtime = ServingRuntime(str(registry), "digits", home=tmp_path / "home", http_port=free_port(), grpc_port=free_port(),
                             log_dir=tmp_path / "logs", fault_injection=True)
    runtime.start()
    admin = AdminServer(runtime, free_port())
    admin.start()
    policy = write_policy(tmp_path / "p.yaml", full)
    trigger = Trigger(tmp_path / "home", registry, policy, admin_url=admin.url)
    store = ModelRegistry(registry)
    body = json.dumps({"instances": [[0.0] * 64]}).encode()
    failures: list = []
    answers = {"ok": 0}
    stop = threading.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(runtime.endpoints["v1"], data=body, headers={"content-type": "application/json"}) as answer:
                    if answer.status == 200:
                        answers["ok"] += 1
                    else:
                        failures.append((answer.status, await answer.text()))
                await asyncio.sleep(0.01)

    loader = threading.Thread(target=asyncio.run, args=(load(),))
    loader.start()
    try:
        # 1. Better data: promoted by the gate, canary, then all traffic.
        assert trigger.alarm().headers["x-kfloop-outcome"] == "started"
        run = trigger.wait_idle(1)[-1]
        assert (run["outcome"], run["version"]) == ("promoted", "2")
        assert run["canary_answers"] > 0 and run["canary_failure_rate"] == 0.0
        assert runtime.version == "2" and store.production_version("digits") == "2"
        assert failures == [] and answers["ok"] > 100

        # 2. Worse data: the gate rejects it; version 2 keeps serving.
        write_policy(tmp_path / "p.yaml", small)
        trigger.stop()
        trigger = Trigger(tmp_path / "home", registry, policy, admin_url=admin.url)
        assert trigger.alarm().headers["x-kfloop-outcome"] == "started"
        run = trigger.wait_idle(2)[-1]
        assert (run["outcome"], run["promoted"]) == ("rejected", False)
        assert runtime.version == "2" and store.production_version("digits") == "2"

        # 3. A new version that fails in its canary is rolled back.
        write_policy(tmp_path / "p.yaml", full, include_captures=False)
        trigger.stop()
        trigger = Trigger(tmp_path / "home", registry, policy, admin_url=admin.url)
        stop.set()
        loader.join()
        stop.clear()
        store.set_production("digits", "1")  # so the full-data model beats production again
        runtime.switch_version("1")
        loader = threading.Thread(target=asyncio.run, args=(load(),))
        loader.start()
        assert trigger.alarm().headers["x-kfloop-outcome"] == "started"
        deadline = time.time() + 240
        injected = None
        while time.time() < deadline and injected is None:
            shares = runtime.status()["traffic"]
            new = [s["version"] for s in shares if s["version"] not in ("1",)]
            if len(shares) == 2 and new:
                runtime.inject_failures(1.0, version=new[0])
                injected = new[0]
            time.sleep(0.05)
        run = trigger.wait_idle(3)[-1]
        assert run["outcome"] == "rolled_back" and run["version"] == injected
        assert run["rollback_reason"].startswith("canary 5xx share")
        assert runtime.version == "1" and store.production_version("digits") == "1"
        assert store.metadata("digits", injected)["status"] == "rolled_back"
    finally:
        stop.set()
        loader.join()
        trigger.stop()
        admin.stop()
        runtime.stop()


@pytest.mark.slow
@pytest.mark.heavy
def test_a_canary_with_too_few_answers_is_rolled_back_and_the_old_version_keeps_serving(tmp_path, registry_with_weak_v1):
    from kfloop.policies.rollout import LocalDeployer, roll_out

    registry, _, full = registry_with_weak_v1
    runtime = ServingRuntime(str(registry), "digits", home=tmp_path / "home", http_port=free_port(), grpc_port=free_port(),
                             log_dir=tmp_path / "logs")
    runtime.start()
    admin = AdminServer(runtime, free_port())
    admin.start()
    try:
        new = register_version(registry, "digits", full, n_estimators=20, work=tmp_path / "v2", target="digit")
        policy = Policy.model_validate({"model": "digits", "rollout": {
            "canary_percent": 50, "observe_seconds": 1, "min_canary_answers": 20, "max_observe_seconds": 4}})
        deployer = LocalDeployer(admin.url, "digits", local_token(tmp_path / "home"))
        body = {"instances": [[0.0] * 64]}
        statuses: list[int] = []
        done = threading.Event()

        def trickle() -> None:  # 2 req/s: half of them to the canary, far fewer than 20 in 4 s
            while not done.wait(0.5):
                statuses.append(httpx.post(runtime.endpoints["v1"], json=body, timeout=10).status_code)

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            result = roll_out(deployer, ModelRegistry(registry), "digits", policy.rollout, new, "1").record()
        finally:
            done.set()
            sender.join()
        assert result["outcome"] == "rolled_back" and result["rolled_back"] - result["canary_started"] >= 4
        assert 0 < result["canary_answers"] < 20
        assert "canary answers in 4 s, fewer than min_canary_answers (20)" in result["rollback_reason"]
        assert runtime.version == "1" and ModelRegistry(registry).production_version("digits") == "1"
        assert ModelRegistry(registry).metadata("digits", new)["status"] == "rolled_back"
        assert statuses and set(statuses) == {200}
    finally:
        admin.stop()
        runtime.stop()


def test_a_kserve_rollout_is_a_storage_uri_and_canary_percentage_patch():
    from kfloop.policies.rollout import canary_patch

    assert canary_patch("s3://b/r/leaf/4", 10) == {"spec": {"predictor": {"model": {"storageUri": "s3://b/r/leaf/4"}, "canaryTrafficPercent": 10}}}
    # All traffic: the merge patch removes canaryTrafficPercent (null), as KServe's promotion does.
    assert canary_patch("s3://b/r/leaf/4", None)["spec"]["predictor"]["canaryTrafficPercent"] is None
