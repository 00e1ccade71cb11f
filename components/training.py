"""The training pipeline's KFP v2 lightweight components.

Each function body only moves artifact paths and metrics between KFP and one
step function of :mod:`kfloop.steps`. The functions are turned into
components by :func:`build_training_components`, which pins ``base_image`` to
the kfloop image (configurable, it must have kfloop installed) and skips
KFP's per-task ``pip install kfp`` (the image has it).
"""

from dataclasses import dataclass
from typing import Any, List

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kfloop import __version__

DEFAULT_IMAGE = f"ghcr.io/kfloop/kfloop:{__version__}"


def load_data(data_uri: str, target: str, min_rows_per_class: int, dataset: Output[Dataset]) -> dict:
    """Load and validate the labelled data."""
    from kfloop.steps import load_step

    summary = load_step(data_uri, target, min_rows_per_class, dataset.path)
    dataset.metadata.update({k: v for k, v in summary.items() if k != "notes"})
    for note in summary["notes"]:
        print(f"note: {note}")
    return summary


def prepare_data(
    dataset: Input[Dataset],
    holdout_fraction: float,
    seed: int,
    prepared: Output[Dataset],
    preprocessor: Output[Model],
) -> dict:
    """Split the stratified holdout; fit the scaler and label encoder."""
    from kfloop.steps import prepare_step

    sizes = prepare_step(dataset.path, holdout_fraction, seed, prepared.path, preprocessor.path)
    prepared.metadata.update(sizes)
    return sizes


def train_candidate(prepared: Input[Dataset], params: dict, cv_folds: int, seed: int, metrics: Output[Metrics]) -> dict:
    """Cross-validate one random forest; log its metrics and parameters for the run view."""
    from kfloop.steps import candidate_step

    result = candidate_step(prepared.path, params, cv_folds, seed)
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    for name, value in result["params"].items():
        metrics.log_metric(f"param_{name}", value if isinstance(value, (int, float)) else str(value))
    return result


def select_best(candidates: List[dict], metric: str) -> dict:
    """Rank the collected candidates by the selection metric."""
    from kfloop.steps import select_step

    return select_step(candidates, metric)


def fit_and_export(
    prepared: Input[Dataset],
    preprocessor: Input[Model],
    selection: dict,
    seed: int,
    model: Output[Model],
    holdout_metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> dict:
    """Refit the winner, export joblib + ONNX, log holdout metrics and the confusion matrix."""
    from kfloop.steps import fit_export_step

    final = fit_export_step(prepared.path, preprocessor.path, selection["best"]["params"], seed, model.path)
    for name, value in final["metrics"].items():
        holdout_metrics.log_metric(name, value)
    holdout_metrics.log_metric("onnx_agreement", final["onnx_agreement"])
    confusion.log_confusion_matrix(final["classes"], final["confusion_matrix"])
    model.metadata.update({"framework": "scikit-learn", "runtime": "onnx" if final["onnx_exported"] else "joblib"})
    return {k: v for k, v in final.items() if k != "confusion_matrix"}


def register_model(
    registry_uri: str,
    model_name: str,
    model: Input[Model],
    preprocessor: Input[Model],
    prepared: Input[Dataset],
    data_summary: dict,
    selection: dict,
    final: dict,
    training: dict,
    run_id: str,
) -> str:
    """Store the winner as a new registry version."""
    from kfloop.steps import register_step

    return register_step(
        registry_uri, model_name, model.path, preprocessor.path, prepared.path,
        data_summary, selection, final, training, run_id,
    )


def promotion_gate(registry_uri: str, model_name: str, version: str, prepared: Input[Dataset], metric: str, margin: float,
                   move_production: bool) -> dict:
    """Pass the new version only if it beats production on the same holdout; with move_production, promote it."""
    from kfloop.steps import gate_step

    return gate_step(registry_uri, model_name, version, prepared.path, metric, margin, move_production)


@dataclass(frozen=True)
class TrainingComponents:
    """The components of one image."""

    load_data: Any
    prepare_data: Any
    train_candidate: Any
    select_best: Any
    fit_and_export: Any
    register_model: Any
    promotion_gate: Any


def build_training_components(image: str = DEFAULT_IMAGE) -> TrainingComponents:
    """The training components with ``base_image`` pinned to ``image``."""

    def component(func: Any) -> Any:
        return dsl.component(func=func, base_image=image, install_kfp_package=False)

    return TrainingComponents(
        load_data=component(load_data),
        prepare_data=component(prepare_data),
        train_candidate=component(train_candidate),
        select_best=component(select_best),
        fit_and_export=component(fit_and_export),
        register_model=component(register_model),
        promotion_gate=component(promotion_gate),
    )
