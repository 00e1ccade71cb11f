"""Training logic behind the pipeline's components, importable and testable without KFP.

Flow: :func:`prepare` (stratified holdout split, fit the preprocessor) ->
:func:`cross_validate_candidate` per hyper-parameter set (stratified k-fold on
the training split, out-of-fold metrics) -> :func:`select_best` ->
:func:`fit_final` (refit the winner on the whole training split) ->
:func:`classification_metrics` on the holdout.

The holdout is never used to rank candidates, so its accuracy is an unbiased
estimate for the winner and a fair ground for the promotion gate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from kfloop.data import LabelledData
from kfloop.errors import DataError, InputError, PolicyError
from kfloop.preprocessing import Preprocessor

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "log_loss": False}
REFERENCE_ROWS = 2000  # training rows kept as the drift detectors' reference sample
_PROBA_FLOOR = 1e-15


@dataclass(frozen=True)
class Prepared:
    """Everything candidates and the final fit need, computed once per run."""

    train_features: np.ndarray  # scaled float32
    train_codes: np.ndarray  # int64 class indices
    holdout_features: np.ndarray  # raw float64, as clients send them
    holdout_labels: np.ndarray  # str
    reference: np.ndarray  # raw float64 training rows, the drift reference
    feature_names: tuple[str, ...]

    def save(self, path: str) -> None:
        with open(path, "wb") as handle:
            np.savez(
                handle,
                train_features=self.train_features,
                train_codes=self.train_codes,
                holdout_features=self.holdout_features,
                holdout_labels=self.holdout_labels.astype(str),
                reference=self.reference,
                feature_names=np.array(self.feature_names, dtype=str),
            )

    @classmethod
    def load(cls, path: str) -> "Prepared":
        with np.load(path, allow_pickle=False) as arrays:
            return cls(
                train_features=arrays["train_features"],
                train_codes=arrays["train_codes"],
                holdout_features=arrays["holdout_features"],
                holdout_labels=arrays["holdout_labels"],
                reference=arrays["reference"],
                feature_names=tuple(arrays["feature_names"].tolist()),
            )


def holdout_split(data: LabelledData, *, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training split and of the stratified holdout."""
    from sklearn.model_selection import train_test_split

    try:
        train, holdout = train_test_split(np.arange(data.rows), test_size=holdout_fraction, stratify=data.labels,
                                          random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split a stratified holdout: {exc}", source=data.source) from None
    return train, holdout


def prepare(data: LabelledData, *, holdout_fraction: float, seed: int) -> tuple[Prepared, Preprocessor]:
    """Split off a stratified holdout and fit the preprocessor on the training part only."""
    train, holdout = holdout_split(data, holdout_fraction=holdout_fraction, seed=seed)
    train_x, hold_x = data.features[train], data.features[holdout]
    train_y, hold_y = data.labels[train], data.labels[holdout]
    preprocessor = Preprocessor.fit(train_x, train_y, data.feature_names)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(train_x), size=min(REFERENCE_ROWS, len(train_x)), replace=False))
    prepared = Prepared(
        train_features=preprocessor.transform(train_x),
        train_codes=preprocessor.encode(train_y),
        holdout_features=hold_x,
        holdout_labels=hold_y,
        reference=train_x[keep],
        feature_names=data.feature_names,
    )
    return prepared, preprocessor


def make_forest(params: dict[str, Any], seed: int, n_jobs: int = 1) -> Any:
    """A RandomForestClassifier from pipeline parameters (KFP turns ints into floats: cast back).

    ``n_jobs=-1`` grows trees on every core: candidate tasks share the cores
    while several run and a lone task (the last candidate, the refit) gets them all.
    """
    from sklearn.ensemble import RandomForestClassifier

    clean: dict[str, Any] = {}
    for name, value in params.items():
        if name in ("n_estimators", "min_samples_leaf", "min_samples_split", "max_depth"):
            clean[name] = int(value)
        elif name == "max_features" and not isinstance(value, str):
            clean[name] = float(value)
        else:
            clean[name] = value
    return RandomForestClassifier(random_state=seed, n_jobs=n_jobs, **clean)


def normalise_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the forest sees them, for reports and metadata."""
    return {k: v for k, v in make_forest(params, 0).get_params().items() if k in params}


def classification_metrics(
    true_labels: np.ndarray, proba: np.ndarray, classes: tuple[str, ...] | list[str]
) -> dict[str, float]:
    """Accuracy, macro-F1 and log-loss of class probabilities over ``classes``.

    Labels unknown to ``classes`` count as wrong and get the probability floor,
    so models trained on other class sets can be compared on the same rows.
    """
    from sklearn.metrics import f1_score

    classes_array = np.asarray(classes, dtype=str)
    predicted = classes_array[np.argmax(proba, axis=1)]
    lookup = {name: index for index, name in enumerate(classes_array.tolist())}
    true_index = np.fromiter((lookup.get(str(t), -1) for t in true_labels), dtype=np.int64, count=len(true_labels))
    p_true = np.where(true_index >= 0, proba[np.arange(len(true_index)), np.maximum(true_index, 0)], 0.0)
    return {
        "accuracy": float(np.mean(predicted == np.asarray(true_labels, dtype=str))),
        "macro_f1": float(f1_score(true_labels, predicted, average="macro", zero_division=0)),
        "log_loss": float(-np.mean(np.log(np.clip(p_true, _PROBA_FLOOR, 1.0)))),
    }


def cross_validate_candidate(prepared: Prepared, params: dict[str, Any], *, cv_folds: int, seed: int,
                             metric: str = "accuracy", leader: float | None = None) -> dict[str, Any]:
    """Out-of-fold metrics of one hyper-parameter set: ``{"params": ..., "metrics": ..., "folds": k}``.

    Early stopping (successive halving's rule, made exact): given the ``leader``'s out-of-fold score in
    ``metric``, the candidate stops after the first fold at which it can no longer reach that score even
    if every row still to be scored came out perfect (accuracy 1, log-loss 0). Its metrics are then those
    of the rows scored so far (``folds`` < ``cv_folds``), which rank below the leader, so the winner is the
    same as without stopping. macro-F1 has no such bound: it never stops early.
    """
    from sklearn.model_selection import StratifiedKFold

    x, y = prepared.train_features, prepared.train_codes
    n_classes = int(y.max()) + 1
    proba = np.zeros((len(y), n_classes), dtype=np.float64)
    scored = np.zeros(len(y), dtype=bool)
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    done = 0
    for fit_index, score_index in folds.split(x, y):
        forest = make_forest(params, seed, n_jobs=-1).fit(x[fit_index], y[fit_index])
        proba[np.ix_(score_index, forest.classes_)] = forest.predict_proba(x[score_index])
        scored[score_index] = True
        done += 1
        if done < cv_folds and leader is not None and not _can_reach(proba[scored], y[scored], len(y), metric, leader):
            break
    names = [str(i) for i in range(n_classes)]
    metrics = classification_metrics(y[scored].astype(str), proba[scored], names)
    return {"params": normalise_params(params), "metrics": metrics, "folds": done}


def out_of_bag_candidate(prepared: Prepared, params: dict[str, Any], *, seed: int) -> tuple[dict[str, Any], Any]:
    """Out-of-bag metrics of one hyper-parameter set from a single fit on the training split (each row scored
    by the trees whose bootstrap sample left it out): ``{"params", "metrics", "folds": 0}``, and the forest.

    A k-th of k-fold CV's cost, for a warm search's few candidates around a winner the parent's
    cross-validated search already ranked. A row that every tree drew scores as no vote (probability 0).
    The forest, stripped of its out-of-bag scores, is the one :func:`fit_final` grows for these parameters
    (same rows, same seed), so a winner needs no refit.
    """
    x, y = prepared.train_features, prepared.train_codes
    n_classes = int(y.max()) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Some inputs do not have OOB scores": counted as no vote
        forest = make_forest(params, seed, n_jobs=-1).set_params(oob_score=True, bootstrap=True).fit(x, y)
    proba = np.zeros((len(y), n_classes), dtype=np.float64)
    proba[:, forest.classes_] = np.nan_to_num(forest.oob_decision_function_)
    metrics = classification_metrics(y.astype(str), proba, [str(i) for i in range(n_classes)])
    del forest.oob_score_, forest.oob_decision_function_
    return {"params": normalise_params(params), "metrics": metrics, "folds": 0}, forest.set_params(oob_score=False)


def _can_reach(proba: np.ndarray, codes: np.ndarray, rows: int, metric: str, leader: float) -> bool:
    """Whether a candidate with these scored rows (of ``rows``) can still reach ``leader`` if the rest are perfect."""
    if metric == "accuracy":
        return (int(np.sum(np.argmax(proba, axis=1) == codes)) + rows - len(codes)) / rows >= leader
    if metric == "log_loss":
        losses = -np.log(np.clip(proba[np.arange(len(codes)), codes], _PROBA_FLOOR, 1.0))
        return float(np.sum(losses)) / rows <= leader
    return True


def select_best(candidates: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The winning candidate and all candidates ranked best first (ties keep search order)."""
    if not candidates:
        raise InputError("no candidates to select from")
    if metric not in HIGHER_IS_BETTER:
        raise PolicyError(f"unknown selection metric {metric!r}; choose one of {sorted(HIGHER_IS_BETTER)}")
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    ranked = sorted(candidates, key=lambda c: sign * float(c["metrics"][metric]))
    return ranked[0], ranked


def fit_final(prepared: Prepared, params: dict[str, Any], *, seed: int) -> Any:
    """Refit the winning hyper-parameters on the whole training split."""
    return make_forest(params, seed, n_jobs=-1).fit(prepared.train_features, prepared.train_codes)


def beats(metric: str, new: float, current: float, margin: float) -> bool:
    """Whether ``new`` improves on ``current`` by more than ``margin`` in the metric's direction."""
    return new - current > margin if HIGHER_IS_BETTER[metric] else current - new > margin
