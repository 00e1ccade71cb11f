"""The training pipeline's steps as plain functions over local file paths.

Each KFP component in ``kfloop.components.training`` is a thin wrapper that
calls one function here with its artifacts' paths, so every step is tested
without KFP, and runs the same on a laptop and in a cluster pod.
Inputs and results are JSON-able dicts, as KFP passes them between tasks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kfloop import __version__
from kfloop.bundle import MODEL_JOBLIB, MODEL_ONNX, PREPROCESSOR, REFERENCE, export_onnx, onnx_agreement
from kfloop.data import check_class_counts, load_dataset
from kfloop.errors import DataError, InputError
from kfloop.preprocessing import Preprocessor
from kfloop.training import (
    HIGHER_IS_BETTER,
    Prepared,
    beats,
    classification_metrics,
    cross_validate_candidate,
    fit_final,
    normalise_params,
    out_of_bag_candidate,
    prepare,
    select_best,
)


def end_of_task() -> None:
    """Called last in a pipeline task's own process (a component's body; never in a process that lives on).

    The objects made so far are moved out of the garbage collector's reach (``gc.freeze``): the interpreter's
    exit collects every generation once more, which with scikit-learn, SciPy and pandas loaded is slow, and a
    task's end is only seen once its process has exited (the gain is measured in ``docs/pipelines.md``).
    Nothing is lost: the process ends as soon as KFP has written the task's outputs.
    """
    import gc

    gc.freeze()


def prepare_step(data_uri: str, target: str, min_rows_per_class: int, holdout_fraction: float, seed: int,
                 prepared_path: str, preprocessor_path: str) -> dict[str, Any]:
    """Load and validate the data, split the holdout, fit and save the preprocessor and the prepared arrays.

    Returns the data's summary (source, rows, features, classes, fingerprint, notes) and the split's sizes.
    """
    import joblib

    data = load_dataset(data_uri or None, target=target or None)
    check_class_counts(data, min_rows_per_class)
    prepared, preprocessor = prepare(data, holdout_fraction=holdout_fraction, seed=seed)
    prepared.save(prepared_path)
    joblib.dump(preprocessor, preprocessor_path)
    return {
        "source": data.source,
        "rows": data.rows,
        "features": len(data.feature_names),
        "classes": len(data.classes),
        "fingerprint": data.fingerprint(),
        "notes": list(data.notes),
        "train_rows": int(len(prepared.train_codes)),
        "holdout_rows": int(len(prepared.holdout_labels)),
    }


def candidates_step(prepared_path: str, batch: list[dict[str, Any]], cv_folds: int, seed: int,
                    metric: str = "accuracy", evaluation: str = "cv", fitted_dir: str | None = None) -> list[dict[str, Any]]:
    """Score a batch of hyper-parameter sets, one after another, in one process.

    ``evaluation`` ``cv``: stratified k-fold; a set that cannot catch the batch's leader in ``metric`` stops
    early (:func:`~kfloop.training.cross_validate_candidate`). ``oob``: one fit each, out-of-bag metrics
    (:func:`~kfloop.training.out_of_bag_candidate`; a warm search's few sets); the batch leader's forest is
    kept in ``fitted_dir`` (:data:`FITTED_PARAMS` + :data:`FITTED_FOREST`), so a winner is not grown twice.
    With ``fitted_dir`` and CV the folder stays empty: fold models are not the final model.
    """
    prepared = Prepared.load(prepared_path)
    if fitted_dir is not None:
        Path(fitted_dir).mkdir(parents=True, exist_ok=True)
    if evaluation == "oob":
        scored = [out_of_bag_candidate(prepared, params, seed=seed) for params in batch]
        results = [result for result, _ in scored]
        if fitted_dir is not None and results:
            leader = select_best(results, metric)[0]
            _keep_fitted(fitted_dir, leader, scored[results.index(leader)][1])
        return results
    if evaluation != "cv":
        raise InputError(f"unknown candidate evaluation {evaluation!r}: cv or oob")
    results: list[dict[str, Any]] = []
    for params in batch:
        leader = select_best(results, metric)[0]["metrics"][metric] if results else None
        results.append(cross_validate_candidate(prepared, params, cv_folds=cv_folds, seed=seed, metric=metric,
                                                leader=leader))
    return results


FITTED_PARAMS = "params.json"  # the kept forest's hyper-parameters
FITTED_FOREST = "forest.joblib"  # a batch leader's forest, grown on the whole training split, saved as a model


def _save_forest(forest: Any, path: Path) -> None:
    """``forest`` as a model's ``model.joblib`` holds it.

    Grown on every core, but served one request at a time: a pickled n_jobs=-1 would make every single-row
    predict dispatch its trees to a thread pool. zlib level 1: a forest over many classes is mostly zeros
    (99 classes, 300 trees: 95 MB -> 5 MB, 0.4 s).
    """
    import joblib

    joblib.dump(forest.set_params(n_jobs=1), path, compress=("zlib", 1))


def _keep_fitted(folder: str, candidate: dict[str, Any], forest: Any) -> None:
    _save_forest(forest, Path(folder) / FITTED_FOREST)
    (Path(folder) / FITTED_PARAMS).write_text(json.dumps(candidate["params"]))


def _kept_forest(folders: list[str], params: dict[str, Any]) -> Path | None:
    """The file of the forest a candidate task kept for ``params`` (None: none did; the winner is grown again)."""
    wanted = normalise_params(params)
    for folder in folders:
        kept = Path(folder) / FITTED_PARAMS
        if kept.is_file() and normalise_params(json.loads(kept.read_text())) == wanted:
            return Path(folder) / FITTED_FOREST
    return None


def select_step(batches: list[list[dict[str, Any]]], metric: str) -> dict[str, Any]:
    """``{"best": candidate, "ranked": [...], "metric": metric}`` over every batch's candidates."""
    best, ranked = select_best([candidate for batch in batches for candidate in batch], metric)
    return {"best": best, "ranked": ranked, "metric": metric}


def fit_export_step(prepared_path: str, preprocessor_path: str, best_params: dict[str, Any], seed: int, model_dir: str,
                    fitted_dirs: list[str] | None = None) -> dict[str, Any]:
    """Take the winner's forest from a candidate task's ``fitted_dirs`` or refit it, evaluate it on the holdout,
    export joblib + ONNX into ``model_dir``. ``final_fit`` says which: ``reused`` or ``refit``.

    The ONNX file is kept only if it predicts the same label as scikit-learn on
    every holdout row; otherwise servers fall back to the joblib forest.
    """
    import joblib

    prepared = Prepared.load(prepared_path)
    preprocessor: Preprocessor = joblib.load(preprocessor_path)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = _kept_forest(fitted_dirs or [], best_params)
    final_fit = "refit" if kept is None else "reused"
    if kept is None:
        forest = fit_final(prepared, best_params, seed=seed)
        _save_forest(forest, out / MODEL_JOBLIB)
    else:  # saved as a model already: the file is the model's
        shutil.copyfile(kept, out / MODEL_JOBLIB)
        forest = joblib.load(out / MODEL_JOBLIB)
    scaled_holdout = preprocessor.transform(prepared.holdout_features)
    onnx_bytes = export_onnx(forest, preprocessor.n_features)
    agreement = onnx_agreement(onnx_bytes, forest, scaled_holdout)
    if agreement == 1.0:
        (out / MODEL_ONNX).write_bytes(onnx_bytes)
    proba = np.zeros((len(scaled_holdout), len(preprocessor.classes)))
    proba[:, forest.classes_] = forest.predict_proba(scaled_holdout)
    metrics = classification_metrics(prepared.holdout_labels, proba, preprocessor.classes)
    predicted = preprocessor.decode(np.argmax(proba, axis=1))
    return {
        "metrics": metrics,
        "final_fit": final_fit,
        "onnx_agreement": agreement,
        "onnx_exported": agreement == 1.0,
        "classes": list(preprocessor.classes),
        "confusion_matrix": _confusion(prepared.holdout_labels, predicted, preprocessor.classes),
    }


def _confusion(true: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> list[list[int]]:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true, predicted, labels=list(classes)).tolist()


def register_step(
    registry_uri: str,
    model_name: str,
    model_dir: str,
    preprocessor_path: str,
    prepared_path: str,
    data_summary: dict[str, Any],
    selection: dict[str, Any],
    final: dict[str, Any],
    training: dict[str, Any],
    run_id: str,
    lineage: dict[str, Any] | None = None,
) -> str:
    """Store the winner as a new registry version (status ``candidate``); returns the version.

    ``lineage`` (:meth:`kfloop.search.Search.lineage`): how its search was seeded."""
    from importlib.metadata import version as installed  # the versions only: importing onnxruntime is slow

    from kfloop.policies import TrainingPolicy  # here, not at the top: building the spec's models is slow
    from kfloop.registry import ModelRegistry

    if not registry_uri:
        raise DataError("registry_uri is empty: give the pipeline a registry location (--registry)")
    prepared = Prepared.load(prepared_path)
    with tempfile.TemporaryDirectory(prefix="kfloop-register-") as tmp:
        reference_path = os.path.join(tmp, REFERENCE)
        with open(reference_path, "wb") as handle:
            # features: the drift reference (training rows); holdout: rows the forest was not trained on, the
            # baseline of its attributions (kfloop.drift.attribution).
            np.savez(handle, features=prepared.reference, holdout=prepared.holdout_features,
                     feature_names=np.array(prepared.feature_names, dtype=str))
        files = {PREPROCESSOR: preprocessor_path, REFERENCE: reference_path}
        files.update({p.name: str(p) for p in Path(model_dir).iterdir() if p.is_file()})
        # KFP hands dict parameters over as JSON with every number a float: restore the ints.
        ranked = [{**c, "params": normalise_params(c["params"]), **({"folds": int(c["folds"])} if "folds" in c else {})}
                  for c in selection["ranked"]]
        metadata = {
            "params": ranked[0]["params"],
            "cv_metrics": selection["best"]["metrics"],
            "metrics": final["metrics"],
            "selection_metric": selection["metric"],
            "candidates": ranked,
            "onnx_agreement": final["onnx_agreement"],
            "final_fit": final.get("final_fit", "refit"),
            "runtime": "onnx" if final["onnx_exported"] else "joblib",
            "classes": final["classes"],
            "feature_names": list(prepared.feature_names),
            "data": {**data_summary, **{k: int(v) for k, v in data_summary.items() if k in _COUNTS}},
            "training": TrainingPolicy.model_validate(training).model_dump(mode="json", exclude_none=True),
            "pipeline_run_id": run_id,
            "lineage": _restored_lineage(lineage or {"search": "full"}),
            "software": {
                "kfloop": __version__,
                **{name: installed(name) for name in ("scikit-learn", "onnx", "onnxruntime")},
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        return ModelRegistry(registry_uri).register(model_name, files, metadata)


_COUNTS = ("rows", "features", "classes", "train_rows", "holdout_rows")  # the data summary's ints (KFP hands back floats)


def _restored_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    """A search's lineage as it was before KFP turned its numbers into floats."""
    restored = dict(lineage)
    if "candidates" in restored:
        restored["candidates"] = int(restored["candidates"])
    if restored.get("seed_params"):
        restored["seed_params"] = normalise_params(restored["seed_params"])
    if restored.get("pinned"):
        restored["pinned"] = [normalise_params(params) for params in restored["pinned"]]
    return restored


def gate_step(registry_uri: str, model_name: str, version: str, prepared_path: str, metric: str, margin: float,
              move_production: bool = True) -> dict[str, Any]:
    """Promote ``version`` if it beats production on this run's holdout by more than ``margin``.

    Both versions are scored on the same rows, each through its own
    preprocessor, so a production model trained on other data is judged fairly.
    With ``move_production`` the gate itself points production at a winner
    (``kfloop train``); without, the winner is only ``approved`` and the
    production pointer is left to the rollout that serves it (a run the trigger
    service started: the pointer must not move before the canary is judged).
    The decision's ``promoted`` says whether the version passed the gate.
    """
    from kfloop.registry import ModelRegistry

    registry = ModelRegistry(registry_uri)
    prepared = Prepared.load(prepared_path)
    new_metrics = registry.metadata(model_name, version)["metrics"]
    production = registry.production_version(model_name)
    decision: dict[str, Any] = {
        "model": model_name,
        "version": version,
        "metric": metric,
        "margin": margin,
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "candidate_score": new_metrics[metric],
        "production_version": production,
        "production_score": None,
    }
    if production is None:
        decision.update(promoted=True, reason="no production version yet")
    else:
        current = registry.load(model_name, production)
        _, proba = current.predict(prepared.holdout_features)
        current_score = classification_metrics(prepared.holdout_labels, proba, current.preprocessor.classes)[metric]
        decision["production_score"] = current_score
        promoted = beats(metric, new_metrics[metric], current_score, margin)
        relation = "beats" if promoted else "does not beat"
        decision.update(
            promoted=promoted,
            reason=f"{metric} {new_metrics[metric]:.4f} {relation} production v{production} "
            f"{current_score:.4f} by more than {margin}",
        )
    if decision["promoted"] and move_production:
        registry.promote(model_name, version, decision)
    elif decision["promoted"]:
        registry.approve(model_name, version, decision)
    else:
        registry.reject(model_name, version, decision)
    return decision
