"""Benchmark: kfloop's predictor alone and transformer+predictor chain vs MLServer (mlserver-sklearn).

Usage: python benchmarks/serve.py [--data URI] [--seconds 10]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits;
needs wrk: apt-get install wrk; MLServer is installed into .venv-mlserver on first run)

One random forest (the leaf search's usual winner: 300 trees, sqrt features,
min_samples_leaf 2) is trained once and served four ways on this machine:
  * in-process floor: ModelBundle.predict_scaled on one row in a loop (onnxruntime, no HTTP);
  * kfloop predictor alone (KServe ModelServer, onnxruntime, 1 process);
  * kfloop chain: transformer -> predictor (local runtime, 1 replica);
  * MLServer 1.7.1 + mlserver-sklearn on the same joblib forest (its defaults, debug logging off
    as kfloop's access log is).
Load: wrk on loopback, V2 REST, single-row requests, concurrency 1 and 16. Ratios are against
MLServer measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlserver_peer import MLServerPeer, ensure_mlserver_venv  # noqa: E402

SHARED_LEAF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kaggle_leaf_train.csv"
PARAMS = {"n_estimators": 300, "max_features": "sqrt", "min_samples_leaf": 2}
_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def train(data_uri: str, registry: Path, work: Path) -> tuple[str, list[float]]:
    """Register one forest as model 'leaf' v1; returns its version folder and one raw row."""
    from kfloop.registry import ModelRegistry
    from kfloop.steps import fit_export_step, prepare_step, register_step
    from kfloop.training import Prepared

    summary = prepare_step(data_uri, "", 2, 0.2, 42, str(work / "prepared.npz"), str(work / "prep.joblib"))
    final = fit_export_step(str(work / "prepared.npz"), str(work / "prep.joblib"), PARAMS, 42, str(work / "model"))
    candidate = {"params": PARAMS, "metrics": final["metrics"]}
    version = register_step(str(registry), "leaf", str(work / "model"), str(work / "prep.joblib"),
                            str(work / "prepared.npz"), summary, {"best": candidate, "ranked": [candidate], "metric": "accuracy"},
                            final, {}, "benchmark")
    ModelRegistry(registry).promote("leaf", version, {"reason": "benchmark"})
    row = Prepared.load(str(work / "prepared.npz")).holdout_features[0].tolist()
    return ModelRegistry(registry).uri("leaf", version), row


def predictor_process(version_dir: str, work: Path):
    """A ``kfloop predictor`` of ``version_dir`` as model 'leaf' on a free port (not started), and its V2 infer URL."""
    from kfloop.local.supervisor import ManagedProcess, free_port

    port = free_port()
    process = ManagedProcess(
        "predictor", [sys.executable, "-m", "kfloop", "predictor", "--model-dir", version_dir, "--model", "leaf",
                      "--http-port", str(port), "--no-grpc"],
        f"http://127.0.0.1:{port}/v2/models/leaf/ready", work / "predictor.log",
    )
    return process, f"http://127.0.0.1:{port}/v2/models/leaf/infer"


def wrk(url: str, body: dict, concurrency: int, seconds: int, work: Path) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of wrk posting ``body`` to ``url``; any non-2xx answer aborts."""
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [[{json.dumps(body)}]]\n")
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors under load at {url}:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: float(v) * _UNIT_MS[u] for p, v, u in _LATENCY.findall(out)}
    return rate, latency["50"], latency["99"]


def in_process(version_dir: str, row: list[float], seconds: float) -> tuple[float, float, float]:
    import numpy as np

    from kfloop.bundle import ModelBundle

    bundle = ModelBundle.load(version_dir)
    scaled = bundle.preprocessor.transform(np.asarray([row]))
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        bundle.predict_scaled(scaled)
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000
    return len(times) / float(ms.sum() / 1000), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    from kfloop.local.runtime import ServingRuntime
    from kfloop.local.supervisor import free_port

    console = Console(width=200)
    mlserver_python = ensure_mlserver_venv()
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-serve-") as tmp:
        work = Path(tmp)
        version_dir, row = train(args.data, work / "registry", work)
        body = {"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}
        results["in-process floor (onnxruntime, no HTTP)"] = {1: in_process(version_dir, row, args.seconds)}

        predictor, url = predictor_process(version_dir, work)
        predictor.spawn()
        try:
            predictor.wait_ready()
            results["kfloop predictor alone"] = {c: wrk(url, body, c, args.seconds, work) for c in (1, 16)}
        finally:
            predictor.stop()

        with ServingRuntime(str(work / "registry"), "leaf", home=work / "home", http_port=free_port(), grpc_port=free_port(), log_dir=work / "logs") as runtime:
            results["kfloop transformer -> predictor"] = {c: wrk(runtime.endpoints["v2"], body, c, args.seconds, work) for c in (1, 16)}

        peer_body = {"inputs": [{"name": "predict", "shape": [1, len(row)], "datatype": "FP64", "data": row}]}
        with MLServerPeer(Path(version_dir) / "model.joblib", "leaf", free_port(), free_port(), python=mlserver_python,
                          settings={"debug": False}) as peer:
            url = f"{peer.url}/v2/models/leaf/infer"
            results["MLServer + mlserver-sklearn"] = {c: wrk(url, peer_body, c, args.seconds, work) for c in (1, 16)}

    peer = results["MLServer + mlserver-sklearn"]
    table = Table(title=f"V2 REST, single-row requests, {args.seconds} s per cell (wrk), data {Path(args.data).name}")
    for column in ("server", "c=1 req/s", "c=1 p50 ms", "c=1 p99 ms", "c=16 req/s", "c=16 p50 ms", "c=16 p99 ms",
                   "c=16 req/s / MLServer", "c=1 p50 / MLServer"):
        table.add_column(column, justify="right")
    for name, cells in results.items():
        one, sixteen = cells[1], cells.get(16)
        table.add_row(
            name, f"{one[0]:.0f}", f"{one[1]:.2f}", f"{one[2]:.2f}",
            *(f"{v:.0f}" if i == 0 else f"{v:.2f}" for i, v in enumerate(sixteen)) if sixteen else ("-", "-", "-"),
            f"{sixteen[0] / peer[16][0]:.2f}x" if sixteen else "-",
            f"{one[1] / peer[1][1]:.2f}x",
        )
    console.print(table)
    console.print("targets: predictor >= 8x MLServer req/s at c=16 and p50 <= 0.2x at c=1; "
                  "chain >= 3x and <= 0.5x")


if __name__ == "__main__":
    main()
