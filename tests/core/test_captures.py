"""The registry's captures area: captured rows written as shards with meta files, labelled shards that are
training data; rows kept through failed writes and restarts (the journal), retention, and shards that follow
the version's features."""

from __future__ import annotations

import errno
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from testbed import fill, small_disk
from kfloop.capture_journal import JournaledRows, JournalMark
from kfloop.captures import CaptureArea, CaptureRetention
from kfloop.data import LabelledData, load_dataset
from kfloop.errors import TemporaryError
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


def in_the_way(area: CaptureArea) -> Path:
    """A file where today's shard folder must go: writing a shard fails (NotADirectoryError / FileExistsError)."""
    blocker = area_path(area) / f"{datetime.now(timezone.utc):%Y%m%d}"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    return blocker


def test_a_failed_flush_keeps_its_rows_and_a_later_flush_writes_them_all(area):
    writer = area.writer(FEATURES, flush_rows=2, flush_seconds=3600)
    writer.add(["a:0", "a:1"], np.array([[1.0, 2.0], [3.0, 4.0]]), "1")
    blocker = in_the_way(area)
    with pytest.raises(OSError):
        writer.flush()
    assert writer.buffered == 2 and "Error" in writer.last_error
    assert writer.due() is False  # a back-off before the next attempt
    writer.add(["b:0"], np.array([[5.0, 6.0]]), "1")
    blocker.unlink()
    writer.flush()
    [shard] = shards(area)
    assert area.read(shard).ids == ("a:0", "a:1", "b:0")  # in order, none lost, none twice
    assert writer.buffered == 0 and writer.last_error is None


def test_journaled_rows_survive_a_restart_and_their_tags_come_back(tmp_path, area):
    journal = tmp_path / "journal"
    first = area.writer(FEATURES, flush_rows=100, journal=journal)
    first.add(["e:0", "e:1"], np.array([[1.0, 2.0], [3.0, 4.0]]), "1", tag="e key")
    first.add(["f:0"], np.array([[5.0, 6.0]]), "2", tag="f key")
    first.close()  # or a crash: nothing was flushed
    assert shards(area) == []
    second = area.writer(FEATURES, flush_rows=100, journal=journal)
    assert second.recovered_tags == ["e key", "f key"] and second.buffered == 3
    second.flush()
    [shard] = shards(area)
    rows = area.read(shard)
    assert (rows.ids, rows.versions) == (("e:0", "e:1", "f:0"), ("1", "1", "2"))
    np.testing.assert_array_equal(rows.features, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    third = area.writer(FEATURES, flush_rows=100, journal=journal)  # written rows are not buffered again ...
    assert third.buffered == 0 and third.recovered_tags == ["e key", "f key"]  # ... but their tags count until released
    third.release()
    assert area.writer(FEATURES, journal=journal).recovered_tags == []
    assert len(shards(area)) == 1


def test_adds_and_marks_come_back_in_journal_order_once_after_a_restart(tmp_path, area):
    journal = tmp_path / "journal"
    first = area.writer(FEATURES, flush_rows=100, journal=journal)
    first.add(["e:0", "e:1"], np.array([[1.0, 2.0], [3.0, 4.0]]), "1", tag="e")
    first.mark("e:1", "tested")
    first.add(["f:0"], np.array([[5.0, 6.0]]), "2", tag="f")
    first.close()  # or a crash
    second = area.writer(FEATURES, flush_rows=100, journal=journal)
    e, mark, f = second.take_recovered()
    assert isinstance(e, JournaledRows) and (e.ids, e.feature_names, e.version) == (("e:0", "e:1"), FEATURES, "1")
    np.testing.assert_array_equal(e.rows, [[1.0, 2.0], [3.0, 4.0]])
    assert abs(e.captured_at - time.time()) < 60
    assert mark == JournalMark("e:1", "tested")
    assert isinstance(f, JournaledRows) and (f.ids, f.version) == (("f:0",), "2")
    assert second.take_recovered() == []  # handed over once
    assert second.recovered_tags == ["e", "f"] and second.buffered == 3  # a mark is no row


def test_release_keeps_the_written_segments_the_last_rows_are_in_and_they_come_back_but_are_not_written_again(tmp_path, area):
    journal = tmp_path / "journal"
    writer = area.writer(FEATURES, flush_rows=100, journal=journal)
    writer.add(["a:0", "a:1", "a:2"], np.zeros((3, 2)), "1", tag="a")
    writer.flush()
    writer.add(["b:0", "b:1"], np.ones((2, 2)), "1", tag="b")
    writer.mark("b:1", "tested")
    writer.flush()
    writer.add(["c:0"], np.full((1, 2), 2.0), "1", tag="c")  # not in a shard yet
    writer.release(keep_rows=3)  # c's segment and b's hold the last 3 rows: a's goes
    writer.close()
    again = area.writer(FEATURES, flush_rows=100, journal=journal)
    recovered = again.take_recovered()
    assert [entry.ids for entry in recovered if isinstance(entry, JournaledRows)] == [("b:0", "b:1"), ("c:0",)]
    assert JournalMark("b:1", "tested") in recovered
    assert again.recovered_tags == ["b", "c"] and again.buffered == 1  # b is in a shard already
    again.flush()
    assert [area.read(shard).ids for shard in shards(area)] == [("a:0", "a:1", "a:2"), ("b:0", "b:1"), ("c:0",)]
    again.release()  # keep nothing
    again.close()
    assert area.writer(FEATURES, journal=journal).take_recovered() == []


def test_a_torn_journal_record_is_skipped_and_the_records_before_it_are_kept(tmp_path, area):
    journal = tmp_path / "journal"
    writer = area.writer(FEATURES, journal=journal)
    writer.add(["e:0"], np.array([[1.0, 2.0]]), "1", tag="e")
    writer.add(["f:0"], np.array([[3.0, 4.0]]), "1", tag="f")
    writer.close()
    [segment] = journal.glob("*.wal")
    segment.write_bytes(segment.read_bytes()[:-5])  # a crash in the middle of the last write
    again = area.writer(FEATURES, journal=journal)
    assert again.recovered_tags == ["e"] and again.buffered == 1
    again.add(["g:0"], np.array([[5.0, 6.0]]), "1", tag="g")  # into a new segment: the torn one is never appended to
    again.flush()
    assert area.read(shards(area)[0]).ids == ("e:0", "g:0")


def test_rows_that_cannot_be_journaled_are_refused_and_nothing_is_buffered(tmp_path, area):
    with small_disk(tmp_path / "disk", "1m") as disk:
        writer = area.writer(FEATURES, journal=disk / "journal")
        writer.add(["e:0"], np.array([[1.0, 2.0]]), "1", tag="e")
        filler = fill(disk)
        with pytest.raises(TemporaryError, match="cannot be journaled") as refused:
            writer.add([f"f:{i}" for i in range(1000)], np.random.rand(1000, 2), "1", tag="f")  # 16 KB: new pages
        assert isinstance(refused.value.__cause__, OSError) and refused.value.__cause__.errno == errno.ENOSPC
        assert writer.buffered == 1
        filler.unlink()
        writer.add(["f:0"], np.array([[3.0, 4.0]]), "1", tag="f")  # the retry is taken
        writer.close()
        assert area.writer(FEATURES, journal=disk / "journal").recovered_tags == ["e", "f"]  # no torn record between


def test_rows_waiting_for_a_shard_that_cannot_be_written_are_bounded(area):
    writer = area.writer(FEATURES, flush_rows=2)
    assert writer.max_buffered_rows == 40
    in_the_way(area)
    for start in range(0, 40, 2):
        writer.add([f"e:{start}", f"e:{start + 1}"], np.zeros((2, 2)), "1")
    with pytest.raises(OSError):
        writer.flush()
    with pytest.raises(TemporaryError, match="40 rows wait for a shard that cannot be written"):
        writer.add(["f:0"], np.zeros((1, 2)), "1")


# --- the schema follows the serving version ----------------------------------------------------------


def test_rows_after_a_version_change_are_written_with_the_new_versions_features(tmp_path, area):
    writer = area.writer(("a", "b"), flush_rows=100, journal=tmp_path / "journal")
    writer.add(["v1:0"], np.array([[1.0, 2.0]]), "1")
    writer.follow(("a", "b", "c"))
    writer.add(["v2:0"], np.array([[3.0, 4.0, 5.0]]), "2")
    writer.close()
    writer = area.writer(("a", "b", "c"), flush_rows=100, journal=tmp_path / "journal")  # after a restart too
    writer.flush()
    first, second = (area.read(shard) for shard in shards(area))
    by_version = {rows.versions[0]: rows for rows in (first, second)}
    assert by_version["1"].feature_names == ("a", "b") and by_version["2"].feature_names == ("a", "b", "c")
    np.testing.assert_array_equal(by_version["2"].features, [[3.0, 4.0, 5.0]])
    labelled_shard = area.add_labelled(by_version["2"].labelled(["x"]))
    assert labelled_shard.read_text().splitlines()[0] == "id,label,a,b,c"


# --- retention -------------------------------------------------------------------------------------


def sample(name: str, model: str = "m", **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model, **labels}) or 0.0


def aged(path: Path, days: float) -> Path:
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp))
    return path


def captured_shard(area: CaptureArea, row_id: str, rows: int = 50) -> Path:
    writer = area.writer(FEATURES, flush_rows=rows)
    writer.add([f"{row_id}:{i}" for i in range(rows)], np.random.rand(rows, 2), "1")
    return Path(writer.flush())


def test_retention_removes_shards_older_than_max_age_of_both_kinds_and_counts_them(tmp_path):
    area = ModelRegistry(tmp_path / "registry").captures("aging")
    old = aged(captured_shard(area, "old"), 10)
    aged(old.with_name(old.name + ".meta.json"), 10)
    young = captured_shard(area, "young")
    old_label = aged(area.add_labelled(labelled([[1.0, 2.0]], ["x"], ["l:0"])), 10)
    young_label = area.add_labelled(labelled([[1.0, 2.0]], ["x"], ["l:1"]))
    sweep = area.enforce(CaptureRetention(max_age_days=7))
    assert sweep.removed_shards == 2 and sweep.kept_shards == 2
    assert shards(area) == [young] and area.labelled_shards() == [young_label]
    assert not old.with_name(old.name + ".meta.json").exists() and not old_label.exists()
    assert sample("kfloop_capture_retention_removed_shards_total", "aging", kind="captured") == 1
    assert sample("kfloop_capture_retention_removed_shards_total", "aging", kind="labelled") == 1
    assert sample("kfloop_capture_retention_removed_bytes_total", "aging", kind="captured") > 0
    assert sample("kfloop_capture_stored_shards", "aging") == 2
    assert sample("kfloop_capture_stored_bytes", "aging") == sweep.kept_bytes


def test_over_max_bytes_the_oldest_captured_shards_go_first_and_labelled_ones_only_when_those_do_not_suffice(tmp_path):
    area = ModelRegistry(tmp_path / "registry").captures("budget")
    label = aged(area.add_labelled(labelled(np.random.rand(50, 2), ["x"] * 50, [f"l:{i}" for i in range(50)])), 3)
    captured = [aged(captured_shard(area, f"c{i}"), 2 - i) for i in range(3)]  # c0 the oldest
    sizes = {path: path.stat().st_size + path.with_name(path.name + ".meta.json").stat().st_size for path in captured}
    total = sum(sizes.values()) + label.stat().st_size
    area.enforce(CaptureRetention(max_bytes=total - 1))
    assert shards(area) == captured[1:] and area.labelled_shards() == [label]  # the oldest captured one, not the label
    area.enforce(CaptureRetention(max_bytes=label.stat().st_size))
    assert shards(area) == [] and area.labelled_shards() == [label]
    area.enforce(CaptureRetention(max_bytes=label.stat().st_size - 1))
    assert area.labelled_shards() == []
    assert not [p for p in area_path(area).iterdir() if p.is_dir() and p.name.isdigit()]  # empty day folders go too


def test_the_writer_enforces_retention_after_a_shard_breaks_max_bytes(tmp_path):
    area = ModelRegistry(tmp_path / "registry").captures("writer")
    one = captured_shard(area, "probe")
    shard_bytes = one.stat().st_size + one.with_name(one.name + ".meta.json").stat().st_size
    writer = area.writer(FEATURES, flush_rows=50, retention=CaptureRetention(max_bytes=int(shard_bytes * 1.5)))
    for batch in range(4):
        writer.add([f"b{batch}:{i}" for i in range(50)], np.random.rand(50, 2), "1")
        writer.flush()
    kept = shards(area)
    assert len(kept) == 1 and area.read(kept[0]).ids[0] == "b3:0"  # the newest
    assert sample("kfloop_capture_retention_removed_shards_total", "writer", kind="captured") == 4  # the probe too


def test_a_remote_area_is_not_swept():
    remote = CaptureArea("s3://bucket/registry/m/captures", "m", is_local=False)
    assert remote.enforce(CaptureRetention(max_bytes=1)).removed_shards == 0
