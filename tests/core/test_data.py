"""The data loader: every format, and a clear DataError naming file, row and column for bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from kfloop.data import check_class_counts, load_dataset
from kfloop.errors import DataError


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


GOOD_CSV = "id,label,a,b\n1,x,0.1,1\n2,y,0.2,2\n3,x,0.3,3\n4,y,0.4,4\n"


def test_builtin_default_is_scikit_learn_digits():
    data = load_dataset(None)
    assert data.source == "builtin:digits"
    assert data.features.shape == (1797, 64)
    assert len(data.classes) == 10


def test_generic_csv_with_target_keeps_ids_out_of_the_features(tmp_path):
    data = load_dataset(write(tmp_path / "d.csv", GOOD_CSV), target="label")
    assert data.feature_names == ("a", "b")
    assert data.labels.tolist() == ["x", "y", "x", "y"]
    assert data.ids.tolist() == ["1", "2", "3", "4"]
    np.testing.assert_allclose(data.features[:, 1], [1, 2, 3, 4])


def test_generic_csv_without_target_says_to_pass_one(tmp_path):
    path = write(tmp_path / "d.csv", GOOD_CSV)
    with pytest.raises(DataError, match=r"d\.csv: cannot tell which column is the label: pass --target"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"d\.csv: file is empty"),
        ("id,label,a\n", r"d\.csv: has a header but no data rows"),
        ("id,label,a\n1,x,0.5\n2,y,abc\n", r"d\.csv, row 3, column 'a': non-numeric value 'abc'"),
        ("id,label,a\n1,x,0.5\n2,y,\n", r"d\.csv, row 3, column 'a': missing value \(NaN\)"),
        ("id,label,a\n1,x,NaN\n2,y,1\n", r"d\.csv, row 2, column 'a': missing value \(NaN\)"),
        ("id,label,a\n1,x,inf\n2,y,1\n", r"d\.csv, row 2, column 'a': infinite value 'inf'"),
        ("id,label,a\n1,x,1\n1,y,2\n", r"d\.csv, row 3, column 'id': duplicate id '1' \(first seen on row 2\)"),
        ("id,label,a\n1,x,1\n2,,2\n", r"d\.csv, row 3, column 'label': missing label"),
        ("id,other,a\n1,x,1\n", r"d\.csv, column 'label': target column is missing"),
    ],
    ids=["empty", "header-only", "non-numeric", "blank", "nan", "inf", "duplicate-id", "missing-label", "no-target"],
)
def test_bad_csv_names_file_row_and_column(tmp_path, text, message):
    path = write(tmp_path / "d.csv", text)
    with pytest.raises(DataError, match=message):
        load_dataset(path, target="label")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file or folder"):
        load_dataset(str(tmp_path / "nope.csv"))


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(DataError, match="choose one of digits, iris, wine"):
        load_dataset("builtin:mnist")


def test_classes_with_too_few_rows_are_named(tmp_path):
    rows = "".join(f"{i},{'rare' if i == 0 else ('x' if i % 2 else 'y')},{i}\n" for i in range(20))
    data = load_dataset(write(tmp_path / "d.csv", "id,label,a\n" + rows), target="label")
    with pytest.raises(DataError, match=r"d\.csv: classes with too few rows .* \(need >= 7 each\): 'rare' \(1\)"):
        check_class_counts(data, 7)


def test_shards_are_concatenated_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "001.csv", "id,label,a\n1,x,1\n2,y,2\n")
    write(shards / "002.csv", "id,label,a\n3,x,3\n")
    data = load_dataset(str(shards), target="label")
    assert data.ids.tolist() == ["1", "2", "3"]
    assert data.features[:, 0].tolist() == [1, 2, 3]


def test_shard_with_another_schema_is_refused(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "001.csv", "id,label,a\n1,x,1\n")
    write(shards / "002.csv", "id,label,b\n2,x,1\n")
    with pytest.raises(DataError, match=r"002\.csv: shard schema differs from .*001\.csv: missing \['a'\], extra \['b'\]"):
        load_dataset(str(shards), target="label")


def test_duplicate_id_across_shards_is_refused(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "001.csv", "id,label,a\n1,x,1\n")
    write(shards / "002.csv", "id,label,a\n1,y,2\n")
    with pytest.raises(DataError, match=r"002\.csv, row 2, column 'id': duplicate id '1' \(also in .*001\.csv\)"):
        load_dataset(str(shards), target="label")


def test_kaggle_leaf_csv_is_recognised(shared_data):
    data = load_dataset(str(shared_data / "kaggle_leaf_train.csv"))
    assert data.features.shape == (990, 192)
    assert len(data.classes) == 99
    assert data.feature_names[:2] == ("margin1", "margin2") and data.feature_names[-1] == "texture64"


def test_uci_folder_joins_three_files_and_drops_the_unalignable_species(shared_data):
    data = load_dataset(str(shared_data))
    assert data.features.shape == (1584, 192)
    assert len(data.classes) == 99
    assert "Acer_Campestre" not in data.classes
    assert any("Acer_Campestre" in note for note in data.notes)


def test_uci_rows_match_the_kaggle_rows_of_the_same_leaves(shared_data):
    kaggle = load_dataset(str(shared_data / "kaggle_leaf_train.csv"))
    uci = load_dataset(str(shared_data))
    assert kaggle.feature_names == uci.feature_names
    # Every Kaggle margin vector is a UCI margin vector of the same species.
    by_margin = {tuple(np.round(row[:64], 6)): label for row, label in zip(uci.features, uci.labels)}
    matched = [by_margin.get(tuple(np.round(row[:64], 6))) == label for row, label in zip(kaggle.features, kaggle.labels)]
    assert np.mean(matched) == 1.0


def test_uci_zip_loads_like_the_folder(shared_data, tmp_path):
    archive = tmp_path / "100-leaves.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for part in ("Mar", "Sha", "Tex"):
            zf.write(shared_data / f"uci100_data_{part}_64.txt", f"100 leaves plant species/data_{part}_64.txt")
    assert load_dataset(str(archive)).features.shape == (1584, 192)


def test_incomplete_uci_folder_names_the_missing_file(shared_data, tmp_path):
    folder = tmp_path / "uci"
    folder.mkdir()
    (folder / "data_Mar_64.txt").write_bytes((shared_data / "uci100_data_Mar_64.txt").read_bytes())
    with pytest.raises(DataError, match=r"missing data_Sha_64\.txt, data_Tex_64\.txt"):
        load_dataset(str(folder))


def test_fingerprint_changes_with_the_data(tmp_path):
    first = load_dataset(write(tmp_path / "a.csv", GOOD_CSV), target="label")
    again = load_dataset(write(tmp_path / "b.csv", GOOD_CSV), target="label")
    other = load_dataset(write(tmp_path / "c.csv", GOOD_CSV.replace("0.4", "0.5")), target="label")
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
