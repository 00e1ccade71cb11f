"""Attribution drift directly on a real registry version's forest: nDCG is 1 for the baseline's own ranking
and falls as it is reordered, the threshold is the policy's or the clean windows' alpha quantile (the lower),
clean windows of the baseline's rows rarely fall below it, a strong shift does, and the features that moved
are named."""

from __future__ import annotations

import numpy as np
import pytest

from kfloop.drift.attribution import AttributionBaseline, ndcg
from kfloop.explain import ForestExplainer
from kfloop.registry import ModelRegistry
from kfloop.training import Prepared
from testbed import register_version


def test_ndcg_is_one_for_the_baselines_own_order_and_falls_as_it_is_reversed():
    gains = np.array([0.4, 0.3, 0.2, 0.1])
    assert ndcg(gains, gains, top=4) == pytest.approx(1.0)
    assert ndcg(gains, gains * 7, top=4) == pytest.approx(1.0)  # only the order counts
    swapped = ndcg(gains, np.array([0.3, 0.4, 0.2, 0.1]), top=4)
    reversed_ = ndcg(gains, gains[::-1], top=4)
    assert 1.0 > swapped > reversed_ > 0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, serving_data):
    root = tmp_path_factory.mktemp("attribution")
    register_version(root / "registry", "leaf", serving_data, n_estimators=20, work=root / "v1")
    folder = ModelRegistry(root / "registry").uri("leaf", "1")
    with np.load(f"{folder}/reference.npz") as arrays:
        holdout = arrays["holdout"]
    assert len(holdout) == len(Prepared.load(str(root / "v1" / "prepared.npz")).holdout_features)
    return AttributionBaseline(ForestExplainer.load(folder, "1"), holdout, window=40, threshold=0.9, alpha=0.01), holdout


def test_the_threshold_is_the_lower_of_the_policys_and_the_clean_windows_quantile(baseline):
    fitted, _ = baseline
    assert fitted.threshold == min(0.9, fitted.clean_quantile) and 0 < fitted.threshold <= 0.9
    assert fitted.shares.sum() == pytest.approx(1.0) and (fitted.shares >= 0).all()


def test_clean_windows_rarely_drift_and_a_strong_shift_does_naming_what_moved(baseline):
    fitted, holdout = baseline
    rng = np.random.default_rng(5)
    clean = [fitted.test(holdout[rng.choice(len(holdout), 40, replace=False)]) for _ in range(30)]
    assert sum(result.drift for result in clean) <= 2
    shifted = fitted.test(holdout[:40] * 1.5 + 0.01)
    assert shifted.drift and shifted.rows == 40 and shifted.ndcg < min(result.ndcg for result in clean)
    assert len(shifted.moved) == 5 and all(name in fitted.feature_names for name, _, _ in shifted.moved)
    changes = [abs(now - before) for _, before, now in shifted.moved]
    assert changes == sorted(changes, reverse=True)
