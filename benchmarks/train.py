"""Benchmark: the kfp.local training pipeline, full grid and warm-started, against the same job in process.

Usage: python benchmarks/train.py [--data URI] [--policy FILE] [--splits N]
(default data: ../shared/data/kaggle_leaf_train.csv when present, else builtin:digits)

All runs use the policy's estimator settings, a stratified holdout and stratified k-fold CV. Printed:

1. Time, on the policy's own split (its seed):
  * in-process search: load + split + GridSearchCV(cv=k, n_jobs=2, refit) + holdout score;
  * in-process same job: the above + ONNX export and its agreement check (what
    the pipeline's select + fit + export task also does);
  * full-grid pipeline: the whole kfp.local pipeline (prepare, candidate batches in a ParallelFor,
    select + fit + export, register + promotion gate), a subprocess per task, into a fresh registry;
  * warm retraining pipeline: the same pipeline as an alarm's run starts it (retraining.search: warm),
    seeded from the production version that a full-grid run trained on a different holdout split.
   And early stopping's effect on the full grid: how many candidates stopped before their last fold, how many
   folds were scored, and whether the winner and its holdout accuracy are GridSearchCV's (which scores every fold).
2. Accuracy, on N holdout splits (seeds seed ... seed + N - 1; default 3): on each split a full-grid
   run, and a warm run seeded from the full-grid version of the next split (the last from the first's).
   One split's holdout decides a leaf model's accuracy in steps of one row (1/198 = 0.005), so the warm
   search is judged on the mean over the splits, as well as split by split.
Ratios are against runs measured in the same run of this script. Targets (issue 16): full-grid pipeline
<= 1.3 x the in-process same job; warm <= 0.4 x the full-grid pipeline; warm holdout accuracy within
0.005 of the full grid's.
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


def pipeline(data_uri: str, policy, registry: str, workdir: Path, search=None) -> tuple[float, float, dict, list]:
    """Wall seconds, holdout accuracy, best params and the ranked candidates (with the folds each was scored on)
    of one kfp.local run into ``registry``."""
    from kfloop.pipelines.local import run_training_locally
    from kfloop.registry import ModelRegistry

    start = time.perf_counter()
    decision = run_training_locally(policy, registry_uri=registry, workdir=workdir, data_uri=data_uri, search=search,
                                    move_production=search is None)
    elapsed = time.perf_counter() - start
    meta = ModelRegistry(registry).metadata(decision["model"], decision["version"])
    return elapsed, meta["metrics"]["accuracy"], meta["params"], meta["candidates"]


def warm_pipeline(data_uri: str, policy, registry: str, workdir: Path) -> tuple[float, float, dict, list]:
    """The timed warm run on ``policy``'s split, seeded from the production version of ``registry`` (a full-grid
    run on another split)."""
    from kfloop.registry import ModelRegistry
    from kfloop.search import warm_search

    store = ModelRegistry(registry)
    parent = store.production_version(policy.model)
    search = warm_search(policy.training.search_space.candidates(), parent, store.metadata(policy.model, parent),
                         neighbourhood=policy.retraining.neighbourhood,
                         pinned=[pinned.params() for pinned in policy.retraining.pinned])
    return pipeline(data_uri, policy, registry, workdir, search=search)


def on_split(policy, seed: int):
    """``policy`` with its holdout split and CV folds drawn with ``seed``."""
    return policy.model_copy(update={"training": policy.training.model_copy(update={"seed": seed})})


def main() -> None:
    from kfloop.policies import load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_LEAF) if SHARED_LEAF.exists() else "builtin:digits")
    parser.add_argument("--policy", default=None)
    parser.add_argument("--splits", type=int, default=3, help="holdout splits the warm search's accuracy is judged on")
    args = parser.parse_args()
    policy = load_policy(args.policy)
    seeds = [policy.training.seed + offset for offset in range(max(2, args.splits))]
    console = Console(width=200)
    console.print(f"data {args.data}; {len(policy.training.search_space.candidates())} candidates, "
                  f"{policy.training.cv_folds}-fold CV, parallelism {policy.training.parallelism}, "
                  f"warm neighbourhood {policy.retraining.neighbourhood}; splits {seeds}")
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-") as tmp:
        searched = in_process(args.data, policy, with_export=False)
        job = in_process(args.data, policy, with_export=True)
        registries = {seed: f"{tmp}/registry-{seed}" for seed in seeds}
        full = {seed: pipeline(args.data, on_split(policy, seed), registries[seed], Path(tmp)) for seed in seeds}
        # Each split's warm run starts from the next split's full-grid version (the last from the first's).
        warm = {seed: warm_pipeline(args.data, on_split(policy, seed), registries[seeds[(i + 1) % len(seeds)]], Path(tmp))
                for i, seed in enumerate(seeds)}
    own = seeds[0]
    job_s, (full_s, full_accuracy, _, full_candidates) = job[0], full[own]
    table = Table(title=f"training time: kfp.local pipeline (full grid, warm) vs the same job in process (split {own})")
    for column in ("run", "wall s", "holdout accuracy", "x same job", "x full-grid pipeline", "accuracy - full grid", "best params"):
        table.add_column(column)
    rows = {"in-process search (GridSearchCV n_jobs=2)": searched, "in-process same job (+ ONNX export)": job,
            "full-grid pipeline": full[own], f"warm retraining pipeline (parent: split {seeds[1]})": warm[own]}
    for name, (seconds, accuracy, params, *_) in rows.items():
        table.add_row(name, f"{seconds:.1f}", f"{accuracy:.4f}", f"{seconds / job_s:.2f}", f"{seconds / full_s:.2f}",
                      f"{accuracy - full_accuracy:+.4f}", str(params))
    console.print(table)
    folds = policy.training.cv_folds
    stopped = [c for c in full_candidates if c["folds"] < folds]
    same = "the same winner" if full[own][2] == searched[2] else f"another winner than GridSearchCV's {searched[2]}"
    console.print(f"early stopping (full grid, split {own}): {len(stopped)} of {len(full_candidates)} candidates stopped "
                  f"early, {sum(c['folds'] for c in full_candidates)} of {folds * len(full_candidates)} folds scored; "
                  f"{same} as GridSearchCV over every fold, holdout accuracy {full_accuracy - searched[1]:+.4f}")
    accuracy_table = Table(title=f"warm retraining against the full grid on {len(seeds)} holdout splits")
    for column in ("split", "parent: split", "full grid s", "warm s", "warm x full", "full grid accuracy", "warm accuracy",
                   "warm - full", "full grid best", "warm best"):
        accuracy_table.add_column(column)
    for i, seed in enumerate(seeds):
        (f_s, f_acc, f_params, _), (w_s, w_acc, w_params, _) = full[seed], warm[seed]
        accuracy_table.add_row(str(seed), str(seeds[(i + 1) % len(seeds)]), f"{f_s:.1f}", f"{w_s:.1f}", f"{w_s / f_s:.2f}",
                               f"{f_acc:.4f}", f"{w_acc:.4f}", f"{w_acc - f_acc:+.4f}", str(f_params), str(w_params))
    mean_full, mean_warm = (sum(run[seed][1] for seed in seeds) / len(seeds) for run in (full, warm))
    mean_ratio = sum(warm[seed][0] / full[seed][0] for seed in seeds) / len(seeds)
    accuracy_table.add_row("mean", "", f"{sum(full[s][0] for s in seeds) / len(seeds):.1f}",
                           f"{sum(warm[s][0] for s in seeds) / len(seeds):.1f}", f"{mean_ratio:.2f}", f"{mean_full:.4f}",
                           f"{mean_warm:.4f}", f"{mean_warm - mean_full:+.4f}", "", "")
    console.print(accuracy_table)


if __name__ == "__main__":
    main()
