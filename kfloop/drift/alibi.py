"""The alibi-detect backend: the only kfloop module that imports alibi-detect.

alibi-detect 0.13 is licensed under the Business Source License 1.1
(production use needs a commercial licence from Seldon until each version's
change date), so it is the ``kfloop[alibi]`` extra and never the default.
Drift: ``alibi_detect.cd.KSDrift`` (its per-feature p-values; kfloop applies
the correction so both backends share one rule). Outliers:
``alibi_detect.od.IForest`` scores.
"""

from __future__ import annotations

import numpy as np

from kfloop.drift.detectors import WindowDetector


class AlibiDetector(WindowDetector):
    backend = "alibi"

    def _fit_drift(self, reference: np.ndarray) -> None:
        from alibi_detect.cd import KSDrift

        self._drift = KSDrift(reference.astype(np.float32), p_val=self.config.alpha / 2, correction=self.config.correction)

    def _p_values(self, window: np.ndarray) -> np.ndarray:
        result = self._drift.predict(window.astype(np.float32), return_p_val=True, return_distance=False)
        return np.asarray(result["data"]["p_val"], dtype=np.float64)

    def _fit_outliers(self, rows: np.ndarray) -> None:
        from alibi_detect.od import IForest

        self._forest = IForest(n_estimators=200)
        self._forest.fit(rows.astype(np.float32))

    def _outlier_scores(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._forest.score(rows.astype(np.float32)), dtype=np.float64)
