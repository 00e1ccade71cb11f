"""Ground truth at the watch: the model's answers from response events, and labels from clients.

What comes in is parsed here and kept by the model's :class:`~kfloop.labels.LabelBook`:

* **answers** -- the payload logger's response events (``org.kubeflow.serving.inference.response``),
  V1 ``{"predictions": [...]}`` or V2 with a ``label`` output: row ``i`` of the event ``<ce-id>`` is
  ``<ce-id>:<i>``, as the watch captured the request's rows. The version that answered is the V2
  ``model_version``, else the event's ``modelversion`` extension (kfloop's transformer sets it), else the
  version the watch follows. An event with the extension ``shadow: true`` is a shadow version's answer to a
  mirrored copy of the request (the transformer sends it; no client saw it). An answer without a ``label`` output (a client asked for probabilities
  only) is not recorded: there is nothing to judge.
* **labels** -- ``[{"id": ..., "label": ...}, ...]``: the body of ``POST /v2/models/{model}/labels``, or
  the data of an ``io.kfloop.label`` CloudEvent. Ids and labels are strings (a whole-number label is
  taken as its digits). At most :data:`~kfloop.labels.MAX_LABELS_PER_REQUEST` labels at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from kfloop.errors import InputError
from kfloop.labels import LabelBook, LabelIntake
from kfloop.serving.events import Delivery
from kfloop.serving.protocol import LABEL_OUTPUT

__all__ = ["Feedback"]


class Feedback:
    """One model's answers and labels, as the watch receives them."""

    def __init__(self, book: LabelBook, serving_version: Callable[[], str]) -> None:
        self.book = book
        self.serving_version = serving_version

    def answered(self, delivery: Delivery) -> int:
        """Record a response event's answers; returns how many rows it answered (0: none to record)."""
        body = delivery.event.get_data()
        if isinstance(body, (bytes, bytearray)):
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise InputError("a response event's data must be the JSON answer") from None
        if not isinstance(body, dict):
            raise InputError("a response event's data must be a JSON object (a V1 or V2 answer)")
        predicted = _answers(body)
        if not predicted:
            return 0
        version = str(body.get("model_version") or delivery.event.get("modelversion") or self.serving_version())
        event_id = delivery.event["id"]
        shadow = delivery.event.get("shadow") == "true"  # a shadow version's answer to a mirrored copy
        self.book.answered([f"{event_id}:{i}" for i in range(len(predicted))], version, predicted, shadow=shadow)
        return len(predicted)

    def labels(self, body: Any) -> LabelIntake:
        """Keep the labels of one request or event (all or none: :meth:`LabelBook.add`)."""
        if isinstance(body, (bytes, bytearray, str)):
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"labels must be JSON: {exc}") from None
        if not isinstance(body, list) or not body:
            raise InputError('labels must be a non-empty JSON list: [{"id": "<x-request-id>", "label": "<class>"}, ...]')
        items = []
        for number, item in enumerate(body):
            if not isinstance(item, dict) or set(item) - {"id", "label"} or "id" not in item or "label" not in item:
                raise InputError(f'label {number} must be an object with exactly "id" and "label", got {_shown(item)}')
            items.append((_text(item["id"], f"label {number}: id"), _text(item["label"], f"label {number}: label")))
        return self.book.add(items)


def _answers(body: dict[str, Any]) -> list[str]:
    if "predictions" in body:
        predictions = body["predictions"]
        if not isinstance(predictions, list):
            raise InputError('a V1 answer\'s "predictions" must be a list')
        return [str(p) for p in predictions]
    outputs = body.get("outputs")
    if not isinstance(outputs, list):
        raise InputError('a response event must carry a V1 "predictions" or V2 "outputs" list')
    for output in outputs:
        if isinstance(output, dict) and output.get("name") == LABEL_OUTPUT:
            data = output.get("data")
            if not isinstance(data, list):
                raise InputError(f'the V2 output "{LABEL_OUTPUT}" must carry its "data" as a list')
            return [str(p) for p in data]
    return []


def _text(value: Any, what: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= 256:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{what} must be a string of 1 to 256 characters, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
