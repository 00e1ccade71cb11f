"""Autoscaling: the decision engine's rules, and real servers scraped by a real Prometheus."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from testbed import wait_until_answering, register_version
from kfloop.policies import ScalingPolicy, ScalingRule
from kfloop.policies.scaling import Autoscaler
from kfloop.policies.scaling import ScalingEngine
from kfloop.policies.sources import LocalMetricsSource, PrometheusSource
from kfloop.local.runtime import ServingRuntime
from kfloop.local.supervisor import free_port
from kfloop.training import Prepared


RATE = ScalingRule(name="request-rate", signal="request_rate", window="10s", threshold=2.0)


FAILURES = ScalingRule(name="predictor-failures", signal="failure_rate", window="10s", threshold=0.9)


def engine(**overrides) -> ScalingEngine:
    settings = {"min_replicas": 1, "max_replicas": 4, "cooldown_seconds": 60, "rules": [RATE, FAILURES], **overrides}
    return ScalingEngine(ScalingPolicy(**settings))


@pytest.mark.parametrize(
    ("current", "rate", "failures", "desired", "action"),
    [
        (1, 1.9, 0.0, 1, "hold"),
        (1, 2.3, 0.0, 2, "scale_out"),
        (1, 2.1, 0.0, 1, "hold"),  # 2.1 / (2 * 1) is inside the HPA's 10 % tolerance
        (1, 7.0, 0.0, 4, "scale_out"),  # ceil(7/2) = 4
        (2, 30.0, 0.0, 4, "scale_out"),  # clamped to max_replicas
        (1, 0.5, 0.95, 1, "hold"),  # 0.95 / 0.9 is inside the HPA's 10 % tolerance
        (1, 0.5, 1.0, 2, "scale_out"),  # ceil(1 * 1.0 / 0.9) = 2
        (3, 0.5, 1.0, 4, "scale_out"),
        (2, None, None, 2, "hold"),  # no values at all: hold
    ],
)
def test_each_rule_wishes_as_the_hpa_would(current, rate, failures, desired, action):
    decision = engine().decide(current, {"request-rate": rate, "predictor-failures": failures}, now=0.0)
    assert (decision.desired, decision.action) == (desired, action)


def test_scaling_in_waits_for_the_cooldown_and_missing_signals_block_it():
    rules = engine(cooldown_seconds=60)
    assert rules.decide(1, {"request-rate": 7.0, "predictor-failures": 0.0}, now=0).desired == 4
    assert rules.decide(4, {"request-rate": 1.0, "predictor-failures": 0.0}, now=30).desired == 4  # within cooldown
    assert rules.decide(4, {"request-rate": 1.0, "predictor-failures": 0.0}, now=61).desired == 1
    held = engine().decide(4, {"request-rate": 1.0, "predictor-failures": None}, now=0)
    assert (held.desired, held.reason) == (4, "signals ['predictor-failures'] missing: not scaling in")


@pytest.fixture(scope="module")
def model(tmp_path_factory, serving_data):
    root = tmp_path_factory.mktemp("autoscale")
    register_version(root / "registry", "leaf", serving_data, n_estimators=20, work=root / "v1")
    rows = Prepared.load(str(root / "v1" / "prepared.npz")).holdout_features[:1].tolist()
    return root, rows


class Load:
    """Requests at a steady rate (per second) to a URL, in a background thread, until stopped."""

    def __init__(self, url: str, body: dict, per_second: float) -> None:
        self.url, self.body, self.per_second = url, body, per_second
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                self.statuses.append(client.post(self.url, json=self.body).status_code)
                self._stop.wait(1.0 / self.per_second)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Prometheus:
    """Debian's prometheus binary, scraping the runtime's file_sd targets every second."""

    def __init__(self, folder: Path, targets: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run does)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kfloop", "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}],
        }))
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until_answering(self.url + "/-/ready", "prometheus", 30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def wait_for(predicate, seconds: float, step: float = 0.25) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.mark.slow
@pytest.mark.heavy
def test_prometheus_driven_scaling_out_in_and_holding_and_the_embedded_engine_agrees(model, tmp_path):
    root, rows = model
    policy = ScalingPolicy(min_replicas=1, max_replicas=3, evaluation_seconds=2, cooldown_seconds=8, rules=[RATE])
    targets = tmp_path / "targets.json"
    runtime = ServingRuntime(str(root / "registry"), "leaf", home=tmp_path / "home", http_port=free_port(), grpc_port=free_port(),
                             log_dir=tmp_path / "logs", prometheus_targets=targets)
    runtime.start()
    prometheus = Prometheus(tmp_path, targets)
    acting = Autoscaler("leaf", runtime, policy, PrometheusSource(prometheus.url, "leaf"))
    shadow_engine = ScalingEngine(policy)
    shadow = LocalMetricsSource("leaf", runtime.metrics_urls)
    pairs = []

    def evaluate() -> None:
        now = time.time()
        shadow_decision = shadow_engine.decide(runtime.replica_count(), shadow.read(policy.rules), now)
        decision = acting.step(now)
        pairs.append((decision, shadow_decision))

    def phase_end(replicas: int) -> tuple:
        """The pair once the acting engine has reached `replicas` and the shadow has had two more
        evaluations to catch up (the two sample at different moments, so a ramp may end one
        evaluation apart)."""
        assert wait_for(lambda: evaluate() or runtime.replica_count() == replicas, 60, step=policy.evaluation_seconds)
        wait_for(lambda: pairs[-1][1].desired == replicas or evaluate(), 2 * policy.evaluation_seconds + 1,
                 step=policy.evaluation_seconds)
        return pairs[-1]

    load = Load(runtime.endpoints["v1"], {"instances": rows}, per_second=9)
    try:
        # Out: 9 req/s on 1 replica is over 2 req/s per replica.
        phase_ends = [phase_end(3)]
        crossing = next(i for i, (d, _) in enumerate(pairs) if (d.values["request-rate"] or 0) > 2.0)
        assert pairs[crossing][0].action == "scale_out"  # in the evaluation where the windowed rate first crossed
        # In: no traffic; after the rate falls and the cooldown passes, back to 1.
        load.stop()
        phase_ends.append(phase_end(1))
        # Hold: out again, then Prometheus goes away with the traffic; the count must not fall.
        load = Load(runtime.endpoints["v1"], {"instances": rows}, per_second=9)
        phase_ends.append(phase_end(3))
        load.stop()
        prometheus.stop()
        held = []
        for _ in range(10):  # 20 s: longer than window + cooldown (18 s)
            time.sleep(policy.evaluation_seconds)
            held.append(acting.step().desired)
        assert held == [3] * 10 and runtime.replica_count() == 3
    finally:
        load.stop()
        prometheus.stop()
        runtime.stop()
    assert 200 in load.statuses and set(load.statuses) == {200}
    # Same traffic, same rules, same engine: the embedded source reaches the same decision at the end of
    # every phase (out, in, out), at most two evaluations after the acting one. During a ramp the two may
    # differ for several evaluations (Prometheus's rate() needs two scrapes inside the window and lags on a
    # loaded machine; the embedded source samples at evaluation time), but they never pull in opposite
    # directions from the same replica count.
    assert [(d.desired, s.desired) for d, s in phase_ends] == [(3, 3), (1, 1), (3, 3)]
    opposite = [(d.action, s.action) for d, s in pairs if {d.action, s.action} == {"scale_out", "scale_in"}]
    assert opposite == [], opposite


@pytest.mark.slow
@pytest.mark.heavy
def test_predictor_failures_scale_out_and_client_errors_do_not(model, tmp_path):
    root, rows = model
    policy = ScalingPolicy(min_replicas=1, max_replicas=3, evaluation_seconds=2, cooldown_seconds=60, rules=[FAILURES])
    runtime = ServingRuntime(str(root / "registry"), "leaf", home=tmp_path / "home", http_port=free_port(), grpc_port=free_port(),
                             log_dir=tmp_path / "logs", fault_injection=True)
    runtime.start()
    scaler = Autoscaler("leaf", runtime, policy, LocalMetricsSource("leaf", runtime.metrics_urls))
    try:
        predictor = runtime.metrics_urls()[0].removesuffix("/metrics")
        bad = Load(f"{predictor}/v1/models/leaf:predict", {"instances": [[1.0]]}, per_second=20)  # 400s at the predictor
        good = Load(runtime.endpoints["v1"], {"instances": rows}, per_second=5)
        for _ in range(5):
            time.sleep(policy.evaluation_seconds)
            assert scaler.step().desired == 1
        bad.stop()
        assert set(bad.statuses) == {400}
        runtime.inject_failures(1.0)
        assert wait_for(lambda: scaler.step().action == "scale_out", 30, step=policy.evaluation_seconds)
        fired = scaler.decisions[-1]
        assert fired.firing == ("predictor-failures",) and fired.values["predictor-failures"] > 0.9
        assert runtime.replica_count() == 2
        good.stop()
        assert 502 in good.statuses  # the client saw the predictor's failures through the transformer
    finally:
        runtime.stop()
