"""Rollout: how an approved version reaches all traffic -- or goes back -- through a shadow and a gated canary.

:func:`roll_out` carries one version through the steps :data:`ROLLOUT_STEPS` (``gated``, ``shadow``,
``shadowed``, ``canary``, ``judged``), handing each step's facts to ``on_step`` and carrying on from
``resume``; it returns a :class:`RolloutOutcome` (``promoted``, ``rolled_back``, ``failed_inconsistent``).
:func:`roll_back` puts traffic and the production pointer back, each tried per :class:`Retries`.
A :class:`Deployer` serves versions and splits traffic: :class:`LocalDeployer` (the local serving
runtime's admin API) or :class:`KServeDeployer` (an InferenceService, patched with :func:`canary_patch`).

Used by :mod:`kfloop.policies.retraining` (its worker rolls out, abandons and repairs runs);
``kfloop trigger`` (:mod:`kfloop.cli.act`) builds the deployer. Step facts, judging, failures: ``docs/acting.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar


from kfloop.credentials import bearer
from kfloop.errors import UpstreamError
from kfloop.http_clients import http_client
from kfloop.kube import load_kube_config
from kfloop.labels import ACCURACY_LABELS_METRIC, ACCURACY_METRIC, TruthFigures
from kfloop.policies.signals import REQUESTS_METRIC
from kfloop.policies.spec import RolloutPolicy
from kfloop.prometheus_text import sum_samples
from kfloop.registry import ModelRegistry
from kfloop.retry import Backoff, wait_before_retry

__all__ = [
    "CANARY_POLL_SECONDS",
    "ROLLOUT_STEPS",
    "Deployer",
    "KServeDeployer",
    "LocalDeployer",
    "Retries",
    "RolloutOutcome",
    "canary_patch",
    "roll_back",
    "roll_out",
]

CANARY_POLL_SECONDS = 1.0  # how often the canary's answer count is read once observe_seconds have passed
ROLLOUT_STEPS = ("gated", "shadow", "shadowed", "canary", "judged")  # what on_step is given, in order (then the outcome)
STATUS_ROLLED_BACK = "rolled_back"

log = logging.getLogger(__name__)
T = TypeVar("T")


class Deployer:
    """Contract: where versions are served and how traffic is split between them."""

    mirrors = False  # can send a shadow version a copy of every request (set_traffic's ``mirror``)

    def serving_version(self) -> str:
        raise NotImplementedError

    def set_traffic(self, weights: dict[str, float], mirror: str | None = None) -> None:
        """``weights`` (version -> percent) of requests to each version; a copy of each to ``mirror`` (if it ``mirrors``)."""
        raise NotImplementedError

    def failure_counts(self, version: str) -> tuple[float, float]:
        """(5xx answers, all answers) counted so far by the predictors of ``version``."""
        raise NotImplementedError

    def realised_accuracy(self, version: str) -> tuple[float, int] | None:
        """(accuracy, labelled answers) of ``version`` as the watch measures it; None when no labels are known
        (this default: a deployer with no source of labels, whose canaries are judged on their 5xx share alone)."""
        return None

    def agreement(self, version: str) -> tuple[float, int] | None:
        """(share, answers) of shadow ``version``'s answers to mirrored requests that equal the served answers."""
        return None


class LocalDeployer(Deployer):
    """The local serving runtime, through its admin API (``kfloop serve --admin-port``), with the home's token;
    realised accuracy from the watch's ``/status`` (``watch_url``; without it, none is known)."""

    mirrors = True

    def __init__(self, admin_url: str, model: str, token: str, watch_url: str | None = None) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.model = model
        self.headers = bearer(token)
        self.watch_url = watch_url.rstrip("/") if watch_url else None
        self._http = http_client(timeout=10.0)

    def _figures(self) -> TruthFigures:
        """What the watch's labels say now (none without a watch)."""
        if self.watch_url is None:
            return TruthFigures()
        return TruthFigures.from_status(self._http.get(f"{self.watch_url}/status").json())

    def realised_accuracy(self, version: str) -> tuple[float, int] | None:
        return self._figures().realised_accuracy(version)

    def agreement(self, version: str) -> tuple[float, int] | None:
        return self._figures().agreement_of(version)

    def _status(self) -> dict[str, Any]:
        return self._http.get(f"{self.admin_url}/status").json()

    def serving_version(self) -> str:
        return str(self._status()["version"])

    def set_traffic(self, weights: dict[str, float], mirror: str | None = None) -> None:
        body = {"weights": weights, **({"mirror": mirror} if mirror is not None else {})}
        answer = self._http.post(f"{self.admin_url}/traffic", json=body, headers=self.headers, timeout=120.0)
        if answer.status_code != 200:
            raise UpstreamError(f"runtime refused traffic {weights} (mirror {mirror}): {answer.text}")

    def failure_counts(self, version: str) -> tuple[float, float]:
        failed = total = 0.0
        for share in self._status()["traffic"]:
            if share["version"] != version:
                continue
            for replica in share["replicas"]:
                text = self._http.get(f"http://{replica['address']}/metrics", timeout=5.0).text
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
    version from the predictor pods (docs/serving.md, "Transformer").
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
        self._http = http_client(timeout=10.0)

    def _patch(self, body: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name, body)

    def serving_version(self) -> str:
        isvc = self.api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name)
        return isvc["spec"]["predictor"]["model"]["storageUri"].rstrip("/").rsplit("/", 1)[-1]

    def set_traffic(self, weights: dict[str, float], mirror: str | None = None) -> None:
        if mirror is not None:
            raise UpstreamError("an InferenceService has no shadow route: KServe mirrors no traffic")
        serving = [v for v, w in weights.items() if w > 0]
        newest = max(serving, key=int)
        percent = weights[newest] if len(serving) > 1 else None
        self._patch(canary_patch(self.registry.uri(self.model, newest), percent))

    def failure_counts(self, version: str) -> tuple[float, float]:
        selector = f'model="{self.model}",component="predictor",version="{version}"'
        failed = self._query(f'sum({REQUESTS_METRIC}{{{selector},status_class="5xx"}})')
        total = self._query(f"sum({REQUESTS_METRIC}{{{selector}}})")
        return failed or 0.0, total or 0.0

    def realised_accuracy(self, version: str) -> tuple[float, int] | None:
        selector = f'model="{self.model}",version="{version}"'
        accuracy, labels = self._query(f"max({ACCURACY_METRIC}{{{selector}}})"), self._query(f"max({ACCURACY_LABELS_METRIC}{{{selector}}})")
        return None if accuracy is None or not labels else (accuracy, int(labels))

    def _query(self, query: str) -> float | None:
        """The value of an instant PromQL query with one result (None: no result)."""
        result = self._http.get(f"{self.prometheus_url}/api/v1/query", params={"query": query}).json()
        values = result.get("data", {}).get("result", [])
        return float(values[0]["value"][1]) if values else None


@dataclass(frozen=True)
class Retries:
    """How often an action that puts things back (traffic, the production pointer) is tried: ``attempts`` tries,
    waiting ``backoff_seconds`` after the first failure and twice as long after each next one (longer when the
    error asks for it: :func:`~kfloop.retry.wait_before_retry`)."""

    attempts: int = 3
    backoff_seconds: float = 1.0

    @property
    def backoff(self) -> Backoff:
        return Backoff.doubling(self.backoff_seconds, self.attempts - 1)

    def call(self, action: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except Exception as exc:
                if attempt >= self.attempts:
                    raise
                log.warning("%s failed (try %d of %d), trying again: %s: %s", what, attempt, self.attempts, type(exc).__name__, exc)
                time.sleep(wait_before_retry(self.backoff, attempt, exc))
        raise AssertionError("unreachable")  # attempts < 1


@dataclass(frozen=True)
class RolloutOutcome:
    """How a rollout ended (``promoted``, ``rolled_back`` or ``failed_inconsistent``); :meth:`record` is what the
    run's record keeps."""

    outcome: str
    version: str
    old_version: str | None = None
    canary_failure_rate: float | None = None
    canary_answers: float | None = None
    canary_started: float | None = None
    ended: float | None = None
    rollback_reason: str | None = None
    error: str | None = None
    note: str | None = None

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def record(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"outcome": self.outcome, "version": self.version, "old_version": self.old_version}
        if self.note is not None:
            return {**facts, "step": self.outcome, "rollout": self.note}
        facts.update(canary_failure_rate=self.canary_failure_rate, canary_answers=self.canary_answers,
                     canary_started=self.canary_started)
        if self.outcome == "promoted":
            return {**facts, "step": "promoted", "full_traffic": self.ended}
        if self.outcome == "rolled_back":
            return {**facts, "step": "rolled_back", "rollback_reason": self.rollback_reason, "rolled_back": self.ended}
        return {**facts, "rollback_reason": self.rollback_reason, "error": self.error}  # the step stays the last one reached


def roll_out(deployer: Deployer, registry: ModelRegistry, model: str, policy: RolloutPolicy, new: str, old: str | None,
             *, clock: Callable[[], float] = time.time, resume: Mapping[str, Any] | None = None,
             on_step: Callable[[dict[str, Any]], None] | None = None, retries: Retries = Retries()) -> RolloutOutcome:
    """(Shadow ->) canary -> observe -> all traffic to ``new``, or everything back to ``old`` (None: what ``deployer`` serves).

    ``on_step`` is given each step's facts once it is done (docs/acting.md lists them); ``resume`` -- the facts
    persisted last, e.g. the run's record -- carries on from the step it names: a running canary is judged
    from its recorded start and baseline, not started again.
    """
    facts: dict[str, Any] = dict(resume or {})
    reached = ROLLOUT_STEPS.index(facts["step"]) + 1 if facts.get("step") in ROLLOUT_STEPS else 0
    old = facts.get("old_version") if reached else old
    steps = (*ROLLOUT_STEPS, "promoted")
    step = steps[reached]  # the step under way, named in the reason if it fails

    def advance(name: str, update: dict[str, Any]) -> None:
        nonlocal step
        facts.update(update, step=name)
        if on_step is not None:
            on_step({**update, "step": name})
        step = steps[steps.index(name) + 1]

    try:
        if reached < 1:
            old = old or deployer.serving_version()
            if old == new:
                _point(registry, model, new)
                return RolloutOutcome("promoted", new, old, ended=clock(), note="already serving")
            _point(registry, model, old)  # the pointer moves to the new version only once it has earned it
            note = ({"shadow_note": "this deployer cannot mirror traffic: no shadow stage"}
                    if policy.shadow.enabled and not deployer.mirrors else {})
            advance("gated", {"version": new, "old_version": old, **note})
        if not (policy.shadow.enabled and deployer.mirrors) and reached < 3:
            reached, step = 3, "canary"  # no shadow stage: from the gate to the canary
        if reached < 2:
            deployer.set_traffic({old: 100.0}, mirror=new)
            advance("shadow", {"shadow_started": clock()})
        if reached < 3:
            advance("shadowed", _judge_shadow(deployer, policy, new, facts, clock))
        if facts.get("rollback_reason") is None:  # the shadow, if any, passed
            if reached < 4:
                baseline = deployer.failure_counts(new)
                weights = {old: 100.0 - policy.canary_percent, new: policy.canary_percent}
                deployer.set_traffic(weights)
                advance("canary", {"canary_started": clock(), "weights": weights, "canary_baseline": list(baseline)})
            if reached < 5:
                advance("judged", _judge(deployer, policy, new, facts, clock))
        judged = _judged(facts)
        if facts.get("rollback_reason") is None:
            deployer.set_traffic({new: 100.0})
            registry.promote(model, new)  # status ``promoted`` (the gate's decision kept) and the pointer
            return RolloutOutcome("promoted", new, old, **judged, ended=clock())
        reason = str(facts["rollback_reason"])
    except Exception as exc:  # any failure ends in a defined state: everything back on the old version
        if old is None:
            raise  # nothing was changed yet (the old version is not even known): the caller's failure
        log.exception("rollout of %s version %s failed in step %r: rolling back to version %s", model, new, step, old)
        reason = f"step {step!r} failed: {type(exc).__name__}: {exc}"
    return roll_back(deployer, registry, model, new, str(old), reason, retries=retries, clock=clock, facts=facts)


def roll_back(deployer: Deployer, registry: ModelRegistry, model: str, new: str, old: str, reason: str, *,
              retries: Retries = Retries(), clock: Callable[[], float] = time.time,
              facts: Mapping[str, Any] | None = None) -> RolloutOutcome:
    """All traffic to ``old``, the production pointer on it, ``new`` marked ``rolled_back`` -- each tried per ``retries``.

    ``rolled_back`` when traffic and pointer are back, else ``failed_inconsistent`` (logged as an error) with what
    could not be undone in ``error``: call it again later. ``facts`` are the rollout's recorded facts, kept in the outcome.
    """
    judged = _judged(facts or {})
    errors = []
    for what, action in ((f"traffic back to version {old}", lambda: deployer.set_traffic({old: 100.0})),
                         (f"production pointer back to version {old}", lambda: _point(registry, model, old))):
        try:
            retries.call(action, what)
        except Exception as exc:
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
    if errors:
        error = f"could not roll back after {retries.attempts} tries: " + "; ".join(errors)
        log.error("rollout of %s version %s left inconsistent: %s (rolling back because %s)", model, new, error, reason)
        return RolloutOutcome("failed_inconsistent", new, old, **judged, rollback_reason=reason, error=error)
    rollback = {"reason": reason, "failure_rate": judged["canary_failure_rate"], "answers": judged["canary_answers"]}
    try:
        retries.call(lambda: registry.update_metadata(model, new, status=STATUS_ROLLED_BACK, rollback=rollback),
                     f"marking version {new} rolled back")
    except Exception:  # traffic and pointer are back: the version's own record is only information
        log.exception("could not mark %s version %s as rolled back", model, new)
    return RolloutOutcome("rolled_back", new, old, **judged, ended=clock(), rollback_reason=reason)


def _judge(deployer: Deployer, policy: RolloutPolicy, new: str, facts: Mapping[str, Any],
           clock: Callable[[], float]) -> dict[str, Any]:
    """Observe the running canary (from its recorded start) and judge it: ``rollback_reason`` None means promote."""
    failed_before, total_before = (float(n) for n in facts["canary_baseline"])
    elapsed = max(0.0, clock() - float(facts["canary_started"]))  # > 0 when a restarted service resumes the canary
    observed_since = time.monotonic() - elapsed
    time.sleep(max(0.0, policy.observe_seconds - elapsed))
    on_truth = policy.max_accuracy_drop is not None
    # Labels are waited for only where they come: production's answers have some.
    awaits_labels = on_truth and deployer.realised_accuracy(str(facts["old_version"])) is not None
    while True:
        failed, total = deployer.failure_counts(new)
        if total < total_before or failed < failed_before:  # the canary's predictors restarted: their counts begin at 0
            failed_before = total_before = 0.0
        answers = total - total_before
        labelled = deployer.realised_accuracy(new) if on_truth else None
        enough_labels = not awaits_labels or (labelled is not None and labelled[1] >= policy.min_labelled_answers)
        if (answers >= policy.min_canary_answers and enough_labels) or time.monotonic() - observed_since >= policy.max_observe_seconds:
            break
        time.sleep(CANARY_POLL_SECONDS)
    rate = (failed - failed_before) / answers if answers else 0.0
    truth = _on_truth(deployer, policy, "canary", new, str(facts["old_version"]), labelled) if on_truth else {}
    truth_reason = truth.pop("reason", None)
    if answers < policy.min_canary_answers:
        reason = (f"{answers:g} canary answers in {policy.max_observe_seconds} s, "
                  f"fewer than min_canary_answers ({policy.min_canary_answers})")
    elif rate > policy.rollback_failure_rate:
        reason = f"canary 5xx share {rate:.1%} over rollback_failure_rate {policy.rollback_failure_rate:.1%}"
    else:
        reason = truth_reason
    return {"canary_failure_rate": rate, "canary_answers": answers, "rollback_reason": reason, **truth}


def _judge_shadow(deployer: Deployer, policy: RolloutPolicy, new: str, facts: Mapping[str, Any],
                  clock: Callable[[], float]) -> dict[str, Any]:
    """Observe the running shadow (from its recorded start) and judge it: ``rollback_reason`` None means on to the canary."""
    shadow, old = policy.shadow, str(facts["old_version"])
    elapsed = max(0.0, clock() - float(facts["shadow_started"]))
    observed_since = time.monotonic() - elapsed
    time.sleep(max(0.0, shadow.observe_seconds - elapsed))
    on_truth = policy.max_accuracy_drop is not None
    awaits_labels = on_truth and deployer.realised_accuracy(old) is not None
    while True:
        agreement = deployer.agreement(new)
        labelled = deployer.realised_accuracy(new) if on_truth else None
        answered = agreement is not None and agreement[1] >= shadow.min_answers
        enough_labels = not awaits_labels or (labelled is not None and labelled[1] >= policy.min_labelled_answers)
        if (answered and enough_labels) or time.monotonic() - observed_since >= shadow.max_observe_seconds:
            break
        time.sleep(CANARY_POLL_SECONDS)
    truth = _on_truth(deployer, policy, "shadow", new, old, labelled) if on_truth else {}
    truth_reason = truth.pop("reason", None)
    answers = 0 if agreement is None else agreement[1]
    if answers < shadow.min_answers:
        reason = (f"{answers} shadow answers in {shadow.max_observe_seconds} s, fewer than shadow.min_answers "
                  f"({shadow.min_answers})")
    elif shadow.min_agreement is not None and agreement is not None and agreement[0] < shadow.min_agreement:
        reason = f"shadow agrees with production on {agreement[0]:.1%} of answers, below shadow.min_agreement {shadow.min_agreement:.1%}"
    else:
        reason = truth_reason
    return {"shadow_agreement": None if agreement is None else agreement[0], "shadow_answers": answers,
            "rollback_reason": reason, **truth}


def _on_truth(deployer: Deployer, policy: RolloutPolicy, stage: str, new: str, old: str,
              labelled: tuple[float, int] | None) -> dict[str, Any]:
    """The ``stage`` (canary or shadow) judged on its labelled answers against production's: the facts, a ``reason``
    to roll back (if any) and a ``<stage>_accuracy_note`` saying what the judgement stood on."""
    assert policy.max_accuracy_drop is not None
    production = deployer.realised_accuracy(old)
    facts: dict[str, Any] = {f"{stage}_accuracy": None if labelled is None else labelled[0],
                             f"{stage}_labels": 0 if labelled is None else labelled[1],
                             "production_accuracy": None if production is None else production[0],
                             "production_labels": 0 if production is None else production[1]}
    note_key = f"{stage}_accuracy_note"
    if labelled is None:
        judged_on = "its 5xx share alone" if stage == "canary" else "its agreement with production alone"
        return {**facts, note_key: f"no labelled answers of the {stage}: judged on {judged_on}"}
    if production is None:
        return {**facts, note_key: f"no labelled answers of production version {old}: nothing to compare with"}
    note = (f"{stage} {labelled[0]:.3f} over {labelled[1]} labelled answers, production {production[0]:.3f} "
            f"over {production[1]}")
    if labelled[1] < policy.min_labelled_answers:
        note += f" (fewer than min_labelled_answers, {policy.min_labelled_answers}: judged on what is there)"
    facts[note_key] = note
    if production[0] - labelled[0] > policy.max_accuracy_drop:
        facts["reason"] = (f"{stage} accuracy {labelled[0]:.3f} trails production's {production[0]:.3f} by more than "
                           f"max_accuracy_drop {policy.max_accuracy_drop:g} ({note})")
    return facts


def _judged(facts: Mapping[str, Any]) -> dict[str, Any]:
    return {name: facts.get(name) for name in ("canary_failure_rate", "canary_answers", "canary_started")}


def _point(registry: ModelRegistry, model: str, version: str) -> None:
    """The production pointer on ``version`` (written only if it is elsewhere)."""
    if registry.production_version(model) != version:
        registry.set_production(model, version)
