"""The alibi-detect backend: the only kfloop module that imports alibi-detect.

alibi-detect 0.13 is licensed under the Business Source License 1.1
(production use needs a commercial licence from Seldon until each version's
change date), so it is the ``kfloop[alibi]`` extra and never the default.
Drift: ``alibi_detect.cd.KSDrift`` (its per-feature p-values; kfloop applies
the correction so both backends share one rule). Outliers: alibi-detect's
Gaussian mixture detector (``GMM``, one full-covariance component, its
scikit-learn backend) on standardised features: the negative log-likelihood
under the reference's joint density, so rows whose features no longer hang
together are outliers even when every feature on its own looks normal (an
isolation forest, alibi's ``IForest``, misses that: 0 of 20 "shape shuffled"
shifts in the watch benchmark). The GMM class lives in ``alibi_detect.od._gmm``
in 0.13: ``alibi_detect.od`` exports it only next to its PyTorch backend.
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
        from alibi_detect.od._gmm import GMM

        # Standardised, as the SciPy backend's Mahalanobis distance: features on very different scales
        # would otherwise make the covariance ill-conditioned.
        spread = rows.std(axis=0)
        self._centre, self._scale = rows.mean(axis=0), np.where(spread > 0, spread, 1.0)
        self._mixture = GMM(n_components=1, backend="sklearn")
        self._mixture.fit((rows - self._centre) / self._scale)

    def _outlier_scores(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._mixture.score((rows - self._centre) / self._scale), dtype=np.float64)
