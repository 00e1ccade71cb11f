"""ModelBundle and the ONNX export directly: a version folder loads as ONNX or joblib and both runtimes answer the
same classes and probabilities; a folder that is not a version is a RegistryError naming what is missing."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from kfloop.bundle import MODEL_JOBLIB, MODEL_ONNX, PREPROCESSOR, ModelBundle, export_onnx, onnx_agreement
from kfloop.errors import RegistryError
from kfloop.preprocessing import Preprocessor


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    iris = load_iris()
    labels = np.array(iris.target_names)[iris.target]
    preprocessor = Preprocessor.fit(iris.data, labels, tuple(iris.feature_names))
    scaled = preprocessor.transform(iris.data)
    forest = RandomForestClassifier(n_estimators=25, random_state=0).fit(scaled, preprocessor.encode(labels))
    folder = tmp_path_factory.mktemp("version")
    joblib.dump(preprocessor, folder / PREPROCESSOR)
    joblib.dump(forest, folder / MODEL_JOBLIB)
    (folder / MODEL_ONNX).write_bytes(export_onnx(forest, iris.data.shape[1]))
    return folder, iris.data, forest, scaled


def test_the_onnx_graph_agrees_with_the_forest_on_every_row(version):
    folder, _, forest, scaled = version
    assert onnx_agreement((folder / MODEL_ONNX).read_bytes(), forest, scaled) == 1.0


def test_onnx_and_joblib_runtimes_answer_the_same(version):
    folder, rows, _, _ = version
    onnx, plain = ModelBundle.load(folder), ModelBundle.load(folder, prefer_onnx=False)
    assert (onnx.runtime, plain.runtime) == ("onnx", "joblib")
    onnx_labels, onnx_proba = onnx.predict(rows)
    plain_labels, plain_proba = plain.predict(rows)
    assert onnx_labels.tolist() == plain_labels.tolist()
    assert set(onnx_labels) == {"setosa", "versicolor", "virginica"}
    np.testing.assert_allclose(onnx_proba, plain_proba, atol=1e-6)
    assert onnx.version == folder.name  # no metadata.json: the folder's name


def test_a_folder_that_is_not_a_version_says_what_is_missing(tmp_path, version):
    with pytest.raises(RegistryError, match="not a model version \\(no preprocessor.joblib\\)"):
        ModelBundle.load(tmp_path)
    joblib.dump(joblib.load(version[0] / PREPROCESSOR), tmp_path / PREPROCESSOR)
    with pytest.raises(RegistryError, match="no model.onnx or model.joblib"):
        ModelBundle.load(tmp_path)
