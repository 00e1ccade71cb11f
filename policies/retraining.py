"""Retraining: one model's alarm admission, its runs' memory on disk and the worker that carries each run.

:class:`RetrainingService` admits alarms (:meth:`~RetrainingService.admit`: dedup, one run at a time,
daily budget, cooldown) and carries one pending run at a time through training and
:func:`~kfloop.policies.rollout.roll_out`, resuming a run a restart interrupted from its recorded step.
:class:`RetrainingState` is its state file (``trigger-state.json``). A :class:`Retrainer` runs the
training pipeline: :class:`LocalRetrainer` (``kfp.local``) or :class:`ClusterRetrainer` (Kubeflow
Pipelines, a :class:`ResumableRetrainer`); :class:`RetrainingConfig` holds the settings.

Used by ``kfloop trigger`` (:mod:`kfloop.cli.act` builds the service, :mod:`kfloop.serving.trigger` serves
it); the demo and ``benchmarks/chaos.py`` read :data:`FINISHED_OUTCOMES`. Rules, steps, outcomes: ``docs/acting.md``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import Counter

from kfloop.training_sets import assemble_training_set, training_base
from kfloop.durable import atomic_write, fsync_folder
from kfloop.errors import ClusterError, DataError, PipelineError, TemporaryError, is_temporary
from kfloop.policies.rollout import ROLLOUT_STEPS, Deployer, Retries, roll_back, roll_out
from kfloop.policies.spec import Policy
from kfloop.registry import ModelRegistry
from kfloop.search import Search, full_search, warm_search

if TYPE_CHECKING:
    import kfp

    from kfloop.pipelines.cluster import KfpEndpoint

__all__ = [
    "ADMISSION_OUTCOMES",
    "FINISHED_OUTCOMES",
    "ClusterRetrainer",
    "LocalRetrainer",
    "ResumableRetrainer",
    "Retrainer",
    "RetrainingConfig",
    "RetrainingService",
    "RetrainingState",
]

# How a run ends (its record's ``outcome``); ``pending`` and ``running`` come before.
FINISHED_OUTCOMES = ("promoted", "rejected", "rolled_back", "failed", "failed_inconsistent", "abandoned")
ADMISSIONS = Counter("kfloop_trigger_events", "Alarms by admission outcome.", ["model", "outcome"])
RUNS = Counter("kfloop_trigger_runs", "Retraining runs by outcome.", ["model", "outcome"])
SEEN_IDS = 10_000
RUNS_KEPT = 200  # finished runs kept in the state file (besides those the daily budget still counts)
DAY_SECONDS = 86400
ADMISSION_OUTCOMES = ("started", "duplicate", "coalesced", "budget", "cooldown")
STATE_FILE = "trigger-state.json"

log = logging.getLogger(__name__)


class Retrainer:
    """Contract: run the training pipeline on ``data_uri`` (label column ``target``) over the candidates of
    ``search``; return the promotion gate's decision."""

    def run(self, data_uri: str | None, target: str | None, run_name: str, search: Search) -> dict[str, Any]:
        raise NotImplementedError


class ResumableRetrainer(Retrainer):
    """Optional ability: a training run that lives outside this process (a Kubeflow Pipelines run).

    The service records the handle :meth:`submit` returns before it waits, so a
    restarted service waits for that same run again instead of starting another.
    """

    def submit(self, data_uri: str | None, target: str | None, run_name: str, search: Search) -> str:
        raise NotImplementedError

    def find(self, run_name: str) -> str | None:
        """The handle of a run already submitted as ``run_name``, if any: a service stopped after :meth:`submit`
        and before it recorded the handle looks the run up instead of starting a second one."""
        raise NotImplementedError

    def wait(self, handle: str) -> dict[str, Any]:
        """Block until the run ``handle`` ends; return its gate's decision."""
        raise NotImplementedError

    def terminate(self, handle: str) -> None:
        """Stop the run ``handle``: a run the service gives up on must not go on and promote a version."""
        raise NotImplementedError

    def run(self, data_uri: str | None, target: str | None, run_name: str, search: Search) -> dict[str, Any]:
        return self.wait(self.submit(data_uri, target, run_name, search))


class LocalRetrainer(Retrainer):
    """The pipeline under ``kfp.local`` on this machine; its gate only approves (the service's rollout promotes)."""

    def __init__(self, policy: Policy, registry_uri: str, workdir: Path, *, model: str) -> None:
        self.policy, self.registry_uri, self.workdir, self.model = policy, registry_uri, workdir, model

    def run(self, data_uri: str | None, target: str | None, run_name: str, search: Search) -> dict[str, Any]:
        from kfloop.pipelines.local import run_training_locally

        return run_training_locally(self.policy, registry_uri=self.registry_uri, workdir=self.workdir,
                                    data_uri=data_uri, target=target, model=self.model, move_production=False,
                                    search=search)


class ClusterRetrainer(ResumableRetrainer):
    """The pipeline on a Kubeflow Pipelines cluster (``kfp.Client``), waited for, then read back from the registry.

    Its gate only approves a winner: the production pointer moves through the service's rollout.

    The wait is bounded: a run not finished ``timeout_seconds`` after it was
    created is terminated (:meth:`terminate`) and fails as a
    :class:`~kfloop.errors.ClusterError` -- an infrastructure failure, not
    charged to the daily budget. The run's state is read every ``poll_seconds``.
    """

    FINISHED = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")  # V2beta1RuntimeState values a run does not leave

    def __init__(self, policy: Policy, endpoint: KfpEndpoint, registry_uri: str, *, model: str, image: str,
                 timeout_seconds: float = 3600.0, poll_seconds: float = 10.0) -> None:
        self.policy, self.endpoint, self.registry_uri = policy, endpoint, registry_uri
        self.model, self.image = model, image
        self.timeout_seconds, self.poll_seconds = timeout_seconds, poll_seconds

    def client(self) -> kfp.Client:
        """A ``kfp.Client`` for the endpoint (as :func:`kfloop.pipelines.cluster.submit_training` builds one)."""
        import kfp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
            return kfp.Client(host=self.endpoint.host, existing_token=self.endpoint.token,
                              namespace=self.endpoint.namespace or "kubeflow", verify_ssl=self.endpoint.verify_tls)

    def submit(self, data_uri: str | None, target: str | None, run_name: str, search: Search) -> str:
        from kfloop.pipelines.cluster import submit_training

        outcome = submit_training(self.policy, self.endpoint, registry_uri=self.registry_uri, data_uri=data_uri,
                                  target=target, model=self.model, run_name=run_name, image=self.image, wait=False,
                                  move_production=False, search=search)
        return str(outcome["run_id"])

    def find(self, run_name: str) -> str | None:
        """The newest run named ``run_name`` (``list_runs`` filtered on ``display_name``); a
        :class:`~kfloop.errors.ClusterError` if the API does not answer (then nothing is submitted either)."""
        query = {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": run_name}]}
        try:
            listed = self.client().list_runs(filter=json.dumps(query), sort_by="created_at desc", page_size=10,
                                             namespace=self.endpoint.namespace)
        except Exception as exc:
            raise ClusterError(f"could not look up pipeline run {run_name!r}: {type(exc).__name__}: {exc}") from None
        named = [run for run in (listed.runs or []) if run.display_name == run_name]  # the filter is the server's
        return str(named[0].run_id) if named else None

    def wait(self, handle: str) -> dict[str, Any]:
        client = self.client()
        deadline = time.time() + self.timeout_seconds  # until the run's own creation time is known
        state = "unknown"
        while True:
            try:
                run = client.get_run(handle)
                state = str(getattr(run, "state", None) or "unknown").upper()
                created = getattr(run, "created_at", None)
                if isinstance(created, datetime):  # from the run's creation, so a restarted wait is not longer
                    deadline = (created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp() + self.timeout_seconds
            except Exception as exc:  # the API did not answer this time: ask again until the deadline
                log.warning("could not read the state of pipeline run %s: %s: %s", handle, type(exc).__name__, exc)
            if state in self.FINISHED:
                return self.decision(handle, state)
            if time.time() >= deadline:
                log.warning("pipeline run %s did not finish within %g s (state %s): terminating it", handle, self.timeout_seconds, state)
                self.terminate(handle)
                raise ClusterError(f"pipeline run {handle} did not finish within {self.timeout_seconds:g} s "
                                   f"(state {state}): terminated it")
            time.sleep(self.poll_seconds)

    def terminate(self, handle: str) -> None:
        """``kfp.Client.terminate_run`` (a :class:`~kfloop.errors.ClusterError` if the API refuses 3 times)."""
        try:
            Retries(3, 1.0).call(lambda: self.client().terminate_run(handle), f"terminating pipeline run {handle}")
        except Exception as exc:
            raise ClusterError(f"could not terminate pipeline run {handle}: {type(exc).__name__}: {exc}") from None

    def decision(self, handle: str, state: str) -> dict[str, Any]:
        """The gate's decision on the version run ``handle`` registered (its metadata's ``pipeline_run_id``)."""
        registry = ModelRegistry(self.registry_uri)
        for version in reversed(registry.versions(self.model)):
            metadata = registry.metadata(self.model, version)
            if metadata.get("pipeline_run_id") != handle:
                continue
            gate = metadata.get("gate")
            if not gate:
                raise PipelineError(f"pipeline run {handle} ended ({state}) after registering version {version} "
                                    "but before its promotion gate decided")
            return {**gate, "version": version, "promoted": bool(gate.get("promoted")), "run_id": handle}
        raise PipelineError(f"pipeline run {handle} ended ({state}) without registering a version")


class RetrainingState:
    """The service's memory on disk: seen event ids, pending runs and finished runs.

    Written whole by :func:`~kfloop.durable.atomic_write` (fsynced, renamed into
    place). A file that cannot be read or is not this shape is moved aside to
    ``trigger-state.json.corrupt-<UTC time>`` and the service starts with no
    memory, saying so in an error line: a crash loop on a torn file would lose
    every later alarm. The dedup memory keeps the last :data:`SEEN_IDS` ids;
    finished runs beyond :data:`RUNS_KEPT` are dropped once the daily budget
    no longer counts them.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()
        data = self._read()
        self.seen: dict[str, None] = dict.fromkeys(data["seen"][-SEEN_IDS:])  # insertion-ordered: oldest first
        self.pending: list[dict[str, Any]] = data["pending"]
        self.runs: list[dict[str, Any]] = data["runs"]
        interrupted = [r for r in self.runs if r.get("outcome") == "running"]
        for run in interrupted:  # the service stopped mid-run: resume it from its step
            self.runs.remove(run)
            run.update(outcome="pending", restarted=True, restarts=int(run.get("restarts", 0)) + 1)
            self.pending.insert(0, run)
        if interrupted:
            try:
                self.save()
            except OSError:
                log.exception("could not record the interrupted runs in %s", self.path)

    def _read(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"seen": [], "pending": [], "runs": []}
        if self.path.parent.is_dir():  # temporaries of a write that a crash cut short
            for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
                stale.unlink(missing_ok=True)
        if not self.path.exists():
            return empty
        try:
            data = json.loads(self.path.read_bytes())
            _check_shape(data)
            return data
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, not this shape
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            os.replace(self.path, moved)
            fsync_folder(self.path.parent)
            log.error("trigger state %s could not be read (%s: %s): moved it to %s and started afresh -- earlier alarm ids, "
                      "pending and finished runs are forgotten", self.path, type(exc).__name__, exc, moved)
            return empty

    def save(self, now: float | None = None) -> None:
        """Write the state (raises ``OSError`` if it cannot: the caller decides what that means)."""
        now = time.time() if now is None else now
        with self.lock:
            seen = list(self.seen)[-SEEN_IDS:]
            recent = len(self.runs) - RUNS_KEPT
            runs = [r for i, r in enumerate(self.runs) if i >= recent or _still_counts(r, now)]
            atomic_write(self.path, json.dumps({"seen": seen, "pending": self.pending, "runs": runs}, indent=1))
            if len(seen) < len(self.seen):
                self.seen = dict.fromkeys(seen)
            self.runs[:] = runs


def _still_counts(run: dict[str, Any], now: float) -> bool:
    """Whether an old run must stay on file: not finished, waiting for its rollback, or counted by today's budget."""
    if run.get("outcome") in ("running", "failed_inconsistent"):
        return True
    return bool(run.get("charged", True)) and now - float(run.get("started", 0.0)) < DAY_SECONDS


def _check_shape(data: Any) -> None:
    """Raise :class:`~kfloop.errors.DataError` unless ``data`` is a state this service wrote."""
    if not isinstance(data, dict):
        raise DataError(f"the state must be a JSON object, not {type(data).__name__}")
    seen = data.setdefault("seen", [])
    if not isinstance(seen, list) or not all(isinstance(i, str) for i in seen):
        raise DataError('"seen" must be a list of event ids')
    for name in ("pending", "runs"):
        records = data.setdefault(name, [])
        if not isinstance(records, list) or not all(_is_run(r) for r in records):
            raise DataError(f'"{name}" must be a list of runs, each with an "id", an "outcome" and numeric times')


def _is_run(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("outcome"), str)
            and all(isinstance(record.get(t, 0), (int, float)) for t in ("queued", "started")))


@dataclass
class RetrainingConfig:
    model: str
    registry_uri: str
    policy: Policy
    state_dir: Path
    target: str | None = None  # label column of the base data (None: the format's own)
    max_restarts: int = 3  # a run found interrupted more often than this is abandoned
    retries: Retries = field(default_factory=Retries)  # for putting traffic and the pointer back


class RetrainingService:
    """Admission, persistence and the one worker of one model's retraining."""

    def __init__(self, config: RetrainingConfig, retrainer: Retrainer, deployer: Deployer | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.retrainer = retrainer
        self.deployer = deployer
        self.clock = clock
        self.registry = ModelRegistry(config.registry_uri)
        self.state = RetrainingState(Path(config.state_dir) / STATE_FILE)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- admission -----------------------------------------------------------------------

    def admit(self, event_id: str, event_type: str) -> str:
        """One of :data:`ADMISSION_OUTCOMES`: ``started`` (queued), ``duplicate``, ``coalesced``, ``budget``, ``cooldown``.

        Returns once the state file holds the alarm; a :class:`~kfloop.errors.TemporaryError` if it could not
        be written (nothing is then remembered of the alarm, so its redelivery is admitted).
        """
        policy, now = self.config.policy.retraining, self.clock()
        with self.state.lock:
            if event_id in self.state.seen:
                outcome = "duplicate"  # nothing changes: nothing to write
            else:
                started = [r["started"] for r in self.state.runs if "started" in r]
                charged = [r["started"] for r in self.state.runs if "started" in r and r.get("charged", True)]
                run = None
                if self.state.pending or any(r.get("outcome") == "running" for r in self.state.runs):
                    outcome = "coalesced"
                elif sum(1 for t in charged if now - t < DAY_SECONDS) >= policy.max_runs_per_day:
                    outcome = "budget"  # before the cooldown: it says no run comes today, not just now
                elif started and now - max(started) < policy.cooldown_seconds:
                    outcome = "cooldown"
                else:
                    outcome = "started"
                    run = {"id": uuid.uuid4().hex[:12], "event_id": event_id, "event_type": event_type,
                           "queued": now, "outcome": "pending"}
                    self.state.pending.append(run)
                self.state.seen[event_id] = None
                try:
                    self.state.save(now)
                except OSError as exc:
                    del self.state.seen[event_id]  # as if it never came: the sender's retry is a new alarm
                    if run is not None:
                        self.state.pending.remove(run)
                    log.error("could not record alarm %s in %s: %s", event_id, self.state.path, exc)
                    raise TemporaryError(f"the trigger could not record alarm {event_id!r} ({type(exc).__name__}: {exc}); "
                                         "it was not taken: send it again") from None
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
        try:
            self.repair()  # rollouts a stopped service left inconsistent
        except Exception:
            log.exception("retraining worker: could not try the inconsistent rollouts again")
        while not self._stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            while not self._stop.is_set():
                try:
                    if self.run_next() is None:
                        break
                except Exception:  # the worker outlives any one run's surprise
                    log.exception("retraining worker: unexpected error; waiting for the next alarm")
                    break

    def run_next(self) -> dict[str, Any] | None:
        """Carry the oldest pending run to its end -- from its recorded step if a restart interrupted it -- and return
        its record; None if none is pending. Rollouts left inconsistent are tried again first (:meth:`repair`)."""
        with self.state.lock:
            if not self.state.pending:
                return None
        self.repair()  # a new rollout must not start on top of one left half done
        with self.state.lock:  # only this worker takes pending runs: the one seen above is still there
            run = self.state.pending.pop(0)
            now = self.clock()
            run["outcome"] = "running"
            run.setdefault("started", now)
            if run.get("restarts"):
                run["resumed"] = now
            self.state.runs.append(run)
            self._save_quietly()
        try:
            if int(run.get("restarts", 0)) > self.config.max_restarts:
                result = self._abandon(run)
            else:
                result = self.execute(run)
        except Exception as exc:  # a failed run is recorded and the service goes on
            log.exception("retraining run %s failed", run["id"])
            # Infrastructure failures do not use up the day's budget; the run's own failures do.
            result = {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}", "charged": not is_temporary(exc)}
        with self.state.lock:
            run.update(result)
            run["finished"] = self.clock()
            self._save_quietly()
        RUNS.labels(self.config.model, run["outcome"]).inc()
        return run

    def execute(self, run: dict[str, Any]) -> dict[str, Any]:
        """Retrain (unless ``run`` is past that) and, if the gate promoted, roll out. Returns what to record for the run."""
        if run.get("step") in (None, "training"):
            self._train(run)
        if not run.get("promoted"):
            return {"outcome": "rejected"}
        new = str(run["version"])
        if self.deployer is None:
            self.registry.promote(self.config.model, new)
            return {"outcome": "promoted", "rollout": "no deployer: the production pointer moved without a canary"}
        outcome = roll_out(self.deployer, self.registry, self.config.model, self.config.policy.rollout, new,
                           run.get("production_version") or run.get("production_before"), clock=self.clock, resume=run,
                           on_step=lambda facts: self._record(run, facts), retries=self.config.retries)
        return outcome.record()

    def _train(self, run: dict[str, Any]) -> None:
        if run.get("step") != "training":  # else resumed: the facts are recorded
            self._record(run, {"step": "training", "production_before": self.registry.production_version(self.config.model)})
        name = f"kfloop-retrain-{run['id']}"
        if isinstance(self.retrainer, ResumableRetrainer):
            if run.get("pipeline_run") is None:
                # "data" recorded: the stopped service may have submitted the run without recording its handle
                handle = self.retrainer.find(name) if "data" in run else None
                if handle is None:
                    data_uri, target = self.training_data(run["id"])
                    search = self.search()
                    self._record(run, {"data": data_uri, "search": search.lineage()})
                    handle = self.retrainer.submit(data_uri, target, name, search)
                else:
                    log.warning("retraining run %s: found pipeline run %s submitted before the restart; waiting for it",
                                run["id"], handle)
                self._record(run, {"pipeline_run": handle})
            decision = self.retrainer.wait(str(run["pipeline_run"]))
        else:
            data_uri, target = self.training_data(run["id"])
            search = self.search()
            self._record(run, {"data": data_uri, "search": search.lineage()})
            decision = self.retrainer.run(data_uri, target, name, search)
        self._record(run, {"step": "trained", "version": decision.get("version"), "gate": decision.get("reason"),
                           "promoted": bool(decision.get("promoted")), "production_version": decision.get("production_version"),
                           "trained": self.clock()})

    def _abandon(self, run: dict[str, Any]) -> dict[str, Any]:
        step = run.get("step") or "training"
        why = (f"interrupted {run['restarts']} times (the service stopped while it ran, last in step {step!r}), "
               f"more than max_restarts ({self.config.max_restarts})")
        log.error("retraining run %s (alarm %s) abandoned: %s", run["id"], run.get("event_id"), why)
        # A step of the rollout was reached: traffic or the pointer may have moved.
        if step in ROLLOUT_STEPS and self.deployer is not None and run.get("old_version"):
            ended = roll_back(self.deployer, self.registry, self.config.model, str(run["version"]), str(run["old_version"]),
                              f"run abandoned: {why}", retries=self.config.retries, clock=self.clock, facts=run).record()
            if ended["outcome"] == "rolled_back":
                return {**ended, "outcome": "abandoned", "error": why, "charged": True}
            return {**ended, "error": f"{why}; {ended['error']}", "charged": True}
        if step == "training" and run.get("pipeline_run") and isinstance(self.retrainer, ResumableRetrainer):
            try:  # else it goes on, and its gate may move the pointer with no rollout
                self.retrainer.terminate(str(run["pipeline_run"]))
            except Exception:
                log.exception("retraining run %s: could not terminate pipeline run %s", run["id"], run["pipeline_run"])
        return {"outcome": "abandoned", "error": why, "charged": True}

    def repair(self) -> None:
        """Try again to roll back the rollouts left ``failed_inconsistent``; those that now succeed end ``rolled_back``."""
        if self.deployer is None:
            return
        with self.state.lock:
            broken = [r for r in self.state.runs if r.get("outcome") == "failed_inconsistent"]
        for run in broken:
            ended = roll_back(self.deployer, self.registry, self.config.model, str(run["version"]), str(run["old_version"]),
                              str(run.get("rollback_reason")), retries=self.config.retries, clock=self.clock, facts=run)
            if ended.outcome != "rolled_back":
                continue
            log.warning("retraining run %s: the rollback that had failed is done now (%s version %s back on %s)",
                        run["id"], self.config.model, run["version"], run["old_version"])
            with self.state.lock:
                run.update(outcome="rolled_back", step="rolled_back", rolled_back=ended.ended, repaired=self.clock())
                self._save_quietly()

    def _record(self, run: dict[str, Any], facts: dict[str, Any]) -> None:
        """Add ``facts`` to the run's record and write it (raises if it cannot be written: the step is then not done)."""
        with self.state.lock:
            run.update(facts)
            self.state.save(self.clock())

    def _save_quietly(self) -> None:
        try:
            self.state.save(self.clock())
        except OSError:  # kept in memory: the next write that succeeds has it
            log.exception("could not write the trigger state %s", self.state.path)

    def training_data(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's data URI and label column: the base data alone, or -- when labelled capture
        shards exist -- the training set of base and shards (:func:`~kfloop.training_sets.assemble_training_set`)."""
        policy = self.config.policy.retraining
        base, target = (policy.base_data, self.config.target) if policy.base_data else self._serving_base()
        shards = self.registry.captures(self.config.model).labelled_shards() if policy.include_captures else []
        if not shards or base is None:
            return base, target
        return assemble_training_set(base, target, shards, Path(self.config.state_dir) / "data" / run_id)

    def search(self) -> Search:
        """The run's candidates: with ``retraining.search: warm``, seeded from the serving version's own search
        (:func:`~kfloop.search.warm_search`); the full grid with ``full`` or with nothing serving."""
        policy = self.config.policy
        grid = policy.training.search_space.candidates()
        serving = self.registry.production_version(self.config.model)
        if policy.retraining.search == "full" or serving is None:
            return full_search(grid)
        return warm_search(grid, serving, self.registry.metadata(self.config.model, serving),
                           neighbourhood=policy.retraining.neighbourhood,
                           pinned=[pinned.params() for pinned in policy.retraining.pinned])

    def _serving_base(self) -> tuple[str | None, str | None]:
        """The data the serving version was trained on, less the shards an earlier run of ours added."""
        serving = self.registry.production_version(self.config.model)
        if serving is None:
            return None, self.config.target
        return training_base(self.registry.metadata(self.config.model, serving)["data"]["source"], self.config.target)

    def status(self) -> dict[str, Any]:
        with self.state.lock:
            return {"model": self.config.model, "pending": list(self.state.pending), "runs": list(self.state.runs[-20:])}
