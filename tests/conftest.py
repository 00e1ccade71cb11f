"""Shared fixtures: the ../shared data (tests that need it skip without it), a CLI runner, small policies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_SPECS = SHARED / "specs"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "kaggle_leaf_train.csv").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def shared_specs() -> Path:
    if not SHARED_SPECS.exists():
        pytest.skip("../shared/specs is not present")
    return SHARED_SPECS


class CliResult:
    def __init__(self, completed: subprocess.CompletedProcess) -> None:
        self.code = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def kfloop_cli(tmp_path: Path):
    """Run ``python -m kfloop ...`` for real, with its own home folder."""
    home = tmp_path / "home"

    def run(*args: str, timeout: float = 600) -> CliResult:
        completed = subprocess.run(
            [sys.executable, "-m", "kfloop", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_clean_env(), "KFLOOP_HOME": str(home), "COLUMNS": "200"},
        )
        return CliResult(completed)

    return run


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("KFLOOP_")}


@pytest.fixture
def small_policy(tmp_path: Path) -> Path:
    """A policy with a tiny, fast search (2 candidates, 3-fold CV)."""
    path = tmp_path / "small-policy.yaml"
    path.write_text(yaml.safe_dump({
        "model": "digits",
        "training": {
            "search_space": {"n_estimators": [20, 40], "max_features": ["sqrt"], "min_samples_leaf": [1]},
            "cv_folds": 3,
            "holdout_fraction": 0.25,
            "seed": 7,
        },
    }))
    return path
