"""Rollout: how a promoted version reaches all traffic -- or goes back -- through a gated canary.

A :class:`Deployer` is where versions are served and how traffic is split:
:class:`LocalDeployer` drives the local serving runtime through its admin
API, :class:`KServeDeployer` an InferenceService on a cluster. :func:`roll_out`
sends the policy's ``canary_percent`` of traffic to the new version, watches it
for ``observe_seconds`` and until it has ``min_canary_answers`` answers, then
sends it all traffic -- or rolls back (traffic and the production pointer)
when its 5xx share exceeds ``rollback_failure_rate`` or it still has too few
answers after ``max_observe_seconds``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from kfloop.credentials import bearer
from kfloop.errors import UpstreamError
from kfloop.kube import load_kube_config
from kfloop.policies.signals import REQUESTS_METRIC
from kfloop.policies.spec import RolloutPolicy
from kfloop.prometheus_text import sum_samples
from kfloop.registry import STATUS_PROMOTED, ModelRegistry

__all__ = ["CANARY_POLL_SECONDS", "Deployer", "KServeDeployer", "LocalDeployer", "RolloutOutcome", "canary_patch", "roll_out"]

CANARY_POLL_SECONDS = 1.0  # how often the canary's answer count is read once observe_seconds have passed


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
    """The local serving runtime, through its admin API (``kfloop serve --admin-port``), with the home's token."""

    def __init__(self, admin_url: str, model: str, token: str) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.model = model
        self.headers = bearer(token)

    def _status(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin_url}/status", timeout=10.0).json()

    def serving_version(self) -> str:
        return str(self._status()["version"])

    def set_traffic(self, weights: dict[str, float]) -> None:
        answer = httpx.post(f"{self.admin_url}/traffic", json={"weights": weights}, headers=self.headers, timeout=120.0)
        if answer.status_code != 200:
            raise UpstreamError(f"runtime refused traffic {weights}: {answer.text}")

    def failure_counts(self, version: str) -> tuple[float, float]:
        failed = total = 0.0
        for share in self._status()["traffic"]:
            if share["version"] != version:
                continue
            for replica in share["replicas"]:
                text = httpx.get(f"http://{replica['address']}/metrics", timeout=5.0).text
                total += sum_samples(text, REQUESTS_METRIC, model=self.model)
                failed += sum_samples(text, REQUESTS_METRIC, model=self.model, status_class="5xx")
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
        from kubernetes import client

        load_kube_config(context)
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
        for query in (f'sum({REQUESTS_METRIC}{{{selector},status_class="5xx"}})', f"sum({REQUESTS_METRIC}{{{selector}}})"):
            result = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": query}, timeout=10.0).json()
            values = result.get("data", {}).get("result", [])
            counts.append(float(values[0]["value"][1]) if values else 0.0)
        return counts[0], counts[1]


@dataclass(frozen=True)
class RolloutOutcome:
    """How a rollout ended; :meth:`record` is what the run's record keeps."""

    promoted: bool
    canary_failure_rate: float | None = None
    canary_answers: float | None = None
    canary_started: float | None = None
    ended: float | None = None
    rollback_reason: str | None = None
    note: str | None = None

    def record(self) -> dict[str, Any]:
        if self.note is not None:
            return {"outcome": "promoted", "rollout": self.note}
        judged = {"canary_failure_rate": self.canary_failure_rate, "canary_answers": self.canary_answers,
                  "canary_started": self.canary_started}
        if self.promoted:
            return {"outcome": "promoted", **judged, "full_traffic": self.ended}
        return {"outcome": "rolled_back", "rollback_reason": self.rollback_reason, **judged, "rolled_back": self.ended}


def roll_out(deployer: Deployer, registry: ModelRegistry, model: str, policy: RolloutPolicy, new: str, old: str | None,
             *, clock: Callable[[], float] = time.time) -> RolloutOutcome:
    """Canary -> observe -> all traffic to ``new``, or everything back to ``old``."""
    old = old or deployer.serving_version()
    if old == new:
        return RolloutOutcome(promoted=True, note="already serving")
    failed_before, total_before = deployer.failure_counts(new)
    deployer.set_traffic({old: 100.0 - policy.canary_percent, new: policy.canary_percent})
    canary_started = clock()
    observed_since = time.monotonic()
    time.sleep(policy.observe_seconds)
    while True:
        failed, total = deployer.failure_counts(new)
        answers = total - total_before
        if answers >= policy.min_canary_answers or time.monotonic() - observed_since >= policy.max_observe_seconds:
            break
        time.sleep(CANARY_POLL_SECONDS)
    rate = (failed - failed_before) / answers if answers else 0.0
    if answers < policy.min_canary_answers:
        reason = (f"{answers:g} canary answers in {policy.max_observe_seconds} s, "
                  f"fewer than min_canary_answers ({policy.min_canary_answers})")
    elif rate > policy.rollback_failure_rate:
        reason = f"canary 5xx share {rate:.1%} over rollback_failure_rate {policy.rollback_failure_rate:.1%}"
    else:
        reason = None
    if reason is not None:
        deployer.set_traffic({old: 100.0})
        registry.set_production(model, old)
        registry.update_metadata(model, new, status="rolled_back",
                                 rollback={"failure_rate": rate, "answers": answers, "reason": reason})
        return RolloutOutcome(False, rate, answers, canary_started, clock(), rollback_reason=reason)
    deployer.set_traffic({new: 100.0})
    if registry.metadata(model, new).get("status") != STATUS_PROMOTED:
        registry.set_production(model, new)
    return RolloutOutcome(True, rate, answers, canary_started, clock())
