"""Training steps as plain functions: split, cross-validation, selection, export and the gate's rule."""

from __future__ import annotations

import numpy as np
import pytest

from kfloop.bundle import ModelBundle
from kfloop.data import load_dataset, save_npz
from kfloop.steps import candidate_step, fit_export_step, prepare_step
from kfloop.training import Prepared, beats, classification_metrics, select_best


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    save_npz(load_dataset("builtin:digits"), str(folder / "dataset.npz"))
    sizes = prepare_step(str(folder / "dataset.npz"), 0.25, 3, str(folder / "prepared.npz"), str(folder / "prep.joblib"))
    return folder, sizes


def test_holdout_is_stratified_and_reference_is_raw_training_rows(prepared_digits):
    folder, sizes = prepared_digits
    prepared = Prepared.load(str(folder / "prepared.npz"))
    assert sizes == {"train_rows": 1347, "holdout_rows": 450}
    _, counts = np.unique(prepared.holdout_labels, return_counts=True)
    assert counts.min() >= 43 and counts.max() <= 46
    assert prepared.reference.shape == (1347, 64)
    assert prepared.reference.max() == 16.0  # raw pixel values, not scaled
    assert abs(float(prepared.train_features.mean())) < 1e-3  # scaled


def test_candidate_metrics_come_from_out_of_fold_predictions(prepared_digits):
    folder, _ = prepared_digits
    result = candidate_step(str(folder / "prepared.npz"), {"n_estimators": 30.0, "max_features": "sqrt"}, 3, 3)
    assert result["params"] == {"n_estimators": 30, "max_features": "sqrt"}
    assert 0.9 < result["metrics"]["accuracy"] < 1.0
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
