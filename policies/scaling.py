"""Scaling: the replica-count decision engine and the loop that applies it on one machine.

:class:`ScalingEngine` turns the current replica count and the latest value of each of the policy's
scaling rules into a :class:`ScalingDecision`, deciding as KEDA's HPA does for the ScaledObject compiled
from the same policy (each rule's wish comes from :mod:`kfloop.policies.signals`). :class:`Autoscaler`
runs the engine every ``evaluation_seconds`` on a :class:`Scalable` with a
:class:`~kfloop.policies.sources.MetricSource`, scales it, and logs, records and exports each decision.

Used by :class:`~kfloop.local.stack.LocalStack` (``kfloop serve --autoscale``, ``kfloop up``,
``kfloop demo``) to scale the local serving runtime; on a cluster KEDA scales. Decision rules: ``docs/acting.md``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from prometheus_client import Counter, Gauge

from kfloop.policies.signals import signal_of
from kfloop.policies.sources import MetricSource
from kfloop.policies.spec import ScalingPolicy

DESIRED = Gauge("kfloop_autoscaler_desired_replicas", "Replicas the last decision asked for.", ["model"])
SIGNAL = Gauge("kfloop_autoscaler_signal", "Last value of each scaling signal (NaN = missing).", ["model", "rule"])
DECISIONS = Counter("kfloop_autoscaler_decisions", "Scaling decisions by action.", ["model", "action"])

Action = Literal["scale_out", "scale_in", "hold"]


@dataclass(frozen=True)
class ScalingDecision:
    """One evaluation: its inputs, every rule's wish, and the outcome."""

    time: float
    current: int
    desired: int
    values: dict[str, float | None]
    wishes: dict[str, int | None]
    reason: str
    firing: tuple[str, ...] = field(default=())  # rules whose wish is above the current count

    @property
    def action(self) -> Action:
        if self.desired > self.current:
            return "scale_out"
        if self.desired < self.current:
            return "scale_in"
        return "hold"


class ScalingEngine:
    """Stateful only for the scale-in stabilisation window."""

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self._history: deque[tuple[float, int]] = deque()

    def decide(self, current: int, values: dict[str, float | None], now: float) -> ScalingDecision:
        policy = self.policy
        wishes: dict[str, int | None] = {}
        for rule in policy.rules:
            value = values.get(rule.name)
            wishes[rule.name] = None if value is None or math.isnan(value) else signal_of(rule).wish(value, rule.threshold, current)
        known = {name: wish for name, wish in wishes.items() if wish is not None}
        if not known:
            return ScalingDecision(now, current, current, values, wishes, "no signal has a value: holding")
        raw = min(max(max(known.values()), policy.min_replicas), policy.max_replicas)
        self._history.append((now, raw))
        while self._history and self._history[0][0] < now - policy.cooldown_seconds:
            self._history.popleft()
        firing = tuple(name for name, wish in known.items() if wish > current)
        if raw >= current:
            desired, reason = raw, "highest wish" if raw > current else "at the wished count"
        else:
            desired = max(wish for _, wish in self._history)
            reason = f"scale-in stabilised over {policy.cooldown_seconds} s"
        if len(known) < len(wishes) and desired < current:
            missing = sorted(set(wishes) - set(known))
            desired, reason = current, f"signals {missing} missing: not scaling in"
        return ScalingDecision(now, current, min(max(desired, policy.min_replicas), policy.max_replicas), values, wishes, reason, firing)


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
