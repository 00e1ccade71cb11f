"""A predictor's explanations, in a worker process of their own so they never starve its predictions.

TreeSHAP holds the interpreter while it walks the trees, so explanations run in one spawned worker process
(:class:`ExplainWorkers`), at a lower CPU priority, that loads the version's kept forest once
(:class:`~kfloop.explain.ForestExplainer`).
Requests are bounded: at most ``max_rows`` rows each (413), at most :data:`MAX_WAITING` waiting or running
(503 with a Retry-After), each answered within ``timeout`` seconds (503). A worker that dies is replaced on
the next request; the request it was running gets a 503. :class:`~kfloop.serving.predictor.ForestPredictor`
owns one; the metrics are ``kfloop_explain_requests_total`` and ``kfloop_explain_seconds``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from prometheus_client import Counter, Histogram

from kfloop.bundle import MODEL_JOBLIB
from kfloop.errors import KfloopError, NotFoundError, PayloadTooLarge, TemporaryError
from kfloop.explain import DEFAULT_MAX_ROWS, ExplainOptions, Explanation, ForestExplainer
from kfloop.lifetimes import die_with_parent

__all__ = ["EXPLAIN_REQUESTS", "EXPLAIN_SECONDS", "MAX_WAITING", "ExplainWorkers"]

MAX_WAITING = 4  # explain requests waiting or running in one predictor; more are refused (503)
EXPLAIN_TIMEOUT = 60.0  # seconds one explain request may take, waiting included
WORKER_NICENESS = 10  # the worker's CPU priority below the predictor's (any process may lower its own)

EXPLAIN_REQUESTS = Counter("kfloop_explain_requests", "Explain requests, by method and outcome.",
                           ["model", "version", "method", "outcome"])
EXPLAIN_SECONDS = Histogram("kfloop_explain_seconds", "Time to explain one request (waiting included), by method.",
                            ["model", "method"], buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

_explainer: ForestExplainer | None = None  # the worker process's own


def _load(version_dir: str, version: str, parent: int) -> None:
    global _explainer
    die_with_parent(parent=parent)  # a predictor killed with SIGKILL leaves no worker behind
    os.nice(WORKER_NICENESS)  # predictions first: the scheduler gives this process what they leave
    _explainer = ForestExplainer.load(version_dir, version)


def _explain(scaled: np.ndarray, options: ExplainOptions) -> Explanation:
    assert _explainer is not None
    return _explainer.explain_scaled(scaled, options)


class ExplainWorkers:
    """One worker process explaining ``version_dir`` for model ``model``; started on first use."""

    def __init__(self, model: str, version_dir: str, version: str, *, max_rows: int = DEFAULT_MAX_ROWS,
                 timeout: float = EXPLAIN_TIMEOUT) -> None:
        self.model, self.version_dir, self.version = model, version_dir, version
        self.max_rows, self.timeout = max_rows, timeout
        self.has_forest = (Path(version_dir) / MODEL_JOBLIB).exists()  # the folder is the served version's: fixed
        self._pool: ProcessPoolExecutor | None = None
        self._waiting = 0

    def check_rows(self, rows: int) -> None:
        """A :class:`PayloadTooLarge` for a request over the row limit (before any work)."""
        if rows > self.max_rows:
            raise PayloadTooLarge(f"{rows} rows to explain; at most {self.max_rows} per request (the policy's explain.max_rows)")

    async def explain(self, scaled: np.ndarray, options: ExplainOptions) -> Explanation:
        """Attributions of scaled rows, from the worker process."""
        self.check_rows(len(scaled))
        if not self.has_forest:
            raise NotFoundError(f"version {self.version} keeps no forest ({MODEL_JOBLIB}) to explain")
        if self._waiting >= MAX_WAITING:
            self._count(options, "busy")
            raise TemporaryError(f"{self._waiting} explain requests are waiting already; try again", delay=1.0)
        self._waiting += 1
        started = time.perf_counter()
        try:
            future = self._workers().submit(_explain, scaled, options)
            explanation = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            self._count(options, "timeout")
            raise TemporaryError(f"the explanation took longer than {self.timeout:g} s; try fewer rows or "
                                 "method approximate", delay=1.0) from None
        except BrokenProcessPool:
            self._pool = None  # the next request starts a new worker
            self._count(options, "error")
            raise TemporaryError("the explain worker stopped; try again", delay=1.0) from None
        except KfloopError:
            self._count(options, "error")
            raise
        finally:
            self._waiting -= 1
        EXPLAIN_SECONDS.labels(self.model, options.method).observe(time.perf_counter() - started)
        self._count(options, "ok")
        return explanation

    def _count(self, options: ExplainOptions, outcome: str) -> None:
        EXPLAIN_REQUESTS.labels(self.model, self.version, options.method, outcome).inc()

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_load, initargs=(self.version_dir, self.version, os.getpid()))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
