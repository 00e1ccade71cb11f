"""The step every alarm waits for, in process: WatchService.join_labels_for_retraining writes the rows still
buffered and joins the labels that wait for them into a labelled shard, so the retraining an alarm starts reads
every label kept so far."""

from __future__ import annotations

import csv

import orjson

from kfloop.data import load_dataset
from kfloop.event_types import REQUEST_EVENT, RESPONSE_EVENT
from kfloop.serving.events import Delivery, ReceivedEvent
from kfloop.serving.watch import WatchConfig, WatchService


def delivery(event_id: str, event_type: str, body: dict) -> Delivery:
    attributes = {"specversion": "1.0", "id": event_id, "type": event_type, "source": "test"}
    return Delivery(ReceivedEvent(attributes, body), "application/json", orjson.dumps(body))


def test_the_labels_of_buffered_rows_reach_a_labelled_shard_only_through_the_named_step(registry_with_weak_v1, tmp_path):
    registry, _, _ = registry_with_weak_v1
    rows = load_dataset("builtin:digits").features[:3]
    service = WatchService(WatchConfig(registry_uri=str(registry), model="digits", sink_url="http://127.0.0.1:9/",
                                       state_dir=tmp_path / "state"))
    try:
        assert service.handle(delivery("r1", REQUEST_EVENT, {"instances": rows.tolist()})).status == 202
        assert service.handle(delivery("r1", RESPONSE_EVENT, {"predictions": ["0", "1", "2"]})).status == 202
        intake = service.take_labels([{"id": "r1:0", "label": "0"}, {"id": "r1:2", "label": "7"}])
        assert intake.accepted == 2
        area = service.registry.captures("digits")
        assert area.labelled_shards() == [] and service.labels.waiting == 2  # the rows are still buffered

        service.join_labels_for_retraining()

        assert service.labels.waiting == 0
        [shard] = area.labelled_shards()
        with open(shard) as handle:
            joined = {row["id"]: row["label"] for row in csv.DictReader(handle)}
        assert joined == {"r1:0": "0", "r1:2": "7"}
    finally:
        service.close()
