"""The loop on one machine, assembled in one place: ``kfloop serve``, ``kfloop up`` and ``kfloop demo`` all use it.

:class:`LocalStack` starts, on loopback:

* :meth:`~LocalStack.start_serving` -- the serving runtime (predictor replicas +
  transformer), its admin API and, if asked, the autoscaler (the policy's
  scaling rules, read from the policy's Prometheus or, without one, from the
  servers' own ``/metrics``): what ``kfloop serve`` runs;
* :meth:`~LocalStack.start` -- the whole loop: ``kfloop watch`` (alarms to the
  trigger) and ``kfloop trigger`` (retraining and canary rollouts through the
  admin API), then the serving part with payload events to the watch and
  fault injection on. ``HOME/stack.json`` records the addresses and the PID
  of the process that owns the stack, for ``kfloop status`` and ``kfloop down``.

:meth:`~LocalStack.ensure_model` trains a first version (kfp.local) when the
registry has no production version.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from kfloop.durable import atomic_write
from kfloop.http_clients import http_client
from kfloop.labels import TruthFigures
from kfloop.local.admin import AdminServer
from kfloop.local.runtime import ServingRuntime
from kfloop.local.supervisor import ManagedProcess
from kfloop.policies.scaling import Autoscaler
from kfloop.policies.sources import LocalMetricsSource, MetricSource, PrometheusSource
from kfloop.policies.spec import Policy
from kfloop.prometheus_text import samples
from kfloop.registry import ModelRegistry

__all__ = ["STACK_FILE", "LocalStack", "StackPorts", "stack_status"]

STACK_FILE = "stack.json"


@dataclass(frozen=True)
class StackPorts:
    http: int = 8080
    grpc: int = 8081
    admin: int = 8090
    watch: int = 8085
    trigger: int = 8095


class LocalStack:
    """Start and stop the loop's processes; everything they need comes in through the constructor."""

    def __init__(self, policy: Policy, policy_path: Path | None, home: Path, registry_uri: str, *,
                 model: str | None = None, data_uri: str | None = None, target: str | None = None,
                 ports: StackPorts = StackPorts(), host: str = "127.0.0.1", watch_alpha: float | None = None,
                 inference_token_file: Path | None = None) -> None:
        self.policy, self.policy_path, self.home = policy, policy_path, Path(home)
        self.inference_token_file = inference_token_file  # inference needs this token (None: open)
        self.watch_alpha = watch_alpha  # false-alarm rate per window of the watch (None: its default)
        self.registry_uri, self.data_uri, self.target, self.ports, self.host = registry_uri, data_uri, target, ports, host
        self.model = model or policy.model
        self.runtime: ServingRuntime | None = None
        self.admin: AdminServer | None = None
        self.autoscaler: Autoscaler | None = None
        self.services: list[ManagedProcess] = []
        self._recorded = False  # this stack wrote HOME/stack.json (kfloop up), so it removes it

    @property
    def urls(self) -> dict[str, str]:
        return {
            "rest": f"http://{self.host}:{self.ports.http}",
            "grpc": f"{self.host}:{self.ports.grpc}",
            "admin": self.admin.url if self.admin is not None else f"http://127.0.0.1:{self.ports.admin}",
            "watch": f"http://127.0.0.1:{self.ports.watch}",
            "trigger": f"http://127.0.0.1:{self.ports.trigger}",
        }

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def ensure_model(self) -> dict[str, Any] | None:
        """Train (kfp.local) when the model has no production version; returns the gate decision if it trained."""
        if ModelRegistry(self.registry_uri).production_version(self.model) is not None:
            return None
        from kfloop.pipelines.local import run_training_locally

        return run_training_locally(self.policy, registry_uri=self.registry_uri, workdir=self.home,
                                    data_uri=self.data_uri, target=self.target, model=self.model)

    def metric_source(self, runtime: ServingRuntime) -> MetricSource:
        """Where the autoscaler reads its signals: the policy's Prometheus, else the replicas' ``/metrics``."""
        url = self.policy.scaling.prometheus_url
        return PrometheusSource(url, self.model) if url else LocalMetricsSource(self.model, runtime.metrics_urls)

    def start_serving(self, *, version: str | None = None, replicas: int = 1, logger_url: str | None = None,
                      autoscale: bool = True, fault_injection: bool = False) -> None:
        """The serving runtime, its admin API and (with ``autoscale``) the autoscaler."""
        try:
            self.runtime = ServingRuntime(self.registry_uri, self.model, home=self.home, version=version, replicas=replicas,
                                          host=self.host, inference_token_file=self.inference_token_file,
                                          http_port=self.ports.http, grpc_port=self.ports.grpc, logger_url=logger_url,
                                          log_dir=self.logs, fault_injection=fault_injection,
                                          max_replicas=self.policy.scaling.max_replicas,
                                          max_explain_rows=self.policy.explain.max_rows)
            self.runtime.start()
            self.admin = AdminServer(self.runtime, self.ports.admin)
            self.admin.start()
            if autoscale:
                self.autoscaler = Autoscaler(self.model, self.runtime, self.policy.scaling, self.metric_source(self.runtime),
                                             decision_log=self.logs / f"scaling-{self.model}.jsonl")
                self.autoscaler.start()
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        """The whole loop: watch and trigger, then serving with payload events to the watch."""
        urls = self.urls
        policy_args = ["--policy", str(self.policy_path)] if self.policy_path else []
        common = [sys.executable, "-m", "kfloop"]
        self.services = [
            ManagedProcess("watch", common + ["watch", "--registry", self.registry_uri, "--model", self.model,
                                              "--sink", urls["trigger"] + "/", "--http-port", str(self.ports.watch),
                                              "--home", str(self.home), *policy_args,
                                              *(["--alpha", str(self.watch_alpha)] if self.watch_alpha is not None else [])],
                           urls["watch"] + "/healthz", self.logs / "watch.log"),
            ManagedProcess("trigger", common + ["trigger", "--registry", self.registry_uri, "--model", self.model,
                                                "--admin-url", urls["admin"], "--watch-url", urls["watch"],
                                                "--http-port", str(self.ports.trigger),
                                                "--home", str(self.home), *(["--target", self.target] if self.target else []),
                                                *policy_args],
                           urls["trigger"] + "/healthz", self.logs / "trigger.log"),
        ]
        try:
            for service in self.services:
                service.spawn()
            self.start_serving(logger_url=urls["watch"] + "/", fault_injection=True)
            for service in self.services:
                service.wait_ready()
        except BaseException:
            self.stop()
            raise
        atomic_write(self.home / STACK_FILE, json.dumps({"pid": os.getpid(), "model": self.model, "urls": self.urls}, indent=2))
        self._recorded = True

    def stop(self) -> None:
        """Stop everything this stack started, by PID, newest first."""
        if self.autoscaler is not None:
            self.autoscaler.stop()
        for service in self.services:
            service.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.runtime is not None:
            self.runtime.stop()
        if self._recorded:
            (self.home / STACK_FILE).unlink(missing_ok=True)


def stack_status(home: Path) -> dict[str, Any]:
    """What ``kfloop status`` shows, read from a running stack's APIs."""
    record = json.loads((Path(home) / STACK_FILE).read_text())
    urls, model = record["urls"], record["model"]
    with http_client(timeout=5.0) as client:
        serving = client.get(urls["admin"] + "/status").json()
        watch = client.get(urls["watch"] + "/status").json()
        trigger = client.get(urls["trigger"] + "/status").json()
        metrics = client.get(urls["admin"] + "/metrics").text
    signals = {labels["rule"]: value for labels, value in samples(metrics, "kfloop_autoscaler_signal", model=model)}
    last_window = watch.get("last_window") or {}
    last_alarm = watch.get("last_alarm") or {}
    return {
        "model": model,
        "version": serving["version"],
        "replicas": sum(len(share["replicas"]) for share in serving["traffic"]),
        "traffic": {share["version"]: share["weight"] for share in serving["traffic"]},
        "signals": signals,
        "last_p_value": last_window.get("min_p_value"),
        "last_alarm": {k: last_alarm.get(k) for k in ("type", "id", "first_drifted_row_time")} if last_alarm else None,
        "realised_accuracy": dict(TruthFigures.from_status(watch).accuracy),  # version -> {accuracy, labels}
        "runs_in_flight": len(trigger["pending"]) + sum(1 for r in trigger["runs"] if r["outcome"] == "running"),
        "last_run": trigger["runs"][-1] if trigger["runs"] else None,
        "urls": urls,
        "pid": record["pid"],
    }
