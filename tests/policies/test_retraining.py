"""The retraining service: its training data is the base plus the labelled shards, each shard added once;
a run that fails on infrastructure is recorded and not charged to the daily budget."""

from __future__ import annotations

import time

import numpy as np
import pytest

from testbed import DRIFT, register_version
from kfloop.data import LabelledData, load_dataset, save_csv
from kfloop.policies import Policy
from kfloop.local.supervisor import free_port

pytestmark = pytest.mark.slow


def test_retraining_data_is_the_base_plus_labelled_shards_in_one_schema_and_shards_are_not_added_twice(tmp_path):
    from kfloop.policies.retraining import LocalRetrainer, RetrainingConfig, RetrainingService

    registry = tmp_path / "registry"
    register_version(registry, "digits", "builtin:digits", n_estimators=5, work=tmp_path / "v1")
    base = load_dataset("builtin:digits")
    shard_folder = registry / "digits" / "captures" / "20261201"
    shard_folder.mkdir(parents=True)
    shifted = LabelledData(base.features[:30] + 1.0, base.labels[:30], base.feature_names, "labeller",
                           ids=np.array([f"cap:{i}" for i in range(30)]))
    save_csv(shifted, str(shard_folder / "labelled-1.csv"))
    (shard_folder / "unlabelled.csv").write_text("id\n")  # captures without labels are not training data
    policy = Policy.model_validate({"model": "digits"})
    service = RetrainingService(RetrainingConfig("digits", str(registry), policy, tmp_path / "state"),
                             LocalRetrainer(policy, str(registry), tmp_path, model="digits"), None)

    uri, target = service.training_data("run1")
    data = load_dataset(uri, target=target)
    assert (target, data.rows, data.feature_names) == ("label", base.rows + 30, base.feature_names)
    np.testing.assert_allclose(data.features[: base.rows], base.features)
    np.testing.assert_allclose(data.features[base.rows:], base.features[:30] + 1.0)
    assert list(data.labels) == list(base.labels) + list(base.labels[:30])

    # Once a version trained on that folder serves, the next run starts again from the base, not base + old shards.
    register_version(registry, "digits", uri, n_estimators=5, work=tmp_path / "v2", target="label")
    again_uri, again_target = service.training_data("run2")
    assert load_dataset(again_uri, target=again_target).rows == base.rows + 30


def test_a_run_that_fails_on_infrastructure_does_not_use_up_the_daily_budget(tmp_path, registry_with_weak_v1):
    """A Kubeflow Pipelines API that does not answer is an infrastructure failure: the run is recorded as failed
    and uncharged, so the next alarm still starts a run with a budget of one a day."""
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies.retraining import ClusterRetrainer, RetrainingConfig, RetrainingService

    registry, _, full = registry_with_weak_v1
    policy = Policy.model_validate({"model": "digits", "retraining": {"base_data": full, "cooldown_seconds": 0, "max_runs_per_day": 1}})
    down = KfpEndpoint(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    service = RetrainingService(RetrainingConfig("digits", str(registry), policy, tmp_path / "state", target="digit"),
                                ClusterRetrainer(policy, down, str(registry), model="digits", image="kfloop:test"), None)
    service.start()
    try:
        outcomes = []
        for attempt in range(2):
            outcomes.append(service.admit(f"alarm-{attempt}", DRIFT))
            deadline = time.time() + 60
            while time.time() < deadline and (service.status()["pending"] or any(r["outcome"] == "running" for r in service.status()["runs"])):
                time.sleep(0.2)
        runs = service.status()["runs"]
        assert outcomes == ["started", "started"]
        assert [(r["outcome"], r["charged"]) for r in runs] == [("failed", False), ("failed", False)]
        assert "ClusterError" in runs[0]["error"]
    finally:
        service.stop()
