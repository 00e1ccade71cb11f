"""The trigger service as a real process: admission rules, restart survival, and retrain -> canary -> rollout
against the real local serving runtime, with real kfp.local pipeline runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import pytest
import yaml
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

import numpy as np

from conftest import digits_csv, register_version, wait_until_answering
from kfloop.data import LabelledData, load_dataset, save_csv
from kfloop.policies import Policy
from kfloop.registry import ModelRegistry
from kfloop.serving.runtime import AdminServer, ServingRuntime, free_port

pytestmark = pytest.mark.slow
DRIFT = "io.kfloop.drift.detected"


def write_policy(path: Path, base: str, **retraining) -> Path:
    path.write_text(yaml.safe_dump({
        "model": "digits",
        "training": {"search_space": {"n_estimators": [20, 40], "max_features": ["sqrt"], "min_samples_leaf": [1]},
                     "cv_folds": 3, "holdout_fraction": 0.25, "seed": 7},
        "retraining": {"base_data": base, "cooldown_seconds": 0, "max_runs_per_day": 10, **retraining},
        "rollout": {"canary_percent": 30, "observe_seconds": 4, "rollback_failure_rate": 0.05},
    }))
    return path


class Trigger:
    def __init__(self, home: Path, registry: Path, policy: Path, *, admin_url: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "kfloop", "trigger", "--registry", str(registry), "--policy", str(policy),
                "--target", "digit", "--http-port", str(self.port), "--home", str(home), "--state-dir", str(home / "trigger")]
        if admin_url:
            argv += ["--admin-url", admin_url]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_answering(self.url + "/healthz", "trigger", 60)

    def alarm(self, event_id: str | None = None, event_type: str = DRIFT) -> httpx.Response:
        attributes = {"type": event_type, "source": "kfloop/watch/digits", "id": event_id or str(uuid.uuid4())}
        headers, body = to_binary(CloudEvent(attributes, {"model": "digits", "kind": "drift"}))
        return httpx.post(self.url + "/", headers=headers, content=body, timeout=30)

    def status(self) -> dict:
        return httpx.get(self.url + "/status").json()

    def wait_idle(self, runs: int, seconds: float = 240) -> list[dict]:
        deadline = time.time() + seconds
        while time.time() < deadline:
            status = self.status()
            done = [r for r in status["runs"] if r["outcome"] not in ("running", "pending")]
            if not status["pending"] and len(done) >= runs:
                return status["runs"]
            time.sleep(0.5)
        raise AssertionError(f"runs did not finish: {self.status()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


@pytest.fixture(scope="module")
def weak_v1(tmp_path_factory):
    """A registry with digits v1 trained on a sixth of the data (promoted); the small and the full data."""
    root = tmp_path_factory.mktemp("weak-v1")
    small = digits_csv(root / "digits-small.csv", every=6)
    register_version(root / "registry", "digits", small, n_estimators=40, work=root / "v1", target="digit")
    return root / "registry", small, digits_csv(root / "digits-full.csv")


@pytest.fixture
def registry_with_weak_v1(tmp_path, weak_v1):
    """This test's own copy of the weak-v1 registry, with the small and the full data."""
    registry, small, full = weak_v1
    shutil.copytree(registry, tmp_path / "registry")
    return tmp_path / "registry", small, full


def test_retraining_data_is_the_base_plus_labelled_shards_in_one_schema_and_shards_are_not_added_twice(tmp_path):
    from kfloop.serving.trigger import LocalRetrainer, TriggerConfig, TriggerService

    registry = tmp_path / "registry"
    register_version(registry, "digits", "builtin:digits", n_estimators=5, work=tmp_path / "v1")
    base = load_dataset("builtin:digits")
    shard_folder = registry / "digits" / "captures" / "20261201"
    shard_folder.mkdir(parents=True)
    shifted = LabelledData(base.features[:30] + 1.0, base.labels[:30], base.feature_names, "labeller",
                           ids=np.array([f"cap:{i}" for i in range(30)]))
    save_csv(shifted, str(shard_folder / "labelled-1.csv"))
    (shard_folder / "unlabelled.csv").write_text("id\n")  # captures without labels are not training data
    policy = Policy.model_validate({"model": "digits"})
    service = TriggerService(TriggerConfig("digits", str(registry), policy, tmp_path / "state"),
                             LocalRetrainer(policy, str(registry), tmp_path, model="digits"), None)

    uri, target = service.training_data("run1")
    data = load_dataset(uri, target=target)
    assert (target, data.rows, data.feature_names) == ("label", base.rows + 30, base.feature_names)
    np.testing.assert_allclose(data.features[: base.rows], base.features)
    np.testing.assert_allclose(data.features[base.rows:], base.features[:30] + 1.0)
    assert list(data.labels) == list(base.labels) + list(base.labels[:30])

    # Once a version trained on that folder serves, the next run starts again from the base, not base + old shards.
    register_version(registry, "digits", uri, n_estimators=5, work=tmp_path / "v2", target="label")
    again_uri, again_target = service.training_data("run2")
    assert load_dataset(again_uri, target=again_target).rows == base.rows + 30


def test_a_burst_of_alarms_starts_one_run_then_cooldown_and_budget_hold(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    policy = write_policy(tmp_path / "p.yaml", full, cooldown_seconds=25, max_runs_per_day=2)
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
        assert trigger.alarm().headers["x-kfloop-outcome"] == "cooldown"
        time.sleep(max(0.0, runs[0]["started"] + 25 - time.time()) + 1)
        assert trigger.alarm().headers["x-kfloop-outcome"] == "started"
        assert len(trigger.wait_idle(2)) == 2
        assert trigger.alarm().headers["x-kfloop-outcome"] == "budget"  # also inside the cooldown: the budget is named
        ignored = trigger.alarm(event_type="io.kfloop.something.else")
        assert ignored.status_code == 204 and "does not trigger retraining" in ignored.headers["x-kfloop-ignored"]
        assert httpx.post(trigger.url + "/", content=b"nope").status_code == 400
    finally:
        trigger.stop()


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


def test_drift_retrains_and_rolls_out_by_canary_with_no_failed_request_and_worse_or_failing_versions_do_not_stay(tmp_path, registry_with_weak_v1):
    registry, small, full = registry_with_weak_v1
    runtime = ServingRuntime(str(registry), "digits", http_port=free_port(), grpc_port=free_port(),
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


def test_a_canary_with_too_few_answers_is_rolled_back_and_the_old_version_keeps_serving(tmp_path, registry_with_weak_v1):
    from kfloop.serving.trigger import LocalDeployer, LocalRetrainer, TriggerConfig, TriggerService

    registry, _, full = registry_with_weak_v1
    runtime = ServingRuntime(str(registry), "digits", http_port=free_port(), grpc_port=free_port(), log_dir=tmp_path / "logs")
    runtime.start()
    admin = AdminServer(runtime, free_port())
    admin.start()
    try:
        new = register_version(registry, "digits", full, n_estimators=20, work=tmp_path / "v2", target="digit")
        policy = Policy.model_validate({"model": "digits", "rollout": {
            "canary_percent": 50, "observe_seconds": 1, "min_canary_answers": 20, "max_observe_seconds": 4}})
        service = TriggerService(TriggerConfig("digits", str(registry), policy, tmp_path / "state"),
                                 LocalRetrainer(policy, str(registry), tmp_path, model="digits"),
                                 LocalDeployer(admin.url, "digits"))
        body = {"instances": [[0.0] * 64]}
        statuses: list[int] = []
        done = threading.Event()

        def trickle() -> None:  # 2 req/s: half of them to the canary, far fewer than 20 in 4 s
            while not done.wait(0.5):
                statuses.append(httpx.post(runtime.endpoints["v1"], json=body, timeout=10).status_code)

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            result = service.rollout(new, "1")
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
    from kfloop.serving.trigger import canary_patch

    assert canary_patch("s3://b/r/leaf/4", 10) == {"spec": {"predictor": {"model": {"storageUri": "s3://b/r/leaf/4"}, "canaryTrafficPercent": 10}}}
    # All traffic: the merge patch removes canaryTrafficPercent (null), as KServe's promotion does.
    assert canary_patch("s3://b/r/leaf/4", None)["spec"]["predictor"]["canaryTrafficPercent"] is None
