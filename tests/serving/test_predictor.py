"""The predictor model in-process, as a predictor server runs it: one registry version's forest on scaled
rows, V1 and V2 answers with the outputs asked for, rows scaled for another version refused with the version
it serves, and fault injection."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from kserve import InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

from testbed import register_version
from kfloop.data import load_dataset
from kfloop.errors import HttpAnswer, InjectedFailure, InputError, NotFoundError, VersionMismatch, is_temporary, to_http
from kfloop.registry import ModelRegistry
from kfloop.serving.predictor import ForestPredictor


def predict(predictor: ForestPredictor, payload):
    """What the model server does with a request: await the model's predict."""
    return asyncio.run(predictor.predict(payload))


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """Registry version 1 of model 'iris'; 15 raw rows, the same rows scaled, and the version's own answers."""
    root = tmp_path_factory.mktemp("predictor")
    register_version(root / "registry", "iris", "builtin:iris", n_estimators=10, work=root / "v1")
    store = ModelRegistry(root / "registry")
    bundle = store.load("iris", "1")
    rows = load_dataset("builtin:iris").features[::10]
    labels, proba = bundle.predict(rows)
    return {"store": store, "scaled": bundle.preprocessor.transform(rows), "labels": labels.tolist(), "proba": proba}


@pytest.fixture
def predictor(version) -> ForestPredictor:
    model = ForestPredictor("iris", version["store"].uri("iris", "1"))
    assert model.load() is True and model.ready
    return model


def features(rows: np.ndarray, name: str = "features") -> InferInput:
    return InferInput(name, list(rows.shape), "FP32", data=rows.ravel().tolist())


def answer(predictor: ForestPredictor, request: InferRequest) -> dict:
    """The V2 REST body of the predictor's answer (``to_rest`` gives the body and, for binary outputs, its length)."""
    body, _ = predict(predictor, request).to_rest()
    return body


def test_the_model_declares_its_input_and_outputs(predictor):
    assert predictor.version == "1"
    assert predictor.get_input_types() == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert predictor.get_output_types() == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "class_index", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]


def test_v1_scaled_rows_get_the_versions_labels(predictor, version):
    assert predict(predictor, {"instances": version["scaled"].tolist()}) == {"predictions": version["labels"]}


def test_v2_answers_label_class_index_and_probabilities_of_the_version(predictor, version):
    body = answer(predictor, InferRequest("iris", [features(version["scaled"])], request_id="call-1"))
    assert (body["id"], body["model_name"], body["model_version"]) == ("call-1", "iris", "1")
    outputs = {o["name"]: o for o in body["outputs"]}
    assert [o["name"] for o in body["outputs"]] == ["label", "class_index", "probabilities"]
    assert (outputs["label"]["datatype"], outputs["label"]["shape"], outputs["label"]["data"]) == ("BYTES", [15], version["labels"])
    classes = ("setosa", "versicolor", "virginica")
    assert [classes[i] for i in outputs["class_index"]["data"]] == version["labels"]
    assert (outputs["probabilities"]["datatype"], outputs["probabilities"]["shape"]) == ("FP32", [15, 3])
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (15, 3)), version["proba"], atol=1e-6)


def test_v2_answers_only_the_outputs_asked_for(predictor, version):
    request = InferRequest("iris", [features(version["scaled"])], request_outputs=[RequestedOutput("label")])
    assert [o["name"] for o in answer(predictor, request)["outputs"]] == ["label"]
    unknown = InferRequest("iris", [features(version["scaled"])], request_outputs=[RequestedOutput("scores")])
    with pytest.raises(InputError) as caught:
        predict(predictor, unknown)
    assert str(caught.value) == ("unknown output(s) ['scores']; this model has label, class_index, probabilities, "
                                 "attributions, attribution_features, base_values, explained_class")


def test_of_rows_scaled_for_several_versions_the_predictor_uses_its_own(predictor, version):
    other = np.full_like(version["scaled"], 50.0)  # what another version's scaler might make of the rows
    request = InferRequest("iris", [features(other, "features@2"), features(version["scaled"], "features@1")])
    labels = next(o for o in answer(predictor, request)["outputs"] if o["name"] == "label")["data"]
    assert labels == version["labels"]


def test_rows_scaled_only_for_other_versions_are_refused_naming_the_version_served(predictor, version):
    request = InferRequest("iris", [features(version["scaled"], "features@3"), features(version["scaled"], "features@2")])
    with pytest.raises(VersionMismatch) as caught:
        predict(predictor, request)
    message = "this predictor serves version 1; the request has features scaled for version(s) ['2', '3']"
    assert to_http(caught.value) == HttpAnswer(409, {"error": message}, {"x-kfloop-model-version": "1"})


def test_a_request_pinned_to_the_predictors_version_is_answered(predictor, version):
    assert predictor.served_versions() == ("1",)
    body = answer(predictor, InferRequest("iris", [features(version["scaled"])], model_version="1"))
    assert body["model_version"] == "1"
    assert next(o for o in body["outputs"] if o["name"] == "label")["data"] == version["labels"]


@pytest.mark.parametrize("pinned", ["2", "latest"])
def test_a_request_pinned_to_another_version_is_not_found(predictor, version, pinned):
    with pytest.raises(NotFoundError) as caught:
        predict(predictor, InferRequest("iris", [features(version["scaled"])], model_version=pinned))
    assert to_http(caught.value) == HttpAnswer(404, {"error": f"model 'iris' has no version '{pinned}' here; versions served: 1"})


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x00\x01", "request body is not JSON: send Content-Type: application/json"),
    ({"instances": [[1.0]]}, "instance 0 has 1 values; expected 4 numbers per row (sepal length (cm)..petal width (cm))"),
    ({"instances": [[1.0, 2.0, float("nan"), 4.0]]}, "row 0, feature 'petal length (cm)': nan is not a finite number"),
])
def test_an_unusable_v1_request_is_an_input_error(predictor, payload, message):
    with pytest.raises(InputError) as caught:
        predict(predictor, payload)
    assert str(caught.value) == message


def test_with_fault_injection_on_every_request_fails_temporarily(predictor, version):
    predictor.failure_rate = 1.0
    with pytest.raises(InjectedFailure) as caught:
        predict(predictor, {"instances": version["scaled"].tolist()})
    assert str(caught.value) == "injected failure: fault injection is on for this predictor"
    assert (caught.value.status, is_temporary(caught.value)) == (503, True)
    predictor.failure_rate = 0.0
    assert predict(predictor, {"instances": version["scaled"].tolist()}) == {"predictions": version["labels"]}
