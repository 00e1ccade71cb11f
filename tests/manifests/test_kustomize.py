"""The kustomize tree: the checked-in base is exactly what `kfloop manifests` renders, and every overlay
builds, stays locked down and keeps the namespace and image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kfloop.manifests.schemas import validate_manifest
from loop_objects import (
    BASE, OVERLAYS, NAMESPACE, IMAGE, RENDER_ARGS, CRD_KINDS, CORE_KINDS, K8S_VERSIONS, one, workloads, security_problems, run_kfloop,
)


def test_the_checked_in_base_is_exactly_what_kfloop_manifests_renders(tmp_path):
    result = run_kfloop("manifests", *RENDER_ARGS, "-o", str(tmp_path / "base"))
    assert result.returncode == 0, result.stderr
    printed = [Path(line).name for line in result.stdout.split()]
    written = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert sorted(printed) == written == sorted(p.name for p in BASE.iterdir())
    for name in written:
        assert (tmp_path / "base" / name).read_text() == (BASE / name).read_text(), f"manifests/base/{name} is stale: re-render it"
    assert yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"] == printed[:-1]
    assert printed[-1] == "kustomization.yaml"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for 'kubectl kustomize') is not installed")
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.mark.parametrize("overlay", ["local-kind", "production"])
def test_each_overlay_builds_stays_locked_down_and_keeps_namespace_and_image(overlay, shared_specs):
    built = kustomize(OVERLAYS / overlay)
    assert security_problems(built) == []
    assert {o["metadata"]["namespace"] for o in built} == {NAMESPACE}
    assert {c["image"] for _, _, containers in workloads(built) for c in containers} == {IMAGE}
    for obj in built:
        if obj["kind"] in CRD_KINDS:
            validate_manifest(obj, shared_specs)
        elif obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    if overlay == "production":
        for name in ("classifier-trigger", "classifier-watch"):
            volumes = {v["name"]: v for v in one(built, "Deployment", name)["spec"]["template"]["spec"]["volumes"]}
            assert volumes["state"] == {"name": "state", "persistentVolumeClaim": {"claimName": f"{name}-state"}}
            one(built, "PersistentVolumeClaim", f"{name}-state")
