"""Benchmark: the kfp.local training pipeline, full grid and warm-started, against the same job in process.

Usage: python benchmarks/train.py [--data URI] [--policy FILE]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

All rows run the policy's estimator settings on the same stratified holdout and the same stratified
k-fold CV, then refit the winner. Rows printed:
  * in-process search: load + split + GridSearchCV(cv=k, n_jobs=2, refit) + holdout score;
  * in-process same job: the above + ONNX export and its agreement check (what
    the pipeline's select + fit + export task also does);
  * full-grid pipeline: the whole kfp.local pipeline (prepare, candidate batches in a ParallelFor,
    select + fit + export, register + promotion gate), a subprocess per task, into a fresh registry;
  * warm retraining pipeline: the same pipeline as an alarm's run starts it (retraining.search: warm),
    seeded from a production version that a full-grid run trained on a different holdout split (seed + 1).
Ratios are against rows measured in the same run. Targets (issue 16): full-grid pipeline <= 1.3 x the
in-process same job; warm <= 0.4 x the full-grid pipeline; warm holdout accuracy within 0.005 of the full grid's.
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


def pipeline(data_uri: str, policy, registry: str, workdir: Path, search=None) -> tuple[float, float, dict]:
    """Wall seconds, holdout accuracy and best params of one kfp.local run into ``registry``."""
    from kfloop.pipelines.local import run_training_locally
    from kfloop.registry import ModelRegistry

    start = time.perf_counter()
    decision = run_training_locally(policy, registry_uri=registry, workdir=workdir, data_uri=data_uri, search=search,
                                    move_production=search is None)
    elapsed = time.perf_counter() - start
    meta = ModelRegistry(registry).metadata(decision["model"], decision["version"])
    return elapsed, meta["metrics"]["accuracy"], meta["params"]


def warm_pipeline(data_uri: str, policy, workdir: Path) -> tuple[float, float, dict]:
    """A parent trained (full grid) on another split, then the timed warm run on the policy's own split."""
    from kfloop.registry import ModelRegistry
    from kfloop.search import warm_search

    registry = str(workdir / "registry-warm")
    other_split = policy.model_copy(update={"training": policy.training.model_copy(update={"seed": policy.training.seed + 1})})
    pipeline(data_uri, other_split, registry, workdir)
    store = ModelRegistry(registry)
    parent = store.production_version(policy.model)
    search = warm_search(policy.training.search_space.candidates(), parent, store.metadata(policy.model, parent),
                         neighbourhood=policy.retraining.neighbourhood,
                         pinned=[pinned.params() for pinned in policy.retraining.pinned])
    return pipeline(data_uri, policy, registry, workdir, search=search)


def main() -> None:
    from kfloop.policies import load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--policy", default=None)
    args = parser.parse_args()
    policy = load_policy(args.policy)
    console = Console(width=200)
    console.print(f"data {args.data}; {len(policy.training.search_space.candidates())} candidates, "
                  f"{policy.training.cv_folds}-fold CV, parallelism {policy.training.parallelism}, "
                  f"warm neighbourhood {policy.retraining.neighbourhood}")
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-") as tmp:
        rows = {
            "in-process search (GridSearchCV n_jobs=2)": in_process(args.data, policy, with_export=False),
            "in-process same job (+ ONNX export)": in_process(args.data, policy, with_export=True),
            "full-grid pipeline": pipeline(args.data, policy, f"{tmp}/registry-full", Path(tmp)),
            "warm retraining pipeline": warm_pipeline(args.data, policy, Path(tmp)),
        }
    job_s = rows["in-process same job (+ ONNX export)"][0]
    full_s, full_accuracy = rows["full-grid pipeline"][:2]
    table = Table(title="training: kfp.local pipeline (full grid, warm) vs the same job in process")
    for column in ("run", "wall s", "holdout accuracy", "x same job", "x full-grid pipeline", "accuracy - full grid", "best params"):
        table.add_column(column)
    for name, (seconds, accuracy, params) in rows.items():
        table.add_row(name, f"{seconds:.1f}", f"{accuracy:.4f}", f"{seconds / job_s:.2f}", f"{seconds / full_s:.2f}",
                      f"{accuracy - full_accuracy:+.4f}", str(params))
    console.print(table)


if __name__ == "__main__":
    main()
