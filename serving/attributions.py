"""The watch's attribution-drift check: a version's baseline, each window's test, one alarm per fall.

:class:`AttributionCheck` fits a :class:`~kfloop.drift.attribution.AttributionBaseline` when the watch
loads a version (from the version folder's kept forest and the holdout rows in ``reference.npz``; the
training rows for versions registered without them), tests up to the policy's ``explain.drift_rows`` rows
of each tested window, exports ``kfloop_watch_attribution_ndcg`` and returns an ``io.kfloop.attribution.drift``
alarm when a version's nDCG falls below its threshold -- once, until it is back above. Without shap (the
``explain`` extra) or a kept forest there is no check, and the watch says so once in its log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from prometheus_client import Gauge

from kfloop.bundle import MODEL_JOBLIB
from kfloop.drift.attribution import AttributionBaseline
from kfloop.policies.spec import ExplainPolicy
from kfloop.serving.alarms import FallRule, PendingAlarm, attribution_alarm

__all__ = ["AttributionCheck"]

NDCG = Gauge("kfloop_watch_attribution_ndcg", "nDCG of the last window's attribution ranking against the version's "
             "baseline (1: the same features matter most).", ["model", "version"])
THRESHOLD = Gauge("kfloop_watch_attribution_threshold", "The attribution-drift threshold of the version (nDCG).",
                  ["model", "version"])

log = logging.getLogger(__name__)


class AttributionCheck:
    """Attribution drift for one model's watch, as ``policy`` asks (``drift_rows`` 0: off)."""

    def __init__(self, model: str, source: str, policy: ExplainPolicy, alpha: float, window: int) -> None:
        self.model, self.source, self.policy, self.alpha = model, source, policy, alpha
        self.rows = min(window, policy.drift_rows)
        self._falls = FallRule()
        self._rng = np.random.default_rng(0)

    def fit(self, folder: Path, version: str, arrays: dict[str, np.ndarray]) -> AttributionBaseline | None:
        """The baseline of the version in ``folder`` (None: no check for it, and why is logged)."""
        if self.rows == 0:
            return None
        if not (folder / MODEL_JOBLIB).exists():
            log.warning("no attribution drift for %s v%s: it keeps no forest (%s)", self.model, version, MODEL_JOBLIB)
            return None
        try:
            from kfloop.explain import ForestExplainer

            explainer = ForestExplainer.load(folder, version)
        except ImportError:
            log.warning("no attribution drift for %s: shap is missing (install kfloop[explain])", self.model)
            return None
        rows = arrays.get("holdout", arrays["features"])
        baseline = AttributionBaseline(explainer, rows, window=self.rows, threshold=self.policy.drift_threshold,
                                       alpha=self.alpha)
        THRESHOLD.labels(self.model, version).set(baseline.threshold)
        log.info("attribution drift for %s v%s: %d baseline rows, threshold %.3f (policy %.3f, clean windows' "
                 "%g quantile %.3f)", self.model, version, len(rows), baseline.threshold, self.policy.drift_threshold,
                 self.alpha, baseline.clean_quantile)
        return baseline

    def test(self, baseline: AttributionBaseline | None, window_rows: np.ndarray, version: str) -> PendingAlarm | None:
        """Test up to ``drift_rows`` rows of a window; the alarm when the version's figure just fell."""
        if baseline is None or len(window_rows) < self.rows:
            return None
        sample = window_rows[self._rng.choice(len(window_rows), self.rows, replace=False)]
        result = baseline.test(sample)
        NDCG.labels(self.model, version).set(result.ndcg)
        if not self._falls.fell(version, result.drift):
            return None
        log.warning("attribution alarm for %s v%s: nDCG %.3f below %.3f; moved most: %s", self.model, version,
                    result.ndcg, result.threshold, ", ".join(name for name, _, _ in result.moved))
        return attribution_alarm(result, model=self.model, version=version, source=self.source)
