"""The KFP components themselves: each pins the image it runs in, installs nothing at run time, passes typed
artifacts, and -- run alone under kfp.local -- does its step's work and hands its outputs to KFP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kfloop.components.training import DEFAULT_IMAGE, build_training_components


@pytest.mark.parametrize("image", [DEFAULT_IMAGE, "registry.example.org/ml/kfloop@sha256:" + "0" * 64])
def test_every_component_runs_in_the_given_image_and_installs_nothing(image):
    components = build_training_components(image)
    for name in ("prepare_data", "train_candidates", "select_to_gate"):
        container = getattr(components, name).component_spec.implementation.container
        assert container.image == image, name
        assert "pip install" not in " ".join(container.command), name  # the image has kfp and kfloop


def test_components_pass_typed_artifacts():
    components = build_training_components()
    spec = components.select_to_gate.component_spec
    inputs = {name: value.type for name, value in spec.inputs.items() if "system." in str(value.type)}
    outputs = {name: value.type for name, value in spec.outputs.items() if "system." in str(value.type)}
    assert inputs == {"prepared": "system.Dataset@0.0.1", "preprocessor": "system.Model@0.0.1",
                      "fitted": "system.Model@0.0.1"}
    assert outputs == {"model": "system.Model@0.0.1", "holdout_metrics": "system.Metrics@0.0.1",
                       "confusion": "system.ClassificationMetrics@0.0.1"}
    assert spec.inputs["fitted"].is_artifact_list


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task")  # kfp.local: the image is not used here
def test_prepare_data_run_alone_under_kfp_local_writes_its_artifacts_and_summary(tmp_path, monkeypatch):
    from kfp import local

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # kfp.local leaves a temporary folder per task
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"))
    task = build_training_components().prepare_data(data_uri="builtin:iris", target="", min_rows_per_class=2,
                                                      holdout_fraction=0.2, seed=3)
    summary = task.outputs["Output"]
    assert (summary["rows"], summary["classes"], summary["features"]) == (150, 3, 4)
    prepared = np.load(task.outputs["prepared"].path)
    assert len(prepared["holdout_labels"]) == 30 and Path(task.outputs["preprocessor"].path).stat().st_size > 0
    assert task.outputs["prepared"].metadata["rows"] == 150
    json.dumps(summary)  # what KFP hands on must be plain JSON
