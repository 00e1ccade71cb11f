"""Benchmark: calibration, detection and throughput of the watch, both detector backends, on the leaf data.

Usage: python benchmarks/watch.py [--window 100] [--windows 200] [--trials 40] [--seconds 10]
                                  [--backends scipy,alibi] [--no-throughput]
(needs ../shared/data: the Kaggle leaf training set and the UCI 100-plant files; the throughput part
needs wrk: apt-get install -y wrk)

Reference: the training split of the Kaggle set (as the pipeline makes it, seed 42). Clean rows: the
Kaggle holdout plus the UCI 100-plant leaves that are not in the Kaggle training set (the Kaggle test
leaves), mapped to the same 192 features -- rows the model was not trained on.

Every row reaches the detector the way a client sends it: encoded as a V1 body, one V2 FP32 tensor,
one V2 FP64 tensor or one FP32 tensor per feature (kfloop.serving.protocol.request_body), through
JSON, and parsed by the watch's own InputSchema.

Shifts tested (each on clean rows drawn the same way):
  * margin x1.25      -- all 64 margin features scaled by 1.25
  * texture noise     -- Gaussian noise (sigma 0.01) added to the 64 texture features
  * 10 species        -- rows of 10 random species only (a population shift)
  * shape shuffled    -- each of the 64 shape features shuffled across rows on its own
                         (marginals unchanged: only the outlier test can see it)
Targets: false alarms per tested window <= alpha in every row; detection rate >= 0.95 with the
maximum delay within one window (rows from the first shifted row to the alarm).

Throughput (same run, same machine, wrk on loopback: 2 threads, concurrency 16): the transformer -> predictor
chain's single-row V2 requests/s against the watch's ingestion of single-row payload CloudEvents
(unique ids, over HTTP, the real app) -- target >= 4x -- and /healthz latency while the watch is
saturated (target p99 <= 100 ms).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REQUEST_EVENT = "org.kubeflow.serving.inference.request"


def shifts(clean: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    from kfloop.drift import calibration

    species = rng.choice(np.unique(labels), 10, replace=False)
    return {
        "margin x1.25": calibration.scale_columns(slice(0, 64), 1.25),
        "texture noise": calibration.add_noise(slice(128, 192), 0.01),
        "10 species": calibration.replace_rows(clean[np.isin(labels, species)]),
        "shape shuffled": calibration.shuffle_columns(slice(64, 128)),
    }


def as_received(encoding: str, names: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """Rows as sent in ``encoding`` -> rows as the watch parses them (JSON round trip, InputSchema)."""
    from kfloop.serving.protocol import InputSchema, request_body

    schema = InputSchema(names, max_batch=10_000)
    return lambda rows: schema.rows_from_body(orjson.loads(orjson.dumps(request_body(rows, encoding, names))))


def calibration_table(args: argparse.Namespace, console: Console) -> None:
    from kfloop.data import load_dataset
    from kfloop.drift import calibration
    from kfloop.drift.backends import make_detector
    from kfloop.drift.detectors import DetectorConfig
    from kfloop.serving.protocol import ENCODINGS

    kaggle = load_dataset(str(SHARED / "kaggle_leaf_train.csv"))
    reference, clean, labels = calibration.clean_streams(kaggle, load_dataset(str(SHARED)))
    names = tuple(kaggle.feature_names)
    stride = args.window // 4
    console.print(f"reference {len(reference)} rows, clean pool {len(clean)} rows (not trained on), window {args.window}, "
                  f"stride {stride}, alpha {args.alpha}, correction {args.correction}, {args.trials} trials per shift")
    table = Table(title="watch calibration on leaf data, rows as clients send them")
    for column in ("backend", "encoding", "case", "false alarms / windows", "detection rate", "median delay (rows)",
                   "max delay (rows)", "rows/s tested"):
        table.add_column(column, justify="right")
    for backend in args.backends:
        detector = make_detector(backend, DetectorConfig(alpha=args.alpha, correction=args.correction)).fit(reference)
        for encoding in ENCODINGS:
            encode = as_received(encoding, names)
            start = time.perf_counter()
            rate, tested = calibration.false_alarm_rate(detector, clean, windows=args.windows, window=args.window,
                                                        stride=stride, encode=encode)
            speed = tested * stride / (time.perf_counter() - start)
            verdict = "" if rate <= args.alpha else " [red](over alpha)"
            table.add_row(backend, encoding, "clean", f"{rate:.3f} ({tested}){verdict}", "-", "-", "-", f"{speed:.0f}")
            for name, shift in shifts(clean, labels, np.random.default_rng(1)).items():
                found = calibration.detection(detector, clean, shift, trials=args.trials, window=args.window, stride=stride,
                                              encode=encode)
                table.add_row(backend, encoding, name, "-", f"{found.rate:.2f}", f"{found.median_delay:.0f}",
                              str(found.max_delay), "-")
    console.print(table)


# --- throughput -----------------------------------------------------------------------------------

_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")


def wrk(url: str, lua: str, concurrency: int, seconds: int, work: Path) -> float:
    """Requests/s of wrk running ``lua`` against ``url``; any non-2xx answer or socket error aborts."""
    script = work / f"load-{abs(hash(lua))}.lua"
    script.write_text(lua)
    out = subprocess.run(["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors under load at {url}:\n{out}")
    return float(_RATE.search(out).group(1))


def _lua_body(body: dict) -> str:
    return f"wrk.body = [[{json.dumps(body)}]]\n"


def inference_lua(row: list[float]) -> str:
    body = {"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}
    return 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n' + _lua_body(body)


def event_lua(row: list[float], token: str) -> str:
    """Binary-mode payload CloudEvents, one row each, each with an id of its own, with the home's token."""
    body = {"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}
    return (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
        'wrk.headers["ce-specversion"] = "1.0"\n'
        f'wrk.headers["ce-type"] = "{REQUEST_EVENT}"\nwrk.headers["ce-source"] = "benchmark"\n'
        + _lua_body(body)
        + 'counter = 0\nrequest = function()\n  counter = counter + 1\n'
        '  wrk.headers["ce-id"] = "bench-" .. tostring(math.random(1, 1e9)) .. "-" .. counter\n'
        "  return wrk.format()\nend\n"
    )


def healthz_latency(url: str, seconds: float) -> list[float]:
    """Milliseconds of /healthz answers, one after the other, for ``seconds``."""
    times: list[float] = []
    with httpx.Client(timeout=10.0) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            client.get(url).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    return times


def throughput_table(args: argparse.Namespace, console: Console) -> None:
    from kfloop.local.runtime import ServingRuntime
    from kfloop.credentials import local_token
    from kfloop.local.supervisor import ManagedProcess, free_port

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import train  # noqa: E402 - the serving benchmark's forest, registered the same way

    with tempfile.TemporaryDirectory(prefix="kfloop-bench-watch-") as tmp:
        work = Path(tmp)
        _, row = train(str(SHARED / "kaggle_leaf_train.csv"), work / "registry", work)
        with ServingRuntime(str(work / "registry"), "leaf", home=work / "home", http_port=free_port(), grpc_port=free_port(), log_dir=work / "logs") as runtime:
            chain = wrk(runtime.endpoints["v2"], inference_lua(row), 16, args.seconds, work)
        sink = free_port()  # nothing listens: alarms wait in the outbox, as with a broker outage
        port = free_port()
        watch = ManagedProcess(
            "watch", [sys.executable, "-m", "kfloop", "watch", "--registry", str(work / "registry"), "--model", "leaf",
                      "--sink", f"http://127.0.0.1:{sink}/", "--http-port", str(port), "--state-dir", str(work / "watch"),
                      "--home", str(work / "home")],
            f"http://127.0.0.1:{port}/healthz", work / "watch.log",
        )
        watch.spawn()
        try:
            watch.wait_ready()
            idle = healthz_latency(f"http://127.0.0.1:{port}/healthz", 2.0)
            busy: list[float] = []
            prober = threading.Thread(target=lambda: busy.extend(
                healthz_latency(f"http://127.0.0.1:{port}/healthz", args.seconds - 2)))
            threading.Timer(1.0, prober.start).start()
            ingest = wrk(f"http://127.0.0.1:{port}/", event_lua(row, local_token(work / "home")), 16, args.seconds, work)
            time.sleep(1.5)
            prober.join()
        finally:
            watch.stop()

    def p(values: list[float], q: float) -> str:
        return f"{np.percentile(values, q):.1f}" if values else "-"

    table = Table(title=f"watch ingestion vs the serving chain, single rows, wrk c=16, {args.seconds} s each")
    for column in ("what", "per second", "ratio to the chain"):
        table.add_column(column, justify="right")
    table.add_row("chain: transformer -> predictor, V2 infer", f"{chain:.0f}", "1.00x")
    table.add_row("watch: payload CloudEvents ingested", f"{ingest:.0f}", f"{ingest / chain:.2f}x")
    console.print(table)
    latency = Table(title="watch /healthz latency (ms), one probe every 20 ms")
    for column in ("while", "probes", "p50", "p99", "max"):
        latency.add_column(column, justify="right")
    latency.add_row("idle", str(len(idle)), p(idle, 50), p(idle, 99), f"{max(idle):.1f}")
    latency.add_row("saturated (wrk c=16)", str(len(busy)), p(busy, 50), p(busy, 99), f"{max(busy):.1f}" if busy else "-")
    console.print(latency)
    console.print(f"targets: ingestion >= 4x the chain (got {ingest / chain:.2f}x); /healthz p99 <= 100 ms while saturated "
                  f"(got {statistics.quantiles(busy, n=100)[98]:.1f} ms)" if len(busy) > 2 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--correction", default="fdr", choices=("bonferroni", "fdr"))
    parser.add_argument("--backends", type=lambda text: text.split(","), default=["scipy", "alibi"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-calibration", action="store_true")
    args = parser.parse_args()
    console = Console(width=200)
    if not args.no_calibration:
        calibration_table(args, console)
    if not args.no_throughput:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is needed for the throughput part: apt-get install -y wrk (or --no-throughput)")
        throughput_table(args, console)


if __name__ == "__main__":
    main()
