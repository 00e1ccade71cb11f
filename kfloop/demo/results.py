"""What a demo run recorded, and how it is told: the automation table's rows, rule firings, the result, loop timings.

:class:`DemoResult` is everything :class:`kfloop.demo.scenario.Demo` observed (times, requests, samples, decisions,
alarms, runs); :func:`automation_rows` words the table's rows from the policy; :func:`scaling_firings`,
:func:`alarm_rule`, :func:`describe_alarm` and :func:`alarm_outcome` turn decisions and alarms into
:class:`Firing` s; :func:`loop_timings` measures the loop; :func:`save_result` writes the JSON. Read by the live
display (:mod:`kfloop.demo.view`), the report (:mod:`kfloop.demo.report`) and ``kfloop demo``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


from kfloop.event_types import ACCURACY_EVENT
from kfloop.policies import Policy
from kfloop.policies.signals import signal_of
from kfloop.demo.traffic import RequestRecord

PHASES = ("train", "clean", "load", "calm", "fault", "concept", "drift", "done")


@dataclass(frozen=True)
class AutomationRow:
    """One row of the automation table, as the demo reports it."""

    key: str
    stage: str
    event: str
    action: str


def automation_rows(policy: Policy) -> tuple[AutomationRow, ...]:
    """The table's five rows, with the scaling events worded from the policy's own rules."""
    rows = [
        AutomationRow("tune", "training", "hyper-parameters", "tune many sets in parallel"),
        AutomationRow("select", "training", "several candidate models", "select the best"),
    ]
    for rule in sorted(policy.scaling.rules, key=lambda r: r.signal):  # failure_rate before request_rate, as in the table
        rows.append(AutomationRow(rule.name, "inference", signal_of(rule).describe(rule.threshold, rule.window), "scale out"))
    rows.append(AutomationRow("drift", "inference", "drift or outliers in new data", "retrain and update the model"))
    accuracy = policy.accuracy
    rows.append(AutomationRow("accuracy", "inference", f"accuracy of the served version below {accuracy.below:g} over "
                              f"{accuracy.labels} labels", "retrain and update the model"))
    return tuple(rows)



@dataclass
class Firing:
    """A rule that fired: when, what it did and what came of it."""

    rule: str
    time: float
    action: str
    outcome: str


@dataclass
class DemoResult:
    """Everything the demo observed; times are epoch seconds."""

    model: str
    speed: float
    data: str
    started: float
    finished: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # phase -> start time
    requests: list[RequestRecord] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[Firing] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)  # every alarm the watch raised, in order
    rows: tuple[AutomationRow, ...] = ()
    scaling_rules: list[dict[str, Any]] = field(default_factory=list)  # the (time-scaled) policy's rules
    accuracy_below: float | None = None  # the accuracy rule's threshold
    label_shift: float | None = None  # when the first swapped label was sent
    labels: dict[str, int] = field(default_factory=dict)  # labels sent: accepted, duplicate, refused
    timings: dict[str, float | None] = field(default_factory=dict)
    # version -> its top features by mean |attribution| on the holdout rows (approximate attributions)
    importance: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    # drift or outlier alarm id -> the nDCG of the drift phase's rows against its version's holdout ranking, and the
    # features whose attribution share moved most: [feature, holdout share, drifted share]
    moved: dict[str, dict[str, Any]] = field(default_factory=dict)

    def first_alarm(self, phase: str, *, accuracy: bool) -> dict[str, Any] | None:
        """The first accuracy alarm (``accuracy``), or drift or outlier alarm, raised since ``phase`` began."""
        start = self.phases.get(phase)
        if start is None:
            return None
        return next((a for a in self.alarms if (a["type"] == ACCURACY_EVENT) == accuracy and alarm_time(a) >= start), None)

    def run_of(self, alarm: dict[str, Any]) -> dict[str, Any] | None:
        """The retraining run ``alarm`` started (None: the trigger started none for it)."""
        return next((r for r in self.runs if r.get("event_id") == alarm["id"]), None)

    def first_firings(self) -> dict[str, Firing]:
        """The first firing of each rule."""
        first: dict[str, Firing] = {}
        for firing in self.timeline:
            first.setdefault(firing.rule, firing)
        return first

    def run_after(self, moment: float) -> dict[str, Any] | None:
        """The first retraining run queued at or after ``moment`` (one second's slack for clock reads)."""
        return next((r for r in self.runs if r.get("queued", 0) >= moment - 1), None)

    def phase_at(self, moment: float) -> str:
        current = PHASES[0]
        for phase, start in sorted(self.phases.items(), key=lambda item: item[1]):
            if start <= moment:
                current = phase
        return current

    @property
    def failed_requests(self) -> list[RequestRecord]:
        """Client requests that failed outside the injected fault."""
        return [r for r in self.requests if r.status != 200 and r.phase != "fault"]

    @property
    def injected_failures(self) -> int:
        return sum(1 for r in self.requests if r.status != 200 and r.phase == "fault")

    def summary(self) -> dict[str, Any]:
        """The ``--json`` document: rule firings, failed client requests and loop timings."""
        return {
            "model": self.model,
            "data": self.data,
            "speed": self.speed,
            "duration_s": round(self.finished - self.started, 1),
            "timeline": [{**asdict(f), "at_s": round(f.time - self.started, 1)} for f in self.timeline],
            "requests": len(self.requests),
            "labels": self.labels,
            "failed_client_requests": len(self.failed_requests),
            "injected_failures": self.injected_failures,
            "loop_timings": self.timings,
            "phases": {phase: round(start - self.started, 1) for phase, start in self.phases.items()},
        }


def scaling_firings(decisions: list[dict[str, Any]]) -> list[Firing]:
    """The autoscaler's decisions as firings: each rule that drove a scale-out, and each scale-in."""
    firings = []
    for decision in decisions:
        change = f"{decision['current']} -> {decision['desired']} replicas"
        if decision["action"] == "scale_out":
            firings += [Firing(rule, decision["time"], "scale out",
                               f"{change} ({rule} = {decision['values'].get(rule, float('nan')):.3g})")
                        for rule in decision["firing"]]
        elif decision["action"] == "scale_in":
            firings.append(Firing("cooldown", decision["time"], "scale in", f"{change} ({decision['reason']})"))
    return firings


def _describe_run(run: dict[str, Any], policy: Policy) -> str:
    outcome = run.get("outcome")
    if outcome == "promoted":
        observed = run.get("full_traffic", 0.0) - run.get("canary_started", 0.0)
        return (f"version {run.get('version')} passed the gate, {_describe_shadow(run)}canary "
                f"{policy.rollout.canary_percent:g} % for {observed:.0f} s ({run.get('canary_answers', 0):g} answers, "
                f"{run.get('canary_failure_rate', 0):.0%} 5xx{_accuracy_of(run, 'canary')}), then 100 %")
    if outcome == "rejected":
        return f"version {run.get('version')} rejected by the gate: {run.get('gate')}"
    if outcome == "rolled_back":
        return f"version {run.get('version')} rolled back: {run.get('rollback_reason')}"
    return f"run {outcome}: {run.get('error', '')}"


def _describe_shadow(run: dict[str, Any]) -> str:
    """``shadow for ... s (...), `` when the run had a shadow stage."""
    if run.get("shadow_started") is None or run.get("canary_started") is None:
        return ""
    agreement = run.get("shadow_agreement")
    agrees = "" if agreement is None else f", {agreement:.0%} agreement with production"
    return (f"shadow for {run['canary_started'] - run['shadow_started']:.0f} s ({run.get('shadow_answers', 0)} mirrored "
            f"answers{agrees}{_accuracy_of(run, 'shadow')}), ")


def _accuracy_of(run: dict[str, Any], stage: str) -> str:
    """``, realised accuracy A over N labels (production P)`` of a stage judged on labels."""
    accuracy = run.get(f"{stage}_accuracy")
    if accuracy is None:
        return ""
    production = run.get("production_accuracy")
    against = "" if production is None else f", production {production:.3f}"
    return f", realised accuracy {accuracy:.3f} over {run.get(f'{stage}_labels', 0)} labels{against}"


def alarm_rule(alarm: dict[str, Any]) -> str:
    """The automation-table row an alarm belongs to."""
    return "accuracy" if alarm["type"] == ACCURACY_EVENT else "drift"


def describe_alarm(alarm: dict[str, Any]) -> str:
    if alarm["type"] == ACCURACY_EVENT:
        return (f"{alarm['type']} (version {alarm['version']}: realised accuracy {alarm['accuracy']:.3f} over "
                f"{alarm['labels']} labels, below {alarm['below']:g})")
    return f"{alarm['type']} ({alarm['drifted_features']} drifted features, min p {alarm['min_p_value']:.1e})"


def alarm_outcome(alarm: dict[str, Any], result: DemoResult, policy: Policy) -> str:
    """What came of ``alarm``: the run it started, or the run already under way (the trigger starts one at a time)."""
    run = result.run_of(alarm)
    if run is not None:
        return _describe_run(run, policy)
    raised = alarm_time(alarm)
    under_way = next((r for r in result.runs if r.get("queued", 0) <= raised <= r.get("finished", float("inf"))), None)
    if under_way is not None:
        return f"no run of its own: a retraining run was under way ({_describe_run(under_way, policy)})"
    return "no run: the retraining cooldown or the day's budget held it"


def alarm_time(alarm: dict[str, Any]) -> float:
    """When the watch raised ``alarm``: for a window's alarm, the time of the window's last row; for the accuracy
    rule, when the labels that tripped it were judged."""
    moment = alarm["judged_time"] if alarm["type"] == ACCURACY_EVENT else alarm["window"]["last_time"]
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()


def loop_timings(result: DemoResult) -> dict[str, float | None]:
    """Seconds between the loop's steps (None where a step did not happen)."""

    def gap(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(end - start, 2)

    shifted = min((r.time for r in result.requests if r.phase == "drift"), default=None)
    drift_alarm, low_accuracy = result.first_alarm("drift", accuracy=False), result.first_alarm("concept", accuracy=True)
    alarm = alarm_time(drift_alarm) if drift_alarm else None
    run = (result.run_after(alarm) if alarm is not None else None) or {}
    accuracy_alarm = alarm_time(low_accuracy) if low_accuracy else None
    concept_run = (result.run_of(low_accuracy) if low_accuracy else None) or {}
    load = result.phases.get("load")
    first_out = next((d for d in result.decisions if d["action"] == "scale_out" and result.phase_at(d["time"]) == "load"), None)
    scale_out = first_out["time"] if first_out else None
    ready = next((s["time"] for s in result.samples
                  if first_out and s["time"] >= first_out["time"] and s["replicas"] >= first_out["desired"]), None)
    return {
        "label_shift_to_accuracy_alarm_s": gap(result.label_shift, accuracy_alarm),
        "accuracy_alarm_to_pipeline_start_s": gap(accuracy_alarm, concept_run.get("started")),
        "concept_pipeline_s": gap(concept_run.get("started"), concept_run.get("trained")),
        "label_shift_to_full_traffic_s": gap(result.label_shift, concept_run.get("full_traffic")),
        "first_shifted_request_to_alarm_s": gap(shifted, alarm),
        "alarm_to_pipeline_start_s": gap(alarm, run.get("started")),
        "pipeline_s": gap(run.get("started"), run.get("trained")),
        "promotion_to_full_traffic_s": gap(run.get("trained"), run.get("full_traffic")),
        "first_shifted_request_to_full_traffic_s": gap(shifted, run.get("full_traffic")),
        "scale_out_reaction_s": gap(load, scale_out),
        "scale_out_to_replica_ready_s": gap(scale_out, ready),
        "initial_training_s": gap(result.phases.get("train"), result.training.get("finished")),
    }


def save_result(result: DemoResult, path: Path) -> None:
    """The whole record as JSON, for a look after the run (what the report and ``--json`` summarise)."""
    path.write_text(json.dumps({**result.summary(), "samples": result.samples, "decisions": result.decisions,
                                "requests": [asdict(r) for r in result.requests], "runs": result.runs,
                                "training": result.training, "alarms": result.alarms, "importance": result.importance,
                                "moved": result.moved},
                               default=str))
