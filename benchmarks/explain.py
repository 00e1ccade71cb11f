"""Benchmark: explanations through the serving chain against shap in process, and what they cost predictions.

Usage: python benchmarks/explain.py [--data URI] [--rows 40] [--seconds 20]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

One forest (the leaf search's usual winner: 300 trees, sqrt features, min_samples_leaf 2) is registered and
served by the local runtime (transformer -> 1 predictor, REST and gRPC). The same holdout rows, one per
request, are explained:
  * shap alone: TreeExplainer.shap_values (path-dependent) on the row scaled, the floor;
  * in process: ForestExplainer.explain on the raw row (shap plus scaling, the additivity check, top_k);
  * V1 ``:explain``, V2 REST and gRPC (``attributions`` outputs) through the transformer;
then the approximate method the same ways. Exact additivity (attributions + base value - probability) is
checked in process over 200 rows (the holdout, then training rows). Last, predict p99 (V2 REST, single rows, a steady 20 req/s) alone
and while 2 exact explain requests per second run, alternating, --seconds each.
Targets (issue 26): exact through HTTP <= 1.3x shap alone (p50); approximate p50 <= 5 ms; predict p99 with
explanations <= 1.2x alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SHARED_LEAF, train  # noqa: E402

PREDICT_RATE = 20.0  # req/s of the predict load
EXPLAIN_RATE = 2.0  # req/s of explanations beside it


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(call, rows: np.ndarray) -> list[float]:
    times = []
    for row in rows:
        start = time.perf_counter()
        call(row[None, :])
        times.append(time.perf_counter() - start)
    return times


def v2_body(rows: np.ndarray, outputs: list[str], parameters: dict) -> dict:
    return {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
            "outputs": [{"name": name} for name in outputs], "parameters": parameters}


def checked(answer: httpx.Response) -> httpx.Response:
    if answer.status_code != 200:
        raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")
    return answer


class GrpcExplainer:
    """Explain requests over gRPC on one event loop and channel kept for the whole run."""

    def __init__(self, address: str) -> None:
        from kserve import InferenceGRPCClient

        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._client(InferenceGRPCClient, address))

    @staticmethod
    async def _client(cls, address: str):
        return cls(address)

    def explain(self, rows: np.ndarray, method: str) -> None:
        from kserve import InferInput, InferRequest
        from kserve.protocol.infer_type import RequestedOutput

        request = InferRequest(model_name="leaf", infer_inputs=[InferInput("features", list(rows.shape), "FP32")],
                               request_outputs=[RequestedOutput("attributions")], parameters={"method": method})
        request.inputs[0].set_data_from_numpy(rows.astype(np.float32))
        self.loop.run_until_complete(self.client.infer(request))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def steady(call, rate: float, seconds: float, stop: threading.Event | None = None) -> list[float]:
    """Latencies of ``call()`` made at ``rate`` per second for ``seconds``."""
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds and not (stop and stop.is_set()):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
        time.sleep(max(0.0, began + 1.0 / rate - time.perf_counter()))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    from kfloop.explain import ExplainOptions, ForestExplainer
    from kfloop.local.runtime import ServingRuntime
    from kfloop.local.supervisor import free_port
    from kfloop.training import Prepared

    console = Console(width=200)
    latency: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-explain-") as tmp:
        work = Path(tmp)
        version_dir, _ = train(args.data, work / "registry", work)
        prepared = Prepared.load(str(work / "prepared.npz"))
        holdout = prepared.holdout_features
        rows = holdout[:args.rows]
        checked_rows = np.concatenate([holdout, prepared.reference])[:200]  # holdout first, then training rows
        explainer = ForestExplainer.load(version_dir, "1")
        scaled = explainer.preprocessor.transform(rows).astype(np.float64)
        for method in ("exact", "approximate"):
            explainer.explain(rows[:1], ExplainOptions(method=method))  # warm
            latency[f"shap alone, {method}"] = percentiles(timed(lambda row: explainer.shap_values(row, method), scaled))
            latency[f"in process, {method}"] = percentiles(
                timed(lambda row: explainer.explain(row, ExplainOptions(method=method)), rows))
        additivity = 0.0
        for start in range(0, len(checked_rows), 20):
            explanation = explainer.explain(checked_rows[start:start + 20], ExplainOptions(top_k=0))
            total = explanation.attributions[:, 0, :].sum(axis=1) + explanation.base_values[:, 0]
            additivity = max(additivity, float(np.abs(total - explanation.probabilities[:, 0]).max()))

        with ServingRuntime(str(work / "registry"), "leaf", home=work / "home", http_port=free_port(),
                            grpc_port=free_port(), log_dir=work / "logs") as runtime, httpx.Client(timeout=120) as client:
            endpoints = runtime.endpoints
            grpc = GrpcExplainer(endpoints["grpc"])
            try:
                for method in ("exact", "approximate"):
                    calls = {
                        "V1 :explain": lambda row: checked(client.post(endpoints["explain"], json={"instances": row.tolist(), "method": method})),
                        "V2 REST": lambda row: checked(client.post(endpoints["v2"], json=v2_body(row, ["attributions"], {"method": method}))),
                        "gRPC": lambda row: grpc.explain(row, method),
                    }
                    for name, call in calls.items():
                        call(rows[:1])  # the explain worker starts on the first request
                        latency[f"{name}, {method}"] = percentiles(timed(call, rows))
            finally:
                grpc.close()

            predict_body = v2_body(rows[:1], ["label"], {})
            predict = lambda: checked(client.post(endpoints["v2"], json=predict_body))  # noqa: E731
            explain_body = {"instances": rows[:1].tolist()}
            rounds: dict[str, list[float]] = {"alone": [], "with 2 explain/s": []}
            with httpx.Client(timeout=120) as side:
                for _ in range(2):
                    rounds["alone"] += steady(predict, PREDICT_RATE, args.seconds / 2)
                    stop = threading.Event()
                    explaining = threading.Thread(target=steady, args=(
                        lambda: checked(side.post(endpoints["explain"], json=explain_body)), EXPLAIN_RATE, args.seconds, stop))
                    explaining.start()
                    rounds["with 2 explain/s"] += steady(predict, PREDICT_RATE, args.seconds / 2)
                    stop.set()
                    explaining.join()

    table = Table(title=f"explanations of {args.rows} holdout rows, one row per request, data {Path(args.data).name}")
    for column in ("how", "p50 ms", "p99 ms", "p50 / shap alone", "p99 / shap alone"):
        table.add_column(column, justify="right")
    for name, (p50, p99) in latency.items():
        floor = latency[f"shap alone, {name.rsplit(', ', 1)[1]}"]
        table.add_row(name, f"{p50:.2f}", f"{p99:.2f}", f"{p50 / floor[0]:.2f}x", f"{p99 / floor[1]:.2f}x")
    console.print(table)
    console.print(f"exact additivity over {len(checked_rows)} rows (holdout, then training): "
                  f"max |attributions + base - probability| = {additivity:.2e}")
    load = Table(title=f"predict latency (V2 REST, single rows, {PREDICT_RATE:g} req/s), {args.seconds:g} s each, alternating")
    for column in ("predict", "requests", "p50 ms", "p99 ms", "p99 / alone"):
        load.add_column(column, justify="right")
    alone = percentiles(rounds["alone"])
    for name, times in rounds.items():
        p50, p99 = percentiles(times)
        load.add_row(name, str(len(times)), f"{p50:.2f}", f"{p99:.2f}", f"{p99 / alone[1]:.2f}x")
    console.print(load)
    console.print("targets: exact through HTTP <= 1.3x shap alone (p50); approximate p50 <= 5 ms; "
                  "predict p99 with explanations <= 1.2x alone")


if __name__ == "__main__":
    main()
