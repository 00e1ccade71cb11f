"""The scaling decision engine: one rule set, the same decisions on a cluster and on one machine.

:class:`ScalingEngine` turns the current replica count and the latest value
of every scaling signal into a :class:`ScalingDecision`, with the semantics
KEDA's HPA applies to the ScaledObject compiled from the same policy:

* ``request_rate`` (``AverageValue``) wants ``ceil(total rate / threshold)``;
* ``failure_rate`` (``Value``) wants ``ceil(replicas * value / threshold)``,
  nothing changes within the HPA's 10 % tolerance;
* the highest wish wins, clamped to ``[min_replicas, max_replicas]``;
* scaling out happens at once; scaling in takes the highest wish of the last
  ``cooldown_seconds`` (the HPA's scale-down stabilisation window);
* a signal without a value (Prometheus down, no traffic for a ratio) makes
  no wish, and while any signal is missing the engine never scales in: with
  no values at all it holds the current count.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from kfloop.policies.spec import ScalingPolicy

HPA_TOLERANCE = 0.1
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

    def wish(self, signal: str, value: float, threshold: float, current: int) -> int:
        if signal == "request_rate":
            return math.ceil(value / threshold)
        ratio = value / threshold
        return current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(current * ratio)

    def decide(self, current: int, values: dict[str, float | None], now: float) -> ScalingDecision:
        policy = self.policy
        wishes: dict[str, int | None] = {}
        for rule in policy.rules:
            value = values.get(rule.name)
            wishes[rule.name] = None if value is None or math.isnan(value) else self.wish(rule.signal, value, rule.threshold, current)
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
