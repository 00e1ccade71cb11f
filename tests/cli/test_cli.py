"""The command line as a user meets it: every error one line naming what to change, exit code 1, no traceback;
a local registry given relative works from anywhere."""

from __future__ import annotations

import pytest


def one_clear_line(result, *expected: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def test_the_top_level_help_lists_every_command_area(kfloop_cli):
    result = kfloop_cli("--help")
    assert result.code == 0
    for command in ("train", "compile", "submit", "models", "serve", "up", "down", "status", "demo", "watch",
                    "trigger", "policy", "manifests", "deploy", "token"):
        assert command in result.stdout, command


def test_image_without_the_docker_runner_names_the_flag(kfloop_cli):
    one_clear_line(kfloop_cli("train", "--image", "kfloop:local"), "--image goes with --runner docker")


def test_the_docker_runner_without_a_daemon_says_where_it_looked(kfloop_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    result = kfloop_cli("train", "--runner", "docker", "--registry", str(tmp_path / "registry"))
    one_clear_line(result, f"no Docker daemon answers at DOCKER_HOST=unix://{tmp_path}/no-daemon.sock")
    assert result.code == 1


@pytest.mark.timeout(120)
def test_a_registry_in_a_bucket_that_does_not_exist_is_one_line(kfloop_cli, s3_env):
    result = kfloop_cli("models", "list", "--registry", "s3://no-such-bucket/registry")
    one_clear_line(result, "registry s3://no-such-bucket/registry: the bucket 'no-such-bucket' does not exist")
    assert result.code == 1


def test_a_relative_registry_is_the_same_registry_from_another_folder(kfloop_cli, tmp_path, monkeypatch):
    from kfloop.cli.options import registry_uri

    monkeypatch.chdir(tmp_path)
    assert registry_uri("registry", tmp_path / "home") == str(tmp_path / "registry")
    assert registry_uri(None, tmp_path / "home") == str(tmp_path / "home" / "registry")
    assert registry_uri("s3://bucket/registry", tmp_path) == "s3://bucket/registry"


def test_a_taken_control_port_stops_the_predictor_before_it_loads_a_model(kfloop_cli, tmp_path):
    import socket

    from kfloop.local.supervisor import free_port

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = kfloop_cli("predictor", "--model-dir", str(tmp_path / "no-model"), "--model", "leaf",
                            "--http-port", str(free_port()), "--no-grpc", "--control-port", str(port), "--fault-injection",
                            timeout=120)
    one_clear_line(result, f"cannot listen on 127.0.0.1:{port} for the control routes")
