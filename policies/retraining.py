"""Retraining: which alarms start a training run, the run's memory on disk, and the worker that runs it.

An alarm (a CloudEvent of the policy's ``retraining.events`` types) passes the
admission rules in order -- duplicate id, a run already pending or running
for the model (one at a time), the daily budget, the cooldown since the last
run started -- and, if admitted, becomes a *pending run* in a state file, so
pending work survives a restart (a run that was in flight when the service
stopped is run again). The worker runs one pending run at a time:

1. the training pipeline (a :class:`Retrainer`: ``kfp.local`` here,
   ``kfp.Client`` on a cluster) on the base data plus the registry's labelled
   capture shards (:mod:`kfloop.captures`);
2. if the pipeline's gate promoted the new version, a rollout through a
   :class:`~kfloop.policies.rollout.Deployer` (:func:`~kfloop.policies.rollout.roll_out`).

A run that fails on infrastructure (a :class:`~kfloop.errors.TemporaryError`,
a network error) is recorded with ``charged: false`` and does not count
against the daily budget; one that fails on its own terms
(:class:`~kfloop.errors.PermanentError`, e.g. the pipeline's data check) does.

Each run's record carries its times, epoch seconds: ``queued``, ``started``,
``trained`` (pipeline done), ``canary_started``, ``full_traffic`` or
``rolled_back``, ``finished``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import Counter

from kfloop.captures import assemble_training_set, training_base
from kfloop.durable import atomic_write
from kfloop.errors import PermanentError, is_temporary
from kfloop.policies.rollout import Deployer, roll_out
from kfloop.policies.spec import Policy
from kfloop.registry import ModelRegistry

if TYPE_CHECKING:
    from kfloop.pipelines.cluster import KfpEndpoint

__all__ = [
    "ADMISSION_OUTCOMES",
    "ClusterRetrainer",
    "LocalRetrainer",
    "Retrainer",
    "RetrainingConfig",
    "RetrainingService",
    "RetrainingState",
]

ADMISSIONS = Counter("kfloop_trigger_events", "Alarms by admission outcome.", ["model", "outcome"])
RUNS = Counter("kfloop_trigger_runs", "Retraining runs by outcome.", ["model", "outcome"])
SEEN_IDS = 10_000
DAY_SECONDS = 86400
ADMISSION_OUTCOMES = ("started", "duplicate", "coalesced", "budget", "cooldown")

log = logging.getLogger(__name__)


class Retrainer:
    """Contract: run the training pipeline on ``data_uri`` (label column ``target``); return the promotion gate's decision."""

    def run(self, data_uri: str | None, target: str | None, run_name: str) -> dict[str, Any]:
        raise NotImplementedError


class LocalRetrainer(Retrainer):
    """The pipeline under ``kfp.local`` on this machine."""

    def __init__(self, policy: Policy, registry_uri: str, workdir: Path, *, model: str) -> None:
        self.policy, self.registry_uri, self.workdir, self.model = policy, registry_uri, workdir, model

    def run(self, data_uri: str | None, target: str | None, run_name: str) -> dict[str, Any]:
        from kfloop.pipelines.local import run_training_locally

        return run_training_locally(self.policy, registry_uri=self.registry_uri, workdir=self.workdir,
                                    data_uri=data_uri, target=target, model=self.model)


class ClusterRetrainer(Retrainer):
    """The pipeline on a Kubeflow Pipelines cluster (``kfp.Client``), waited for, then read back from the registry."""

    def __init__(self, policy: Policy, endpoint: KfpEndpoint, registry_uri: str, *, model: str, image: str) -> None:
        self.policy, self.endpoint, self.registry_uri = policy, endpoint, registry_uri
        self.model, self.image = model, image

    def run(self, data_uri: str | None, target: str | None, run_name: str) -> dict[str, Any]:
        from kfloop.pipelines.cluster import submit_training

        registry = ModelRegistry(self.registry_uri)
        before = set(registry.versions(self.model))
        outcome = submit_training(self.policy, self.endpoint, registry_uri=self.registry_uri, data_uri=data_uri,
                                  target=target, model=self.model, run_name=run_name, image=self.image, wait=True)
        new = [v for v in registry.versions(self.model) if v not in before]
        if not new:
            raise PermanentError(f"pipeline run {outcome['run_id']} ended ({outcome.get('state')}) without registering a version")
        gate = registry.metadata(self.model, new[-1]).get("gate", {})
        return {**gate, "version": new[-1], "promoted": bool(gate.get("promoted")), "run_id": outcome["run_id"]}


class RetrainingState:
    """The service's memory on disk: seen event ids, pending runs and finished runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        data = json.loads(path.read_text()) if path.exists() else {}
        self.seen: list[str] = data.get("seen", [])
        self.pending: list[dict[str, Any]] = data.get("pending", [])
        self.runs: list[dict[str, Any]] = data.get("runs", [])
        interrupted = [r for r in self.runs if r.get("outcome") == "running"]
        for run in interrupted:  # the service stopped mid-run: run it again
            self.runs.remove(run)
            self.pending.insert(0, {**run, "outcome": "pending", "restarted": True})
        if interrupted:
            self.save()

    def save(self) -> None:
        with self.lock:
            atomic_write(self.path, json.dumps({"seen": self.seen[-SEEN_IDS:], "pending": self.pending, "runs": self.runs}, indent=1))


@dataclass
class RetrainingConfig:
    model: str
    registry_uri: str
    policy: Policy
    state_dir: Path
    target: str | None = None  # label column of the base data (None: the format's own)


class RetrainingService:
    """Admission, persistence and the one worker of one model's retraining."""

    def __init__(self, config: RetrainingConfig, retrainer: Retrainer, deployer: Deployer | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.retrainer = retrainer
        self.deployer = deployer
        self.clock = clock
        self.registry = ModelRegistry(config.registry_uri)
        self.state = RetrainingState(Path(config.state_dir) / "trigger-state.json")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- admission -----------------------------------------------------------------------

    def admit(self, event_id: str, event_type: str) -> str:
        """One of :data:`ADMISSION_OUTCOMES`: ``started`` (queued), ``duplicate``, ``coalesced``, ``budget``, ``cooldown``."""
        policy, now = self.config.policy.retraining, self.clock()
        with self.state.lock:
            if event_id in self.state.seen:
                outcome = "duplicate"
            else:
                self.state.seen.append(event_id)
                started = [r["started"] for r in self.state.runs]
                charged = [r["started"] for r in self.state.runs if r.get("charged", True)]
                if self.state.pending or any(r.get("outcome") == "running" for r in self.state.runs):
                    outcome = "coalesced"
                elif sum(1 for t in charged if now - t < DAY_SECONDS) >= policy.max_runs_per_day:
                    outcome = "budget"  # before the cooldown: it says no run comes today, not just now
                elif started and now - max(started) < policy.cooldown_seconds:
                    outcome = "cooldown"
                else:
                    outcome = "started"
                    self.state.pending.append({"id": uuid.uuid4().hex[:12], "event_id": event_id, "event_type": event_type,
                                               "queued": now, "outcome": "pending"})
            self.state.save()
        ADMISSIONS.labels(self.config.model, outcome).inc()
        if outcome == "started":
            self._wake.set()
        return outcome

    # --- work ------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="kfloop-retraining", daemon=True)
        self._worker.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            while not self._stop.is_set():
                with self.state.lock:
                    if not self.state.pending:
                        break
                    run = self.state.pending.pop(0)
                    run.update(outcome="running", started=self.clock())
                    self.state.runs.append(run)
                    self.state.save()
                try:
                    run.update(self.execute(run["id"]))
                except Exception as exc:  # a failed run is recorded and the service goes on
                    log.exception("retraining run %s failed", run["id"])
                    # Infrastructure failures do not use up the day's budget; the run's own failures do.
                    run.update(outcome="failed", error=f"{type(exc).__name__}: {exc}", charged=not is_temporary(exc))
                run["finished"] = self.clock()
                RUNS.labels(self.config.model, run["outcome"]).inc()
                self.state.save()

    def execute(self, run_id: str) -> dict[str, Any]:
        """Retrain and, if the gate promoted, roll out. Returns what to record for the run."""
        data_uri, target = self.training_data(run_id)
        decision = self.retrainer.run(data_uri, target, f"kfloop-retrain-{run_id}")
        record = {"data": data_uri, "version": decision.get("version"), "gate": decision.get("reason"),
                  "promoted": bool(decision.get("promoted")), "trained": self.clock()}
        if not decision.get("promoted"):
            return {**record, "outcome": "rejected"}
        if self.deployer is None:
            return {**record, "outcome": "promoted"}
        outcome = roll_out(self.deployer, self.registry, self.config.model, self.config.policy.rollout,
                           str(decision["version"]), decision.get("production_version"), clock=self.clock)
        return {**record, **outcome.record()}

    def training_data(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's data URI and label column: the base data alone, or -- when labelled capture
        shards exist -- the training set of base and shards (:func:`~kfloop.captures.assemble_training_set`)."""
        policy = self.config.policy.retraining
        base, target = (policy.base_data, self.config.target) if policy.base_data else self._serving_base()
        shards = self.registry.captures(self.config.model).labelled_shards() if policy.include_captures else []
        if not shards or base is None:
            return base, target
        return assemble_training_set(base, target, shards, Path(self.config.state_dir) / "data" / run_id)

    def _serving_base(self) -> tuple[str | None, str | None]:
        """The data the serving version was trained on, less the shards an earlier run of ours added."""
        serving = self.registry.production_version(self.config.model)
        if serving is None:
            return None, self.config.target
        return training_base(self.registry.metadata(self.config.model, serving)["data"]["source"], self.config.target)

    def status(self) -> dict[str, Any]:
        with self.state.lock:
            return {"model": self.config.model, "pending": list(self.state.pending), "runs": list(self.state.runs[-20:])}
