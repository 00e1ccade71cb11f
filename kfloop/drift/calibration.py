"""Calibration of the watch's alarms on your own data: false-alarm rate, detection rate, delay.

Streams rows through a :class:`~kfloop.drift.detectors.WindowMonitor`
exactly as the watch service does:

* :func:`false_alarm_rate` -- clean rows only; the share of tested windows
  that raised an alarm (should be at most ``alpha``);
* :func:`detection` -- per trial, one window of clean rows and then shifted
  rows; whether an alarm came after the shift began and how many rows after
  its first shifted row (the delay; the target is at most one window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kfloop.data import LabelledData
from kfloop.drift.detectors import WindowDetector, WindowMonitor

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]
Encoding = Callable[[np.ndarray], np.ndarray]  # rows as sent -> rows as the watch reads them


@dataclass(frozen=True)
class Detection:
    trials: int
    detected: int
    early_alarms: int  # trials drawn again because of a (false) alarm before the shift began
    delays: tuple[int, ...]  # rows from the first shifted row to the alarm, for detected trials

    @property
    def rate(self) -> float:
        return self.detected / self.trials

    @property
    def median_delay(self) -> float:
        return float(np.median(self.delays)) if self.delays else float("nan")

    @property
    def max_delay(self) -> int:
        return max(self.delays) if self.delays else -1


def clean_streams(
    train: LabelledData, more: LabelledData | None = None, *, holdout_fraction: float = 0.2, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, clean rows, their labels) as a served model would see them.

    The reference is the pipeline's training split of ``train`` (same split,
    same seed); clean rows are its holdout plus the rows of ``more`` (another
    sample of the same population) that are not in ``train``.
    """
    from kfloop.training import prepare

    prepared, _ = prepare(train, holdout_fraction=holdout_fraction, seed=seed)
    clean, labels = [prepared.holdout_features], [prepared.holdout_labels]
    if more is not None:
        seen = {row.round(6).tobytes() for row in train.features}
        fresh = np.array([row.round(6).tobytes() not in seen for row in more.features])
        clean.append(more.features[fresh])
        labels.append(more.labels[fresh])
    return prepared.reference, np.vstack(clean), np.concatenate(labels)


def _sample(pool: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    return pool[rng.integers(0, len(pool), rows)]


def _as_sent(rows: np.ndarray) -> np.ndarray:
    return rows


def false_alarm_rate(detector: WindowDetector, clean: np.ndarray, *, windows: int, window: int, stride: int, seed: int = 0,
                     encode: Encoding = _as_sent) -> tuple[float, int]:
    """(alarms per tested window, windows tested) on a stream of clean rows, each passed through ``encode``
    (what the watch reads after a client sent the rows in some encoding; by default the rows themselves)."""
    rng = np.random.default_rng(seed)
    monitor = WindowMonitor(detector, window, stride)
    alarms = 0
    while monitor.windows_tested < windows:
        alarms += len(monitor.add(encode(_sample(clean, stride, rng)), 0.0))
    return alarms / monitor.windows_tested, monitor.windows_tested


def detection(
    detector: WindowDetector,
    clean: np.ndarray,
    shifted: Shift,
    *,
    trials: int,
    window: int,
    stride: int,
    seed: int = 0,
    encode: Encoding = _as_sent,
) -> Detection:
    """Alarm rate and delay when the stream turns from clean rows to ``shifted`` ones (all passed through ``encode``)."""
    rng = np.random.default_rng(seed)
    detected, early, delays = 0, 0, []
    done = 0
    while done < trials:
        monitor = WindowMonitor(detector, window, stride)
        if monitor.add(encode(_sample(clean, window, rng)), 0.0):
            early += 1  # a false alarm before the shift (counted by false_alarm_rate): draw the trial again
            continue
        done += 1
        first_shifted = window + 1
        alarm_row = None
        for row in encode(shifted(_sample(clean, 2 * window, rng), rng)):
            if monitor.add(row[None, :], 0.0):
                alarm_row = monitor.rows_seen
                break
        if alarm_row is not None:
            detected += 1
            delays.append(alarm_row - first_shifted + 1)
    return Detection(trials, detected, early, tuple(delays))


# --- shifts ------------------------------------------------------------------------------------


def scale_columns(columns: slice | list[int], factor: float) -> Shift:
    """Multiply a group of features (a recalibrated scanner, another unit)."""
    def shift(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rows.copy()
        out[:, columns] *= factor
        return out
    return shift


def add_noise(columns: slice | list[int], sigma: float) -> Shift:
    """Add Gaussian noise to a group of features (a noisier sensor)."""
    def shift(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rows.copy()
        out[:, columns] += rng.normal(0.0, sigma, out[:, columns].shape)
        return out
    return shift


def shuffle_columns(columns: slice | list[int]) -> Shift:
    """Shuffle each feature of a group across rows on its own: every marginal distribution stays, the
    rows no longer hang together (a column-misalignment bug) -- only the outlier test can see this."""
    def shift(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rows.copy()
        for column in np.arange(rows.shape[1])[columns]:
            out[:, column] = out[rng.permutation(len(out)), column]
        return out
    return shift


def replace_rows(pool: np.ndarray) -> Shift:
    """Draw the rows from another population (a subset of classes, another data source)."""
    def shift(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return pool[rng.integers(0, len(pool), len(rows))]
    return shift
