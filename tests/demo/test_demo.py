"""kfloop demo end to end on the leaf case study, shortened (--speed), as a user runs it:
every row of the automation table fires, in the scenario's order, and no client request fails.

Its concept phase is issue 15's end-to-end test: the labels of some classes swap while the features stay
clean; the drift detector stays quiet, the accuracy rule fires, and the version retrained on the labelled
captures goes through the gate, the shadow stage and the canary to all traffic."""

from __future__ import annotations

import pytest
import yaml

from kfloop.event_types import ACCURACY_EVENT

pytestmark = pytest.mark.slow

SCENARIO_ORDER = ("tune", "select", "request-rate", "predictor-failures", "accuracy", "drift")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.heavy
def test_a_shortened_demo_on_leaf_data_fires_every_rule_in_order_without_a_failed_request(tmp_path, kfloop_cli, shared_data):
    policy = tmp_path / "leaf-demo.yaml"
    policy.write_text(yaml.safe_dump({
        "model": "leaf",
        "training": {"search_space": {"n_estimators": [60], "max_features": ["sqrt", "log2"], "min_samples_leaf": [1, 2]},
                     "cv_folds": 3},
    }))
    report = tmp_path / "report"
    result = kfloop_cli("demo", "--data", str(shared_data / "kaggle_leaf_train.csv"), "--policy", str(policy),
                        "--speed", "30", "--report", str(report), "--json", timeout=900)
    assert result.code == 0, result.stderr[-3000:]
    summary = result.json()

    first = {}
    for firing in summary["timeline"]:
        first.setdefault(firing["rule"], firing)
    assert set(SCENARIO_ORDER) <= set(first), summary["timeline"]
    times = [first[rule]["time"] for rule in SCENARIO_ORDER]
    assert times == sorted(times), summary["timeline"]
    actions = {rule: first[rule]["action"] for rule in SCENARIO_ORDER}
    assert actions == {"tune": "tune many sets in parallel", "select": "select the best", "request-rate": "scale out",
                       "predictor-failures": "scale out", "accuracy": "retrain and update the model",
                       "drift": "retrain and update the model"}
    assert first["tune"]["outcome"].startswith("4 candidates in 2 tasks, up to 2 at once")
    assert "1 -> " in first["request-rate"]["outcome"] and "1 -> 2" in first["predictor-failures"]["outcome"]
    concept, drift = first["accuracy"]["outcome"], first["drift"]["outcome"]
    assert concept.startswith(f"{ACCURACY_EVENT} (version 1: realised accuracy") and "below 0.8" in concept, concept
    assert "version 2 passed the gate, shadow for" in concept and "then 100 %" in concept, concept
    assert "version 3 passed the gate, shadow for" in drift and "then 100 %" in drift, drift
    assert any(f["action"] == "scale in" for f in summary["timeline"])
    phases = summary["phases"]
    assert phases["fault"] < phases["concept"] < first["accuracy"]["at_s"] < phases["drift"]
    quiet = [f for f in summary["timeline"] if f["rule"] == "drift" and phases["concept"] <= f["at_s"] < phases["drift"]]
    assert quiet == [], quiet  # the same stream: clean features, so the drift detector raised nothing
    assert summary["labels"]["refused"] == 0 and summary["labels"]["accepted"] > 990, summary["labels"]

    assert summary["failed_client_requests"] == 0 and summary["injected_failures"] > 0 and summary["requests"] > 100
    timings = summary["loop_timings"]
    for step in ("label_shift_to_accuracy_alarm_s", "concept_pipeline_s", "label_shift_to_full_traffic_s",
                 "first_shifted_request_to_alarm_s", "alarm_to_pipeline_start_s", "pipeline_s",
                 "promotion_to_full_traffic_s", "scale_out_reaction_s"):
        assert timings[step] is not None and timings[step] >= 0, timings
    assert timings["promotion_to_full_traffic_s"] >= 4  # the canary is observed for observe_seconds (120 / 30)

    page = (report / "index.html").read_text()
    for name in ("requests.png", "failures.png", "drift.png", "model.png", "accuracy.png", "latency.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC and f'src="{name}"' in page
    assert "request rate over 2 req/s per replica (10s window)" in page and "0 failed" in page
    assert "accuracy of the served version below 0.8 over 200 labels" in page
    # What each version relies on: every version's top 20 features, from its kept forest.
    assert "What each version relies on" in page and "<th>version 1</th><th>version 2</th>" in page
    assert "<td>20</td>" in page and "<td>21</td>" not in page
    assert "Drift and outlier alarms: which features' attributions moved" in page  # the drift phase raised one
