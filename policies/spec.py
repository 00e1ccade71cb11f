"""The policy file: a typed spec parsed in one pass that reports every bad field.

``load_policy(path)`` reads YAML into :class:`Policy`. Any error lists each
offending field by its dotted path together with what is allowed, and names
the file, e.g. ``policy.yaml: training.selection_metric: Input should be
'accuracy', 'macro_f1' or 'log_loss' (got 'f1')``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from kfloop.captures import CaptureRetention
from kfloop.errors import PolicyError, describe_validation_errors
from kfloop.event_types import ACCURACY_EVENT, ALARM_EVENTS, DRIFT_EVENT, OUTLIER_EVENT

DEFAULT_POLICY_PATH = Path(__file__).with_name("default.yaml")

SelectionMetric = Literal["accuracy", "macro_f1", "log_loss"]
MaxFeatures = Literal["sqrt", "log2"] | Annotated[float, Field(gt=0.0, le=1.0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ForestGrid(_Spec):
    """RandomForestClassifier hyper-parameter grid; each combination is one candidate.

    Leave a parameter out for scikit-learn's default (``max_depth`` unlimited).
    """

    n_estimators: list[Annotated[int, Field(ge=1, le=5000)]] = Field(default=[100, 300], min_length=1)
    max_features: list[MaxFeatures] = Field(default=["sqrt", "log2"], min_length=1)
    min_samples_leaf: list[Annotated[int, Field(ge=1)]] = Field(default=[1, 2], min_length=1)
    max_depth: list[Annotated[int, Field(ge=1)]] | None = None
    criterion: list[Literal["gini", "entropy", "log_loss"]] | None = None
    class_weight: list[Literal["balanced", "balanced_subsample"]] | None = None

    def candidates(self) -> list[dict[str, int | float | str]]:
        """Every combination as a plain dict, the most expensive first.

        Longest-first ordering lets a pool of parallel tasks finish together
        (the cost of a forest grows with its trees and the features tried per split).
        """
        axes = {name: values for name, values in self.model_dump().items() if values is not None}
        combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        return sorted(combos, key=_relative_cost, reverse=True)


class ForestParams(_Spec):
    """One RandomForestClassifier hyper-parameter set (a pinned candidate); left out: scikit-learn's default."""

    n_estimators: Annotated[int, Field(ge=1, le=5000)] = 100
    max_features: MaxFeatures = "sqrt"
    min_samples_leaf: Annotated[int, Field(ge=1)] = 1
    max_depth: Annotated[int, Field(ge=1)] | None = None
    criterion: Literal["gini", "entropy", "log_loss"] | None = None
    class_weight: Literal["balanced", "balanced_subsample"] | None = None

    def params(self) -> dict[str, int | float | str]:
        return {name: value for name, value in self.model_dump().items() if value is not None}


def _relative_cost(params: dict[str, int | float | str]) -> float:
    share = {"sqrt": 0.1, "log2": 0.05}.get(str(params.get("max_features")), None)
    if share is None:
        share = float(params.get("max_features", 0.1))
    return float(params.get("n_estimators", 100)) * share / float(params.get("min_samples_leaf", 1)) ** 0.5


class TrainingPolicy(_Spec):
    """How candidates are searched, ranked and promoted."""

    search_space: ForestGrid = ForestGrid()
    parallelism: int = Field(default=2, ge=1, le=64)
    cv_folds: int = Field(default=5, ge=2, le=20)
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    seed: int = 42
    selection_metric: SelectionMetric = "accuracy"
    promotion_margin: float = Field(default=0.0, ge=0.0)
    # Candidates cross-validated one after another in one pipeline task (null: spread over ``parallelism``
    # tasks). Each task pays its start-up once (on a laptop: interpreter, KFP executor, scikit-learn;
    # on a cluster: a pod); fewer, fuller tasks pay it less often, more tasks spread the
    # work over more nodes.
    candidates_per_task: int | None = Field(default=None, ge=1)

    def batches(self, candidates: list[dict[str, int | float | str]]) -> list[list[dict[str, int | float | str]]]:
        """``candidates`` split into the pipeline's tasks, balanced by their relative cost (longest first
        onto the least loaded task with room), each batch longest first."""
        if not candidates:
            return []
        per_task = self.candidates_per_task or -(-len(candidates) // self.parallelism)
        tasks = -(-len(candidates) // per_task)
        batches: list[list[dict[str, int | float | str]]] = [[] for _ in range(tasks)]
        loads = [0.0] * tasks
        for params in sorted(candidates, key=_relative_cost, reverse=True):
            open_tasks = [i for i in range(tasks) if len(batches[i]) < per_task]
            task = min(open_tasks, key=lambda i: loads[i])
            batches[task].append(params)
            loads[task] += _relative_cost(params)
        return batches

    def min_rows_per_class(self) -> int:
        """Rows each class needs: one in the holdout and ``cv_folds`` in the training split."""
        return max(2, self.cv_folds + 1, int(-(-self.cv_folds // (1 - self.holdout_fraction))))


Signal = Literal["request_rate", "failure_rate"]
Duration = Annotated[str, Field(pattern=r"^[1-9][0-9]*(s|m|h)$")]


def duration_seconds(value: str) -> int:
    """``"5m"`` -> 300."""
    return int(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]


class ScalingRule(_Spec):
    """One autoscaling signal of the predictor, evaluated over a window.

    ``request_rate``: requests/s per replica (all statuses); the rule wants
    ``ceil(total rate / threshold)`` replicas (KEDA/HPA ``AverageValue``).
    ``failure_rate``: share of 5xx answers (4xx are the client's and do not
    count); above ``threshold`` the rule wants ``ceil(replicas * rate /
    threshold)`` replicas (HPA ``Value``), i.e. one more.
    """

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    signal: Signal
    window: Duration = "5m"
    threshold: Annotated[float, Field(gt=0)]

    @property
    def window_seconds(self) -> int:
        return duration_seconds(self.window)


class ScalingPolicy(_Spec):
    """Replica bounds and the rules that move between them."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1, le=100)
    evaluation_seconds: int = Field(default=15, ge=1, le=600)
    cooldown_seconds: int = Field(default=300, ge=0, le=86400)
    missing_metrics: Literal["hold"] = "hold"
    prometheus_url: str | None = None
    rules: list[ScalingRule] = Field(
        default=[
            ScalingRule(name="request-rate", signal="request_rate", window="5m", threshold=2.0),
            ScalingRule(name="predictor-failures", signal="failure_rate", window="1m", threshold=0.9),
        ],
        min_length=1,
    )

    @model_validator(mode="after")
    def _bounds(self) -> "ScalingPolicy":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique, got {names}")
        return self


MAX_RETRY_SECONDS = 86_400  # Knative keeps an alarm in memory while it retries: at most a day


class DeliveryPolicy(_Spec):
    """How a cluster's Knative Triggers deliver each alarm to the trigger service (the Triggers' ``spec.delivery``).

    After a failed attempt Knative retries ``retries`` times, waiting
    ``backoff_delay_seconds * 2**n`` (``exponential``) or ``backoff_delay_seconds * n``
    (``linear``) before retry ``n`` (counted from 0, as its dispatcher does: 1, 2,
    4, ... s by default, 255 s in all); an alarm still not taken then goes to the
    Triggers' dead-letter sink, the watch, which stores it in its outbox and sends
    it again. On one machine the watch posts alarms to the trigger service itself
    and its outbox retries, so this section is used on a cluster only.
    """

    retries: int = Field(default=8, ge=0, le=100)
    backoff_delay_seconds: float = Field(default=1.0, ge=0.001)
    backoff_policy: Literal["exponential", "linear"] = "exponential"

    @model_validator(mode="after")
    def _bounded(self) -> "DeliveryPolicy":
        if self.retry_seconds() > MAX_RETRY_SECONDS:
            raise ValueError(f"the retries wait {self.retry_seconds():.0f} s in all, more than a day ({MAX_RETRY_SECONDS} s): "
                             "Knative keeps the alarm in memory meanwhile; use fewer retries or a shorter delay")
        return self

    def retry_seconds(self) -> float:
        """How long Knative waits in all before it dead-letters an alarm that is never taken."""
        if self.backoff_policy == "exponential":
            return self.backoff_delay_seconds * (2 ** self.retries - 1)
        return self.backoff_delay_seconds * self.retries * (self.retries - 1) / 2

    def backoff_delay(self) -> str:
        """``backoff_delay_seconds`` as the ISO-8601 duration Knative reads: ``1`` -> ``"PT1S"``, ``0.5`` -> ``"PT0.5S"``."""
        return f"PT{self.backoff_delay_seconds:.3f}".rstrip("0").rstrip(".") + "S"


AlarmEvent = Literal[ALARM_EVENTS]  # type: ignore[valid-type]  # the alarm types, spelled once (kfloop.event_types)


class RetrainingPolicy(_Spec):
    """When alarms (drift, outliers, low realised accuracy) rerun the training pipeline, and on what data, and how
    alarms reach it on a cluster."""

    # Attribution drift is opt-in: it says what moved, and a retraining on it is the team's call.
    events: list[AlarmEvent] = Field(default=[DRIFT_EVENT, OUTLIER_EVENT, ACCURACY_EVENT], min_length=1)
    cooldown_seconds: int = Field(default=3600, ge=0)
    max_runs_per_day: int = Field(default=4, ge=1)
    # warm: an alarm's run evaluates the serving version's winner, its ``neighbourhood`` closest sets on the
    # grid and the ``pinned`` sets (kfloop.search); full: the whole grid, as ``kfloop train`` always does.
    search: Literal["warm", "full"] = "warm"
    neighbourhood: int = Field(default=1, ge=0, le=64)
    pinned: list[ForestParams] = Field(default=[])
    base_data: str | None = None  # data URI of the base training set (default: the one of the serving version)
    include_captures: bool = True  # add labelled capture shards (<registry>/<model>/captures/**/labelled*.csv)
    delivery: DeliveryPolicy = DeliveryPolicy()


class AccuracyPolicy(_Spec):
    """The accuracy rule: the serving version's realised accuracy -- the share of its last ``labels`` labelled
    answers whose label matches the answer -- below ``below`` raises ``io.kfloop.accuracy.low`` (once ``labels``
    labels are behind it; again only after it was back at or above ``below``, or after a version change).
    ``below: null`` keeps the figure (``kfloop_realised_accuracy``) without the rule."""

    labels: int = Field(default=200, ge=1)
    below: float | None = Field(default=0.8, gt=0, le=1)

    def promql(self, model: str) -> str:
        """The rule as PromQL over the watch's gauges (for an alert on a cluster, and for dashboards)."""
        if self.below is None:
            raise PolicyError("the accuracy rule is off (accuracy.below: null): it has no PromQL")
        selector = f'model="{model}"'
        return (f"kfloop_realised_accuracy{{{selector}}} < {self.below:g} "
                f"and on(model, version) kfloop_realised_accuracy_labels{{{selector}}} >= {self.labels}")


class _ObservationWindow(_Spec):
    """A stage observed for at least ``observe_seconds`` and at most ``max_observe_seconds``. Each subclass
    declares both fields, with its own defaults and in its own place in the policy file."""

    if TYPE_CHECKING:
        observe_seconds: int
        max_observe_seconds: int

    @model_validator(mode="after")
    def _observation(self) -> "_ObservationWindow":
        if self.max_observe_seconds < self.observe_seconds:
            raise ValueError(f"max_observe_seconds ({self.max_observe_seconds}) must not be below "
                             f"observe_seconds ({self.observe_seconds})")
        return self


class ShadowPolicy(_ObservationWindow):
    """The optional shadow stage before the canary: the new version gets a mirrored copy of every request (its
    answers thrown away) for at least ``observe_seconds`` and until it has answered ``min_answers`` of them (and,
    where labels come, ``min_labelled_answers`` are labelled), at most ``max_observe_seconds``. It goes on to the
    canary unless its labelled accuracy trails production's by more than ``max_accuracy_drop``, it agrees with
    production's answers less often than ``min_agreement`` (null: agreement is recorded, not judged), or it
    answered too few copies."""

    enabled: bool = False
    observe_seconds: int = Field(default=60, ge=0)
    min_answers: int = Field(default=20, ge=0)
    max_observe_seconds: int = Field(default=600, ge=0)
    min_agreement: float | None = Field(default=None, ge=0, le=1)


class RolloutPolicy(_ObservationWindow):
    """How a newly promoted version reaches all traffic.

    The canary is observed for at least ``observe_seconds`` and until it has
    answered ``min_canary_answers`` requests (and, when labels come -- production's
    answers have some -- until ``min_labelled_answers`` of its answers are labelled), but no longer than
    ``max_observe_seconds``: a canary that has not answered that often by then
    is rolled back, since nothing showed that it works. It is also rolled back
    when its realised accuracy trails production's by more than
    ``max_accuracy_drop``; with fewer labelled answers than wanted it is judged
    on those it has, and with none on its 5xx share alone (the reason is recorded).
    """

    canary_percent: float = Field(default=10.0, gt=0, le=100)
    observe_seconds: int = Field(default=120, ge=0)
    min_canary_answers: int = Field(default=20, ge=0)
    max_observe_seconds: int = Field(default=1200, ge=0)
    rollback_failure_rate: float = Field(default=0.05, ge=0, le=1)
    # On truth: rolled back if the canary's realised accuracy trails production's by more than this (null: not judged) ...
    max_accuracy_drop: float | None = Field(default=0.02, ge=0, le=1)
    min_labelled_answers: int = Field(default=20, ge=0)  # ... once it has this many labelled answers (waited for, too)
    shadow: ShadowPolicy = ShadowPolicy()



_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def _byte_size(value: object) -> object:
    """``"2GiB"`` -> 2147483648; numbers pass as they are; other text is refused with the units allowed."""
    if not isinstance(value, str):
        return value
    match = _SIZE.match(value)
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise PolicyError(f"a size is a number of bytes, optionally with a unit: {', '.join(u for u in _BYTE_UNITS if u)}")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


ByteSize = Annotated[int, BeforeValidator(_byte_size), Field(ge=2**20)]


class CapturePolicy(_Spec):
    """How much of the model's captures area (captured and labelled shards) is kept.

    ``max_bytes`` (a number of bytes or text such as ``1GiB``; at least 1 MiB) and
    ``max_age_days``: null for no limit. Older shards go first; to meet ``max_bytes``
    captured shards go before labelled ones (:mod:`kfloop.captures`).
    """

    max_bytes: ByteSize | None = 2**30
    max_age_days: float | None = Field(default=30.0, gt=0)

    def retention(self) -> CaptureRetention:
        """What :meth:`kfloop.captures.CaptureArea.enforce` applies."""
        return CaptureRetention(max_bytes=self.max_bytes, max_age_days=self.max_age_days)


class ExplainPolicy(_Spec):
    """Explanations: at most ``max_rows`` rows per explain request (more: 413), on every protocol; and
    attribution drift (opt-in: not yet calibrated within alpha, docs/explain.md): the watch explains up to
    ``drift_rows`` rows of each window and raises ``io.kfloop.attribution.drift`` when their ranking's nDCG
    against the version's baseline falls below ``drift_threshold`` (lowered to what clean windows reach,
    :mod:`kfloop.drift.attribution`); ``drift_rows: 0`` (the default) turns it off."""

    max_rows: int = Field(default=32, ge=1, le=1024)
    drift_rows: int = Field(default=0, ge=0, le=10_000)
    drift_threshold: float = Field(default=0.9, gt=0, le=1)


class Policy(_Spec):
    """The whole policy file."""

    model: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")] = "classifier"
    training: TrainingPolicy = TrainingPolicy()
    scaling: ScalingPolicy = ScalingPolicy()
    retraining: RetrainingPolicy = RetrainingPolicy()
    rollout: RolloutPolicy = RolloutPolicy()
    captures: CapturePolicy = CapturePolicy()
    accuracy: AccuracyPolicy = AccuracyPolicy()
    explain: ExplainPolicy = ExplainPolicy()

    def time_scaled(self, speed: float) -> "Policy":
        """This policy with its windows, periods and cooldowns divided by ``speed`` (for demos).

        Rates and thresholds stay as they are; so the canary's minimum answer
        count, which a rate fills over time, is divided too (at least one if it
        was set). Periods keep at least one second, and a window at least three
        evaluations, so a windowed rate still has samples.
        """
        if speed <= 0:
            raise PolicyError(f"speed must be > 0, got {speed}")
        document = self.model_dump(mode="json")
        scaling = document["scaling"]
        scaling["evaluation_seconds"] = max(1, round(scaling["evaluation_seconds"] / speed))
        scaling["cooldown_seconds"] = round(scaling["cooldown_seconds"] / speed)
        for rule in scaling["rules"]:
            seconds = max(3 * scaling["evaluation_seconds"], round(duration_seconds(rule["window"]) / speed))
            rule["window"] = f"{seconds}s"
        document["retraining"]["cooldown_seconds"] = round(document["retraining"]["cooldown_seconds"] / speed)
        rollout = document["rollout"]
        rollout["observe_seconds"] = round(rollout["observe_seconds"] / speed)
        rollout["max_observe_seconds"] = round(rollout["max_observe_seconds"] / speed)
        rollout["shadow"]["observe_seconds"] = round(rollout["shadow"]["observe_seconds"] / speed)
        rollout["shadow"]["max_observe_seconds"] = round(rollout["shadow"]["max_observe_seconds"] / speed)
        if rollout["min_canary_answers"]:
            rollout["min_canary_answers"] = max(1, round(rollout["min_canary_answers"] / speed))
        return Policy.model_validate(document)

    def save(self, path: str | Path) -> Path:
        """Write the policy as YAML that :func:`load_policy` reads back."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False))
        return path


def load_policy(path: str | Path | None = None) -> Policy:
    """Parse and validate a policy file (the shipped default when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_POLICY_PATH
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"{path}: " + describe_validation_errors(exc.errors())) from None

