"""Drift and outlier detection behind one small contract, with the SciPy backend (the default).

Owns :class:`WindowDetector` -- ``fit`` a version's reference sample once, then ``test`` each window of
new rows, answering a :class:`WindowResult` (drifted features, outliers) under a :class:`DetectorConfig`
-- and its SciPy backend :class:`ScipyDetector` (KS per feature through :class:`KsReference`,
Mahalanobis outlier scores); :func:`at_model_precision`, the float32 grid both sides are compared on;
and :class:`WindowMonitor`, the sliding window that decides when a test is due and turns results into
:class:`WindowAlarm` s. Used by the watch (:mod:`kfloop.serving.watch`), :mod:`kfloop.drift.calibration`,
``kfloop watch`` (:class:`DetectorConfig`) and the watch benchmark; :mod:`kfloop.drift.alibi` implements
the contract, and :func:`kfloop.drift.backends.make_detector` picks a backend.
The tests, how ``alpha`` is shared between them, and why float32: docs/drift.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kfloop.errors import InputError

Correction = Literal["bonferroni", "fdr"]


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


def at_model_precision(rows: np.ndarray) -> np.ndarray:
    """``rows`` rounded to float32, as the predictor sees them (as float64, for the statistics)."""
    return np.asarray(rows, dtype=np.float32).astype(np.float64)


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

        reference = at_model_precision(reference)
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
        window = at_model_precision(window)
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


def _sort_keys(rows: np.ndarray) -> np.ndarray:
    """Exact integer sort keys of float32 values, column ``j`` offset by ``j << 32``.

    The float32 bit pattern, made order-preserving (negative values flipped,
    ``-0.0`` folded into ``0.0``), plus the column's offset: sorting the keys of
    all columns at once sorts every column, and one ``searchsorted`` answers
    for every column.
    """
    bits = (np.asarray(rows, dtype=np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    ordered = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) + (1 << 31)
    return ordered + (np.arange(rows.shape[1], dtype=np.int64) << 32)


class KsReference:
    """A reference sample kept sorted for two-sample KS tests of every column of a window at once.

    :meth:`p_values` equals ``scipy.stats.ks_2samp(method="asymp")`` per column
    (values compared at float32). The statistic is evaluated at the window's
    points only -- ``F_win - F_ref`` at each point and ``F_ref - F_win`` just
    below it -- which is where its supremum lies, with four vectorised
    ``searchsorted`` calls over all columns; the (slow, exact) ``kstwo``
    survival function is memoised: statistics are fractions of the sample
    sizes, so the same few values recur window after window.
    """

    def __init__(self, reference: np.ndarray) -> None:
        self.rows, self.columns = reference.shape
        self._keys = np.sort(_sort_keys(reference), axis=0).ravel(order="F")

    def statistics(self, window: np.ndarray) -> np.ndarray:
        n, (m, d) = self.rows, window.shape
        keys = np.sort(_sort_keys(window), axis=0).ravel(order="F")
        column = np.repeat(np.arange(d, dtype=np.int64), m)
        reference_at_or_below = np.searchsorted(self._keys, keys, "right") - column * n
        reference_below = np.searchsorted(self._keys, keys, "left") - column * n
        window_at_or_below = np.searchsorted(keys, keys, "right") - column * m
        window_below = np.searchsorted(keys, keys, "left") - column * m
        gap = np.maximum(window_at_or_below / m - reference_at_or_below / n, reference_below / n - window_below / m)
        return gap.reshape(d, m).max(axis=1)

    def p_values(self, window: np.ndarray) -> np.ndarray:
        size = int(np.round(self.rows * len(window) / (self.rows + len(window))))
        return np.array([_ks_survival(round(float(d), 12), size) for d in self.statistics(window)])


@functools.lru_cache(maxsize=65536)
def _ks_survival(statistic: float, size: int) -> float:
    from scipy.stats import kstwo

    return float(np.clip(kstwo.sf(statistic, size), 0.0, 1.0))


class ScipyDetector(WindowDetector):
    """KS per feature (SciPy's distribution) and squared Mahalanobis distance (Ledoit-Wolf covariance)."""

    backend = "scipy"

    def _fit_drift(self, reference: np.ndarray) -> None:
        self._reference = KsReference(reference)

    def _p_values(self, window: np.ndarray) -> np.ndarray:
        return self._reference.p_values(window)

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


@dataclass(frozen=True)
class WindowSnapshot:
    """The rows of a window due for a test, with their sequence numbers and arrival times."""

    rows: np.ndarray = field(repr=False)
    row_numbers: tuple[int, ...]
    times: tuple[float, ...]


class WindowMonitor:
    """A sliding window of the last ``window`` rows, tested every ``stride`` rows -- and, at high
    rates, no more often than every ``stride_seconds`` (whichever comes later).

    After an alarm the window starts afresh, so one shift raises one alarm
    per ``window`` rows at most. :meth:`add` appends and tests in one call;
    a service that tests beside its request path uses the three steps:
    :meth:`append` rows (cheap), :meth:`take` a :class:`WindowSnapshot` when a
    test is due, and :meth:`record` the detector's result on it. The monitor
    is not thread-safe: the caller holds a lock around each step.
    """

    def __init__(self, detector: WindowDetector, window: int, stride: int, *, stride_seconds: float = 0.0) -> None:
        self.detector = detector
        self.window = window
        self.stride = stride
        self.stride_seconds = stride_seconds
        self._last_test = float("-inf")
        self._rows: list[np.ndarray] = []
        self._numbers: list[int] = []
        self._times: list[float] = []
        self._since_test = 0
        self._count = 0
        self.last_result: WindowResult | None = None
        self.windows_tested = 0
        self._alarmed_through = 0  # the last row of the last window that raised an alarm

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows_seen(self) -> int:
        return self._count

    def reset(self, through: int | None = None) -> None:
        """Start the window afresh: drop its rows (those numbered up to ``through``, when given)."""
        keep = 0 if through is None else sum(1 for number in self._numbers if number > through)
        cut = len(self._rows) - keep
        del self._rows[:cut], self._numbers[:cut], self._times[:cut]
        self._since_test = keep

    def add(self, rows: np.ndarray, now: float) -> list[WindowAlarm]:
        """Add rows that arrived at ``now``, testing row by row as they come; returns the alarms raised."""
        alarms = []
        for row in rows:
            self.append(row[None, :], now)
            if now - self._last_test >= self.stride_seconds:
                alarms += self.test_due(now)
        return alarms

    def append(self, rows: np.ndarray, now: float) -> None:
        """Add rows that arrived at ``now`` to the window (the last ``window`` rows are kept)."""
        for row in rows:
            self._count += 1
            self._rows.append(row)
            self._numbers.append(self._count)
            self._times.append(now)
            self._since_test += 1
        if len(self._rows) > self.window:
            cut = len(self._rows) - self.window
            del self._rows[:cut], self._numbers[:cut], self._times[:cut]

    def take(self, now: float, *, timer: bool = False) -> WindowSnapshot | None:
        """The window, if a test is due (``stride`` new rows, and ``stride_seconds`` since the last test
        unless the ``timer`` asks); it then counts as tested."""
        if len(self._rows) < self.window or self._since_test < self.stride:
            return None
        if not timer and now - self._last_test < self.stride_seconds:
            return None
        self._since_test = 0
        self._last_test = now
        return WindowSnapshot(np.vstack(self._rows), tuple(self._numbers), tuple(self._times))

    def record(self, snapshot: WindowSnapshot, result: WindowResult) -> list[WindowAlarm]:
        """Keep the result of testing ``snapshot``; an alarm starts the window afresh after its rows.
        A snapshot that shares rows with a window that raised an alarm is void: they were judged."""
        if snapshot.row_numbers[0] <= self._alarmed_through:
            return []
        self.last_result = result
        self.windows_tested += 1
        if not (result.drift or result.outlier_alarm):
            return []
        self._alarmed_through = snapshot.row_numbers[-1]
        self.reset(through=self._alarmed_through)
        return [WindowAlarm(result, snapshot.row_numbers, snapshot.times)]

    def test_due(self, now: float) -> list[WindowAlarm]:
        """Test the window now if ``stride`` rows came since the last test (the timer's call when rows
        arrive faster than one test per ``stride_seconds``); returns the alarm it raised, if any."""
        snapshot = self.take(now, timer=True)
        return [] if snapshot is None else self.record(snapshot, self.detector.test(snapshot.rows))
