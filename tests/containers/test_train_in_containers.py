"""`kfloop train --runner docker`: every pipeline task in the image (kfp.local's DockerRunner, no network with a
local registry), giving the SubprocessRunner's winner and holdout accuracy -- and registering in S3."""

from __future__ import annotations

import json

import pytest

from kfloop.registry import ModelRegistry

pytestmark = pytest.mark.containers


def winner(result) -> tuple[dict, float]:
    assert result.code == 0, result.stderr[-3000:]
    trained = result.json()
    return trained["best_params"], trained["metrics"]["accuracy"]


@pytest.mark.timeout(900)
def test_tasks_in_containers_pick_the_subprocess_runners_winner_locally_and_in_s3(kfloop_cli, image, small_policy,
                                                                                    s3_env, s3_registry, tmp_path):
    common = ["--data", "builtin:digits", "--policy", str(small_policy), "--json"]
    in_processes = winner(kfloop_cli("train", *common, "--registry", str(tmp_path / "subprocess")))
    local_registry = tmp_path / "docker"
    in_containers = kfloop_cli("train", *common, "--registry", str(local_registry), "--runner", "docker", "--image", image)
    assert winner(in_containers) == in_processes
    assert ModelRegistry(local_registry).versions("digits") == ["1"]
    assert json.loads(in_containers.stdout)["registry_path"] == f"{local_registry.resolve()}/digits/1/"

    # The S3 registry: the tasks reach the object store with the credentials of the caller's environment.
    in_s3 = kfloop_cli("train", *common, "--registry", s3_registry, "--runner", "docker", "--image", image)
    assert winner(in_s3) == in_processes
    registry = ModelRegistry(s3_registry)
    assert registry.versions("digits") == ["1"] and registry.production_version("digits") == "1"


def test_a_missing_image_is_a_clear_error_before_any_task(kfloop_cli, image, small_policy, tmp_path):
    result = kfloop_cli("train", "--data", "builtin:digits", "--policy", str(small_policy), "--registry",
                        str(tmp_path / "registry"), "--runner", "docker", "--image", "kfloop:no-such-tag")
    assert result.code == 1
    assert "image 'kfloop:no-such-tag' is not in the Docker daemon" in result.stderr
