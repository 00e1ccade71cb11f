"""The whole loop on one machine: serving runtime, drift watch, trigger service and autoscaler.

:class:`LocalStack` trains a first version if the registry has no production
version, then starts, on loopback: the serving runtime (predictor replicas +
transformer, payload events to the watch), its admin API, the autoscaler
(the policy's scaling rules on the servers' ``/metrics``), ``kfloop watch``
(alarms to the trigger) and ``kfloop trigger`` (retraining and canary
rollouts through the admin API). ``HOME/stack.json`` records the addresses
and the PID of the process that owns the stack, for ``kfloop status`` and
``kfloop down``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kfloop.policies import Policy
from kfloop.registry import ModelRegistry

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
                 data_uri: str | None = None, target: str | None = None, ports: StackPorts = StackPorts(),
                 watch_alpha: float | None = None) -> None:
        self.policy, self.policy_path, self.home = policy, policy_path, Path(home)
        self.watch_alpha = watch_alpha  # false-alarm rate per window of the watch (None: its default)
        self.registry_uri, self.data_uri, self.target, self.ports = registry_uri, data_uri, target, ports
        self.model = policy.model
        self.runtime: Any = None
        self.admin: Any = None
        self.autoscaler: Any = None
        self.services: list[Any] = []

    @property
    def urls(self) -> dict[str, str]:
        return {
            "rest": f"http://127.0.0.1:{self.ports.http}",
            "grpc": f"127.0.0.1:{self.ports.grpc}",
            "admin": f"http://127.0.0.1:{self.ports.admin}",
            "watch": f"http://127.0.0.1:{self.ports.watch}",
            "trigger": f"http://127.0.0.1:{self.ports.trigger}",
        }

    def ensure_model(self) -> dict[str, Any] | None:
        """Train (kfp.local) when the model has no production version; returns the gate decision if it trained."""
        if ModelRegistry(self.registry_uri).production_version(self.model) is not None:
            return None
        from kfloop.pipelines.local import run_training_locally

        return run_training_locally(self.policy, registry_uri=self.registry_uri, workdir=self.home,
                                    data_uri=self.data_uri, target=self.target, model=self.model)

    def start(self) -> None:
        from kfloop.policies.autoscaler import Autoscaler
        from kfloop.policies.sources import LocalMetricsSource
        from kfloop.serving.runtime import AdminServer, ManagedProcess, ServingRuntime

        logs = self.home / "logs"
        urls = self.urls
        self.runtime = ServingRuntime(self.registry_uri, self.model, http_port=self.ports.http, grpc_port=self.ports.grpc,
                                      logger_url=urls["watch"] + "/", log_dir=logs, fault_injection=True)
        policy_args = ["--policy", str(self.policy_path)] if self.policy_path else []
        common = [sys.executable, "-m", "kfloop"]
        self.services = [
            ManagedProcess("watch", common + ["watch", "--registry", self.registry_uri, "--model", self.model,
                                              "--sink", urls["trigger"] + "/", "--http-port", str(self.ports.watch),
                                              "--home", str(self.home), *policy_args,
                                              *(["--alpha", str(self.watch_alpha)] if self.watch_alpha is not None else [])],
                           urls["watch"] + "/healthz", logs / "watch.log"),
            ManagedProcess("trigger", common + ["trigger", "--registry", self.registry_uri, "--model", self.model,
                                                "--admin-url", urls["admin"], "--http-port", str(self.ports.trigger),
                                                "--home", str(self.home), *(["--target", self.target] if self.target else []),
                                                *policy_args],
                           urls["trigger"] + "/healthz", logs / "trigger.log"),
        ]
        try:
            for service in self.services:
                service.spawn()
            self.runtime.start()
            self.admin = AdminServer(self.runtime, self.ports.admin)
            self.admin.start()
            for service in self.services:
                service.wait_ready()
            self.autoscaler = Autoscaler(self.model, self.runtime, self.policy.scaling,
                                         LocalMetricsSource(self.model, self.runtime.metrics_urls),
                                         decision_log=logs / f"scaling-{self.model}.jsonl")
            self.autoscaler.start()
        except BaseException:
            self.stop()
            raise
        (self.home / STACK_FILE).write_text(json.dumps({"pid": os.getpid(), "model": self.model, "urls": urls}, indent=2))

    def stop(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
        for service in self.services:
            service.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.runtime is not None:
            self.runtime.stop()
        (self.home / STACK_FILE).unlink(missing_ok=True)


def stack_status(home: Path) -> dict[str, Any]:
    """What ``kfloop status`` shows, read from a running stack's APIs."""
    from prometheus_client.parser import text_string_to_metric_families

    record = json.loads((Path(home) / STACK_FILE).read_text())
    urls, model = record["urls"], record["model"]
    serving = httpx.get(urls["admin"] + "/status", timeout=5).json()
    watch = httpx.get(urls["watch"] + "/status", timeout=5).json()
    trigger = httpx.get(urls["trigger"] + "/status", timeout=5).json()
    signals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(urls["admin"] + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "kfloop_autoscaler_signal" and sample.labels.get("model") == model:
                signals[sample.labels["rule"]] = sample.value
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
        "runs_in_flight": len(trigger["pending"]) + sum(1 for r in trigger["runs"] if r["outcome"] == "running"),
        "last_run": trigger["runs"][-1] if trigger["runs"] else None,
        "urls": urls,
        "pid": record["pid"],
    }
