"""The scripted demo: the automation table played end to end on one machine.

:meth:`Demo.run` starts a :class:`~kfloop.local.stack.LocalStack` in ``DemoSettings.home`` with
:func:`demo_policy`'s policy time-scaled by ``speed``, and plays the :data:`PHASES` -- train, scale
out and in, injected 503s, concept drift, covariate drift -- with client traffic and labels from
:mod:`kfloop.demo.traffic`. What it observes goes into a :class:`~kfloop.demo.results.DemoResult`
(:mod:`kfloop.demo.results`). Used by ``kfloop demo`` (:mod:`kfloop.cli.loop`, with :func:`new_demo_home`)
and the live display :mod:`kfloop.demo.view`. The phases: ``docs/demo.md``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from kfloop.credentials import bearer, local_token
from kfloop.data import LabelledData, load_dataset
from kfloop.errors import NotFoundError, PermanentError, PolicyError
from kfloop.event_types import ACCURACY_EVENT, DRIFT_EVENT, OUTLIER_EVENT
from kfloop.http_clients import http_client
from kfloop.labels import TruthFigures
from kfloop.policies import Policy, ScalingRule
from kfloop.policies.retraining import FINISHED_OUTCOMES
from kfloop.registry import ModelRegistry
from kfloop.demo.results import (
    PHASES, DemoResult, Firing, alarm_outcome, alarm_rule, alarm_time, automation_rows, describe_alarm, loop_timings,
    scaling_firings,
)
from kfloop.demo.traffic import Labeller, RequestRecord, Traffic, serve_rows, shift, swapped_classes
from kfloop.local.stack import LocalStack, StackPorts

SAMPLE_SECONDS = 0.5
DEMO_WATCH_ALPHA = 0.001  # false alarms per tested window: clean traffic must not start a retraining mid-scenario
LABELLED_FRACTION = 0.5  # share of the training split that arrives shifted and labelled
IMPORTANCE_TOP = 20  # features per version in the report's global importance
SWAPPED_SHARE = 0.4  # concept drift: share of the classes whose labels swap, in pairs (realised accuracy ~0.6)
CATALOGUE_ROWS_PER_REQUEST = 50  # the concept phase's catalogue goes in requests of this many rows
DEMO_RETRAINING_COOLDOWN = 300  # s (before the speed divides it): the concept run's cooldown ends before the drift alarm
DEMO_RUNS = 2  # retraining runs the demo's budget allows: the concept phase's and the drift phase's
# Client request rates of the phases, as multiples of the request-rate rule's threshold (per replica).
# The fault phase runs at the clean rate so that only the failure-rate rule has a reason to scale out.
CLEAN_RATE, LOAD_RATE, FAULT_RATE, CONCEPT_RATE, DRIFT_RATE = 0.5, 4.0, 0.5, 1.5, 1.5
SETTLED_SHARE = 0.75  # before the fault: the windowed request rate below this share of what min replicas take

log = logging.getLogger(__name__)


def demo_policy(policy: Policy) -> Policy:
    """``policy`` as the demo plays it: the shadow stage on; the retraining cooldown at most
    :data:`DEMO_RETRAINING_COOLDOWN`, so the drift phase's alarm comes after the concept run's cooldown; and a
    budget of :data:`DEMO_RUNS` runs, so the alarms that the new version's shifted traffic goes on raising start
    no third run that the demo's end would cut short."""
    document = policy.model_dump(mode="json")
    document["rollout"]["shadow"]["enabled"] = True
    retraining = document["retraining"]
    retraining["cooldown_seconds"] = min(retraining["cooldown_seconds"], DEMO_RETRAINING_COOLDOWN)
    retraining["max_runs_per_day"] = DEMO_RUNS
    return Policy.model_validate(document)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on; ``policy`` is the unscaled policy."""

    policy: Policy
    home: Path
    data_uri: str | None = None
    target: str | None = None
    speed: float = 10.0
    ports: StackPorts = field(default_factory=StackPorts)


class Demo:
    """One run of the scenario; :meth:`run` returns the :class:`DemoResult`."""

    def __init__(self, settings: DemoSettings) -> None:
        signals = {rule.signal for rule in settings.policy.scaling.rules}
        if signals != {"request_rate", "failure_rate"}:
            raise PolicyError(f"the demo needs one request_rate and one failure_rate scaling rule; the policy has {sorted(signals)}")
        accuracy = settings.policy.accuracy
        if accuracy.below is None or ACCURACY_EVENT not in settings.policy.retraining.events:
            raise PolicyError(f"the demo needs the accuracy rule (accuracy.below) and {ACCURACY_EVENT} among retraining.events")
        self.settings = settings
        self.policy = demo_policy(settings.policy).time_scaled(settings.speed)
        self.home = Path(settings.home)
        self.result = DemoResult(model=self.policy.model, speed=settings.speed,
                                 data=settings.data_uri or "builtin:digits", started=time.time(),
                                 rows=automation_rows(self.policy), accuracy_below=accuracy.below,
                                 scaling_rules=[rule.model_dump() for rule in self.policy.scaling.rules])
        self.phase = PHASES[0]
        self._drift_rows: np.ndarray | None = None  # the rows the drift phase sends
        self.status_line = "starting"
        self.tasks_done = 0
        self.stack: LocalStack | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http = http_client(timeout=5.0)  # the polls of the watch's and the trigger's status

    # --- helpers --------------------------------------------------------------------------------

    def seconds(self, at_speed_one: float) -> float:
        """A phase's length: ``at_speed_one`` divided by the speed, at least three seconds."""
        return max(3.0, at_speed_one / self.settings.speed)

    def _enter(self, phase: str, line: str) -> None:
        self.phase, self.status_line = phase, line
        self.result.phases[phase] = time.time()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.result.requests.append(record)

    def _fire(self, rule: str, moment: float, action: str, outcome: str) -> None:
        with self._lock:
            bisect.insort(self.result.timeline, Firing(rule, moment, action, outcome), key=lambda f: f.time)

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise PermanentError(f"demo: {what} did not happen within {seconds:.0f} s (phase {self.phase}); "
                                  f"logs in {self.home / 'logs'}")
            time.sleep(0.25)

    # --- the scenario ---------------------------------------------------------------------------

    def run(self) -> DemoResult:
        self.home.mkdir(parents=True, exist_ok=True)
        policy_path = self.policy.save(self.home / "policy.yaml")
        registry_uri = str(self.home / "registry")
        self.stack = LocalStack(self.policy, policy_path, self.home, registry_uri, data_uri=self.settings.data_uri,
                                target=self.settings.target, ports=self.settings.ports, watch_alpha=DEMO_WATCH_ALPHA)
        self.train()
        data = load_dataset(self.settings.data_uri, target=self.settings.target)
        holdout_rows, holdout_labels, train_rows, train_labels = self.split(data)
        self.status_line = "starting predictor, transformer, watch, trigger and autoscaler"
        self.stack.start()
        sampler = threading.Thread(target=self._sample, name="kfloop-demo-sampler", daemon=True)
        labeller = Labeller(f"{self.stack.urls['watch']}/v2/models/{self.policy.model}/labels", bearer(local_token(self.home)))
        traffic = None
        try:
            sampler.start()
            traffic = Traffic(self.stack.runtime.endpoints["v2"], self._record, lambda: self.phase, labeller)
            traffic.start()
            self.scale_out_and_in(traffic, holdout_rows, holdout_labels)
            self.fail_predictors(traffic)
            truth = swapped_classes(data.classes, SWAPPED_SHARE, self.policy.training.seed)
            self.concept(traffic, labeller, data, truth, holdout_rows, holdout_labels)
            self.drift(traffic, data, holdout_rows, _relabelled(holdout_labels, truth), train_rows,
                       _relabelled(train_labels, truth))
        finally:
            try:
                if traffic is not None:
                    traffic.stop()
                self.result.labels = dict(labeller.outcomes)
                labeller.close()
                self._stop.set()
                sampler.join(timeout=10)
                self._collect()
            finally:
                self.stack.stop()
                self._http.close()
                self.result.finished = time.time()
        self._enter("done", "finished")
        self.result.timings = loop_timings(self.result)
        self.importance(holdout_rows)
        return self.result

    def importance(self, rows: np.ndarray) -> None:
        """Each version's global importance on the holdout rows (its top features by mean |attribution|,
        approximate attributions) and, for each drift or outlier alarm, which features' attributions the drift
        phase's rows moved in the version it named."""
        try:
            from kfloop.drift.attribution import AttributionBaseline
            from kfloop.explain import ForestExplainer, global_importance
        except ImportError:  # shap is the explain extra (make run installs it)
            return
        registry = ModelRegistry(self.stack.registry_uri)
        drift_alarms = [a for a in self.result.alarms if a["type"] in (DRIFT_EVENT, OUTLIER_EVENT) and self._drift_rows is not None]
        for version in registry.versions(self.policy.model):
            with registry.local_version(self.policy.model, version) as folder:
                try:
                    explainer = ForestExplainer.load(folder, version)
                except NotFoundError:  # a version that keeps no forest
                    continue
                self.result.importance[version] = global_importance(explainer, rows, top=IMPORTANCE_TOP)
                raised = [a for a in drift_alarms if str(a.get("version")) == version]
                if raised:  # what the drift phase's rows moved in this version's attributions
                    moved = AttributionBaseline(explainer, rows, window=len(rows)).test(self._drift_rows)
                    for alarm in raised:
                        self.result.moved[alarm["id"]] = {"ndcg": moved.ndcg, "moved": [list(m) for m in moved.moved]}

    def train(self) -> None:
        from kfloop.pipelines.local import run_training_locally
        from kfloop.pipelines.training import CANDIDATE_TASK, SELECT_TASK

        self._enter("train", "training: tuning candidates in parallel")
        candidate_starts: list[float] = []
        running = {"now": 0, "most": 0}
        selected: dict[str, float] = {}

        def on_task(name: str, state: str) -> None:
            now = time.time()
            if name.startswith(CANDIDATE_TASK):
                running["now"] += 1 if state == "started" else -1
                running["most"] = max(running["most"], running["now"])
                if state == "started":
                    candidate_starts.append(now)
            if name.startswith(SELECT_TASK) and state == "succeeded":
                selected["time"] = now
            if state == "succeeded":
                self.tasks_done += 1

        decision = run_training_locally(self.policy, registry_uri=self.stack.registry_uri, workdir=self.home,
                                        data_uri=self.settings.data_uri, target=self.settings.target,
                                        model=self.policy.model, on_task=on_task)
        if not decision.get("promoted"):
            raise PermanentError(f"demo: the first training did not promote a version ({decision.get('reason')})")
        metadata = ModelRegistry(self.stack.registry_uri).metadata(self.policy.model, decision["version"])
        candidates = metadata["candidates"]
        scores = [c["metrics"][metadata["selection_metric"]] for c in candidates]
        self.result.training = {"version": decision["version"], "candidates": len(candidates),
                                "most_at_once": running["most"], "params": metadata["params"],
                                "cv_metrics": metadata["cv_metrics"], "holdout_metrics": metadata["metrics"],
                                "finished": time.time()}
        self._fire("tune", min(candidate_starts, default=self.result.phases["train"]), "tune many sets in parallel",
                   f"{len(candidates)} candidates in {len(candidate_starts)} tasks, up to {running['most']} at once; CV "
                   f"{metadata['selection_metric']} {min(scores):.3f}-{max(scores):.3f}")
        self._fire("select", selected.get("time", time.time()), "select the best",
                   f"best {metadata['params']} (CV {metadata['cv_metrics'][metadata['selection_metric']]:.3f}, "
                   f"holdout accuracy {metadata['metrics']['accuracy']:.3f}); version {decision['version']} promoted")

    def split(self, data: LabelledData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Holdout rows and labels, then training rows and labels: the pipeline's own split (same seed and fraction)."""
        from kfloop.training import holdout_split

        training = self.policy.training
        train, holdout = holdout_split(data, holdout_fraction=training.holdout_fraction, seed=training.seed)
        return data.features[holdout], data.labels[holdout], data.features[train], data.labels[train]

    def _rule(self, signal: str) -> ScalingRule:
        """The (time-scaled) policy's rule of ``signal`` (checked to exist in the constructor)."""
        return next(rule for rule in self.policy.scaling.rules if rule.signal == signal)

    def _signal(self, signal: str) -> float | None:
        """The last evaluated value of the rule of ``signal``."""
        decisions = self.stack.autoscaler.decisions
        return decisions[-1].values.get(self._rule(signal).name) if decisions else None

    def _scaled_out_by(self, signal: str, since: float) -> bool:
        """Whether the rule of ``signal`` has driven a scale-out since ``since``."""
        name = self._rule(signal).name
        return any(d.time >= since and d.action == "scale_out" and name in d.firing
                   for d in list(self.stack.autoscaler.decisions))

    def scale_out_and_in(self, traffic: Traffic, rows: np.ndarray, labels: np.ndarray) -> None:
        threshold = self._rule("request_rate").threshold
        scaling = self.policy.scaling
        self._enter("clean", f"clean holdout traffic at {CLEAN_RATE * threshold:g} req/s, its labels sent")
        traffic.set(CLEAN_RATE * threshold, rows, labels, send_labels=True)
        time.sleep(self.seconds(100))
        self._enter("load", f"load at {LOAD_RATE * threshold:g} req/s: {LOAD_RATE:g}x the request-rate threshold")
        start = time.time()
        traffic.set(LOAD_RATE * threshold)
        self.wait_for(lambda: self._scaled_out_by("request_rate", start),
                      self._rule("request_rate").window_seconds + 10 * scaling.evaluation_seconds + 60, "a request-rate scale-out")
        time.sleep(self.seconds(100))
        self._enter("calm", f"load back to {CLEAN_RATE * threshold:g} req/s: scale in after the {scaling.cooldown_seconds} s cooldown")
        traffic.set(CLEAN_RATE * threshold)
        self.wait_for(lambda: self.stack.runtime.replica_count() == scaling.min_replicas,
                      self._rule("request_rate").window_seconds + scaling.cooldown_seconds + 20 * scaling.evaluation_seconds + 60,
                      f"scale-in to {scaling.min_replicas} replica(s)")
        # The windowed rate lags the traffic: let it settle, so the fault phase's scale-out has one cause.
        settled = SETTLED_SHARE * threshold * scaling.min_replicas
        self.wait_for(lambda: (self._signal("request_rate") or 0.0) < settled,
                      self._rule("request_rate").window_seconds + 10 * scaling.evaluation_seconds + 30,
                      f"the windowed request rate to fall below {settled:g} req/s")

    def fail_predictors(self, traffic: Traffic) -> None:
        scaling = self.policy.scaling
        self._enter("fault", "every predictor answers 503 (fault injection)")
        start = time.time()
        traffic.set(FAULT_RATE * self._rule("request_rate").threshold)
        self.stack.runtime.inject_failures(1.0)
        try:
            self.wait_for(lambda: self._scaled_out_by("failure_rate", start),
                          self._rule("failure_rate").window_seconds + 10 * scaling.evaluation_seconds + 60, "a failure-rate scale-out")
        finally:
            self.stack.runtime.inject_failures(0.0)

    def concept(self, traffic: Traffic, labeller: Labeller, data: LabelledData, truth: dict[str, str],
                holdout_rows: np.ndarray, holdout_labels: np.ndarray) -> None:
        """Concept drift: the same features, the labels of the classes in ``truth`` swapped."""
        self._enter("concept", f"the labels of {len(truth)} classes swap; a client's catalogue is served and labelled")
        start = time.time()
        # In no particular order: a file's order (digits' is by writer) would be a drift of its own, window by window.
        order = np.random.default_rng(self.policy.training.seed).permutation(data.rows)
        with http_client(timeout=60.0) as client:
            ids = serve_rows(client, self.stack.runtime.endpoints["v2"], data.features[order], CATALOGUE_ROWS_PER_REQUEST,
                             self._record, self.phase)
        true_labels = _relabelled(data.labels[order], truth)
        self.result.label_shift = time.time()
        self.status_line = "the catalogue's labels arrive in one batch; the traffic's labels keep coming"
        labeller.send([{"id": row_id, "label": str(label)} for row_id, label in zip(ids, true_labels) if row_id])
        traffic.set(CONCEPT_RATE * self._rule("request_rate").threshold, holdout_rows, _relabelled(holdout_labels, truth))
        self.wait_for(lambda: self._finished_run(start), 900, "an accuracy alarm's retraining run and its rollout")
        time.sleep(self.seconds(50))
        self.refill_window(holdout_rows)

    def refill_window(self, rows: np.ndarray) -> None:
        """The watch starts a new version's window empty: fill it with clean rows (one client's batch) and wait for
        its first test, so the drift phase's shift meets a watch in its steady state."""
        production = ModelRegistry(self.stack.registry_uri).production_version(self.policy.model)
        self.wait_for(lambda: self._watch_status().get("version") == production, 60,
                      f"the watch to follow production version {production}")
        watch = self._watch_status()
        missing = int(watch.get("window", 0)) - int(watch.get("rows_in_window", 0))
        if missing <= 0:
            return
        tested = int(watch.get("windows_tested", 0))
        self.status_line = f"the watch's window of version {watch.get('version')} fills ({missing} clean rows)"
        with http_client(timeout=60.0) as client:
            serve_rows(client, self.stack.runtime.endpoints["v2"], rows[:missing], CATALOGUE_ROWS_PER_REQUEST,
                       self._record, self.phase)
        self.wait_for(lambda: int(self._watch_status().get("windows_tested", 0)) > tested, 30, "the watch's first test of the new version")

    def _watch_status(self) -> dict[str, Any]:
        try:
            return self._http.get(self.stack.urls["watch"] + "/status").json()
        except httpx.HTTPError:
            return {}

    def _finished_run(self, since: float) -> bool:
        return any(r.get("outcome") in FINISHED_OUTCOMES and r.get("queued", 0) >= since for r in self._trigger_runs())

    def drift(self, traffic: Traffic, data: LabelledData, holdout_rows: np.ndarray, holdout_labels: np.ndarray,
              train_rows: np.ndarray, train_labels: np.ndarray) -> None:
        self._enter("drift", "a labelled shard of shifted rows arrives; traffic shifts")
        rng = np.random.default_rng(self.policy.training.seed)
        chosen = np.sort(rng.choice(len(train_rows), size=max(1, int(len(train_rows) * LABELLED_FRACTION)), replace=False))
        self.write_labelled_shard(LabelledData(shift(train_rows[chosen], train_rows), train_labels[chosen],
                                               data.feature_names, "demo", ids=np.array([f"shifted-{i}" for i in chosen])))
        start = time.time()
        self._drift_rows = shift(holdout_rows, train_rows)
        traffic.set(DRIFT_RATE * self._rule("request_rate").threshold, self._drift_rows, holdout_labels)
        self.wait_for(lambda: self._finished_run(start), 900, "a drift alarm's retraining run and its rollout")
        time.sleep(self.seconds(50))

    def write_labelled_shard(self, data: LabelledData) -> Path:
        """Labels for the shifted rows, as a labelled shard in the registry's captures."""
        return ModelRegistry(self.stack.registry_uri).captures(self.policy.model).add_labelled(data)

    # --- observation ----------------------------------------------------------------------------

    def _trigger_runs(self) -> list[dict[str, Any]]:
        try:
            return self._http.get(self.stack.urls["trigger"] + "/status").json()["runs"]
        except httpx.HTTPError:
            return []

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                self._take_sample()
            except Exception:  # one bad sample (a service restarting) must not end the recording
                log.exception("demo: sampling the stack failed; next try in %.1f s", SAMPLE_SECONDS)

    def _take_sample(self) -> None:
        watch = self._watch_status()
        shares = self.stack.runtime.status()["traffic"]  # waits while the runtime starts replicas
        now = time.time()
        decisions = self.stack.autoscaler.decisions
        last = decisions[-1] if decisions else None
        window = watch.get("last_window") or {}
        with self._lock:
            recent = [r for r in self.result.requests if r.time >= now - 5.0]
            known = {alarm["id"] for alarm in self.result.alarms}
            self.result.alarms += [alarm for alarm in watch.get("recent_alarms", []) if alarm["id"] not in known]
        self.result.samples.append({
            "time": now,
            "phase": self.phase,
            "replicas": sum(len(s["replicas"]) for s in shares),
            "traffic": {s["version"]: s["weight"] for s in shares},
            "signals": dict(last.values) if last else {},
            "min_p_value": window.get("min_p_value"),
            "watched_version": watch.get("version"),
            "alarm": bool(watch.get("last_alarm")),
            "client_rate": len(recent) / 5.0,
            "realised_accuracy": {version: figure["accuracy"]
                                  for version, figure in TruthFigures.from_status(watch).accuracy.items()},
        })

    def _decision_records(self) -> list[dict[str, Any]]:
        """The autoscaler's decisions so far, as plain records (with their derived ``action``)."""
        return [{**asdict(d), "action": d.action} for d in list(self.stack.autoscaler.decisions)]

    def _collect(self) -> None:
        """Decisions, runs and the firings they make, after the scenario."""
        result = self.result
        result.decisions = self._decision_records()
        result.runs = self._trigger_runs()
        for firing in scaling_firings(result.decisions):
            self._fire(firing.rule, firing.time, firing.action, firing.outcome)
        for alarm in result.alarms:
            self._fire(alarm_rule(alarm), alarm_time(alarm), "retrain and update the model",
                       f"{describe_alarm(alarm)}; {alarm_outcome(alarm, result, self.policy)}")

    def live_state(self) -> dict[str, Any]:
        """What the live display shows now."""
        sample = self.result.samples[-1] if self.result.samples else {}
        with self._lock:
            requests = len(self.result.requests)
            failed, injected = len(self.result.failed_requests), self.result.injected_failures
            fired = {rule: firing.time for rule, firing in self.result.first_firings().items()}
        if self.stack is not None and self.stack.autoscaler is not None:  # scaling rules fire before _collect
            for firing in scaling_firings(self._decision_records()):
                fired.setdefault(firing.rule, firing.time)
        for alarm in list(self.result.alarms):
            fired.setdefault(alarm_rule(alarm), alarm_time(alarm))
        return {
            "phase": self.phase,
            "line": self.status_line,
            "elapsed": time.time() - self.result.started,
            "tasks_done": self.tasks_done,
            "sample": sample,
            "requests": requests,
            "failed": failed,
            "injected": injected,
            "fired": fired,
        }


def _relabelled(labels: np.ndarray, truth: dict[str, str]) -> np.ndarray:
    """``labels`` after the concept drift ``truth`` (class -> its new label)."""
    return np.array([truth.get(str(label), str(label)) for label in labels])



def new_demo_home(parent: Path) -> Path:
    """A fresh folder per demo run, so no earlier run's registry or state is touched."""
    return Path(parent) / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
