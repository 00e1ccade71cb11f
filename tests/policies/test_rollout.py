"""Rollouts: drift retrains and rolls out by canary against the real local serving runtime with no failed
request, worse or failing versions do not stay, a canary with too few answers is rolled back, and on a
cluster a rollout is a KServe patch. A failure in any step puts the old version back at 100 % with the
production pointer on it; a rollback that fails is recorded and done when the trigger restarts; a restarted
trigger carries on from the recorded step -- it judges the running canary and never trains again -- and gives
up on a run that keeps being interrupted."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from testbed import DRIFT, Trigger, register_version, write_policy
from kfloop.errors import UpstreamError
from kfloop.policies import Policy
from kfloop.policies.retraining import Retrainer, RetrainingConfig, RetrainingService
from kfloop.policies.rollout import Deployer, LocalDeployer, Retries, roll_back, roll_out
from kfloop.registry import ModelRegistry
from kfloop.local.admin import AdminServer
from kfloop.local.runtime import ServingRuntime
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
def test_a_canary_with_too_few_answers_is_rolled_back_and_the_old_version_keeps_serving(tmp_path, serving_v1):
    registry, full, runtime, admin = serving_v1
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


def test_a_kserve_rollout_is_a_storage_uri_and_canary_percentage_patch():
    from kfloop.policies.rollout import canary_patch

    from kfloop.registry import ModelRegistry

    version_uri = ModelRegistry("s3://b/r").uri("leaf", "4")  # what KServeDeployer.set_traffic patches in
    assert version_uri == "s3://b/r/leaf/4/"  # a folder: KServe's storage initializer would copy leaf/40/ for "leaf/4"
    assert canary_patch(version_uri, 10) == {"spec": {"predictor": {"model": {"storageUri": version_uri}, "canaryTrafficPercent": 10}}}
    # All traffic: the merge patch removes canaryTrafficPercent (null), as KServe's promotion does.
    assert canary_patch("s3://b/r/leaf/4", None)["spec"]["predictor"]["canaryTrafficPercent"] is None


# --- failures, crashes and restarts ---------------------------------------------------------------------

FAST = {"canary_percent": 10, "observe_seconds": 0, "min_canary_answers": 5, "max_observe_seconds": 5}
FEW_TRIES = Retries(3, 0.01)


class SimulatedCrash(BaseException):
    """The process dying mid-call: not an ``Exception``, so nothing in kfloop catches it and nothing after it runs."""


class InProcessDeployer(Deployer):
    """The Deployer contract served in this process: the split is a dict, and each read of a serving version's
    counts finds ``answers_per_read`` more answers (none failed).

    Calls fail on purpose: ``fail={"set_traffic": {2}}`` makes the second ``set_traffic`` raise an
    :class:`~kfloop.errors.UpstreamError` (a runtime that refused or went away); ``crash`` raises
    :class:`SimulatedCrash` instead. Call numbers count over the deployer's life, across services.
    """

    def __init__(self, serving: str, *, fail=None, crash=None, answers_per_read: float = 10.0) -> None:
        self.weights = {serving: 100.0}
        self.fail, self.crash = fail or {}, crash or {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[str] = collections.Counter()
        self.answers_per_read = answers_per_read
        self.mirror: str | None = None
        self.splits: list[tuple[dict[str, float], str | None]] = []

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if self.calls[method] in self.crash.get(method, ()):
            raise SimulatedCrash(f"{method} call {self.calls[method]}")
        if self.calls[method] in self.fail.get(method, ()):
            raise UpstreamError(f"{method} failed on purpose (call {self.calls[method]})")

    def serving_version(self) -> str:
        self._call("serving_version")
        return max(self.weights, key=self.weights.__getitem__)

    mirrors = True

    def set_traffic(self, weights: dict[str, float], mirror: str | None = None) -> None:
        self._call("set_traffic")
        self.weights = {version: float(weight) for version, weight in weights.items() if weight > 0}
        self.mirror = mirror
        self.splits.append((dict(self.weights), mirror))

    def failure_counts(self, version: str) -> tuple[float, float]:
        self._call("failure_counts")
        if version in self.weights:
            self.answers[version] += self.answers_per_read
        return 0.0, self.answers[version]


class GateRetrainer(Retrainer):
    """The pipeline's own steps without KFP: a version trained on ``data`` (``tests/testbed.register_version``), then
    the real promotion gate (``kfloop.steps.gate_step``, margin -1: it passes), which only approves the version,
    as in the service's pipeline runs (``move_production`` false). Counts its runs."""

    def __init__(self, registry: Path, data: str, work: Path) -> None:
        self.registry, self.data, self.work = registry, data, work
        self.calls = 0

    def run(self, data_uri, target, run_name, search):
        from kfloop.steps import gate_step

        self.calls += 1
        work = self.work / f"{run_name}-{self.calls}"
        version = register_version(self.registry, "digits", self.data, n_estimators=5, work=work, target="digit", promote=False)
        return gate_step(str(self.registry), "digits", version, str(work / "prepared.npz"), "accuracy", -1.0,
                         move_production=False)


@pytest.fixture(scope="module")
def promoted_v2(tmp_path_factory, weak_v1):
    """The weak-v1 registry plus a version 2 the gate promoted (production pointer on 2, no rollout yet). Read-only."""
    root = tmp_path_factory.mktemp("promoted-v2")
    registry, _, full = weak_v1
    shutil.copytree(registry, root / "registry")
    assert register_version(root / "registry", "digits", full, n_estimators=5, work=root / "v2", target="digit") == "2"
    return root / "registry"


@pytest.mark.parametrize("step, fail", [
    ("gated", {}),  # the step's record cannot be written
    ("canary", {"set_traffic": {1}}),  # the runtime refuses the split
    ("judged", {"failure_counts": {2}}),  # the metrics source is down mid-canary
    ("promoted", {"set_traffic": {2}}),  # the runtime refuses all traffic to the new version
])
def test_a_failure_in_any_rollout_step_puts_the_old_version_back_at_100_percent_with_the_pointer_on_it(tmp_path, promoted_v2, step, fail):
    shutil.copytree(promoted_v2, tmp_path / "registry")
    store = ModelRegistry(tmp_path / "registry")
    deployer = InProcessDeployer("1", fail=fail)
    recorded: list[str] = []

    def on_step(facts: dict) -> None:
        if facts["step"] == step == "gated":
            raise OSError(28, "No space left on device")
        recorded.append(facts["step"])

    policy = Policy.model_validate({"model": "digits", "rollout": FAST}).rollout
    result = roll_out(deployer, store, "digits", policy, "2", "1", on_step=on_step, retries=FEW_TRIES).record()
    assert result["outcome"] == "rolled_back" and result["rollback_reason"].startswith(f"step {step!r} failed: ")
    assert deployer.weights == {"1": 100.0} and store.production_version("digits") == "1"
    assert store.metadata("digits", "2")["status"] == "rolled_back"
    assert store.metadata("digits", "2")["rollback"]["reason"] == result["rollback_reason"]
    assert recorded == ["gated", "canary", "judged"][: ["gated", "canary", "judged", "promoted"].index(step)]


class LabelledDeployer(InProcessDeployer):
    """An in-process deployer whose versions have the realised accuracy the test gives (version -> (accuracy, labels))."""

    def __init__(self, serving: str, accuracy: dict[str, tuple[float, int]], agreement: dict[str, tuple[float, int]] | None = None) -> None:
        super().__init__(serving)
        self.accuracy, self.agreements = accuracy, agreement or {}

    def realised_accuracy(self, version: str) -> tuple[float, int] | None:
        return self.accuracy.get(version)

    def agreement(self, version: str) -> tuple[float, int] | None:
        return self.agreements.get(version) if self.mirror == version else None


@pytest.mark.parametrize("canary, outcome, note", [
    ((0.70, 30), "rolled_back", "canary 0.700 over 30 labelled answers, production 0.900 over 200"),
    ((0.89, 30), "promoted", "canary 0.890 over 30 labelled answers, production 0.900 over 200"),
    ((0.50, 3), "rolled_back", "canary 0.500 over 3 labelled answers, production 0.900 over 200 "
                               "(fewer than min_labelled_answers, 20: judged on what is there)"),
    (None, "promoted", "no labelled answers of the canary: judged on its 5xx share alone"),
], ids=["trails production", "within the margin", "too few labels: judged on them", "no labels"])
def test_a_canary_is_judged_on_its_labelled_accuracy_against_production(tmp_path, promoted_v2, canary, outcome, note):
    shutil.copytree(promoted_v2, tmp_path / "registry")
    store = ModelRegistry(tmp_path / "registry")
    deployer = LabelledDeployer("1", {"1": (0.90, 200), **({"2": canary} if canary else {})})
    judged: list[dict] = []
    policy = Policy.model_validate({"model": "digits", "rollout": {**FAST, "max_observe_seconds": 2}}).rollout
    started = time.monotonic()
    result = roll_out(deployer, store, "digits", policy, "2", "1", retries=FEW_TRIES,
                      on_step=lambda facts: judged.extend([facts] if facts["step"] == "judged" else [])).record()
    assert result["outcome"] == outcome and judged[0]["canary_accuracy_note"] == note
    if canary is None or canary[1] < policy.min_labelled_answers:
        assert time.monotonic() - started >= 2  # it waited for labels, up to max_observe_seconds
    if outcome == "rolled_back":
        assert result["rollback_reason"].startswith(f"canary accuracy {canary[0]:.3f} trails production's 0.900 by more "
                                                    "than max_accuracy_drop 0.02")
        assert deployer.weights == {"1": 100.0} and store.production_version("digits") == "1"
    else:
        assert deployer.weights == {"2": 100.0} and store.production_version("digits") == "2"
    assert (judged[0]["canary_accuracy"], judged[0]["production_accuracy"]) == (canary and canary[0], 0.90)


@pytest.mark.parametrize("shadow_accuracy, outcome", [((0.95, 30), "promoted"), ((0.60, 30), "rolled_back")],
                         ids=["passes the shadow", "fails the shadow"])
def test_a_shadow_stage_mirrors_traffic_before_the_canary_and_a_shadow_that_trails_production_never_takes_a_request(
        tmp_path, promoted_v2, shadow_accuracy, outcome):
    shutil.copytree(promoted_v2, tmp_path / "registry")
    store = ModelRegistry(tmp_path / "registry")
    deployer = LabelledDeployer("1", {"1": (0.90, 200), "2": shadow_accuracy}, agreement={"2": (0.80, 25)})
    steps: list[dict] = []
    shadow = {"enabled": True, "observe_seconds": 0, "min_answers": 20, "max_observe_seconds": 5}
    policy = Policy.model_validate({"model": "digits", "rollout": {**FAST, "shadow": shadow}}).rollout
    result = roll_out(deployer, store, "digits", policy, "2", "1", retries=FEW_TRIES, on_step=steps.append).record()
    assert result["outcome"] == outcome
    assert deployer.splits[0] == ({"1": 100.0}, "2")  # all traffic on production, a copy of each request to the shadow
    [shadowed] = [s for s in steps if s["step"] == "shadowed"]
    assert (shadowed["shadow_agreement"], shadowed["shadow_answers"], shadowed["shadow_accuracy"]) == (0.80, 25, shadow_accuracy[0])
    if outcome == "promoted":
        assert [s["step"] for s in steps] == ["gated", "shadow", "shadowed", "canary", "judged"]
        assert deployer.splits[1:] == [({"1": 90.0, "2": 10.0}, None), ({"2": 100.0}, None)]
    else:
        assert [s["step"] for s in steps] == ["gated", "shadow", "shadowed"]
        assert shadowed["rollback_reason"].startswith("shadow accuracy 0.600 trails production's 0.900")
        assert deployer.splits[1:] == [({"1": 100.0}, None)]  # the shadow went without ever answering a client
        assert store.production_version("digits") == "1" and store.metadata("digits", "2")["status"] == "rolled_back"


def test_a_rollback_that_fails_is_recorded_inconsistent_and_a_later_rollback_finishes_it(tmp_path, promoted_v2):
    shutil.copytree(promoted_v2, tmp_path / "registry")
    store = ModelRegistry(tmp_path / "registry")
    # The runtime goes away mid-canary: its counts, then three tries to put traffic back, fail.
    deployer = InProcessDeployer("1", fail={"failure_counts": {2}, "set_traffic": {2, 3, 4}})
    policy = Policy.model_validate({"model": "digits", "rollout": FAST}).rollout
    result = roll_out(deployer, store, "digits", policy, "2", "1", retries=FEW_TRIES).record()
    assert result["outcome"] == "failed_inconsistent"
    assert result["rollback_reason"] == "step 'judged' failed: UpstreamError: failure_counts failed on purpose (call 2)"
    assert result["error"] == ("could not roll back after 3 tries: traffic back to version 1: "
                               "UpstreamError: set_traffic failed on purpose (call 4)")
    assert deployer.weights == {"1": 90.0, "2": 10.0} and store.production_version("digits") == "1"
    again = roll_back(deployer, store, "digits", "2", "1", result["rollback_reason"], retries=FEW_TRIES, facts=result)
    assert again.outcome == "rolled_back" and deployer.weights == {"1": 100.0}
    assert store.metadata("digits", "2")["status"] == "rolled_back"


def _trigger(tmp_path, registry, full, retrainer, deployer, **rollout):
    policy = Policy.model_validate({"model": "digits", "retraining": {"base_data": full, "cooldown_seconds": 0},
                                    "rollout": {**FAST, **rollout}})
    config = RetrainingConfig("digits", str(registry), policy, tmp_path / "state", target="digit", retries=FEW_TRIES)
    return RetrainingService(config, retrainer, deployer)


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / "trigger-state.json").read_text())


@pytest.mark.parametrize("step, crash", [("gated", {"failure_counts": {1}}), ("canary", {"failure_counts": {2}})])
def test_a_trigger_restarted_mid_rollout_carries_on_from_the_recorded_step_without_training_again(tmp_path, registry_with_weak_v1,
                                                                                                 step, crash):
    registry, _, full = registry_with_weak_v1
    store = ModelRegistry(registry)
    retrainer = GateRetrainer(registry, full, tmp_path / "work")
    deployer = InProcessDeployer("1", crash=crash)
    first = _trigger(tmp_path, registry, full, retrainer, deployer)
    assert first.admit("alarm-1", DRIFT) == "started"
    with pytest.raises(SimulatedCrash):
        first.run_next()
    [interrupted] = _state(tmp_path)["runs"]
    assert (interrupted["outcome"], interrupted["step"], interrupted["version"], interrupted["old_version"]) == ("running", step, "2", "1")
    assert store.production_version("digits") == "1"  # only the rollout moves it to 2
    assert store.metadata("digits", "2")["status"] == "approved"

    restarted = _trigger(tmp_path, registry, full, retrainer, deployer)
    run = restarted.run_next()
    assert (run["outcome"], run["version"], run["restarts"]) == ("promoted", "2", 1)
    assert retrainer.calls == 1 and deployer.calls["set_traffic"] == 2  # the canary once, then all traffic
    if step == "canary":
        assert run["canary_started"] == interrupted["canary_started"]  # the same canary, judged
    assert deployer.weights == {"2": 100.0} and store.production_version("digits") == "2"
    assert store.metadata("digits", "2")["status"] == "promoted" and store.metadata("digits", "2")["gate"]["promoted"]
    assert restarted.admit("alarm-1", DRIFT) == "duplicate"


def test_a_run_interrupted_more_than_max_restarts_times_is_abandoned_and_its_canary_rolled_back(tmp_path, registry_with_weak_v1):
    registry, _, full = registry_with_weak_v1
    store = ModelRegistry(registry)
    retrainer = GateRetrainer(registry, full, tmp_path / "work")
    deployer = InProcessDeployer("1", crash={"failure_counts": set(range(2, 100))})  # every judging read kills the trigger
    service = _trigger(tmp_path, registry, full, retrainer, deployer)
    assert service.admit("alarm-1", DRIFT) == "started"
    for restarts in range(4):  # the first run and three resumptions (max_restarts: 3)
        with pytest.raises(SimulatedCrash):
            service.run_next()
        assert _state(tmp_path)["runs"][-1]["step"] == "canary"
        service = _trigger(tmp_path, registry, full, retrainer, deployer)
    run = service.run_next()
    assert (run["outcome"], run["restarts"], run["charged"]) == ("abandoned", 4, True)
    assert run["error"] == ("interrupted 4 times (the service stopped while it ran, last in step 'canary'), "
                            "more than max_restarts (3)")
    assert run["rollback_reason"] == "run abandoned: " + run["error"]
    assert retrainer.calls == 1
    assert deployer.weights == {"1": 100.0} and store.production_version("digits") == "1"
    assert store.metadata("digits", "2")["status"] == "rolled_back"
    assert service.run_next() is None and _state(tmp_path)["runs"][-1]["outcome"] == "abandoned"


@pytest.fixture
def serving_v1(tmp_path, registry_with_weak_v1):
    """The real local runtime serving version 1 of the weak-v1 registry, with its admin API."""
    registry, _, full = registry_with_weak_v1
    runtime = ServingRuntime(str(registry), "digits", home=tmp_path / "home", http_port=free_port(), grpc_port=free_port(),
                             log_dir=tmp_path / "logs")
    runtime.start()
    admin = AdminServer(runtime, free_port())
    admin.start()
    try:
        yield registry, full, runtime, admin
    finally:
        admin.stop()
        runtime.stop()


class _Trickle:
    """Client requests to the runtime, ten a second, keeping the status of each."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self.statuses: list[int] = []
        self._done = threading.Event()
        body = {"instances": [[0.0] * 64]}

        def send() -> None:
            while not self._done.wait(0.1):
                self.statuses.append(httpx.post(runtime.endpoints["v1"], json=body, timeout=10).status_code)

        self._thread = threading.Thread(target=send)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.heavy
def test_a_trigger_restarted_mid_canary_judges_the_running_canary_of_the_runtime_without_training_again(tmp_path, serving_v1):
    registry, full, runtime, admin = serving_v1
    store = ModelRegistry(registry)
    token = local_token(tmp_path / "home")

    class DyingDeployer(LocalDeployer):
        """The real deployer, in a trigger that dies at its first look at the running canary."""

        reads = 0

        def failure_counts(self, version: str) -> tuple[float, float]:
            self.reads += 1
            if self.reads > 1:
                raise SimulatedCrash("the trigger is killed mid-canary")
            return super().failure_counts(version)

    retrainer = GateRetrainer(registry, full, tmp_path / "work")
    rollout = {"canary_percent": 50, "observe_seconds": 2, "min_canary_answers": 4, "max_observe_seconds": 20}
    traffic = _Trickle(runtime)
    try:
        first = _trigger(tmp_path, registry, full, retrainer, DyingDeployer(admin.url, "digits", token), **rollout)
        assert first.admit("alarm-1", DRIFT) == "started"
        with pytest.raises(SimulatedCrash):
            first.run_next()
        assert {s["version"]: s["weight"] for s in runtime.status()["traffic"]} == {"1": 50.0, "2": 50.0}
        assert store.production_version("digits") == "1"
        canary_started = _state(tmp_path)["runs"][-1]["canary_started"]

        restarted = _trigger(tmp_path, registry, full, retrainer, LocalDeployer(admin.url, "digits", token), **rollout)
        run = restarted.run_next()
    finally:
        traffic.stop()
    assert (run["outcome"], run["version"], run["restarts"], run["canary_started"]) == ("promoted", "2", 1, canary_started)
    assert run["canary_answers"] >= 4 and run["canary_failure_rate"] == 0.0
    assert retrainer.calls == 1
    assert {s["version"]: s["weight"] for s in runtime.status()["traffic"]} == {"2": 100.0}
    assert store.production_version("digits") == "2"
    assert traffic.statuses and set(traffic.statuses) == {200}


@pytest.mark.slow
@pytest.mark.heavy
def test_a_rollback_the_runtime_cannot_take_is_recorded_inconsistent_and_done_when_the_trigger_restarts(tmp_path, serving_v1):
    registry, full, runtime, admin = serving_v1
    store = ModelRegistry(registry)
    token = local_token(tmp_path / "home")
    retrainer = GateRetrainer(registry, full, tmp_path / "work")
    rollout = {"canary_percent": 50, "observe_seconds": 3, "min_canary_answers": 1, "max_observe_seconds": 20}
    first = _trigger(tmp_path, registry, full, retrainer, LocalDeployer(admin.url, "digits", token), **rollout)
    assert first.admit("alarm-1", DRIFT) == "started"
    ended: list[dict] = []
    worker = threading.Thread(target=lambda: ended.append(first.run_next()))
    worker.start()
    deadline = time.time() + 25
    while time.time() < deadline and len(runtime.status()["traffic"]) < 2:
        time.sleep(0.05)
    port = int(admin.url.rsplit(":", 1)[1])
    admin.stop()  # the admin API goes away mid-canary: the canary cannot be judged, nor traffic put back
    worker.join(30)
    [run] = ended
    assert run["outcome"] == "failed_inconsistent" and run["step"] == "canary"
    assert run["rollback_reason"].startswith("step 'judged' failed: ")
    assert run["error"].startswith("could not roll back after 3 tries: traffic back to version 1: ")
    assert {s["version"]: s["weight"] for s in runtime.status()["traffic"]} == {"1": 50.0, "2": 50.0}
    assert store.production_version("digits") == "1"  # the pointer went back; the traffic could not

    back = AdminServer(runtime, port)
    back.start()
    restarted = _trigger(tmp_path, registry, full, retrainer, LocalDeployer(back.url, "digits", token), **rollout)
    restarted.start()  # its worker finishes the broken rollout first
    try:
        deadline = time.time() + 20
        while time.time() < deadline and restarted.status()["runs"][-1]["outcome"] == "failed_inconsistent":
            time.sleep(0.1)
    finally:
        restarted.stop()
        back.stop()
    run = _state(tmp_path)["runs"][-1]
    assert run["outcome"] == "rolled_back" and run["repaired"] >= run["finished"]
    assert {s["version"]: s["weight"] for s in runtime.status()["traffic"]} == {"1": 100.0}
    assert store.production_version("digits") == "1" and store.metadata("digits", "2")["status"] == "rolled_back"
    assert retrainer.calls == 1
