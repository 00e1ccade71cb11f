"""The real parts tests build on: trained registry versions, CSV data, an event sink, a trigger process, request
bodies, a small real disk to fill, containers started as the manifests start them.

Plain functions and classes (the fixtures are in ``conftest.py``), imported by test modules in every
folder as ``from testbed import ...``: ``tests/conftest.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import yaml
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from kfloop.event_types import DRIFT_EVENT
from kfloop.credentials import bearer, local_token
from kfloop.local.supervisor import free_port

DRIFT = DRIFT_EVENT  # the alarm tests send most


def register_version(registry: Path, model: str, data_uri: str, *, n_estimators: int, work: Path, promote: bool = True,
                     target: str = "") -> str:
    """Train one forest with the pipeline's own step functions (no KFP) and register it."""
    from kfloop.registry import ModelRegistry
    from kfloop.steps import fit_export_step, prepare_step, register_step

    work.mkdir(parents=True, exist_ok=True)
    summary = prepare_step(data_uri, target, 2, 0.2, 42, str(work / "prepared.npz"), str(work / "prep.joblib"))
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


SERVING_USER = "10001:10001"  # the manifests' runAsUser / runAsGroup


class Containers:
    """Containers started by one test, all removed at its end (by id, whatever state they are in)."""

    def __init__(self, client, image: str) -> None:
        self.client, self.image = client, image
        self.started: list = []

    def serving(self, args: list[str], *, mounts: list | None = None, environment: dict[str, str] | None = None,
                **options):
        """A container as the manifests' securityContext runs it: uid 10001, read-only root filesystem, every
        capability dropped, no privilege escalation, writable only where a pod has an emptyDir."""
        container = self.client.containers.run(
            self.image, args, detach=True, network_mode="host", user=SERVING_USER, read_only=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges"], mounts=mounts or [],
            tmpfs={"/tmp": "", "/home/kfloop": f"uid={SERVING_USER.split(':')[0]}"},
            environment={"HOME": "/home/kfloop", **(environment or {})}, **options,
        )
        self.started.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            try:
                container.remove(force=True)
            except Exception:  # already gone (auto-removed or the daemon removed it)
                pass


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
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {seconds:.0f} s")


# --- requests to the serving stack (the ``stack`` fixture) --------------------------------------------


def v1(stack, body, **kwargs) -> httpx.Response:
    return httpx.post(stack["runtime"].endpoints["v1"], json=body, **kwargs)


def v2(stack, body, **kwargs) -> httpx.Response:
    return httpx.post(stack["runtime"].endpoints["v2"], json=body, **kwargs)


def tensor(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}


# --- the trigger service as a real process ---------------------------------------------------------------


def write_policy(path: Path, base: str, **retraining) -> Path:
    path.write_text(yaml.safe_dump({
        "model": "digits",
        "training": {"search_space": {"n_estimators": [20, 40], "max_features": ["sqrt"], "min_samples_leaf": [1]},
                     "cv_folds": 3, "holdout_fraction": 0.25, "seed": 7},
        "retraining": {"base_data": base, "cooldown_seconds": 0, "max_runs_per_day": 10, **retraining},
        "rollout": {"canary_percent": 30, "observe_seconds": 4, "rollback_failure_rate": 0.05},
    }))
    return path


class Trigger:
    def __init__(self, home: Path, registry: Path, policy: Path, *, admin_url: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "kfloop", "trigger", "--registry", str(registry), "--policy", str(policy),
                "--target", "digit", "--http-port", str(self.port), "--home", str(home), "--state-dir", str(home / "trigger")]
        if admin_url:
            argv += ["--admin-url", admin_url]
        self.auth = bearer(local_token(home))  # what the watch sends on one machine
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_answering(self.url + "/healthz", "trigger", 60)

    def alarm(self, event_id: str | None = None, event_type: str = DRIFT, *, auth: dict[str, str] | None = None) -> httpx.Response:
        """A drift alarm as the watch sends it (with the home's token, unless ``auth`` says otherwise)."""
        attributes = {"type": event_type, "source": "kfloop/watch/digits", "id": event_id or str(uuid.uuid4())}
        headers, body = to_binary(CloudEvent(attributes, {"model": "digits", "kind": "drift"}))
        return httpx.post(self.url + "/", headers=headers | (self.auth if auth is None else auth), content=body, timeout=30)

    def status(self) -> dict:
        return httpx.get(self.url + "/status").json()

    def wait_idle(self, runs: int, seconds: float = 240) -> list[dict]:
        deadline = time.time() + seconds
        while time.time() < deadline:
            status = self.status()
            done = [r for r in status["runs"] if r["outcome"] not in ("running", "pending")]
            if not status["pending"] and len(done) >= runs:
                return status["runs"]
            time.sleep(0.5)
        raise AssertionError(f"runs did not finish: {self.status()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


class InProcessTrigger(Trigger):
    """The same service and app as ``kfloop trigger`` with the same options, served in this process on a real
    loopback port (where no process boundary is under test)."""

    def __init__(self, home: Path, registry: Path, policy: Path) -> None:
        from kfloop.policies import load_policy
        from kfloop.policies.retraining import LocalRetrainer, RetrainingConfig, RetrainingService
        from kfloop.serving.auth import LocalToken
        from kfloop.serving.listeners import ServerThread, listening
        from kfloop.serving.trigger import create_app

        token = local_token(home)
        self.auth = bearer(token)
        loaded = load_policy(policy)
        config = RetrainingConfig(loaded.model, str(registry), loaded, home / "trigger", target="digit")
        service = RetrainingService(config, LocalRetrainer(loaded, str(registry), home, model=loaded.model), None)
        self.server = ServerThread(create_app(service, LocalToken(token)), listening("127.0.0.1", 0, "the trigger"),
                                   name="in-process-trigger", lifespan="on")
        self.server.start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop(30)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A real, size-limited file system (tmpfs) at ``folder``; skips the test where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (a full disk is not simulated otherwise)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; delete it to free the disk again."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler
