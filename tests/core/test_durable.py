"""atomic_write: the target holds the old content or the new one, never a part, and no temporary file stays."""

from __future__ import annotations

import pytest

from kfloop.durable import atomic_write


def test_a_write_replaces_the_content_and_leaves_only_the_target(tmp_path):
    target = tmp_path / "state.json"
    target.write_text('{"runs": 1}')
    atomic_write(target, '{"runs": 2}')
    assert target.read_text() == '{"runs": 2}'
    atomic_write(str(target), b'{"runs": 3}')
    assert target.read_bytes() == b'{"runs": 3}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_text_is_written_as_utf8(tmp_path):
    target = tmp_path / "note.txt"
    atomic_write(target, "Ahorn – Érable")
    assert target.read_bytes() == "Ahorn – Érable".encode("utf-8")


def test_missing_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.csv"
    atomic_write(target, "id\n")
    assert target.read_text() == "id\n"


@pytest.mark.parametrize(("data", "error"), [
    (12345, TypeError),  # fails while writing the temporary file
    ("half \ud800 text", UnicodeEncodeError),  # fails while encoding, before anything is written
], ids=["not-bytes", "unencodable-text"])
def test_a_write_that_fails_leaves_the_old_content_and_no_temporary_file(tmp_path, data, error):
    target = tmp_path / "production.json"
    target.write_text('{"version": "1"}')
    with pytest.raises(error):
        atomic_write(target, data)
    assert target.read_text() == '{"version": "1"}'
    assert [p.name for p in tmp_path.iterdir()] == ["production.json"]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "new.json", object())
    assert list(tmp_path.iterdir()) == []
