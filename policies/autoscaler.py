"""The autoscaling loop: read signals, decide, scale, and record every decision.

:class:`Autoscaler` drives anything :class:`Scalable` (the local serving
runtime) with the :class:`~kfloop.policies.engine.ScalingEngine` and a
:class:`~kfloop.policies.sources.MetricSource`. Each evaluation is logged
with its inputs, appended to a JSON-lines decision log, and exported as
metrics (``kfloop_autoscaler_*``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Gauge

from kfloop.policies.engine import ScalingDecision, ScalingEngine
from kfloop.policies.sources import MetricSource
from kfloop.policies.spec import ScalingPolicy

DESIRED = Gauge("kfloop_autoscaler_desired_replicas", "Replicas the last decision asked for.", ["model"])
SIGNAL = Gauge("kfloop_autoscaler_signal", "Last value of each scaling signal (NaN = missing).", ["model", "rule"])
DECISIONS = Counter("kfloop_autoscaler_decisions", "Scaling decisions by action.", ["model", "action"])

log = logging.getLogger(__name__)


class Scalable(Protocol):
    def replica_count(self) -> int: ...

    def scale(self, replicas: int) -> int: ...


class Autoscaler:
    """One model's autoscaling, evaluated every ``policy.evaluation_seconds``."""

    def __init__(self, model: str, target: Scalable, policy: ScalingPolicy, source: MetricSource, *, decision_log: Path | None = None) -> None:
        self.model = model
        self.target = target
        self.policy = policy
        self.source = source
        self.engine = ScalingEngine(policy)
        self.decision_log = decision_log
        self.decisions: list[ScalingDecision] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, now: float | None = None) -> ScalingDecision:
        values = self.source.read(self.policy.rules)
        current = self.target.replica_count()
        decision = self.engine.decide(current, values, time.time() if now is None else now)
        if decision.desired != current:
            self.target.scale(decision.desired)
        self._record(decision)
        return decision

    def _record(self, decision: ScalingDecision) -> None:
        self.decisions.append(decision)
        DESIRED.labels(self.model).set(decision.desired)
        DECISIONS.labels(self.model, decision.action).inc()
        for rule, value in decision.values.items():
            SIGNAL.labels(self.model, rule).set(float("nan") if value is None else value)
        level = logging.INFO if decision.action != "hold" else logging.DEBUG
        log.log(level, "%s: %s %d -> %d (%s; values %s; wishes %s)", self.model, decision.action, decision.current,
                decision.desired, decision.reason, decision.values, decision.wishes)
        if self.decision_log is not None:
            self.decision_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.decision_log, "a") as handle:
                handle.write(json.dumps({**asdict(decision), "action": decision.action, "model": self.model}) + "\n")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kfloop-autoscaler-{self.model}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.policy.evaluation_seconds):
            try:
                self.step()
            except Exception:  # one failed evaluation (a replica that would not start) must not end autoscaling
                log.exception("autoscaling step for %s failed; next try in %d s", self.model, self.policy.evaluation_seconds)
