"""Shared fixtures: the ../shared data (tests that need it skip without it), a CLI runner, small policies."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import sys
from pathlib import Path

import pytest
import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_SPECS = SHARED / "specs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "kaggle_leaf_train.csv").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
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


def register_version(registry: Path, model: str, data_uri: str, *, n_estimators: int, work: Path, promote: bool = True,
                     target: str = "") -> str:
    """Train one forest with the pipeline's own step functions (no KFP) and register it."""
    from kfloop.registry import ModelRegistry
    from kfloop.steps import fit_export_step, load_step, prepare_step, register_step

    work.mkdir(parents=True, exist_ok=True)
    summary = load_step(data_uri, target, 2, str(work / "dataset.npz"))
    prepare_step(str(work / "dataset.npz"), 0.2, 42, str(work / "prepared.npz"), str(work / "prep.joblib"))
    params = {"n_estimators": n_estimators, "max_features": "sqrt"}
    final = fit_export_step(str(work / "prepared.npz"), str(work / "prep.joblib"), params, 42, str(work / "model"))
    candidate = {"params": params, "metrics": final["metrics"]}
    version = register_step(
        str(registry), model, str(work / "model"), str(work / "prep.joblib"), str(work / "prepared.npz"),
        summary, {"best": candidate, "ranked": [candidate], "metric": "accuracy"}, final, {}, "test",
    )
    if promote:
        ModelRegistry(registry).promote(model, version, {"reason": "test"})
    return version


@pytest.fixture(scope="session")
def serving_data() -> str:
    """The leaf case study when ../shared is here, else scikit-learn's digits."""
    leaf = SHARED_DATA / "kaggle_leaf_train.csv"
    return str(leaf) if leaf.exists() else "builtin:digits"


class EventSink:
    """An HTTP server that keeps every CloudEvent POSTed to it (on ``port``, or a free one)."""

    def __init__(self, port: int = 0) -> None:
        from cloudevents.http import from_http

        self.events: list = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.events.append(from_http(dict(self.headers.items()), body))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def digits_csv(path: Path, every: int = 1) -> str:
    """builtin:digits as a generic CSV (label column 'digit'), keeping every ``every``-th row."""
    from kfloop.data import load_dataset

    data = load_dataset("builtin:digits")
    lines = ["id,digit," + ",".join(data.feature_names)]
    for index in range(0, data.rows, every):
        values = ",".join(f"{v:g}" for v in data.features[index])
        lines.append(f"{index},{data.labels[index]},{values}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def wait_until_answering(url: str, what: str, seconds: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail naming ``what`` after ``seconds``."""
    import time

    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {seconds:.0f} s")
