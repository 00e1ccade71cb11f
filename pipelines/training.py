"""The KFP v2 training pipeline: load -> prepare -> ParallelFor(train) -> Collected -> select
-> fit/export -> register -> promotion gate.

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

PIPELINE_NAME = "kfloop-training"


def pipeline_arguments(
    policy: Policy,
    *,
    data_uri: str | None = None,
    target: str | None = None,
    registry_uri: str = "",
    model: str | None = None,
    move_production: bool = True,
) -> dict[str, Any]:
    """Run-time arguments of the training pipeline for ``policy``.

    ``move_production`` False: the promotion gate only approves a winner, and the
    caller's rollout moves the production pointer (the trigger service's runs).
    """
    training = policy.training
    return {
        "data_uri": data_uri or DEFAULT_DATA_URI,
        "target": target or "",
        "registry_uri": registry_uri,
        "model_name": model or policy.model,
        "search_space": training.search_space.candidates(),
        "cv_folds": training.cv_folds,
        "holdout_fraction": training.holdout_fraction,
        "seed": training.seed,
        "selection_metric": training.selection_metric,
        "promotion_margin": training.promotion_margin,
        "min_rows_per_class": training.min_rows_per_class(),
        "move_production": move_production,
    }


def build_training_pipeline(policy: Policy, image: str = DEFAULT_IMAGE, registry_uri: str = "") -> Any:
    """The training pipeline function; its parameter defaults come from ``policy``."""
    steps = build_training_components(image)
    defaults = pipeline_arguments(policy, registry_uri=registry_uri)
    training_dict = policy.training.model_dump(mode="json", exclude_none=True)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Tune random forests in parallel, select the best, register it and promote it if it beats production.",
    )
    def training_pipeline(
        data_uri: str = defaults["data_uri"],
        target: str = defaults["target"],
        registry_uri: str = defaults["registry_uri"],
        model_name: str = defaults["model_name"],
        search_space: list = defaults["search_space"],
        cv_folds: int = defaults["cv_folds"],
        holdout_fraction: float = defaults["holdout_fraction"],
        seed: int = defaults["seed"],
        selection_metric: str = defaults["selection_metric"],
        promotion_margin: float = defaults["promotion_margin"],
        min_rows_per_class: int = defaults["min_rows_per_class"],
        move_production: bool = defaults["move_production"],
    ) -> dict:
        loaded = steps.load_data(data_uri=data_uri, target=target, min_rows_per_class=min_rows_per_class)
        loaded.set_display_name("load + validate")
        prepared = steps.prepare_data(dataset=loaded.outputs["dataset"], holdout_fraction=holdout_fraction, seed=seed)
        prepared.set_display_name("preprocess")
        with dsl.ParallelFor(items=search_space, parallelism=policy.training.parallelism) as params:
            candidate = steps.train_candidate(
                prepared=prepared.outputs["prepared"], params=params, cv_folds=cv_folds, seed=seed
            )
            candidate.set_display_name("train candidate")
        selected = steps.select_best(candidates=dsl.Collected(candidate.outputs["Output"]), metric=selection_metric)
        selected.set_display_name("select best")
        final = steps.fit_and_export(
            prepared=prepared.outputs["prepared"],
            preprocessor=prepared.outputs["preprocessor"],
            selection=selected.output,
            seed=seed,
        )
        final.set_display_name("fit + export")
        registered = steps.register_model(
            registry_uri=registry_uri,
            model_name=model_name,
            model=final.outputs["model"],
            preprocessor=prepared.outputs["preprocessor"],
            prepared=prepared.outputs["prepared"],
            data_summary=loaded.outputs["Output"],
            selection=selected.output,
            final=final.outputs["Output"],
            training=training_dict,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        registered.set_display_name("register")
        gate = steps.promotion_gate(
            registry_uri=registry_uri,
            model_name=model_name,
            version=registered.output,
            prepared=prepared.outputs["prepared"],
            metric=selection_metric,
            margin=promotion_margin,
            move_production=move_production,
        )
        gate.set_display_name("promotion gate")
        return gate.output

    return training_pipeline


def compile_training_pipeline(policy: Policy, path: str | Path, image: str = DEFAULT_IMAGE, registry_uri: str = "") -> Path:
    """Write the pipeline's IR YAML (what the Kubeflow UI's "Upload pipeline" accepts)."""
    path = Path(path)
    compiler.Compiler().compile(build_training_pipeline(policy, image, registry_uri), str(path), pipeline_name=PIPELINE_NAME)
    return path
