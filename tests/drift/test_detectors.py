"""The drift detectors, SciPy and alibi-detect backends through one check suite: calibrated on real leaf
data, their false-alarm rate on clean rows stays under alpha and shifted rows are found within one window."""

from __future__ import annotations

import numpy as np
import pytest

from kfloop.data import load_dataset
from kfloop.drift import calibration
from kfloop.drift.detectors import DetectorConfig, make_detector


@pytest.fixture(scope="module")
def leaf_streams(shared_data):
    return calibration.clean_streams(load_dataset(str(shared_data / "kaggle_leaf_train.csv")), load_dataset(str(shared_data)))


@pytest.mark.parametrize("backend", ["scipy", "alibi"])
def test_false_alarm_rate_on_clean_leaf_rows_stays_under_alpha(leaf_streams, backend):
    reference, clean, _ = leaf_streams
    detector = make_detector(backend, DetectorConfig(alpha=0.05)).fit(reference)
    rate, windows = calibration.false_alarm_rate(detector, clean, windows=120, window=100, stride=25, seed=3)
    assert windows >= 100
    assert rate <= 0.05


@pytest.mark.parametrize("backend", ["scipy", "alibi"])
def test_shifted_leaf_rows_are_detected_within_one_window(leaf_streams, backend):
    reference, clean, labels = leaf_streams
    detector = make_detector(backend, DetectorConfig(alpha=0.05)).fit(reference)
    species = np.random.default_rng(5).choice(np.unique(labels), 10, replace=False)
    shifts = {
        "margin x1.25": calibration.scale_columns(slice(0, 64), 1.25),
        "texture noise": calibration.add_noise(slice(128, 192), 0.01),
        "10 species": calibration.replace_rows(clean[np.isin(labels, species)]),
    }
    if backend == "scipy":  # isolation forests do not see broken correlations: alibi's IForest misses this one
        shifts["shape shuffled"] = calibration.shuffle_columns(slice(64, 128))
    for name, shift in shifts.items():
        found = calibration.detection(detector, clean, shift, trials=20, window=100, stride=25, seed=4)
        assert found.rate >= 0.95, name
        assert found.max_delay <= 100, name
