"""Training steps as plain functions: split, cross-validation, selection, export and the gate's rule."""

from __future__ import annotations

import joblib
import numpy as np
import pytest

from kfloop.bundle import ModelBundle
from kfloop.steps import candidates_step, fit_export_step, prepare_step
from kfloop.training import Prepared, beats, classification_metrics, cross_validate_candidate, select_best


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    summary = prepare_step("builtin:digits", "", 2, 0.25, 3, str(folder / "prepared.npz"), str(folder / "prep.joblib"))
    return folder, summary


def test_holdout_is_stratified_and_reference_is_raw_training_rows(prepared_digits):
    folder, sizes = prepared_digits
    prepared = Prepared.load(str(folder / "prepared.npz"))
    assert (sizes["rows"], sizes["features"], sizes["classes"]) == (1797, 64, 10)
    assert (sizes["train_rows"], sizes["holdout_rows"]) == (1347, 450)
    _, counts = np.unique(prepared.holdout_labels, return_counts=True)
    assert counts.min() >= 43 and counts.max() <= 46
    assert prepared.reference.shape == (1347, 64)
    assert prepared.reference.max() == 16.0  # raw pixel values, not scaled
    assert abs(float(prepared.train_features.mean())) < 1e-3  # scaled


def test_candidate_metrics_come_from_out_of_fold_predictions(prepared_digits):
    folder, _ = prepared_digits
    batch = [{"n_estimators": 30.0, "max_features": "sqrt"}, {"n_estimators": 5, "max_features": "log2"}]
    result, small = candidates_step(str(folder / "prepared.npz"), batch, 3, 3)
    assert result["params"] == {"n_estimators": 30, "max_features": "sqrt"}
    assert small["params"] == {"n_estimators": 5, "max_features": "log2"}
    assert 0.9 < result["metrics"]["accuracy"] < 1.0
    assert small["metrics"]["accuracy"] < result["metrics"]["accuracy"]
    assert result["metrics"]["log_loss"] > 0


def test_select_best_follows_the_metric_direction():
    a = {"params": {"n": 1}, "metrics": {"accuracy": 0.9, "log_loss": 0.3, "macro_f1": 0.9}}
    b = {"params": {"n": 2}, "metrics": {"accuracy": 0.8, "log_loss": 0.2, "macro_f1": 0.8}}
    assert select_best([b, a], "accuracy")[0] is a
    assert select_best([a, b], "log_loss")[0] is b
    with pytest.raises(ValueError, match="unknown selection metric"):
        select_best([a], "auc")


def test_beats_needs_more_than_the_margin():
    assert beats("accuracy", 0.95, 0.90, 0.01)
    assert not beats("accuracy", 0.95, 0.95, 0.0)
    assert not beats("accuracy", 0.905, 0.90, 0.01)
    assert beats("log_loss", 0.2, 0.3, 0.05)


def test_metrics_count_unknown_labels_as_wrong():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    metrics = classification_metrics(np.array(["a", "b", "c"]), proba, ("a", "b"))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["log_loss"] > 10  # the unknown label gets the probability floor


def test_onnx_export_agrees_with_scikit_learn_and_loads_as_a_bundle(prepared_digits, tmp_path):
    folder, _ = prepared_digits
    final = fit_export_step(
        str(folder / "prepared.npz"), str(folder / "prep.joblib"), {"n_estimators": 25, "max_features": "sqrt"}, 3,
        str(tmp_path / "model"),
    )
    assert final["onnx_agreement"] == 1.0 and final["onnx_exported"]
    assert final["metrics"]["accuracy"] > 0.9
    assert np.asarray(final["confusion_matrix"]).sum() == 450
    (tmp_path / "model" / "preprocessor.joblib").write_bytes((folder / "prep.joblib").read_bytes())
    prepared = Prepared.load(str(folder / "prepared.npz"))
    onnx = ModelBundle.load(tmp_path / "model")
    sklearn = ModelBundle.load(tmp_path / "model", prefer_onnx=False)
    assert (onnx.runtime, sklearn.runtime) == ("onnx", "joblib")
    onnx_labels, onnx_proba = onnx.predict(prepared.holdout_features)
    sk_labels, sk_proba = sklearn.predict(prepared.holdout_features)
    assert (onnx_labels == sk_labels).all()
    np.testing.assert_allclose(onnx_proba, sk_proba, atol=1e-5)


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_a_candidate_that_cannot_catch_the_leader_stops_early_and_the_winner_is_unchanged(prepared_digits, metric):
    folder, _ = prepared_digits
    strong = {"n_estimators": 30, "max_features": "sqrt"}
    weak = {"n_estimators": 1, "max_depth": 2, "max_features": "sqrt"}
    leader, stopped = candidates_step(str(folder / "prepared.npz"), [strong, weak], 5, 3, metric)
    assert leader["folds"] == 5 and stopped["folds"] <= 2  # accuracy: after 1 fold; log-loss sums up: after 2
    prepared = Prepared.load(str(folder / "prepared.npz"))
    full = cross_validate_candidate(prepared, weak, cv_folds=5, seed=3)
    assert full["folds"] == 5
    # stopped or not, the weak set ranks below the leader: the winner is the same
    assert select_best([stopped, leader], metric)[0] is leader and select_best([full, leader], metric)[0] is leader
    # without a leader to chase (the batch's first set) nothing stops
    [alone] = candidates_step(str(folder / "prepared.npz"), [weak], 5, 3, metric)
    assert alone == full


def test_macro_f1_has_no_bound_so_nothing_stops_early(prepared_digits):
    folder, _ = prepared_digits
    strong = {"n_estimators": 30, "max_features": "sqrt"}
    weak = {"n_estimators": 1, "max_depth": 2, "max_features": "sqrt"}
    results = candidates_step(str(folder / "prepared.npz"), [strong, weak], 3, 3, "macro_f1")
    assert [r["folds"] for r in results] == [3, 3]


@pytest.mark.parametrize("params", [{"n_estimators": 20, "max_features": "sqrt"},
                                    {"n_estimators": 15, "max_features": 0.5, "min_samples_leaf": 4, "max_depth": 6}])
def test_the_onnx_export_computes_what_skl2onnx_s_graph_computes_in_a_fraction_of_its_size(prepared_digits, params):
    """skl2onnx (the reference) and kfloop's export, on pure leaves and on mixed ones: the same labels and
    probabilities on every holdout row, and on rows that sit exactly on a split's float32 threshold."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    from kfloop.bundle import export_onnx, onnx_session
    from kfloop.training import fit_final

    folder, _ = prepared_digits
    prepared = Prepared.load(str(folder / "prepared.npz"))
    forest = fit_final(prepared, params, seed=3)
    features = prepared.train_features.shape[1]
    reference = to_onnx(forest, initial_types=[("features", FloatTensorType([None, features]))],
                        options={id(forest): {"zipmap": False}}, target_opset={"": 15, "ai.onnx.ml": 3}).SerializeToString()
    ours = export_onnx(forest, features)
    assert len(ours) < len(reference) / 2
    tree = forest.estimators_[0].tree_
    split = int(np.flatnonzero(tree.children_left != -1)[0])
    on_threshold = np.repeat(prepared.train_features[:3], 3, axis=0).astype(np.float32)
    for row, value in enumerate(np.float32(tree.threshold[split]) + np.array([-1, 0, 1]) * np.float32(1e-7)):
        on_threshold[row::3, tree.feature[split]] = value
    for rows in (prepared.train_features.astype(np.float32), on_threshold):
        expected = onnx_session(reference).run(None, {"features": rows})
        got = onnx_session(ours).run(None, {"features": rows})
        assert (got[0] == expected[0]).all() and (got[0] == forest.predict(rows)).all()
        np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
        np.testing.assert_allclose(got[1], forest.predict_proba(rows), atol=1e-5)


def test_out_of_bag_scoring_takes_one_fit_and_ranks_like_cross_validation(prepared_digits):
    folder, _ = prepared_digits
    strong = {"n_estimators": 40, "max_features": "sqrt"}
    weak = {"n_estimators": 3, "max_depth": 3, "max_features": "sqrt"}
    oob = candidates_step(str(folder / "prepared.npz"), [strong, weak], 5, 3, "accuracy", "oob")
    cv = candidates_step(str(folder / "prepared.npz"), [strong, weak], 5, 3, "accuracy", "cv")
    assert [r["folds"] for r in oob] == [0, 0]
    assert abs(oob[0]["metrics"]["accuracy"] - cv[0]["metrics"]["accuracy"]) < 0.03
    assert select_best(oob, "accuracy")[0]["params"] == select_best(cv, "accuracy")[0]["params"] == strong
    with pytest.raises(ValueError, match="unknown candidate evaluation 'loo'"):
        candidates_step(str(folder / "prepared.npz"), [strong], 5, 3, "accuracy", "loo")


def test_the_out_of_bag_winner_s_forest_is_the_final_model_and_equals_a_refit(prepared_digits, tmp_path):
    """A warm search's batch leader keeps its forest: the final model is not grown twice, and is the same forest."""
    folder, _ = prepared_digits
    prepared_path, preprocessor_path = str(folder / "prepared.npz"), str(folder / "prep.joblib")
    strong = {"n_estimators": 40.0, "max_features": "sqrt"}  # as KFP hands numbers back
    weak = {"n_estimators": 3, "max_depth": 3, "max_features": "sqrt"}
    candidates_step(prepared_path, [weak, strong], 5, 3, "accuracy", "oob", str(tmp_path / "batch-1"))
    candidates_step(prepared_path, [weak], 5, 3, "accuracy", "cv", str(tmp_path / "batch-2"))  # CV keeps no forest
    assert sorted(p.name for p in (tmp_path / "batch-1").iterdir()) == ["forest.joblib", "params.json"]
    assert list((tmp_path / "batch-2").iterdir()) == []
    fitted = [str(tmp_path / "batch-2"), str(tmp_path / "batch-1")]
    reused = fit_export_step(prepared_path, preprocessor_path, strong, 3, str(tmp_path / "reused"), fitted)
    refit = fit_export_step(prepared_path, preprocessor_path, strong, 3, str(tmp_path / "refit"))
    other = fit_export_step(prepared_path, preprocessor_path, weak, 3, str(tmp_path / "other"), fitted)
    assert (reused["final_fit"], refit["final_fit"], other["final_fit"]) == ("reused", "refit", "refit")
    assert reused["metrics"] == refit["metrics"]
    assert (tmp_path / "reused" / "model.onnx").read_bytes() == (tmp_path / "refit" / "model.onnx").read_bytes()
    model = joblib.load(tmp_path / "reused" / "model.joblib")
    assert not hasattr(model, "oob_decision_function_") and model.get_params()["oob_score"] is False
    assert model.n_jobs == joblib.load(tmp_path / "refit" / "model.joblib").n_jobs == 1  # served one request at a time
    assert (tmp_path / "reused" / "model.joblib").read_bytes() == (tmp_path / "batch-1" / "forest.joblib").read_bytes()
