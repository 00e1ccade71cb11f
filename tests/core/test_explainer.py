"""Exact and approximate attributions of a real registry version's forest: exact ones add up to the forest's
probability, the top features come largest first and named, every class can be asked, bad options are
refused by name, and a version without a kept forest is a NotFoundError."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kfloop.errors import InputError, NotFoundError
from kfloop.explain import ExplainOptions, ForestExplainer, global_importance
from kfloop.registry import ModelRegistry
from kfloop.training import Prepared
from testbed import register_version


@pytest.fixture(scope="module")
def version(tmp_path_factory, serving_data):
    root = tmp_path_factory.mktemp("explain")
    register_version(root / "registry", "leaf", serving_data, n_estimators=20, work=root / "v1")
    raw = Prepared.load(str(root / "v1" / "prepared.npz")).holdout_features[:8]  # as clients send them
    return ModelRegistry(root / "registry").uri("leaf", "1"), raw


def test_exact_attributions_add_up_to_the_forests_probability_of_the_predicted_class(version):
    folder, raw = version
    explainer = ForestExplainer.load(folder)
    explanation = explainer.explain(raw, ExplainOptions(top_k=0))
    total = explanation.attributions[:, 0, :].sum(axis=1) + explanation.base_values[:, 0]
    np.testing.assert_allclose(total, explanation.probabilities[:, 0], atol=1e-6)
    proba = explainer.forest.predict_proba(explainer.preprocessor.transform(raw))
    assert explanation.predicted.tolist() == explainer.forest.classes_[np.argmax(proba, axis=1)].tolist()
    np.testing.assert_allclose(explainer.forest_probabilities(explainer.preprocessor.transform(raw)), proba, atol=1e-12)
    assert explanation.method == "exact" and not explanation.approximate
    assert sorted(explanation.features[0]) == sorted(explainer.feature_names)  # every feature, each once


def test_the_top_features_come_largest_first_with_their_names_and_every_class_on_request(version):
    folder, raw = version
    explainer = ForestExplainer.load(folder)
    top = explainer.explain(raw, ExplainOptions(top_k=5))
    assert top.attributions.shape == (len(raw), 1, 5) and top.features.shape == (len(raw), 5)
    magnitudes = np.abs(top.attributions[:, 0, :])
    assert (np.diff(magnitudes, axis=1) <= 0).all()
    full = explainer.explain(raw, ExplainOptions(top_k=0))
    for row in range(len(raw)):
        by_name = dict(zip(full.features[row], full.attributions[row, 0]))
        assert [by_name[name] for name in top.features[row]] == top.attributions[row, 0].tolist()
    every = explainer.explain(raw[:2], ExplainOptions(top_k=3, classes="all"))
    classes = len(explainer.forest.classes_)
    assert every.attributions.shape == (2, classes, 3) and every.explained.shape == (2, classes)
    assert [row["classes"][0]["class"] for row in every.rows()] == [explainer.preprocessor.classes[i] for i in every.explained[:, 0]]


def test_approximate_attributions_are_labelled_and_rank_like_the_exact_ones(version):
    folder, raw = version
    explainer = ForestExplainer.load(folder)
    approximate = explainer.explain(raw, ExplainOptions(method="approximate", top_k=0))
    assert approximate.approximate and all(row["approximate"] and row["method"] == "approximate" for row in approximate.rows())
    importance = global_importance(explainer, raw, top=5)
    assert len(importance) == 5 and importance[0][1] >= importance[-1][1] > 0


@pytest.mark.parametrize("fields, message", [
    ({"method": "shapley"}, "method must be one of exact, approximate"),
    ({"top_k": -1}, "top_k must be a whole number"),
    ({"top_k": True}, "top_k must be a whole number"),
    ({"classes": "some"}, "classes must be one of predicted, all"),
])
def test_bad_options_are_refused_by_name(fields, message):
    with pytest.raises(InputError, match=message):
        ExplainOptions.parse(fields)


def test_a_version_without_its_forest_cannot_be_explained(version, tmp_path):
    folder, _ = version
    copy = tmp_path / "3"
    shutil.copytree(folder, copy)
    (copy / "model.joblib").unlink()
    with pytest.raises(NotFoundError, match="version 3 keeps no forest"):
        ForestExplainer.load(copy)


def test_importance_is_each_features_absolute_attribution_to_the_predicted_class_in_feature_order(version):
    folder, raw = version
    explainer = ForestExplainer.load(folder)
    for method in ("exact", "approximate"):
        importance = explainer.importance(raw, method)
        explanation = explainer.explain(raw, ExplainOptions(method=method, top_k=0))
        for row in range(len(raw)):
            by_name = dict(zip(explanation.features[row], np.abs(explanation.attributions[row, 0])))
            np.testing.assert_allclose(importance[row], [by_name[name] for name in explainer.feature_names], atol=1e-12)
