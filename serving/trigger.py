"""The trigger service: drift/outlier alarms in, a training run and a gated rollout out.

``POST /`` takes CloudEvents (binary or structured) of the policy's
``retraining.events`` types. Each accepted alarm passes the admission rules
in order -- duplicate id, a run already pending or running for the model
(one at a time), the daily budget, the cooldown since the last run started
-- and, if admitted, becomes a *pending run* in a state file, so pending work
survives a restart (a run that was in flight when the service stopped is run
again). A worker runs one pending run at a time:

1. the training pipeline (:class:`Retrainer`: ``kfp.local`` here,
   ``kfp.Client`` on a cluster) on the base data plus labelled capture shards;
2. if the pipeline's gate promoted the new version, a rollout through a
   :class:`Deployer`: ``canary_percent`` of traffic to the new version,
   watched for ``observe_seconds`` and until it has ``min_canary_answers``
   answers, then all traffic to it -- or back to the old version (and the old
   production pointer) when its 5xx share exceeds ``rollback_failure_rate``
   or it still has too few answers after ``max_observe_seconds``.

Each run's record (``GET /status``) carries its times, epoch seconds:
``queued``, ``started``, ``trained`` (pipeline done), ``canary_started``,
``full_traffic`` or ``rolled_back``, ``finished``.

Replies never carry a CloudEvent (202 with the admission outcome in
``x-kfloop-outcome``, 204 for types not handled, 400 for malformed events).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cloudevents.exceptions import GenericException
from cloudevents.http import from_http
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kfloop.data import LABEL_COLUMN, load_dataset, save_csv
from kfloop.errors import KfloopError
from kfloop.policies import Policy
from kfloop.registry import CAPTURES, STATUS_PROMOTED, ModelRegistry

ADMISSIONS = Counter("kfloop_trigger_events", "Alarms by admission outcome.", ["model", "outcome"])
RUNS = Counter("kfloop_trigger_runs", "Retraining runs by outcome.", ["model", "outcome"])
LABELLED_SHARDS = "labelled*.csv"  # capture shards with a ``label`` column added
BASE_SHARD = "000-base.csv"
SEEN_IDS = 10_000
CANARY_POLL_SECONDS = 1.0  # how often the canary's answer count is read once observe_seconds have passed

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

    def __init__(self, policy: Policy, endpoint: Any, registry_uri: str, *, model: str, image: str) -> None:
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
            raise KfloopError(f"pipeline run {outcome['run_id']} ended ({outcome.get('state')}) without registering a version")
        gate = registry.metadata(self.model, new[-1]).get("gate", {})
        return {**gate, "version": new[-1], "promoted": bool(gate.get("promoted")), "run_id": outcome["run_id"]}


class Deployer:
    """Contract: where versions are served and how traffic is split between them."""

    def serving_version(self) -> str:
        raise NotImplementedError

    def set_traffic(self, weights: dict[str, float]) -> None:
        raise NotImplementedError

    def failure_counts(self, version: str) -> tuple[float, float]:
        """(5xx answers, all answers) counted so far by the predictors of ``version``."""
        raise NotImplementedError


class LocalDeployer(Deployer):
    """The local serving runtime, through its admin API (``kfloop serve --admin-port``)."""

    def __init__(self, admin_url: str, model: str) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.model = model

    def _status(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin_url}/status", timeout=10.0).json()

    def serving_version(self) -> str:
        return str(self._status()["version"])

    def set_traffic(self, weights: dict[str, float]) -> None:
        answer = httpx.post(f"{self.admin_url}/traffic", json={"weights": weights}, timeout=120.0)
        if answer.status_code != 200:
            raise KfloopError(f"runtime refused traffic {weights}: {answer.text}")

    def failure_counts(self, version: str) -> tuple[float, float]:
        failed = total = 0.0
        for share in self._status()["traffic"]:
            if share["version"] != version:
                continue
            for replica in share["replicas"]:
                text = httpx.get(f"http://{replica['address']}/metrics", timeout=5.0).text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "kfloop_requests_total" and sample.labels.get("model") == self.model:
                            total += sample.value
                            failed += sample.value if sample.labels.get("status_class") == "5xx" else 0.0
        return failed, total


def canary_patch(storage_uri: str, percent: float | None) -> dict[str, Any]:
    """The InferenceService merge patch that serves ``storage_uri`` to ``percent`` of traffic (None: all)."""
    predictor: dict[str, Any] = {"model": {"storageUri": storage_uri}, "canaryTrafficPercent": None if percent is None else int(percent)}
    return {"spec": {"predictor": predictor}}


class KServeDeployer(Deployer):
    """An InferenceService on a cluster: versions are ``storageUri`` s, the split is ``canaryTrafficPercent``.

    KServe keeps the previous revision serving the rest of the traffic while a
    canary percentage is set -- in Knative (Serverless) deployment mode. In
    Standard (raw) mode, which KEDA autoscaling needs, KServe has no canary:
    the patch becomes a rolling update and the observation window judges the
    whole new version. The transformer needs no patch: it learns the new
    version from the predictor pods (see :mod:`kfloop.serving.transformer`).
    The failure rate comes from Prometheus (the predictor's
    ``kfloop_requests_total{version=...}``).
    """

    def __init__(self, namespace: str, name: str, registry_uri: str, model: str, prometheus_url: str, *, context: str | None = None) -> None:
        from kubernetes import client, config

        if context or not _in_cluster():
            config.load_kube_config(context=context)
        else:
            config.load_incluster_config()
        self.api = client.CustomObjectsApi()
        self.namespace, self.name, self.model = namespace, name, model
        self.registry = ModelRegistry(registry_uri)
        self.prometheus_url = prometheus_url.rstrip("/")

    def _patch(self, body: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name, body)

    def serving_version(self) -> str:
        isvc = self.api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name)
        return isvc["spec"]["predictor"]["model"]["storageUri"].rstrip("/").rsplit("/", 1)[-1]

    def set_traffic(self, weights: dict[str, float]) -> None:
        serving = [v for v, w in weights.items() if w > 0]
        newest = max(serving, key=int)
        percent = weights[newest] if len(serving) > 1 else None
        self._patch(canary_patch(self.registry.uri(self.model, newest), percent))

    def failure_counts(self, version: str) -> tuple[float, float]:
        selector = f'model="{self.model}",component="predictor",version="{version}"'
        counts = []
        for query in (f'sum(kfloop_requests_total{{{selector},status_class="5xx"}})', f"sum(kfloop_requests_total{{{selector}}})"):
            result = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": query}, timeout=10.0).json()
            values = result.get("data", {}).get("result", [])
            counts.append(float(values[0]["value"][1]) if values else 0.0)
        return counts[0], counts[1]


def _in_cluster() -> bool:
    return os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")


class TriggerState:
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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp-{uuid.uuid4().hex}")
            tmp.write_text(json.dumps({"seen": self.seen[-SEEN_IDS:], "pending": self.pending, "runs": self.runs}, indent=1))
            os.replace(tmp, self.path)


@dataclass
class TriggerConfig:
    model: str
    registry_uri: str
    policy: Policy
    state_dir: Path
    target: str | None = None  # label column of the base data (None: the format's own)


class TriggerService:
    """Admission, persistence and the one worker of one model's retraining."""

    def __init__(self, config: TriggerConfig, retrainer: Retrainer, deployer: Deployer | None, *, clock=time.time) -> None:
        self.config = config
        self.retrainer = retrainer
        self.deployer = deployer
        self.clock = clock
        self.registry = ModelRegistry(config.registry_uri)
        self.state = TriggerState(Path(config.state_dir) / "trigger-state.json")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- admission -----------------------------------------------------------------------

    def receive(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        try:
            event = from_http(headers, body)
        except GenericException as exc:
            return 400, f"not a CloudEvent: {exc}"
        if event["type"] not in self.config.policy.retraining.events:
            return 204, f"event type {event['type']!r} does not trigger retraining"
        data = event.get_data() if isinstance(event.get_data(), dict) else {}
        if data.get("model") not in (None, self.config.model):
            return 204, f"alarm is for model {data.get('model')!r}, this service retrains {self.config.model!r}"
        return 202, self.admit(str(event["id"]), event["type"])

    def admit(self, event_id: str, event_type: str) -> str:
        """``started`` (queued), ``duplicate``, ``coalesced``, ``cooldown`` or ``budget``."""
        policy, now = self.config.policy.retraining, self.clock()
        with self.state.lock:
            if event_id in self.state.seen:
                outcome = "duplicate"
            else:
                self.state.seen.append(event_id)
                started = [r["started"] for r in self.state.runs]
                if self.state.pending or any(r.get("outcome") == "running" for r in self.state.runs):
                    outcome = "coalesced"
                elif sum(1 for t in started if now - t < 86400) >= policy.max_runs_per_day:
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
        self._worker = threading.Thread(target=self._work, name="kfloop-trigger", daemon=True)
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
                    run.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
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
        return {**record, **self.rollout(str(decision["version"]), decision.get("production_version"))}

    def training_data(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's data URI and label column.

        The base data alone, or -- when labelled capture shards exist -- a folder
        of shards in one schema (``id,label,<features>``): the base written as
        ``000-base.csv`` (whatever its format: a built-in set, a UCI folder, a
        CSV) and the labelled shards beside it.
        """
        policy = self.config.policy.retraining
        base, target = (policy.base_data, self.config.target) if policy.base_data else self._serving_base()
        shards = sorted(Path(self.registry.uri(self.config.model), CAPTURES).rglob(LABELLED_SHARDS)) if (
            policy.include_captures and self.registry.is_local) else []
        if not shards or base is None:
            return base, target
        folder = Path(self.config.state_dir) / "data" / run_id
        shutil.rmtree(folder, ignore_errors=True)  # a run restarted after a crash starts from a clean folder
        folder.mkdir(parents=True)
        save_csv(load_dataset(base, target=target), str(folder / BASE_SHARD), id_prefix="base-")
        for index, shard in enumerate(shards, start=1):
            shutil.copyfile(shard, folder / f"{index:03d}-{shard.name}")
        return str(folder), LABEL_COLUMN

    def _serving_base(self) -> tuple[str | None, str | None]:
        """The data the serving version was trained on, less the shards an earlier run of ours added."""
        serving = self.registry.production_version(self.config.model)
        if serving is None:
            return None, self.config.target
        source = self.registry.metadata(self.config.model, serving)["data"]["source"]
        if (Path(source) / BASE_SHARD).is_file():  # a folder a retraining run assembled (here or elsewhere)
            return str(Path(source) / BASE_SHARD), LABEL_COLUMN
        return source, self.config.target

    def rollout(self, new: str, old: str | None) -> dict[str, Any]:
        """Canary -> observe -> all traffic, or roll back to ``old``."""
        rollout = self.config.policy.rollout
        deployer = self.deployer
        old = old or deployer.serving_version()
        if old == new:
            return {"outcome": "promoted", "rollout": "already serving"}
        failed_before, total_before = deployer.failure_counts(new)
        deployer.set_traffic({old: 100.0 - rollout.canary_percent, new: rollout.canary_percent})
        canary_started = self.clock()
        observed_since = time.monotonic()
        time.sleep(rollout.observe_seconds)
        while True:
            failed, total = deployer.failure_counts(new)
            answers = total - total_before
            if answers >= rollout.min_canary_answers or time.monotonic() - observed_since >= rollout.max_observe_seconds:
                break
            time.sleep(CANARY_POLL_SECONDS)
        rate = (failed - failed_before) / answers if answers else 0.0
        if answers < rollout.min_canary_answers:
            reason = (f"{answers:g} canary answers in {rollout.max_observe_seconds} s, "
                      f"fewer than min_canary_answers ({rollout.min_canary_answers})")
        elif rate > rollout.rollback_failure_rate:
            reason = f"canary 5xx share {rate:.1%} over rollback_failure_rate {rollout.rollback_failure_rate:.1%}"
        else:
            reason = None
        if reason is not None:
            deployer.set_traffic({old: 100.0})
            self.registry.set_production(self.config.model, old)
            self.registry.update_metadata(self.config.model, new, status="rolled_back",
                                          rollback={"failure_rate": rate, "answers": answers, "reason": reason})
            return {"outcome": "rolled_back", "rollback_reason": reason, "canary_failure_rate": rate,
                    "canary_answers": answers, "canary_started": canary_started, "rolled_back": self.clock()}
        deployer.set_traffic({new: 100.0})
        if self.registry.metadata(self.config.model, new).get("status") != STATUS_PROMOTED:
            self.registry.set_production(self.config.model, new)
        return {"outcome": "promoted", "canary_failure_rate": rate, "canary_answers": answers,
                "canary_started": canary_started, "full_traffic": self.clock()}

    def status(self) -> dict[str, Any]:
        with self.state.lock:
            return {"model": self.config.model, "pending": list(self.state.pending), "runs": list(self.state.runs[-20:])}


def create_app(service: TriggerService) -> FastAPI:
    """``POST /`` alarms, ``GET /status``, ``GET /healthz``, ``GET /metrics``."""
    app = FastAPI(title="kfloop trigger", docs_url=None, redoc_url=None, openapi_url=None)

    @app.on_event("startup")
    async def start_worker() -> None:
        service.start()

    @app.on_event("shutdown")
    async def stop_worker() -> None:
        service.stop()

    @app.post("/")
    async def receive(request: Request) -> Response:
        status, reason = service.receive(dict(request.headers.items()), await request.body())
        if status == 400:
            return Response(json.dumps({"error": reason}), status_code=400, media_type="application/json")
        header = "x-kfloop-outcome" if status == 202 else "x-kfloop-ignored"
        return Response(status_code=status, headers={header: reason})

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return service.status()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
