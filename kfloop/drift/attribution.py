"""Attribution drift: whether the features a version's answers rest on have moved.

A window's ranking is its features by mean |attribution| to each row's predicted class (approximate
attributions, :mod:`kfloop.explain`); it is compared with the version's baseline ranking -- the same over
rows the forest was not trained on (the version's holdout; its training rows for versions without one) --
by nDCG over the top :data:`TOP_FEATURES`, each feature's gain its share of the baseline's importance
(SageMaker Clarify's measure). Below the threshold is drift: the policy's (default 0.9), lowered to the
``alpha`` quantile of clean windows of the same size drawn from the baseline rows when that is lower, so
clean traffic raises at most about ``alpha`` false alarms. The watch (:mod:`kfloop.serving.watch`) tests
its windows with it; ``benchmarks/attribution_drift.py`` measures false alarms and detection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kfloop.explain import ForestExplainer

__all__ = ["CALIBRATION_WINDOWS", "TOP_FEATURES", "AttributionBaseline", "AttributionResult", "ndcg"]

TOP_FEATURES = 20  # the ranking's depth
CALIBRATION_WINDOWS = 400  # clean windows drawn from the baseline rows to set the threshold
SHOWN_MOVES = 5  # features an alarm names


def ndcg(gains: np.ndarray, window_importance: np.ndarray, top: int = TOP_FEATURES) -> float:
    """nDCG@``top`` of the window's ranking, each feature's gain its baseline share (1.0: the same top order)."""
    top = min(top, len(gains))
    discounts = 1.0 / np.log2(np.arange(2, top + 2))
    ranked = np.argsort(-window_importance, kind="stable")[:top]
    ideal = np.sort(gains)[::-1][:top]
    return float((gains[ranked] * discounts).sum() / (ideal * discounts).sum())


@dataclass(frozen=True)
class AttributionResult:
    """One window's test: its nDCG against the baseline, the threshold, and the features that moved most."""

    ndcg: float
    threshold: float
    rows: int
    moved: tuple[tuple[str, float, float], ...]  # (feature, baseline share, window share), largest change first

    @property
    def drift(self) -> bool:
        return self.ndcg < self.threshold


class AttributionBaseline:
    """A version's baseline importance and its calibrated threshold; :meth:`test` judges a window of raw rows."""

    def __init__(self, explainer: ForestExplainer, baseline_rows: np.ndarray, *, window: int, threshold: float = 0.9,
                 alpha: float = 0.01, seed: int = 0) -> None:
        self.explainer = explainer
        self.feature_names = explainer.feature_names
        per_row = self.importance_per_row(baseline_rows)
        total = per_row.mean(axis=0)
        self.shares = total / total.sum()
        rng = np.random.default_rng(seed)
        clean = [ndcg(self.shares, per_row[rng.choice(len(per_row), window)].mean(axis=0)) for _ in range(CALIBRATION_WINDOWS)]
        self.clean_quantile = float(np.quantile(clean, alpha))
        self.threshold = min(threshold, self.clean_quantile)

    def importance_per_row(self, rows: np.ndarray) -> np.ndarray:
        """|attribution| of each feature to each row's predicted class [rows, features], in feature order."""
        return self.explainer.importance(rows, "approximate")

    def test(self, rows: np.ndarray) -> AttributionResult:
        """The window of raw ``rows`` against the baseline."""
        importance = self.importance_per_row(rows).mean(axis=0)
        shares = importance / importance.sum() if importance.sum() > 0 else importance
        change = np.abs(shares - self.shares)
        moved = tuple((self.feature_names[i], float(self.shares[i]), float(shares[i]))
                      for i in np.argsort(-change, kind="stable")[:SHOWN_MOVES])
        return AttributionResult(ndcg(self.shares, importance), self.threshold, len(rows), moved)
