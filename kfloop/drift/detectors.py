"""Drift and outlier detection behind one small contract, with a SciPy backend (the default).

:class:`WindowDetector` tests a window of new rows against the model
version's reference sample and answers with a :class:`WindowResult`:

* **drift** -- a two-sample Kolmogorov-Smirnov test per feature, corrected for
  testing every feature (Bonferroni or Benjamini-Hochberg FDR);
* **outliers** -- a per-row score whose threshold is the ``1 - outlier_rate``
  quantile of scores on *held-out* reference rows (in-sample scores are too
  small), and a one-sided binomial test of how many rows of the window exceed
  it. The test uses a 95 % upper confidence bound of the exceedance rate
  (Clopper-Pearson, from the held-out rows), because a quantile estimated
  from a few hundred rows is itself uncertain and a slightly low threshold
  would otherwise raise false alarms on every window.

The window's significance level ``alpha`` is split between the two tests
(``alpha / 2`` each), so on clean data the chance that a window raises any
alarm stays at or below ``alpha``.

Backends: ``scipy`` (KS from SciPy, Mahalanobis distance with a Ledoit-Wolf
covariance; no alibi-detect) and ``alibi`` (alibi-detect's ``KSDrift`` and
``IForest``; alibi-detect is BSL 1.1 -- production use needs a licence from
Seldon -- so it is an optional extra, imported only by
:mod:`kfloop.drift.alibi`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kfloop.errors import InputError

Correction = Literal["bonferroni", "fdr"]
Backend = Literal["scipy", "alibi"]
BACKENDS: tuple[str, ...] = ("scipy", "alibi")


@dataclass(frozen=True)
class DetectorConfig:
    """How windows are judged."""

    alpha: float = 0.05
    correction: Correction = "fdr"
    outlier_rate: float = 0.05  # share of clean rows expected above the outlier threshold
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.outlier_rate < 0.5:
            raise InputError(f"outlier_rate must be in (0, 0.5), got {self.outlier_rate}")
        if self.correction not in ("bonferroni", "fdr"):
            raise InputError(f"correction must be 'bonferroni' or 'fdr', got {self.correction!r}")


@dataclass(frozen=True)
class WindowResult:
    """What one window showed."""

    rows: int
    p_values: np.ndarray = field(repr=False)  # per feature, uncorrected
    drift_threshold: float  # p-value below which a feature counts as drifted (after correction)
    drifted_features: tuple[int, ...]
    outlier_scores: np.ndarray = field(repr=False)
    outlier_threshold: float
    outliers: int
    outlier_p_value: float
    alpha: float

    @property
    def drift(self) -> bool:
        return len(self.drifted_features) > 0

    @property
    def outlier_alarm(self) -> bool:
        return self.outlier_p_value < self.alpha / 2

    @property
    def min_p_value(self) -> float:
        return float(self.p_values.min())


def corrected_threshold(p_values: np.ndarray, level: float, correction: Correction) -> float:
    """The largest p-value still significant after correcting for ``len(p_values)`` tests."""
    n = len(p_values)
    if correction == "bonferroni":
        return level / n
    ranked = np.sort(p_values)
    passing = np.flatnonzero(ranked <= level * np.arange(1, n + 1) / n)
    return float(ranked[passing[-1]]) if passing.size else 0.0


def outlier_window_p_value(exceeding: int, rows: int, rate: float) -> float:
    """P(at least ``exceeding`` of ``rows`` clean rows score above a threshold that ``rate`` of them pass)."""
    from scipy.stats import binom

    return float(binom.sf(exceeding - 1, rows, rate))


class WindowDetector:
    """Contract: ``fit(reference)`` once, then ``test(window)`` per window."""

    backend: str = ""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.outlier_threshold = float("nan")
        self.outlier_rate_bound = float("nan")

    def fit(self, reference: np.ndarray) -> "WindowDetector":
        """Keep the drift reference; fit the outlier scorer on one half and set its threshold on the other."""
        from scipy.stats import beta

        reference = np.asarray(reference, dtype=np.float64)
        rng = np.random.default_rng(self.config.seed)
        order = rng.permutation(len(reference))
        fit_rows, calibration_rows = reference[order[: len(order) // 2]], reference[order[len(order) // 2:]]
        self._fit_drift(reference)
        self._fit_outliers(fit_rows)
        calibration = self._outlier_scores(calibration_rows)
        self.outlier_threshold = float(np.quantile(calibration, 1 - self.config.outlier_rate))
        exceeding = int(np.sum(calibration > self.outlier_threshold))
        self.outlier_rate_bound = float(beta.ppf(0.95, exceeding + 1, len(calibration) - exceeding))
        return self

    def test(self, window: np.ndarray) -> WindowResult:
        window = np.asarray(window, dtype=np.float64)
        p_values = self._p_values(window)
        level = self.config.alpha / 2
        threshold = corrected_threshold(p_values, level, self.config.correction)
        scores = self._outlier_scores(window)
        exceeding = int(np.sum(scores > self.outlier_threshold))
        return WindowResult(
            rows=len(window),
            p_values=p_values,
            drift_threshold=threshold,
            drifted_features=tuple(int(i) for i in np.flatnonzero(p_values <= threshold)) if threshold > 0 else (),
            outlier_scores=scores,
            outlier_threshold=self.outlier_threshold,
            outliers=exceeding,
            outlier_p_value=outlier_window_p_value(exceeding, len(window), self.outlier_rate_bound),
            alpha=self.config.alpha,
        )

    # Backend hooks -------------------------------------------------------------------------

    def _fit_drift(self, reference: np.ndarray) -> None:
        raise NotImplementedError

    def _p_values(self, window: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _fit_outliers(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _outlier_scores(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def ks_p_values(sorted_reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Two-sided two-sample KS p-value per column, as ``scipy.stats.ks_2samp(method="asymp")``.

    The reference comes sorted once; the statistic is computed with
    ``searchsorted`` per column, and the (slow, exact) ``kstwo`` survival
    function is memoised: statistics are fractions of the sample sizes, so
    the same few values recur window after window.
    """
    n, m = len(sorted_reference), len(window)
    ordered = np.sort(window, axis=0)
    statistics = np.empty(window.shape[1])
    for j in range(window.shape[1]):
        reference, sample = sorted_reference[:, j], ordered[:, j]
        points = np.concatenate([reference, sample])
        gap = np.searchsorted(reference, points, side="right") / n - np.searchsorted(sample, points, side="right") / m
        statistics[j] = np.abs(gap).max()
    size = int(np.round(n * m / (n + m)))
    return np.array([_ks_survival(round(float(d), 12), size) for d in statistics])


@functools.lru_cache(maxsize=65536)
def _ks_survival(statistic: float, size: int) -> float:
    from scipy.stats import kstwo

    return float(np.clip(kstwo.sf(statistic, size), 0.0, 1.0))


class ScipyDetector(WindowDetector):
    """KS per feature (SciPy's distribution) and squared Mahalanobis distance (Ledoit-Wolf covariance)."""

    backend = "scipy"

    def _fit_drift(self, reference: np.ndarray) -> None:
        self._sorted_reference = np.sort(reference, axis=0)

    def _p_values(self, window: np.ndarray) -> np.ndarray:
        return ks_p_values(self._sorted_reference, window)

    def _fit_outliers(self, rows: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf

        # Standardise first: Ledoit-Wolf shrinks towards a multiple of the identity, which on raw
        # features would drown the small-variance ones (the leaf shape descriptors) in the shrinkage.
        self._centre = rows.mean(axis=0)
        self._scale = np.where(rows.std(axis=0) > 0, rows.std(axis=0), 1.0)
        self._precision = LedoitWolf(assume_centered=True).fit((rows - self._centre) / self._scale).precision_

    def _outlier_scores(self, rows: np.ndarray) -> np.ndarray:
        standard = (rows - self._centre) / self._scale
        return np.einsum("ij,jk,ik->i", standard, self._precision, standard)


@dataclass(frozen=True)
class WindowAlarm:
    """A window that raised an alarm: its result and the rows' sequence numbers and arrival times."""

    result: WindowResult
    row_numbers: tuple[int, ...]
    times: tuple[float, ...]

    @property
    def kind(self) -> str:
        return "drift" if self.result.drift else "outlier"

    @property
    def first_drifted(self) -> int:
        """Position in the window of the first row to blame: the window's start for drift, else the first outlier."""
        if self.result.drift:
            return 0
        above = np.flatnonzero(self.result.outlier_scores > self.result.outlier_threshold)
        return int(above[0]) if above.size else 0


class WindowMonitor:
    """A sliding window of the last ``window`` rows, tested every ``stride`` rows.

    After an alarm the window starts afresh, so one shift raises one alarm
    per ``window`` rows at most.
    """

    def __init__(self, detector: WindowDetector, window: int, stride: int) -> None:
        self.detector = detector
        self.window = window
        self.stride = stride
        self._rows: list[np.ndarray] = []
        self._numbers: list[int] = []
        self._times: list[float] = []
        self._since_test = 0
        self._count = 0
        self.last_result: WindowResult | None = None
        self.windows_tested = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows_seen(self) -> int:
        return self._count

    def reset(self) -> None:
        self._rows, self._numbers, self._times = [], [], []
        self._since_test = 0

    def add(self, rows: np.ndarray, now: float) -> list[WindowAlarm]:
        """Add rows that arrived at ``now``; returns the alarms raised on the way."""
        alarms = []
        for row in rows:
            self._count += 1
            self._rows.append(row)
            self._numbers.append(self._count)
            self._times.append(now)
            if len(self._rows) > self.window:
                del self._rows[0], self._numbers[0], self._times[0]
            self._since_test += 1
            if len(self._rows) == self.window and self._since_test >= self.stride:
                self._since_test = 0
                self.last_result = self.detector.test(np.vstack(self._rows))
                self.windows_tested += 1
                if self.last_result.drift or self.last_result.outlier_alarm:
                    alarms.append(WindowAlarm(self.last_result, tuple(self._numbers), tuple(self._times)))
                    self.reset()
        return alarms


def make_detector(backend: str, config: DetectorConfig) -> WindowDetector:
    """A detector of the named backend (``alibi`` needs the ``kfloop[alibi]`` extra)."""
    if backend == "scipy":
        return ScipyDetector(config)
    if backend == "alibi":
        from kfloop.drift.alibi import AlibiDetector

        return AlibiDetector(config)
    raise InputError(f"unknown detector backend {backend!r}; choose one of {', '.join(BACKENDS)}")
