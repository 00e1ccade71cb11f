"""The label book: answers and labels kept on disk, labels checked whole, joined once, realised accuracy per version."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kfloop.captures import CaptureArea
from kfloop.data import load_dataset
from kfloop.errors import ConflictError, InputError, NotFoundError
from kfloop.labels import ACCURACY_LABELS_METRIC, LabelBook

CLASSES = {"1": ("a", "b", "c"), "2": ("a", "b", "c", "d")}
NAMES = ("f1", "f2", "f3")


def _book(folder, **options) -> LabelBook:
    return LabelBook(folder, "m", lambda version: CLASSES[version], **options)


def _metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": "m", **labels})


def test_labels_are_checked_as_a_batch_each_refusal_is_named_and_counted_and_nothing_of_a_refused_batch_is_kept(tmp_path):
    book = _book(tmp_path / "book")
    book.answered(["r1:0"], "1", ["a"])  # a one-row request: its inference id alone names it
    book.answered(["r2:0", "r2:1"], "1", ["b", "c"])
    before = {o: _metric("kfloop_labels_total", outcome=o) or 0.0 for o in ("accepted", "unknown_id", "unknown_class", "conflict")}

    with pytest.raises(NotFoundError) as unknown:
        book.add([("r1", "a"), ("r9", "a"), ("r2", "b")])  # r2 has two rows: it needs its row number
    assert str(unknown.value).startswith("2 label(s) refused, none kept: 'r9': no served row has this id")
    assert "'r2': no served row" in str(unknown.value)
    with pytest.raises(InputError) as unknown_class:
        book.add([("r1", "zebra"), ("r9", "a")])
    assert "'r1': 'zebra' is not a class of version 1" in str(unknown_class.value)
    assert book.accuracy() == {}  # r1's good label went with its batch

    assert (book.add([("r1", "a"), ("r2:1", "a")]).accepted, book.add([("r1", "a")]).duplicate) == (2, 1)
    with pytest.raises(ConflictError) as conflict:
        book.add([("r2:1", "c")])
    assert "'r2:1': already labelled 'a', not 'c'" in str(conflict.value)
    after = {o: _metric("kfloop_labels_total", outcome=o) for o in before}
    assert {o: after[o] - before[o] for o in before} == {"accepted": 2, "unknown_id": 3, "unknown_class": 1, "conflict": 1}
    assert book.accuracy() == {"1": {"accuracy": 0.5, "labels": 2}}
    assert _metric("kfloop_realised_accuracy", version="1") == 0.5
    assert _metric("kfloop_realised_accuracy_labels", version="1") == 2


def test_accuracy_counts_the_last_n_labelled_answers_of_each_version_in_the_order_labels_came(tmp_path):
    book = _book(tmp_path / "book", accuracy_window=4)
    book.answered([f"x{i}:0" for i in range(6)], "1", ["a"] * 6)
    book.answered([f"y{i}:0" for i in range(2)], "2", ["d", "d"])
    book.add([(f"x{i}", "b") for i in (5, 4)])  # late and out of order: wrong
    book.add([(f"x{i}", "a") for i in (0, 1, 2, 3)])  # right; the window keeps the last 4
    book.add([("y0", "d"), ("y1", "c")])
    assert book.accuracy() == {"1": {"accuracy": 1.0, "labels": 4}, "2": {"accuracy": 0.5, "labels": 2}}


def test_answers_and_labels_survive_a_restart_and_a_torn_last_line(tmp_path):
    book = _book(tmp_path / "book")
    book.answered(["r1:0", "r1:1"], "1", ["a", "b"])
    book.sync()
    book.add([("r1:0", "a")])
    book.close()
    with open(tmp_path / "book" / "labels.log", "ab") as log:
        log.write(b'{"id": "r1:1", "lab')  # a crash in the middle of an append
    again = _book(tmp_path / "book")
    assert again.accuracy() == {"1": {"accuracy": 1.0, "labels": 1}}
    assert again.add([("r1:0", "a")]).duplicate == 1  # remembered: a resent label changes nothing
    assert again.add([("r1:1", "b")]).accepted == 1


def test_old_answers_are_forgotten_past_max_answers_and_the_log_is_compacted(tmp_path):
    book = _book(tmp_path / "book", max_answers=10)
    for i in range(25):
        book.answered([f"r{i}:0"], "1", ["a"])
    with pytest.raises(NotFoundError):
        book.add([("r0", "a")])
    assert book.add([("r24", "a")]).accepted == 1
    lines = (tmp_path / "book" / "answers.log").read_text().splitlines()
    assert len(lines) <= 20 and {json.loads(line)["ids"][0] for line in lines} >= {f"r{i}:0" for i in range(15, 25)}
    book.close()
    assert _book(tmp_path / "book", max_answers=10).figures().answers == 10


def _captured(area: CaptureArea, ids: list[str], version: str = "1") -> np.ndarray:
    rows = np.arange(len(ids) * 3, dtype=float).reshape(len(ids), 3)
    writer = area.writer(NAMES, flush_rows=10_000)
    writer.add(ids, rows, version)
    writer.flush()
    return rows


def test_labelled_rows_become_one_labelled_shard_once_their_rows_are_captured_and_a_crash_mid_join_writes_it_again(tmp_path):
    area = CaptureArea(str(tmp_path / "captures"), "m", is_local=True)
    book = _book(tmp_path / "book")
    book.answered(["r1:0", "r1:1", "r2:0"], "1", ["a", "b", "c"])
    book.add([("r2", "c"), ("r1:1", "a")])
    assert book.join(area) == []  # labels that came before their rows were flushed wait for the shard
    rows = _captured(area, ["r1:0", "r1:1", "r2:0"])
    [shard] = book.join(area)
    data = load_dataset(str(shard), target="label")
    assert data.ids.tolist() == ["r2:0", "r1:1"] and data.labels.tolist() == ["c", "a"]
    np.testing.assert_array_equal(data.features, rows[[2, 1]])
    served = json.loads(shard.with_name(shard.name + ".meta.json").read_text())["rows"]
    assert served["r1:1"]["version"] == "1" and served["r1:1"]["answered"] == "b"
    assert book.join(area) == []  # joined once

    # A crash after the join was logged and before its shard was written: the restart writes the same shard.
    book.answered(["r3:0"], "1", ["a"])
    book.add([("r3", "a")])
    _captured(area, ["r3:0"])
    [second] = book.join(area)
    book.close()
    second.unlink()
    log = (tmp_path / "book" / "labels.log").read_text().splitlines()
    (tmp_path / "book" / "labels.log").write_text("\n".join(log[:-1]) + "\n")  # the "joined" record never made it
    again = _book(tmp_path / "book")
    assert again.join(area) == [second]
    assert sorted(p.name for p in area.labelled_shards()) == sorted([shard.name, second.name])
    assert again.join(area) == []


def test_a_shadow_versions_answers_are_compared_with_the_served_ones_and_judged_by_the_same_labels(tmp_path):
    book = _book(tmp_path / "book")
    book.answered(["r1:0", "r1:1"], "1", ["a", "b"])
    book.answered(["r1:0", "r1:1"], "2", ["a", "c"], shadow=True)
    book.answered(["r2:0"], "2", ["d"], shadow=True)  # the mirror answered before the served answer was recorded
    book.answered(["r2:0"], "1", ["c"])
    assert book.agreement() == {"2": {"agreement": 1 / 3, "answers": 3}}
    assert _metric("kfloop_shadow_agreement", version="2") == pytest.approx(1 / 3)
    with pytest.raises(InputError):  # a label is a class of the served version ("d" is only version 2's)
        book.add([("r2", "d")])
    book.add([("r1:0", "a"), ("r1:1", "c"), ("r2", "c")])
    assert book.accuracy() == {"1": {"accuracy": 2 / 3, "labels": 3}, "2": {"accuracy": 2 / 3, "labels": 3}}
    book.close()
    again = _book(tmp_path / "book")
    assert again.accuracy() == book.accuracy() and again.agreement() == {"2": {"agreement": 1 / 3, "answers": 3}}


def test_a_label_that_comes_before_the_shadow_s_answer_judges_that_answer_too_once(tmp_path):
    book = _book(tmp_path / "book")
    book.answered(["r1:0"], "1", ["a"])
    book.add([("r1", "b")])  # the client's label, sent as soon as it got its answer
    book.answered(["r1:0"], "2", ["b"], shadow=True)  # the mirrored copy's answer comes after it
    book.answered(["r1:0"], "2", ["b"], shadow=True)  # the same answer recorded again judges nothing twice
    assert book.accuracy() == {"1": {"accuracy": 0.0, "labels": 1}, "2": {"accuracy": 1.0, "labels": 1}}
    assert _metric(ACCURACY_LABELS_METRIC, version="2") == 1
    book.close()
    assert _book(tmp_path / "book").accuracy() == book.accuracy()  # a restart reads the same judgement back


def test_a_join_that_failed_is_written_again_under_its_name_and_later_labels_go_to_another_shard(tmp_path):
    area = CaptureArea(str(tmp_path / "captures"), "m", is_local=True)
    book = _book(tmp_path / "book")
    book.answered(["r1:0", "r2:0"], "1", ["a", "b"])
    _captured(area, ["r1:0", "r2:0"])
    book.add([("r1", "a")])
    (tmp_path / "captures" / "labelled").write_text("a file where the shards' folder belongs")  # the write fails
    with pytest.raises(OSError):
        book.join(area)
    (tmp_path / "captures" / "labelled").unlink()
    book.add([("r2", "b")])
    shards = book.join(area)
    rows = [load_dataset(str(s), target="label").ids.tolist() for s in shards]
    assert sorted(rows) == [["r1:0"], ["r2:0"]]  # each row in one shard only
    assert book.join(area) == [] and book.waiting == 0


def test_on_a_full_disk_a_batch_is_refused_as_temporary_and_nothing_of_it_is_kept(tmp_path):
    from testbed import fill, small_disk

    from kfloop.errors import TemporaryError

    with small_disk(tmp_path / "disk", "1m") as disk:
        book = _book(disk / "book")
        book.answered(["r1:0", "r2:0"], "1", ["a", "b"])
        filler = fill(disk)
        with pytest.raises(TemporaryError, match="send them again"):
            book.add([("r1", "a"), ("r2", "a")])
        with pytest.raises(TemporaryError, match="send them again"):  # more than the log's last page still holds
            book.answered([f"r3:{i}" for i in range(1000)], "1", ["c"] * 1000)
        assert book.accuracy() == {} and book.waiting == 0
        filler.unlink()
        assert book.add([("r1", "a"), ("r2", "a")]).accepted == 2  # the retry is new, not a duplicate
        book.close()
        assert _book(disk / "book").accuracy() == {"1": {"accuracy": 0.5, "labels": 2}}


# --- the figures the watch publishes and the rollout reads (one contract: TruthFigures) ------------------------


def test_the_figures_the_watch_publishes_are_what_the_rollout_reads(tmp_path):
    import http.server
    import threading

    from kfloop.labels import STATUS_KEY, TruthFigures
    from kfloop.policies.rollout import LocalDeployer

    book = LabelBook(tmp_path / "labels", "m", lambda version: ["a", "b"])
    book.answered(["r:0", "r:1", "r:2"], "1", ["a", "a", "b"])
    book.answered(["r:0", "r:1", "r:2"], "2", ["a", "b", "b"], shadow=True)
    book.add([("r:0", "a"), ("r:1", "b"), ("r:2", "b")])
    published = json.dumps({"version": "1", STATUS_KEY: book.figures().to_json()}).encode()  # the watch's /status
    book.close()

    class Watch(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(published)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Watch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        deployer = LocalDeployer("http://127.0.0.1:9", "m", "token", watch_url=f"http://127.0.0.1:{server.server_port}")
        accuracy = deployer.realised_accuracy("1")
        assert accuracy is not None and accuracy == pytest.approx((2 / 3, 3))
        assert deployer.agreement("2") == pytest.approx((2 / 3, 3))  # the shadow agreed with production on 2 of 3
        assert deployer.realised_accuracy("9") is None and deployer.agreement("1") is None
    finally:
        server.shutdown()
        server.server_close()
    figures = TruthFigures.from_status(json.loads(published))
    assert (figures.answers, figures.labels, figures.waiting_to_join) == (3, 3, 3)
    assert TruthFigures.from_status({}) == TruthFigures()  # a watch with no labels yet


def test_figures_of_another_shape_are_an_input_error():
    from kfloop.labels import TruthFigures

    with pytest.raises(InputError, match="no readable 'labels' figures"):
        TruthFigures.from_status({"labels": {"accuracy": {"1": {"share": 0.5}}}})
