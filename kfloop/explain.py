"""Per-prediction attributions of a model version: exact TreeSHAP on the forest the version was trained as.

:class:`ForestExplainer` loads a version folder's kept forest (``model.joblib``) and preprocessor and
explains raw rows: shap's ``TreeExplainer`` (path-dependent: no background set) on the scaled rows, whose
per-feature scaling is monotone, so each attribution belongs to the request's own feature of that name.
``exact`` answers are checked (attributions plus base value equal the forest's probability within
:data:`ADDITIVITY_TOLERANCE`, else a :class:`~kfloop.errors.PermanentError` naming the version);
``approximate`` (Saabas) is labelled so in every answer. :class:`ExplainOptions` is what a request may ask.
The predictor's explain workers (:mod:`kfloop.serving.explaining`), ``kfloop explain`` and the demo's report
call it; the design is in ``docs/explain.md``. shap is the ``explain`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from kfloop.bundle import MODEL_JOBLIB, PREPROCESSOR
from kfloop.errors import InputError, NotFoundError, PermanentError
from kfloop.preprocessing import Preprocessor

__all__ = ["ADDITIVITY_TOLERANCE", "DEFAULT_MAX_ROWS", "DEFAULT_TOP_K", "EXPLAIN_OUTPUTS", "METHODS", "ExplainOptions",
           "Explanation", "ForestExplainer", "global_importance"]

METHODS = ("exact", "approximate")
CLASS_MODES = ("predicted", "all")
DEFAULT_TOP_K = 10
DEFAULT_MAX_ROWS = 32  # rows one explain request may carry (the policy's explain.max_rows)
# The V2 outputs an explanation answers with; asking for any of them makes an inference request an explanation.
ATTRIBUTIONS, FEATURES, BASE_VALUES, EXPLAINED_CLASS = "attributions", "attribution_features", "base_values", "explained_class"
EXPLAIN_OUTPUTS = (ATTRIBUTIONS, FEATURES, BASE_VALUES, EXPLAINED_CLASS)
ADDITIVITY_TOLERANCE = 1e-6
Method = Literal["exact", "approximate"]


@dataclass(frozen=True)
class ExplainOptions:
    """What a request asks: the method, how many features per row (0: all) and which classes."""

    method: Method = "exact"
    top_k: int = DEFAULT_TOP_K
    classes: Literal["predicted", "all"] = "predicted"

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> "ExplainOptions":
        """From a request's fields (``method``, ``top_k``, ``classes``; absent ones take the defaults); an
        :class:`InputError` naming the field otherwise."""
        method = fields.get("method", "exact")
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        top_k = fields.get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise InputError(f"top_k must be a whole number >= 0 (0: every feature), got {top_k!r}")
        classes = fields.get("classes", "predicted")
        if classes not in CLASS_MODES:
            raise InputError(f"classes must be one of {', '.join(CLASS_MODES)}, got {classes!r}")
        return cls(method, top_k, classes)

    def to_fields(self) -> dict[str, Any]:
        return {"method": self.method, "top_k": self.top_k, "classes": self.classes}


@dataclass(frozen=True)
class Explanation:
    """Attributions of ``n`` rows: for each row its ``k`` features (by |attribution|, largest first; every
    feature when ``top_k`` is 0) and their attributions to each explained class."""

    version: str
    method: Method
    classes_mode: Literal["predicted", "all"]
    class_names: tuple[str, ...]  # every class of the version
    predicted: np.ndarray  # [n] class index of each row's highest probability
    explained: np.ndarray  # [n, c] class indices explained per row (c = 1: the predicted one)
    probabilities: np.ndarray  # [n, c] the forest's probability of each explained class
    base_values: np.ndarray  # [n, c] the attributions' starting point: the class's mean over the training set
    features: np.ndarray  # [n, k] feature names
    attributions: np.ndarray  # [n, c, k]

    @property
    def approximate(self) -> bool:
        return self.method != "exact"

    def tensors(self) -> dict[str, np.ndarray]:
        """The V2 outputs: ``attributions`` [n, k] (every class: [n, c, k]), ``attribution_features`` [n, k],
        ``base_values`` and ``explained_class`` [n] (every class: [n, c])."""
        names = np.asarray(self.class_names, dtype=object)[self.explained]
        if self.classes_mode == "predicted":
            return {ATTRIBUTIONS: self.attributions[:, 0, :], FEATURES: self.features,
                    BASE_VALUES: self.base_values[:, 0], EXPLAINED_CLASS: names[:, 0]}
        return {ATTRIBUTIONS: self.attributions, FEATURES: self.features, BASE_VALUES: self.base_values,
                EXPLAINED_CLASS: names}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], *, version: str, method: Method,
                     class_names: tuple[str, ...], probabilities: np.ndarray) -> "Explanation":
        """What :meth:`tensors` gave (read back from a predictor's answer), with the version's every-class
        ``probabilities`` [n, classes]."""
        explained_names = np.asarray(tensors[EXPLAINED_CLASS], dtype=object)
        mode: Literal["predicted", "all"] = "predicted" if explained_names.ndim == 1 else "all"
        lookup = {name: index for index, name in enumerate(class_names)}
        explained = np.vectorize(lambda name: lookup[str(name)], otypes=[np.int64])(explained_names.reshape(len(probabilities), -1))
        attributions = np.asarray(tensors[ATTRIBUTIONS], dtype=np.float64)
        rows = np.arange(len(probabilities))[:, None]
        return cls(version=version, method=method, classes_mode=mode, class_names=class_names,
                   predicted=np.argmax(probabilities, axis=1), explained=explained,
                   probabilities=np.asarray(probabilities, dtype=np.float64)[rows, explained],
                   base_values=np.asarray(tensors[BASE_VALUES], dtype=np.float64).reshape(explained.shape),
                   features=np.asarray(tensors[FEATURES], dtype=object),
                   attributions=attributions[:, None, :] if mode == "predicted" else attributions)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON object per row (the V1 ``explanations`` and ``kfloop explain --json``)."""
        out = []
        for row in range(len(self.predicted)):
            classes = []
            for column, index in enumerate(self.explained[row]):
                classes.append({
                    "class": self.class_names[index],
                    "probability": float(self.probabilities[row, column]),
                    "base_value": float(self.base_values[row, column]),
                    "attributions": {str(name): float(value)
                                     for name, value in zip(self.features[row], self.attributions[row, column])},
                })
            out.append({"prediction": self.class_names[self.predicted[row]], "method": self.method,
                        "approximate": self.approximate, "version": self.version, "classes": classes})
        return out


class ForestExplainer:
    """TreeSHAP over one version's kept forest; safe to call from one thread at a time."""

    def __init__(self, forest: Any, preprocessor: Preprocessor, version: str) -> None:
        import shap

        self.forest, self.preprocessor, self.version = forest, preprocessor, version
        self._tree = shap.TreeExplainer(forest, feature_perturbation="tree_path_dependent")
        self._columns = np.asarray(forest.classes_, dtype=np.int64)  # the forest's classes among the version's
        self._base = np.asarray(self._tree.expected_value, dtype=np.float64).reshape(-1)

    @classmethod
    def load(cls, version_dir: str | Path, version: str | None = None) -> "ForestExplainer":
        """The explainer of a version folder; a :class:`NotFoundError` when it keeps no forest to explain."""
        import joblib

        root = Path(version_dir)
        version = version or root.name
        if not (root / MODEL_JOBLIB).exists() or not (root / PREPROCESSOR).exists():
            raise NotFoundError(f"version {version} keeps no forest ({MODEL_JOBLIB}) to explain")
        return cls(joblib.load(root / MODEL_JOBLIB), joblib.load(root / PREPROCESSOR), version)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.preprocessor.feature_names

    def explain(self, raw_rows: np.ndarray, options: ExplainOptions = ExplainOptions()) -> Explanation:
        """Attributions of ``raw_rows`` (the request's own features) as ``options`` ask."""
        return self.explain_scaled(self.preprocessor.transform(np.asarray(raw_rows, dtype=np.float64)), options)

    def explain_scaled(self, scaled: np.ndarray, options: ExplainOptions = ExplainOptions()) -> Explanation:
        """Attributions of rows already scaled by the version's preprocessor (what a predictor gets); each
        scaled feature's attribution is its raw feature's (the scaling is monotone per feature)."""
        values, proba = self._checked_values(scaled, options.method)
        predicted_column = np.argmax(proba, axis=1)
        if options.classes == "predicted":
            columns = predicted_column[:, None]
        else:
            columns = np.broadcast_to(np.arange(len(self._columns)), (len(scaled), len(self._columns)))
        rows = np.arange(len(scaled))[:, None]
        chosen = np.transpose(values, (0, 2, 1))[rows, columns]  # [n, c, f]
        names = np.asarray(self.feature_names, dtype=object)
        k = chosen.shape[2] if options.top_k == 0 else min(options.top_k, chosen.shape[2])
        order = np.argsort(-np.abs(chosen).max(axis=1), axis=1, kind="stable")[:, :k]  # [n, k]
        return Explanation(
            version=self.version, method=options.method, classes_mode=options.classes, class_names=self.preprocessor.classes,
            predicted=self._columns[predicted_column], explained=self._columns[columns],
            probabilities=proba[rows, columns], base_values=self._base[columns],
            features=names[order], attributions=np.take_along_axis(chosen, order[:, None, :], axis=2),
        )

    def importance(self, raw_rows: np.ndarray, method: Method = "approximate") -> np.ndarray:
        """|attribution| of each feature, in the version's feature order, to each row's predicted class
        [rows, features]: what rankings of features are made of (:func:`global_importance`, attribution drift)."""
        values, proba = self._checked_values(self.preprocessor.transform(np.asarray(raw_rows, dtype=np.float64)), method)
        return np.abs(values[np.arange(len(values)), :, np.argmax(proba, axis=1)])

    def _checked_values(self, scaled: np.ndarray, method: Method) -> tuple[np.ndarray, np.ndarray]:
        """TreeSHAP values [n, features, forest classes] of scaled rows and the probabilities they explain
        [n, forest classes]; exact values are checked against the forest's own probabilities."""
        scaled = np.asarray(scaled, dtype=np.float32).astype(np.float64)  # the forest reads float32 values
        values = self.shap_values(scaled, method)
        proba = values.sum(axis=1) + self._base  # what the attributions add up to (Saabas too, by construction)
        if method == "exact":
            forest = self.forest_probabilities(scaled)
            self._check_additivity(proba, forest)
            proba = forest
        return values, proba

    def shap_values(self, scaled: np.ndarray, method: Method) -> np.ndarray:
        """Raw TreeSHAP values [n, features, forest classes] of scaled rows."""
        values = self._tree.shap_values(scaled, approximate=method == "approximate", check_additivity=False)
        values = np.asarray(values, dtype=np.float64)
        return values if values.ndim == 3 else values[:, :, None]

    def forest_probabilities(self, scaled: np.ndarray) -> np.ndarray:
        """The forest's class probabilities [n, forest classes], as ``predict_proba`` computes them (each tree's
        leaf shares, averaged) without its per-call overhead, which is most of the time on a few rows."""
        rows = np.asarray(scaled, dtype=np.float32)
        total = np.zeros((len(rows), len(self._columns)), dtype=np.float64)
        for tree in self.forest.estimators_:
            leaves = tree.tree_.predict(rows)
            total += leaves / leaves.sum(axis=1, keepdims=True)
        return total / len(self.forest.estimators_)

    def _check_additivity(self, added_up: np.ndarray, forest: np.ndarray) -> None:
        error = float(np.abs(added_up - forest).max(initial=0.0))
        if not error <= ADDITIVITY_TOLERANCE:
            raise PermanentError(f"version {self.version}: exact attributions plus base value miss the forest's "
                                 f"probability by {error:.3g} (more than {ADDITIVITY_TOLERANCE:g}); this is a bug")


def global_importance(explainer: ForestExplainer, raw_rows: np.ndarray, method: Method = "approximate",
                      top: int = 20) -> list[tuple[str, float]]:
    """The ``top`` features by mean |attribution| to each row's predicted class over ``raw_rows``."""
    mean = explainer.importance(raw_rows, method).mean(axis=0)
    return [(explainer.feature_names[i], float(mean[i])) for i in np.argsort(-mean, kind="stable")[:top]]
