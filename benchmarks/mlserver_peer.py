"""MLServer (mlserver-sklearn) as a benchmark peer: its own venv, its model repository, its process.

Owns: building the separate MLServer venv (its pins clash with kserve/alibi-detect), writing
settings.json + model-settings.json for one joblib RandomForest, starting `mlserver start` on
127.0.0.1 in its own process group, waiting for V2 readiness, and stopping it by PID.
Smoke check: `python benchmarks/mlserver_peer.py` (with the main venv's python).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import httpx

REPO = Path(__file__).resolve().parents[1]
MLSERVER_PINS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"]  # uvloop: SeldonIO/MLServer#2286


def ensure_mlserver_venv(path: Path = REPO / ".venv-mlserver") -> Path:
    """Create (once) a venv with MLServer + the main venv's scikit-learn; return its python."""
    import numpy
    import sklearn

    python = path / "bin" / "python"
    probe = f"import mlserver, mlserver_sklearn, sklearn; assert sklearn.__version__ == {sklearn.__version__!r}"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pins = [*MLSERVER_PINS, f"scikit-learn=={sklearn.__version__}"]
    if int(numpy.__version__.split(".")[0]) < 2:
        pins.append("numpy<2")  # same major as the pickling side
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MLServerPeer:
    """`with MLServerPeer(model, "rf", 8090, 8091) as peer: httpx.post(peer.url + ...)`."""

    def __init__(self, model_path: Path, name: str, http_port: int, grpc_port: int,
                 python: Path | None = None, settings: Mapping[str, Any] | None = None,
                 ready_timeout: float = 90.0, stop_timeout: float = 15.0) -> None:
        self.model_path, self.name = Path(model_path).resolve(), name
        self.http_port, self.grpc_port = http_port, grpc_port
        self.python = python or ensure_mlserver_venv()
        self.overrides = dict(settings or {})  # e.g. {"debug": False}: MLServer's default True logs every request
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.url = f"http://127.0.0.1:{http_port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    def _write_repository(self, folder: Path) -> None:
        # metrics_endpoint None: no metrics server (else it binds metrics_port, default 8082, on `host`)
        settings = {"metrics_endpoint": None, **self.overrides,
                    "host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port}
        model = {"name": self.name, "implementation": "mlserver_sklearn.SKLearnModel",
                 "parameters": {"uri": str(self.model_path)}}
        (folder / "settings.json").write_text(json.dumps(settings, indent=2))
        (folder / "model-settings.json").write_text(json.dumps(model, indent=2))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:]) if self._log else ""

    def __enter__(self) -> MLServerPeer:
        self._tmp = tempfile.TemporaryDirectory(prefix="mlserver-peer-")
        folder = Path(self._tmp.name) / self.name  # MLServer warns when folder name != model name
        folder.mkdir()
        self._write_repository(folder)
        self._log = Path(self._tmp.name) / "mlserver.log"
        mlserver = self.python.parent / "mlserver"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen([str(mlserver), "start", str(folder)], cwd=folder, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        ready = f"{self.url}/v2/models/{self.name}/ready"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"mlserver exited with {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(ready).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"mlserver not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session)
                    proc.wait()
            try:  # workers left in its group after the main process went
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


if __name__ == "__main__":
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    start = time.perf_counter()
    python = ensure_mlserver_venv()
    print(f"venv ready in {time.perf_counter() - start:.1f}s: {python}")
    X, y = load_digits(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.joblib"
        joblib.dump(forest, model_file)
        start = time.perf_counter()
        with MLServerPeer(model_file, "digits-rf", free_port(), free_port(), python=python) as peer:
            print(f"mlserver ready in {time.perf_counter() - start:.1f}s at {peer.url}")
            body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP64", "data": X[0].tolist()}]}
            response = httpx.post(f"{peer.url}/v2/models/digits-rf/infer", json=body, timeout=10.0)
            print(response.status_code, json.dumps(response.json()))
            print(f"expected class {forest.predict(X[:1])[0]}")
