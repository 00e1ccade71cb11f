"""``kfloop explain`` as a user runs it: rows of a CSV explained from a registry version (JSON that adds up,
and a table), the same rows asked of a running transformer, and a CSV without the model's columns is one
line naming the file and the column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kfloop.data import LabelledData, save_csv

pytestmark = pytest.mark.slow


@pytest.fixture
def rows_csv(stack, tmp_path):
    holdout = stack["holdout"]
    names = tuple(stack["registry"].metadata("leaf", "1")["feature_names"])
    path = tmp_path / "rows.csv"
    save_csv(LabelledData(holdout.holdout_features[:3], holdout.holdout_labels[:3], names, "test"), str(path), id_prefix="r")
    return path


def test_rows_of_a_csv_are_explained_from_a_registry_version_and_add_up(kfloop_cli, stack, rows_csv):
    registry = str(stack["registry"].root)
    result = kfloop_cli("explain", str(rows_csv), "--model", "leaf", "--registry", registry, "--top-k", "0", "--json")
    assert result.code == 0, result.stderr
    explained = json.loads(result.stdout)
    assert [row["row"] for row in explained] == ["r0", "r1", "r2"]
    for row in explained:
        [top] = row["classes"]
        assert row["method"] == "exact" and row["version"] == "1"
        assert abs(sum(top["attributions"].values()) + top["base_value"] - top["probability"]) < 1e-6
    table = kfloop_cli("explain", str(rows_csv), "--model", "leaf", "--registry", registry, "--top-k", "2",
                       "--method", "approximate", "--rows", "1")
    assert table.code == 0 and "approximate" in table.stdout and "r0" in table.stdout and "r1" not in table.stdout


def test_a_running_transformer_explains_the_same_rows(kfloop_cli, stack, rows_csv):
    registry = str(stack["registry"].root)
    local = json.loads(kfloop_cli("explain", str(rows_csv), "--model", "leaf", "--registry", registry, "--json").stdout)
    asked = kfloop_cli("explain", str(rows_csv), "--model", "leaf", "--registry", registry, "--json",
                       "--url", stack["runtime"].endpoints["rest"])
    assert asked.code == 0, asked.stderr
    served = json.loads(asked.stdout)
    assert [row["prediction"] for row in served] == [row["prediction"] for row in local]
    for mine, theirs in zip(local, served):
        ours, remote = mine["classes"][0]["attributions"], theirs["classes"][0]["attributions"]
        assert list(ours) == list(remote)
        np.testing.assert_allclose(list(ours.values()), list(remote.values()), atol=1e-9)


def test_a_csv_without_the_models_columns_is_one_line_naming_file_and_column(kfloop_cli, stack, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,a,b\n1,0.5,0.7\n")
    result = kfloop_cli("explain", str(path), "--model", "leaf", "--registry", str(stack["registry"].root))
    assert result.code == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "feature columns" in result.stderr
