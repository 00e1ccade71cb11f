"""Feedback directly: a response event's answers (V1 and V2, shadow or not) are kept under the ids the watch
captured their rows with, and labels are parsed strictly -- every refusal an InputError naming the item."""

from __future__ import annotations

import orjson
import pytest

from kfloop.errors import InputError
from kfloop.labels import LabelBook
from kfloop.serving.events import Delivery, ReceivedEvent
from kfloop.serving.feedback import Feedback


@pytest.fixture
def feedback(tmp_path):
    book = LabelBook(tmp_path / "labels", "leaf", lambda version: ["a", "b", "c"])
    yield Feedback(book, serving_version=lambda: "1")
    book.close()


def response(event_id: str, body: dict, **extensions: str) -> Delivery:
    raw = orjson.dumps(body)
    attributes = {"id": event_id, "type": "org.kubeflow.serving.inference.response", "source": "t", **extensions}
    return Delivery(ReceivedEvent(attributes, body), "application/json", raw)


def test_answers_are_kept_per_row_and_judged_by_later_labels(feedback):
    assert feedback.answered(response("r1", {"predictions": ["a", "b"]})) == 2
    assert feedback.answered(response("r2", {"model_version": "2", "outputs": [
        {"name": "probabilities", "data": [0.1]}, {"name": "label", "data": ["c"]}]})) == 1
    assert feedback.answered(response("r3", {"outputs": [{"name": "probabilities", "data": [0.5]}]})) == 0
    intake = feedback.labels(b'[{"id": "r1:0", "label": "a"}, {"id": "r1:1", "label": "a"}, {"id": "r2:0", "label": "c"}]')
    assert (intake.accepted, intake.duplicate) == (3, 0)
    accuracy = feedback.book.accuracy()
    assert accuracy["1"]["accuracy"] == 0.5 and accuracy["2"]["accuracy"] == 1.0
    assert feedback.labels([{"id": "r1:0", "label": "a"}]).duplicate == 1


@pytest.mark.parametrize("body, message", [
    (b"not json", "labels must be JSON"),
    ([], "labels must be a non-empty JSON list"),
    ([{"id": "r1:0"}], 'label 0 must be an object with exactly "id" and "label"'),
    ([{"id": "r1:0", "label": "a", "extra": 1}], 'label 0 must be an object with exactly "id" and "label"'),
    ([{"id": "x" * 257, "label": "a"}], "label 0: id must be a string of 1 to 256 characters"),
    ([{"id": "r1:0", "label": True}], "label 0: label must be a string of 1 to 256 characters"),
])
def test_malformed_labels_are_input_errors_naming_the_item(feedback, body, message):
    with pytest.raises(InputError, match=message):
        feedback.labels(body)


@pytest.mark.parametrize("body, message", [
    ({"predictions": "a"}, '"predictions" must be a list'),
    ({"answer": 1}, 'must carry a V1 "predictions" or V2 "outputs" list'),
    ({"outputs": [{"name": "label", "data": "a"}]}, 'must carry its "data" as a list'),
])
def test_malformed_answers_are_input_errors(feedback, body, message):
    with pytest.raises(InputError, match=message):
        feedback.answered(response("bad", body))
