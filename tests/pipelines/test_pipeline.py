"""The training pipeline end to end: compiled IR, real kfp.local runs through the CLI, the gate, bad input."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from testbed import digits_csv
from kfloop.registry import ModelRegistry

pytestmark = pytest.mark.slow


def test_compiled_pipeline_is_a_pipeline_spec_with_parallel_for_and_collected(kfloop_cli, tmp_path):
    result = kfloop_cli("compile", "-o", str(tmp_path / "pipeline.yaml"), "--image", "example.org/kfloop:1.2.3")
    assert result.code == 0, result.stderr
    document = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    spec = json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec())
    tasks = spec.root.dag.tasks
    assert set(tasks) == {"prepare-data", "for-loop-1", "select-to-gate"}
    loop = tasks["for-loop-1"]
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--search_batches"
    assert loop.iterator_policy.parallelism_limit == 2
    collected = tasks["select-to-gate"].inputs.parameters["candidates"].task_output_parameter
    assert collected.producer_task == "for-loop-1"
    loop_dag = spec.components["comp-for-loop-1"].dag
    assert loop_dag.outputs.parameters[collected.output_parameter_key].value_from_parameter.producer_subtask == "train-candidates"
    # No task comes from KFP's cache: its key ignores input artifacts' URIs, and the last two read and write
    # the registry (the gate reads the production version).
    every_task = [*tasks.values(), *loop_dag.tasks.values()]
    assert len(every_task) == 4 and not any(task.caching_options.enable_cache for task in every_task)
    assert "enableCache: true" not in (tmp_path / "pipeline.yaml").read_text()
    images = {e["container"]["image"] for e in document["deploymentSpec"]["executors"].values()}
    assert images == {"example.org/kfloop:1.2.3"}
    parameters = document["root"]["inputDefinitions"]["parameters"]
    # the default grid's 8 candidates, over `parallelism` (2) tasks of 4
    assert [len(batch) for batch in parameters["search_batches"]["defaultValue"]] == [4, 4]
    assert parameters["lineage"]["defaultValue"] == {"search": "full", "candidates": 8, "evaluation": "cv"}
    assert parameters["evaluation"]["defaultValue"] == "cv"
    # a person's run promotes through its gate; the trigger service passes false and promotes through its rollout
    assert parameters["move_production"] == {"defaultValue": True, "isOptional": True, "parameterType": "BOOLEAN"}
    gate_inputs = tasks["select-to-gate"].inputs.parameters["move_production"]
    assert gate_inputs.component_input_parameter == "move_production"


@pytest.mark.heavy
def test_train_promotes_first_refuses_no_gain_and_bad_data_then_promotes_better(kfloop_cli, tmp_path, small_policy):
    registry = tmp_path / "registry"
    small = digits_csv(tmp_path / "digits-small.csv", every=6)
    full = digits_csv(tmp_path / "digits-full.csv")
    common = ("--registry", str(registry), "--policy", str(small_policy), "--target", "digit", "--json")

    first = kfloop_cli("train", "--data", small, *common)
    assert first.code == 0, first.stderr
    one = first.json()
    assert (one["model"], one["version"], one["promoted"]) == ("digits", "1", True)
    assert {"metrics", "best_params", "candidates", "registry_path"} <= set(one)
    assert len(one["candidates"]) == 2 and one["onnx_agreement"] == 1.0
    assert Path(one["registry_path"], "model.onnx").exists()

    again = kfloop_cli("train", "--data", small, *common).json()
    assert (again["version"], again["promoted"], again["production_version"]) == ("2", False, "1")
    assert "does not beat production v1" in again["reason"]

    bad = tmp_path / "bad.csv"
    lines = Path(small).read_text().splitlines()
    fields = lines[1].split(",")
    fields[2] = "zero"  # first feature of the first data row
    bad.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    failed = kfloop_cli("train", "--data", str(bad), *common)
    assert failed.code == 1
    assert failed.stdout == ""
    assert failed.stderr.strip().startswith("error: ") and len(failed.stderr.strip().splitlines()) == 1
    assert "bad.csv, row 2, column 'pixel_0_0': non-numeric value 'zero'" in failed.stderr
    store = ModelRegistry(registry)
    assert store.versions("digits") == ["1", "2"] and store.production_version("digits") == "1"

    better = kfloop_cli("train", "--data", full, *common).json()
    assert (better["version"], better["promoted"], better["production_version"]) == ("3", True, "3")
    assert better["metrics"]["accuracy"] > one["metrics"]["accuracy"]
    meta = store.metadata("digits", "3")
    assert meta["status"] == "promoted" and meta["gate"]["production_version"] == "1"
    assert meta["lineage"] == {"search": "full", "candidates": 2, "evaluation": "cv"}
    assert type(meta["lineage"]["candidates"]) is int  # KFP hands it back as a float: restored
    assert meta["data"]["rows"] == 1797 and meta["params"]["n_estimators"] in (20, 40)
    assert all(type(meta["data"][count]) is int for count in ("rows", "features", "classes", "train_rows", "holdout_rows"))

    listing = kfloop_cli("models", "list", "--registry", str(registry))
    assert listing.code == 0 and "rejected" in listing.stdout and "promoted" in listing.stdout
    shown = kfloop_cli("models", "show", "digits", "--registry", str(registry))
    assert shown.json()["version"] == "3"


def test_too_few_rows_per_class_fails_in_the_first_task_with_one_line(kfloop_cli, tmp_path):
    csv = tmp_path / "tiny.csv"
    csv.write_text("label,a\n" + "".join(f"{'xy'[i % 2]},{i}\n" for i in range(8)))
    result = kfloop_cli("train", "--data", str(csv), "--target", "label", "--registry", str(tmp_path / "r"))
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert "load + validate + preprocess (failed)" in lines[0]  # the progress display marks the failed task
    assert [line for line in lines if "error" in line] == [
        f"error: {csv}: classes with too few rows for a stratified holdout and cross-validation "
        "(need >= 7 each): 'x' (4), 'y' (4)"
    ]
    assert "Traceback" not in result.stderr


def test_bad_policy_is_reported_before_anything_runs(kfloop_cli, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("training:\n  selection_metric: auc\n")
    result = kfloop_cli("train", "--policy", str(policy), "--registry", str(tmp_path / "r"))
    assert result.code == 1
    assert "training.selection_metric: Input should be 'accuracy', 'macro_f1' or 'log_loss' (got 'auc')" in result.stderr


@pytest.mark.heavy
def test_leaf_training_reaches_097_with_eight_parallel_candidates(kfloop_cli, shared_data, tmp_path):
    result = kfloop_cli(
        "train", "--data", str(shared_data / "kaggle_leaf_train.csv"), "--model", "leaf",
        "--registry", str(tmp_path / "registry"), "--json",
    )
    assert result.code == 0, result.stderr
    outcome = result.json()
    assert outcome["metrics"]["accuracy"] >= 0.97
    assert len(outcome["candidates"]) >= 8
    assert outcome["onnx_agreement"] == 1.0 and outcome["runtime"] == "onnx"
    assert outcome["data"]["classes"] == 99 and outcome["data"]["features"] == 192


@pytest.mark.heavy
def test_uci_folder_trains(kfloop_cli, shared_data, tmp_path, small_policy):
    result = kfloop_cli(
        "train", "--data", str(shared_data), "--model", "uci", "--policy", str(small_policy),
        "--registry", str(tmp_path / "registry"), "--json",
    )
    assert result.code == 0, result.stderr
    outcome = result.json()
    assert outcome["data"]["rows"] == 1584 and outcome["data"]["classes"] == 99
    assert any("Acer_Campestre" in note for note in outcome["data"]["notes"])
    assert outcome["metrics"]["accuracy"] > 0.8


class _Unauthorised(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_submit_to_an_unreachable_host_is_one_clear_line(kfloop_cli, tmp_path):
    result = kfloop_cli("submit", "--host", "http://127.0.0.1:9", "--registry", "s3://bucket/registry")
    assert result.code == 1
    assert result.stderr.strip().startswith("error: cannot reach Kubeflow Pipelines at http://127.0.0.1:9")
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_with_refused_credentials_says_so(kfloop_cli):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Unauthorised)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_port}"
        result = kfloop_cli("submit", "--host", host, "--token", "wrong", "--registry", "s3://b/r", "--kfp-allow-http")
    finally:
        server.shutdown()
        server.server_close()
    assert result.code == 1
    assert f"error: Kubeflow Pipelines at {host} refused the credentials (HTTP 401)" in result.stderr


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore")  # kfp.local warns about base_image and display names on every task
def test_with_kfp_local_s_cache_on_a_rerun_on_new_data_at_the_same_address_takes_nothing_from_it(tmp_path, small_policy,
                                                                                                monkeypatch):
    # kfp.local's cache keys a task on its parameters, and the data's address is one: a cached task would hand the
    # rerun the first run's split and winner. The pipeline's tasks opt out, so even with the runner's cache on the
    # rerun reads the new data, and nothing is written to the cache.
    from kfp import local

    from kfloop.pipelines.training import build_training_pipeline, pipeline_arguments
    from kfloop.policies import load_policy

    policy, data, registry = load_policy(small_policy), tmp_path / "digits.csv", str(tmp_path / "registry")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # each task leaves its mktemp folder behind
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"), enable_caching=True,
               cache_root=str(tmp_path / "cache"))
    pipeline = build_training_pipeline(policy, registry_uri=registry)
    arguments = pipeline_arguments(policy, data_uri=str(data), target="digit", registry_uri=registry)
    decisions = []
    for every in (6, 3):  # new data at the same address
        digits_csv(data, every=every)
        decisions.append(pipeline(**arguments).output)
    store = ModelRegistry(registry)
    first, second = (store.metadata("digits", decision["version"])["data"] for decision in decisions)
    assert (first["rows"], second["rows"]) == (300, 599)
    assert first["fingerprint"] != second["fingerprint"] and first["train_rows"] < second["train_rows"]
    assert not any((tmp_path / "cache").glob("*.json"))


def test_a_run_gives_back_builtins_print_that_overlapping_kfp_tasks_leave_replaced():
    # kfp.local replaces builtins.print while a task runs; the tasks of a ParallelFor overlap in threads, and
    # when the first to start ends first the second puts the first one's replacement back (numba, which shap
    # imports, then refuses to start: it checks that print is the builtin).
    import builtins
    from contextlib import ExitStack

    from kfp.local import logging_utils

    from kfloop.pipelines.local import _process_state_kept

    original = builtins.print
    with _process_state_kept():
        first, second = logging_utils.indented_print(), logging_utils.indented_print()
        with ExitStack() as outer:
            outer.enter_context(first)
            second.__enter__()
        second.__exit__(None, None, None)  # the order overlapping threads may end in
        assert builtins.print is not original  # what kfp.local leaves
    assert builtins.print is original
