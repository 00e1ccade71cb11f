"""The drift detectors, SciPy and alibi-detect backends through one check suite: calibrated on real leaf
data, their false-alarm rate on clean rows stays under alpha and shifted rows are found within one window."""

from __future__ import annotations

import numpy as np
import pytest

from kfloop.data import load_dataset
from kfloop.drift import calibration
from kfloop.drift.backends import make_detector
from kfloop.drift.detectors import DetectorConfig


@pytest.fixture(scope="module")
def leaf_streams(shared_data):
    return calibration.clean_streams(load_dataset(str(shared_data / "kaggle_leaf_train.csv")), load_dataset(str(shared_data)))


# alibi-detect's KSDrift runs scipy's ks_2samp feature by feature: ~0.5 s per window of 192 features, 15 times the
# SciPy backend's cost. It is held to the same bounds on half as many windows and trials (single-threaded and not
# timing-sensitive: these tests run beside the others, not in the serial heavy group).
SAMPLES = {"scipy": 1.0, "alibi": 0.5}


@pytest.mark.parametrize("backend", ["scipy", "alibi"])
def test_false_alarm_rate_on_clean_leaf_rows_stays_under_alpha(leaf_streams, backend):
    reference, clean, _ = leaf_streams
    detector = make_detector(backend, DetectorConfig(alpha=0.05)).fit(reference)
    wanted = int(120 * SAMPLES[backend])
    rate, windows = calibration.false_alarm_rate(detector, clean, windows=wanted, window=100, stride=25, seed=3)
    assert windows >= wanted
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
    shifts["shape shuffled"] = calibration.shuffle_columns(slice(64, 128))  # only a joint outlier score sees it
    for name, shift in shifts.items():
        found = calibration.detection(detector, clean, shift, trials=int(20 * SAMPLES[backend]), window=100, stride=25, seed=4)
        assert found.rate >= 0.95, name
        assert found.max_delay <= 100, name


def as_received(encoding: str, names: tuple[str, ...]):
    """Rows as a client sends them in ``encoding`` -> rows as the watch parses them."""
    import orjson

    from kfloop.serving.protocol import InputSchema, request_body

    schema = InputSchema(names, max_batch=10_000)
    return lambda rows: schema.rows_from_body(orjson.loads(orjson.dumps(request_body(rows, encoding, names))))


@pytest.mark.parametrize("encoding", ["v2-fp32", "v2-per-feature-fp32"])
def test_clean_leaf_rows_sent_as_fp32_stay_quiet_on_tie_heavy_features(leaf_streams, shared_data, encoding):
    """Float32-rounded clean rows against the reference: the precision of both sides is the model's, so
    features with few distinct values (margin64: ~30 values, many zeros) do not drift on rounding alone."""
    reference, clean, _ = leaf_streams
    names = tuple(load_dataset(str(shared_data / "kaggle_leaf_train.csv")).feature_names)
    margin64 = names.index("margin64")
    assert len(np.unique(reference[:, margin64])) < 40  # the tie-heavy feature the float64 comparison tripped on
    detector = make_detector("scipy", DetectorConfig(alpha=0.05)).fit(reference)
    encode = as_received(encoding, names)
    window = encode(clean[:100])
    assert not np.array_equal(window, clean[:100])  # the rows did change on the way: float32 rounding
    assert detector.test(window).p_values[margin64] > 0.01
    rate, windows = calibration.false_alarm_rate(detector, clean, windows=200, window=100, stride=25, seed=3, encode=encode)
    assert windows >= 200 and rate <= 0.05


def test_a_fast_stream_is_tested_at_most_once_per_stride_seconds_and_the_timer_tests_the_rest(leaf_streams):
    from kfloop.drift.detectors import WindowMonitor

    reference, clean, _ = leaf_streams
    monitor = WindowMonitor(make_detector("scipy", DetectorConfig()).fit(reference), 100, 25, stride_seconds=1.0)
    monitor.add(clean[:100], now=10.0)
    assert monitor.windows_tested == 1
    monitor.add(clean[100:200], now=10.5)  # 100 more rows within the second: no test yet
    assert monitor.windows_tested == 1
    assert monitor.test_due(now=10.6) == [] and monitor.windows_tested == 2  # the timer's test covers them
    assert monitor.test_due(now=10.7) == [] and monitor.windows_tested == 2  # nothing new since
