"""The policy file: defaults encode the automation table; every bad field is reported with what is allowed;
the captures section bounds what the captures area keeps; the delivery section says how long Knative retries an alarm."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from kfloop.event_types import ACCURACY_EVENT
from kfloop.captures import CaptureRetention
from kfloop.errors import PolicyError
from kfloop.policies import load_policy
from kfloop.policies.spec import CapturePolicy, DeliveryPolicy


def test_default_policy_has_eight_candidates_most_expensive_first():
    policy = load_policy()
    candidates = policy.training.search_space.candidates()
    assert len(candidates) == 8
    assert candidates[0]["n_estimators"] == 300 and candidates[0]["max_features"] == "sqrt"
    assert candidates[-1]["n_estimators"] == 100 and candidates[-1]["max_features"] == "log2"


def test_every_bad_field_is_reported_with_its_path_and_allowed_values(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "training": {
            "selection_metric": "f1",
            "cv_folds": 1,
            "search_space": {"max_features": ["all"], "n_trees": [3]},
        },
        "rollout": {"observe_seconds": 600, "max_observe_seconds": 60},
    }))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "training.selection_metric: Input should be 'accuracy', 'macro_f1' or 'log_loss' (got 'f1')" in message
    assert "training.cv_folds: Input should be greater than or equal to 2 (got 1)" in message
    assert "training.search_space.max_features.0: Input should be 'sqrt' or 'log2'" in message
    assert "training.search_space.n_trees: unknown field" in message
    assert "rollout: Value error, max_observe_seconds (60) must not be below observe_seconds (600)" in message


def test_unreadable_and_non_mapping_files_are_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="top level must be a mapping"):
        load_policy(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(broken)


def test_rows_per_class_cover_the_holdout_and_every_fold():
    training = load_policy().training
    assert training.cv_folds == 5 and training.holdout_fraction == 0.2
    assert training.min_rows_per_class() == 7


def test_a_time_scaled_policy_divides_windows_periods_and_cooldowns_but_not_rates(tmp_path):
    scaled = load_policy().time_scaled(10)
    assert (scaled.scaling.evaluation_seconds, scaled.scaling.cooldown_seconds) == (2, 30)
    assert [(r.window, r.threshold) for r in scaled.scaling.rules] == [("30s", 2.0), ("6s", 0.9)]
    assert (scaled.rollout.observe_seconds, scaled.retraining.cooldown_seconds) == (12, 360)
    # The canary's answers come at an unscaled rate in scaled time: the minimum count shrinks with it.
    assert (scaled.rollout.min_canary_answers, scaled.rollout.max_observe_seconds) == (2, 120)
    fast = load_policy().time_scaled(1000)
    assert fast.rollout.min_canary_answers == 1
    assert fast.scaling.evaluation_seconds == 1 and [r.window for r in fast.scaling.rules] == ["3s", "3s"]
    assert load_policy(scaled.save(tmp_path / "scaled.yaml")) == scaled
    with pytest.raises(PolicyError, match="speed must be > 0"):
        load_policy().time_scaled(0)


def test_capture_retention_defaults_to_one_gib_and_thirty_days_and_a_policy_without_the_section_stays_valid(tmp_path):
    assert load_policy().captures.retention() == CaptureRetention(max_bytes=2**30, max_age_days=30.0)
    older = tmp_path / "older.yaml"
    older.write_text(yaml.safe_dump({"model": "leaf", "retraining": {"cooldown_seconds": 60}}))
    assert load_policy(older).captures == CapturePolicy()


@pytest.mark.parametrize(("written", "max_bytes"), [
    ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("500MiB", 500 * 2**20), (5_000_000, 5_000_000), (None, None),
])
def test_capture_max_bytes_takes_bytes_or_a_size_with_a_unit(tmp_path, written, max_bytes):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"captures": {"max_bytes": written, "max_age_days": None}}))
    assert load_policy(path).captures.retention() == CaptureRetention(max_bytes=max_bytes, max_age_days=None)


def test_bad_capture_retention_fields_are_each_reported_with_what_is_allowed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"captures": {"max_bytes": "10 parsecs", "max_age_days": 0, "max_rows": 5}}))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert ("captures.max_bytes: Value error, a size is a number of bytes, optionally with a unit: "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (got '10 parsecs')") in message
    assert "captures.max_age_days: Input should be greater than 0 (got 0)" in message
    assert "captures.max_rows: unknown field" in message
    path.write_text(yaml.safe_dump({"captures": {"max_bytes": 1000}}))
    with pytest.raises(PolicyError, match=r"captures.max_bytes: Input should be greater than or equal to 1048576 \(got 1000\)"):
        load_policy(path)


def test_alarm_delivery_defaults_to_eight_exponential_retries_from_one_second_and_older_policies_stay_valid(tmp_path):
    delivery = load_policy().retraining.delivery
    assert (delivery.retries, delivery.backoff_delay_seconds, delivery.backoff_policy) == (8, 1.0, "exponential")
    assert delivery.retry_seconds() == 255  # 1 + 2 + ... + 128 s, then the alarm is dead-lettered
    assert delivery.backoff_delay() == "PT1S"
    older = tmp_path / "older.yaml"
    older.write_text(yaml.safe_dump({"model": "leaf", "retraining": {"cooldown_seconds": 60, "include_captures": False}}))
    assert load_policy(older).retraining.delivery == DeliveryPolicy()


@pytest.mark.parametrize(("fields", "retry_seconds", "duration"), [
    ({"retries": 0}, 0, "PT1S"),
    ({"retries": 4, "backoff_policy": "linear", "backoff_delay_seconds": 2}, 12, "PT2S"),  # 0 + 2 + 4 + 6 s
    ({"retries": 3, "backoff_delay_seconds": 0.25}, 1.75, "PT0.25S"),
    ({"retries": 16}, 65535, "PT1S"),
])
def test_delivery_waits_as_knatives_dispatcher_does(tmp_path, fields, retry_seconds, duration):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"retraining": {"delivery": fields}}))
    delivery = load_policy(path).retraining.delivery
    assert (delivery.retry_seconds(), delivery.backoff_delay()) == (retry_seconds, duration)


def test_bad_delivery_fields_are_each_reported_with_what_is_allowed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"retraining": {"delivery": {"retries": -1, "backoff_policy": "random",
                                                                "backoff_delay_seconds": 0, "dead_letter": "x"}}}))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert "retraining.delivery.retries: Input should be greater than or equal to 0 (got -1)" in message
    assert "retraining.delivery.backoff_policy: Input should be 'exponential' or 'linear' (got 'random')" in message
    assert "retraining.delivery.backoff_delay_seconds: Input should be greater than or equal to 0.001 (got 0)" in message
    assert "retraining.delivery.dead_letter: unknown field" in message
    path.write_text(yaml.safe_dump({"retraining": {"delivery": {"retries": 17}}}))
    with pytest.raises(PolicyError, match=r"retraining.delivery: Value error, the retries wait 131071 s in all, more than a day"):
        load_policy(path)


def test_the_accuracy_rule_is_in_the_default_policy_and_its_promql_names_the_watchs_gauges(tmp_path):
    from kfloop.policies import Policy

    policy = load_policy(None)
    assert (policy.accuracy.labels, policy.accuracy.below) == (200, 0.8)
    assert ACCURACY_EVENT in policy.retraining.events
    assert policy.accuracy.promql("leaf") == ('kfloop_realised_accuracy{model="leaf"} < 0.8 and on(model, version) '
                                              'kfloop_realised_accuracy_labels{model="leaf"} >= 200')
    promtool = shutil.which("promtool")  # Prometheus' own parser: the alert rule a cluster would load
    if promtool is not None:
        rules = tmp_path / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": [{"name": "kfloop", "rules": [
            {"alert": "KfloopAccuracyLow", "expr": policy.accuracy.promql("leaf"), "for": "1m"}]}]}))
        checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    with pytest.raises(PolicyError, match="the accuracy rule is off"):
        Policy.model_validate({"accuracy": {"below": None}}).accuracy.promql("leaf")
    with pytest.raises(ValueError, match=r"rollout.shadow\n  Value error, max_observe_seconds \(5\) must not be below"):
        Policy.model_validate({"rollout": {"shadow": {"observe_seconds": 10, "max_observe_seconds": 5}}})
