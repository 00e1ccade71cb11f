"""Benchmark: the transformer's hop to a predictor with aiohttp (what it uses) against httpx's AsyncClient.

Usage: python benchmarks/http_clients.py [--data URI] [--calls 2000]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

kfloop speaks httpx everywhere (kfloop.http_clients) except this one hop, where the
transformer posts each V2 request's scaled rows to a predictor replica. Both clients
post the same single-row V2 body to one real ``kfloop predictor`` on loopback, each
with one long-lived pooled session as the transformer keeps it: sequentially (c=1)
and 16 at a time (c=16), in alternating rounds so drift in the machine's load hits
both. The table gives per-call latency, throughput and CPU of this process per call,
with httpx / aiohttp ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SHARED_LEAF, predictor_process, train  # noqa: E402

ROUNDS = 4


async def with_aiohttp(url: str, body: bytes, calls: int, concurrency: int) -> tuple[list[float], float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def call() -> None:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
        return await _timed(call, calls, concurrency)


async def with_httpx(url: str, body: bytes, calls: int, concurrency: int) -> tuple[list[float], float, float]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=30)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def call() -> None:
            answer = await client.post(url, content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 200, answer.status_code
        return await _timed(call, calls, concurrency)


async def _timed(call, calls: int, concurrency: int) -> tuple[list[float], float, float]:
    """Per-call seconds, wall seconds and CPU seconds of this process for ``calls`` calls, ``concurrency`` at a time."""
    for _ in range(20):  # warm the pool
        await call()
    latencies: list[float] = []

    async def worker(share: int) -> None:
        for _ in range(share):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return latencies, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    clients = {"aiohttp": with_aiohttp, "httpx": with_httpx}
    results: dict[tuple[str, int], list[tuple[list[float], float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-clients-") as tmp:
        work = Path(tmp)
        version_dir, row = train(args.data, work / "registry", work)
        body = orjson.dumps({"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]})
        predictor, url = predictor_process(version_dir, work)
        predictor.spawn()
        try:
            predictor.wait_ready()
            for _ in range(ROUNDS):
                for concurrency in (1, 16):
                    for name, client in clients.items():
                        results.setdefault((name, concurrency), []).append(
                            asyncio.run(client(url, body, args.calls // ROUNDS, concurrency)))
        finally:
            predictor.stop()

    table = Table(title=f"transformer -> predictor hop, V2 REST single-row, {args.calls} calls per cell "
                        f"({ROUNDS} alternating rounds), data {Path(args.data).name}")
    for column in ("client", "concurrency", "p50 ms", "p99 ms", "calls/s", "client CPU us/call",
                   "p50 / aiohttp", "calls/s / aiohttp", "CPU / aiohttp"):
        table.add_column(column, justify="right")
    summary: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for (name, concurrency), rounds in results.items():
        latencies = np.asarray([value for latency, _, _ in rounds for value in latency]) * 1000
        wall, cpu = sum(r[1] for r in rounds), sum(r[2] for r in rounds)
        summary[(name, concurrency)] = (float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                                        len(latencies) / wall, cpu / len(latencies) * 1e6)
    for (name, concurrency), (p50, p99, rate, cpu) in sorted(summary.items(), key=lambda item: (item[0][1], item[0][0])):
        base = summary[("aiohttp", concurrency)]
        table.add_row(name, str(concurrency), f"{p50:.2f}", f"{p99:.2f}", f"{rate:.0f}", f"{cpu:.0f}",
                      f"{p50 / base[0]:.2f}x", f"{rate / base[2]:.2f}x", f"{cpu / base[3]:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
