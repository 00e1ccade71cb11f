"""The registry's captures area: captured rows written as shards with meta files, labelled shards that are
training data, and training sets of base data plus labelled shards whose base is found again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kfloop.captures import BASE_SHARD, CaptureArea, assemble_training_set, training_base
from kfloop.data import LabelledData, load_dataset
from kfloop.registry import ModelRegistry

FEATURES = ("a", "b")
ISO_MILLIS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"


@pytest.fixture
def area(tmp_path) -> CaptureArea:
    return ModelRegistry(tmp_path / "registry").captures("m")


def area_path(area: CaptureArea) -> Path:
    return Path(area.uri)


def shards(area: CaptureArea) -> list[Path]:
    """Every captured shard in the area, in name order."""
    return area.captured_shards()


def labelled(rows: np.ndarray, labels: list[str], ids: list[str], names=FEATURES) -> LabelledData:
    return LabelledData(np.asarray(rows, dtype=np.float64), np.asarray(labels), tuple(names), "labeller", ids=np.asarray(ids))


def test_the_area_is_the_models_captures_folder_in_the_registry(tmp_path, area):
    assert area.model == "m" and area.is_local
    assert area_path(area) == (tmp_path / "registry" / "m" / "captures").resolve()
    assert area.labelled_shards() == []  # nothing captured yet: no folder


def test_rows_are_buffered_and_written_as_one_shard_with_a_meta_file(area):
    writer = area.writer(FEATURES, flush_rows=3, flush_seconds=3600)
    assert writer.add(["call-1:0", "call-1:1"], np.array([[0.5, 1.0], [2.0, -3.25]]), "1") is False  # under flush_rows
    assert shards(area) == []  # adding only buffers
    assert writer.add(["call-2:0"], np.array([[4.0, 5.0]]), "2") is True  # a shard is due
    writer.flush()
    [shard] = shards(area)
    assert re.fullmatch(r"\d{8}", shard.parent.name) and shard.parent.parent == area_path(area)
    assert re.fullmatch(r"\d{12}-[0-9a-f]{8}\.npz", shard.name)
    captured = area.read(shard)
    assert (captured.ids, captured.feature_names, captured.versions) == (("call-1:0", "call-1:1", "call-2:0"), FEATURES, ("1", "1", "2"))
    np.testing.assert_array_equal(captured.features, [[0.5, 1.0], [2.0, -3.25], [4.0, 5.0]])
    assert all(re.fullmatch(ISO_MILLIS, t) for t in captured.captured_at)
    meta = json.loads(shard.with_name(shard.name + ".meta.json").read_text())
    assert {k: meta[k] for k in ("model", "model_versions", "rows")} == {"model": "m", "model_versions": ["1", "2"], "rows": 3}
    assert re.fullmatch(ISO_MILLIS, meta["first_captured_at"]) and meta["first_captured_at"] <= meta["last_captured_at"]
    assert not list(area_path(area).rglob(".*tmp*"))
    assert writer.flush() is None  # nothing buffered: no empty shard
    assert len(shards(area)) == 1


def test_flush_writes_what_is_buffered_and_returns_where(area):
    writer = area.writer(FEATURES, flush_rows=100, flush_seconds=3600)
    writer.add(["e:0"], np.array([[1.0, 2.0]]), "1")
    written = writer.flush()
    assert [str(p) for p in shards(area)] == [written]


def test_rows_older_than_flush_seconds_make_a_shard_due(area):
    writer = area.writer(FEATURES, flush_rows=100, flush_seconds=0)
    assert writer.due() is False  # nothing buffered
    assert writer.add(["e:0"], np.array([[1.0, 2.0]]), "1") is True
    writer.flush()
    assert writer.due() is False
    assert writer.add(["f:0"], np.array([[3.0, 4.0]]), "1") is True
    writer.flush()
    assert len(shards(area)) == 2


def test_captured_shards_are_not_training_data_until_labelled(area):
    writer = area.writer(FEATURES, flush_rows=1)
    writer.add(["e:0", "e:1"], np.array([[1.0, 2.0], [3.0, 4.0 + 1e-12]]), "1")
    writer.flush()
    [shard] = shards(area)
    assert area.labelled_shards() == []
    named = area.add_labelled(area.read(shard).labelled(["x", "y"]))
    assert area.labelled_shards() == [named]
    data = load_dataset(str(named), target="label")
    assert (data.ids.tolist(), data.labels.tolist()) == (["e:0", "e:1"], ["x", "y"])
    np.testing.assert_array_equal(data.features, [[1.0, 2.0], [3.0, 4.0 + 1e-12]])  # exactly as captured


def test_added_labelled_rows_are_a_shard_that_load_dataset_reads_back(area):
    rows = np.array([[0.1, 0.2], [0.3, 0.4], [1e-9, 123456.789]])
    first = area.add_labelled(labelled(rows, ["x", "y", "x"], ["cap:0", "cap:1", "cap:2"]))
    second = area.add_labelled(labelled(rows[:1] + 1, ["y"], ["cap:3"]))
    assert first.parent == area_path(area) / "labelled" and first.name.startswith("labelled-")
    assert area.labelled_shards() == [first, second]
    data = load_dataset(str(first), target="label")
    assert data.feature_names == FEATURES
    assert (data.ids.tolist(), data.labels.tolist()) == (["cap:0", "cap:1", "cap:2"], ["x", "y", "x"])
    np.testing.assert_array_equal(data.features, rows)  # exact: no digits lost
    assert not list(area_path(area).rglob(".*tmp*"))


def test_a_remote_area_has_no_labelled_shards_a_local_run_can_read():
    assert CaptureArea("s3://bucket/registry/m/captures", "m", is_local=False).labelled_shards() == []


# --- training sets ---------------------------------------------------------------------------------------


@pytest.fixture
def iris_shards(area):
    """Two labelled shards in iris's schema (rows shifted so they differ from the base)."""
    base = load_dataset("builtin:iris")
    first = area.add_labelled(labelled(base.features[:5] + 10, base.labels[:5], [f"cap:{i}" for i in range(5)], base.feature_names))
    second = area.add_labelled(labelled(base.features[:2] + 20, base.labels[:2], ["cap:5", "cap:6"], base.feature_names))
    return base, [first, second]


def test_a_training_set_is_the_base_then_the_labelled_shards_in_one_schema(tmp_path, iris_shards):
    base, labelled_shards = iris_shards
    folder = tmp_path / "run-1" / "data"
    uri, target = assemble_training_set("builtin:iris", None, labelled_shards, folder)
    assert (uri, target) == (str(folder), "label")
    assert sorted(p.name for p in folder.iterdir()) == [
        BASE_SHARD, f"001-{labelled_shards[0].name}", f"002-{labelled_shards[1].name}",
    ]
    data = load_dataset(uri, target=target)
    assert data.rows == base.rows + 7 and data.feature_names == base.feature_names
    np.testing.assert_array_equal(data.features[: base.rows], base.features)
    np.testing.assert_array_equal(data.features[base.rows:], np.vstack([base.features[:5] + 10, base.features[:2] + 20]))
    assert data.labels.tolist() == base.labels.tolist() + base.labels[:5].tolist() + base.labels[:2].tolist()
    assert data.ids.tolist()[:2] == ["base-0", "base-1"] and data.ids.tolist()[-1] == "cap:6"


def test_assembling_again_starts_from_an_empty_folder(tmp_path, iris_shards):
    base, labelled_shards = iris_shards
    folder = tmp_path / "data"
    assemble_training_set("builtin:iris", None, labelled_shards, folder)
    (folder / "999-left-over.csv").write_text("id,label\n")  # a crashed run's leftovers
    uri, target = assemble_training_set("builtin:iris", None, labelled_shards[:1], folder)
    assert sorted(p.name for p in folder.iterdir()) == [BASE_SHARD, f"001-{labelled_shards[0].name}"]
    assert load_dataset(uri, target=target).rows == base.rows + 5


def test_a_base_in_another_format_keeps_its_label_column_name_out_of_the_set(tmp_path, area):
    csv = tmp_path / "base.csv"
    csv.write_text("id,species,a,b\nr1,x,1,2\nr2,y,3,4\n")
    shard = area.add_labelled(labelled([[5.0, 6.0]], ["x"], ["cap:0"]))
    uri, target = assemble_training_set(str(csv), "species", [shard], tmp_path / "set")
    data = load_dataset(uri, target=target)
    assert (target, data.ids.tolist(), data.labels.tolist()) == ("label", ["r1", "r2", "cap:0"], ["x", "y", "x"])


def test_the_base_of_a_training_set_is_its_base_shard_alone(tmp_path, iris_shards):
    base, labelled_shards = iris_shards
    uri, target = assemble_training_set("builtin:iris", None, labelled_shards, tmp_path / "data")
    assert training_base(uri, "label") == (str(tmp_path / "data" / BASE_SHARD), "label")
    again_uri, again_target = training_base(uri, "label")
    assert load_dataset(again_uri, target=again_target).rows == base.rows  # the shards are not added twice


@pytest.mark.parametrize(("source", "target"), [("builtin:iris", None), ("/data/leaf.csv", "species"), ("s3://b/train/", "label")])
def test_any_other_source_is_its_own_base(source, target):
    assert training_base(source, target) == (source, target)
