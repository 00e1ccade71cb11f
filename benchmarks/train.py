"""Benchmark: the kfp.local training pipeline vs the same search in-process with GridSearchCV(n_jobs=2).

Usage: python benchmarks/train.py [--data URI] [--policy FILE]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

Both sides run the policy's grid with the same estimator settings, the same
stratified holdout and the same stratified k-fold CV, then refit the winner.
Rows printed:
  * in-process search: load + split + GridSearchCV(cv=k, n_jobs=2, refit) + holdout score;
  * in-process same job: the above + ONNX export and its agreement check (what
    the pipeline's fit+export step also does);
  * kfp.local pipeline: the whole pipeline (load, preprocess, ParallelFor, Collected,
    select, fit+export, register, promotion gate), subprocess per task.
Ratios are against the rows measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SHARED_LEAF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kaggle_leaf_train.csv"


def in_process(data_uri: str, policy, with_export: bool) -> tuple[float, float, dict]:
    """Wall seconds, holdout accuracy and best params of the in-process search."""
    import numpy as np
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from kfloop.bundle import export_onnx, onnx_agreement
    from kfloop.data import check_class_counts, load_dataset
    from kfloop.training import make_forest, prepare

    training = policy.training
    start = time.perf_counter()
    data = load_dataset(data_uri)
    check_class_counts(data, training.min_rows_per_class())
    prepared, preprocessor = prepare(data, holdout_fraction=training.holdout_fraction, seed=training.seed)
    grid = [{k: [v] for k, v in params.items()} for params in training.search_space.candidates()]
    search = GridSearchCV(
        make_forest({}, training.seed),
        grid,
        cv=StratifiedKFold(training.cv_folds, shuffle=True, random_state=training.seed),
        scoring="accuracy",
        n_jobs=2,
        refit=True,
    ).fit(prepared.train_features, prepared.train_codes)
    scaled_holdout = preprocessor.transform(prepared.holdout_features)
    predicted = preprocessor.decode(search.best_estimator_.predict(scaled_holdout))
    accuracy = float(np.mean(predicted == prepared.holdout_labels))
    if with_export:
        onnx_bytes = export_onnx(search.best_estimator_, preprocessor.n_features)
        onnx_agreement(onnx_bytes, search.best_estimator_, scaled_holdout)
    return time.perf_counter() - start, accuracy, search.best_params_


def pipeline(data_uri: str, policy) -> tuple[float, float, dict]:
    from kfloop.pipelines.local import run_training_locally
    from kfloop.registry import ModelRegistry

    with tempfile.TemporaryDirectory(prefix="kfloop-bench-") as tmp:
        start = time.perf_counter()
        decision = run_training_locally(policy, registry_uri=f"{tmp}/registry", workdir=Path(tmp), data_uri=data_uri)
        elapsed = time.perf_counter() - start
        meta = ModelRegistry(f"{tmp}/registry").metadata(decision["model"], decision["version"])
    return elapsed, meta["metrics"]["accuracy"], meta["params"]


def main() -> None:
    from kfloop.policies import load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--policy", default=None)
    args = parser.parse_args()
    policy = load_policy(args.policy)
    console = Console(width=200)
    console.print(f"data {args.data}; {len(policy.training.search_space.candidates())} candidates, "
                  f"{policy.training.cv_folds}-fold CV, parallelism {policy.training.parallelism}")
    rows = {
        "in-process search (GridSearchCV n_jobs=2)": in_process(args.data, policy, with_export=False),
        "in-process same job (+ ONNX export)": in_process(args.data, policy, with_export=True),
        "kfp.local pipeline": pipeline(args.data, policy),
    }
    search_s = rows["in-process search (GridSearchCV n_jobs=2)"][0]
    job_s = rows["in-process same job (+ ONNX export)"][0]
    table = Table(title="training: kfp.local pipeline vs in-process")
    for column in ("run", "wall s", "holdout accuracy", "x search", "x same job", "best params"):
        table.add_column(column)
    for name, (seconds, accuracy, params) in rows.items():
        table.add_row(name, f"{seconds:.1f}", f"{accuracy:.4f}", f"{seconds / search_s:.2f}",
                      f"{seconds / job_s:.2f}", str(params))
    console.print(table)


if __name__ == "__main__":
    main()
