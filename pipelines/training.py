"""The KFP v2 training pipeline: prepare -> ParallelFor(candidate batches) -> Collected -> select +
fit + export + register + promotion gate.

:func:`build_training_pipeline` makes the pipeline for one policy and image
(``parallelism`` is a compile-time constant in KFP, so it comes from the
policy at build time); :func:`pipeline_arguments` gives the run-time
arguments. The same pipeline runs under ``kfp.local`` and on a cluster.

(No ``from __future__ import annotations`` here: KFP reads the pipeline
function's annotations as real types.)
"""

from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from kfloop.components.training import DEFAULT_IMAGE, build_training_components
from kfloop.data import DEFAULT_DATA_URI
from kfloop.policies import Policy
from kfloop.search import Search, full_search

PIPELINE_NAME = "kfloop-training"
CANDIDATE_TASK = "train-candidates"
SELECT_TASK = "select-to-gate"
# The pipeline's tasks in run order: KFP task name -> the name the Kubeflow UI and `kfloop train` show.
PIPELINE_TASKS = {
    "prepare-data": "load + validate + preprocess",
    CANDIDATE_TASK: "train candidates",
    SELECT_TASK: "select + fit + export + register + promotion gate",
}


def pipeline_arguments(
    policy: Policy,
    *,
    data_uri: str | None = None,
    target: str | None = None,
    registry_uri: str = "",
    model: str | None = None,
    move_production: bool = True,
    search: Search | None = None,
) -> dict[str, Any]:
    """Run-time arguments of the training pipeline for ``policy``.

    ``move_production`` False: the promotion gate only approves a winner, and the
    caller's rollout moves the production pointer (the trigger service's runs).
    ``search``: the candidates and their lineage (default: the policy's full grid).
    """
    training = policy.training
    search = search or full_search(training.search_space.candidates())
    return {
        "data_uri": data_uri or DEFAULT_DATA_URI,
        "target": target or "",
        "registry_uri": registry_uri,
        "model_name": model or policy.model,
        "search_batches": training.batches(search.candidates),
        "lineage": search.lineage(),
        "evaluation": search.evaluation,
        "cv_folds": training.cv_folds,
        "holdout_fraction": training.holdout_fraction,
        "seed": training.seed,
        "selection_metric": training.selection_metric,
        "promotion_margin": training.promotion_margin,
        "min_rows_per_class": training.min_rows_per_class(),
        "move_production": move_production,
    }


def build_training_pipeline(policy: Policy, image: str = DEFAULT_IMAGE, registry_uri: str = "") -> Any:
    """The training pipeline function; its parameter defaults come from ``policy``.

    Three kinds of task, as few as keep the UI readable (each task start pays its imports):
    prepare (load, validate, split, preprocess), the candidate batches in a ``ParallelFor``, and select +
    refit + export + register + promotion gate (its output is the gate's decision). No task is ever taken
    from KFP's cache: its key ignores input artifacts' URIs, so a run on new data at the same address (or
    new captures) would reuse old results, and the last task reads and writes the registry, which is state
    outside its inputs.
    """
    steps = build_training_components(image)
    defaults = pipeline_arguments(policy, registry_uri=registry_uri)
    training_dict = policy.training.model_dump(mode="json", exclude_none=True)

    def uncached(task: Any, name: str) -> Any:
        task.set_display_name(PIPELINE_TASKS[name])
        task.set_caching_options(False)
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Tune random forests in parallel, select the best, register it and promote it if it beats production.",
    )
    def training_pipeline(
        data_uri: str = defaults["data_uri"],
        target: str = defaults["target"],
        registry_uri: str = defaults["registry_uri"],
        model_name: str = defaults["model_name"],
        search_batches: list = defaults["search_batches"],
        lineage: dict = defaults["lineage"],
        evaluation: str = defaults["evaluation"],
        cv_folds: int = defaults["cv_folds"],
        holdout_fraction: float = defaults["holdout_fraction"],
        seed: int = defaults["seed"],
        selection_metric: str = defaults["selection_metric"],
        promotion_margin: float = defaults["promotion_margin"],
        min_rows_per_class: int = defaults["min_rows_per_class"],
        move_production: bool = defaults["move_production"],
    ) -> dict:
        prepared = uncached(steps.prepare_data(
            data_uri=data_uri, target=target, min_rows_per_class=min_rows_per_class, holdout_fraction=holdout_fraction,
            seed=seed,
        ), "prepare-data")
        with dsl.ParallelFor(items=search_batches, parallelism=policy.training.parallelism) as batch:
            candidates = uncached(steps.train_candidates(
                prepared=prepared.outputs["prepared"], batch=batch, cv_folds=cv_folds, seed=seed, metric=selection_metric,
                evaluation=evaluation,
            ), CANDIDATE_TASK)
        gate = uncached(steps.select_to_gate(
            prepared=prepared.outputs["prepared"],
            preprocessor=prepared.outputs["preprocessor"],
            candidates=dsl.Collected(candidates.outputs["Output"]),
            fitted=dsl.Collected(candidates.outputs["fitted"]),
            data_summary=prepared.outputs["Output"],
            registry_uri=registry_uri,
            model_name=model_name,
            training=training_dict,
            lineage=lineage,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            seed=seed,
            metric=selection_metric,
            margin=promotion_margin,
            move_production=move_production,
        ), SELECT_TASK)
        return gate.outputs["Output"]

    return training_pipeline


def compile_training_pipeline(policy: Policy, path: str | Path, image: str = DEFAULT_IMAGE, registry_uri: str = "") -> Path:
    """Write the pipeline's IR YAML (what the Kubeflow UI's "Upload pipeline" accepts)."""
    path = Path(path)
    compiler.Compiler().compile(build_training_pipeline(policy, image, registry_uri), str(path), pipeline_name=PIPELINE_NAME)
    return path
