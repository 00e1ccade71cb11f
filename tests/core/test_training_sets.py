"""Training sets: base data plus labelled capture shards made one set, the newest label of a row winning, shards
aligned to the base's features, and the base of a set found again."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kfloop.captures import BASE_SHARD, CaptureArea
from kfloop.data import LabelledData, load_dataset
from kfloop.registry import ModelRegistry
from kfloop.training_sets import assemble_training_set, training_base

FEATURES = ("a", "b")


@pytest.fixture
def area(tmp_path) -> CaptureArea:
    return ModelRegistry(tmp_path / "registry").captures("m")


def labelled(rows, labels: list[str], ids: list[str], names=FEATURES) -> LabelledData:
    return LabelledData(np.asarray(rows, dtype=np.float64), np.asarray(labels), tuple(names), "labeller", ids=np.asarray(ids))


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


def test_the_newest_label_of_a_row_wins_over_the_base_and_older_shards(tmp_path, area):
    """Truth correction: labels from the field relabel the base's identical rows, the last shard's label of a
    row counts, and the corrected base is what the next run starts from."""
    base = load_dataset("builtin:iris")
    first = area.add_labelled(labelled(base.features[:3], ["virginica", "virginica", "setosa"], ["c:0", "c:1", "c:2"],
                                       base.feature_names), name="labelled-b")
    second = area.add_labelled(labelled(np.vstack([base.features[:1], base.features[:1] + 50]), ["versicolor", "setosa"],
                                        ["c:3", "c:4"], base.feature_names), name="labelled-a")  # newer, first by name
    os.utime(first, ns=(10**18, 10**18))
    os.utime(second, ns=(2 * 10**18, 2 * 10**18))
    # A join's shard, written last but its row labelled first (its .meta.json says when): it loses.
    late = area.add_labelled(labelled(base.features[1:2], ["setosa"], ["c:5"], base.feature_names), name="labelled-z",
                             meta={"rows": {"c:5": {"labelled_at": 1.0}}})
    uri, target = assemble_training_set("builtin:iris", None, [second, late, first], tmp_path / "data")
    data = load_dataset(uri, target=target)
    assert data.rows == base.rows + 1  # only the row new to the base is added
    expected = base.labels.copy()
    same = lambda row: np.all(base.features == row, axis=1)  # noqa: E731 -- iris repeats some rows
    expected[same(base.features[1])] = "virginica"
    expected[same(base.features[0])] = "versicolor"  # the second shard's label, newer than the first's
    assert data.labels[: base.rows].tolist() == expected.tolist()
    assert (data.ids[-1], data.labels[-1]) == ("c:4", "setosa")
    np.testing.assert_array_equal(data.features[: base.rows], base.features)
    base_uri, base_target = training_base(uri, target)
    again = load_dataset(base_uri, target=base_target)
    assert again.labels.tolist() == expected.tolist()  # the correction carries on into the next run's base


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


# --- rows are not lost: failed writes, the journal, restarts -------------------------------------------


def test_a_training_set_aligns_shards_to_the_bases_features_and_leaves_out_those_that_lack_some(tmp_path, area):
    base = tmp_path / "base.csv"
    base.write_text("id,label,a,b\nr1,x,1,2\nr2,y,3,4\n")
    reordered = area.add_labelled(labelled([[6.0, 7.0, 5.0]], ["y"], ["cap:1"], names=("b", "c", "a")))
    older = area.add_labelled(labelled([[9.0]], ["x"], ["cap:2"], names=("a",)))  # labelled for a version without b
    same = area.add_labelled(labelled([[10.0, 11.0]], ["x"], ["cap:3"]))
    uri, target = assemble_training_set(str(base), "label", [reordered, older, same], tmp_path / "set")
    data = load_dataset(uri, target=target)
    assert data.feature_names == ("a", "b")
    assert data.ids.tolist() == ["r1", "r2", "cap:1", "cap:3"]
    np.testing.assert_array_equal(data.features[2:], [[5.0, 6.0], [10.0, 11.0]])
    assert training_base(uri, target) == (str(tmp_path / "set" / BASE_SHARD), "label")
