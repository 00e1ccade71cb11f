"""``kfloop train``, ``compile``, ``submit`` and ``models``: the training pipeline and the registry."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfloop.cli.options import (
    DEFAULT_HOME, DataOption, HomeOption, ImageOption, ModelOption, PolicyOption, RegistryOption, TargetOption,
    absolute_if_local, err, out, registry_uri,
)

__all__ = ["compile_pipeline", "models_app", "submit", "train"]


class Runner(str, enum.Enum):
    """Where ``kfloop train`` runs each pipeline task."""

    subprocess = "subprocess"
    docker = "docker"


models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)


def train(
    data: DataOption = None,
    target: TargetOption = None,
    registry: RegistryOption = None,
    policy: PolicyOption = None,
    model: ModelOption = None,
    runner: Annotated[Runner, typer.Option("--runner", help="Where each task runs: a subprocess, or a container of "
                                           "--image (kfp.local's DockerRunner; DOCKER_HOST names the daemon).")] = Runner.subprocess,
    image: Annotated[Optional[str], typer.Option("--image", help="With --runner docker: the kfloop image (default: "
                                                 "kfloop:local, what `make image` builds).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result.")] = False,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Run the training pipeline locally (kfp.local): tune in parallel, select, register, gate."""
    from kfloop.pipelines.local import LOCAL_IMAGE, ContainerTasks, run_training_locally
    from kfloop.pipelines.training import CANDIDATE_TASK, PIPELINE_TASKS
    from kfloop.policies import load_policy
    from kfloop.registry import ModelRegistry

    loaded_policy = load_policy(policy)
    registry_root = registry_uri(registry, home)
    batches = len(loaded_policy.training.batches(loaded_policy.training.search_space.candidates()))
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=json_output,
    ) as progress:
        rows = {
            name: progress.add_task(label, total=batches if name == CANDIDATE_TASK else 1, start=False)
            for name, label in PIPELINE_TASKS.items()
        }

        def on_task(name: str, state: str) -> None:
            task_id = rows.get(name)
            if task_id is None:
                return
            if state == "started":
                progress.start_task(task_id)
            elif state == "succeeded":
                progress.advance(task_id)
            else:
                progress.update(task_id, description=f"[red]{PIPELINE_TASKS[name]} (failed)")

        data_uri = absolute_if_local(data)
        containers = None
        if runner is Runner.docker:
            # An object store's credentials go to the tasks as they are here (s3fs reads AWS_*).
            passed = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "S3_", "FSSPEC_"))}
            containers = ContainerTasks(image or LOCAL_IMAGE, passed)
        elif image is not None:
            raise typer.BadParameter("--image goes with --runner docker", param_hint="--image")
        decision = run_training_locally(
            loaded_policy, registry_uri=registry_root, workdir=home, data_uri=data_uri,
            target=target, model=model, on_task=on_task, containers=containers,
        )
    store = ModelRegistry(registry_root)
    name, version = decision["model"], decision["version"]
    metadata = store.metadata(name, version)
    if json_output:
        out.print_json(json.dumps(_train_result(store, metadata, decision)))
        return
    err.print(_candidates_table(metadata))
    verdict = "[green]promoted" if decision["promoted"] else "[yellow]not promoted"
    err.print(
        f"model [bold]{name}[/] version [bold]{version}[/]: holdout accuracy {metadata['metrics']['accuracy']:.4f}, "
        f"{verdict}[/] ({decision['reason']})\n  stored at {store.uri(name, version)}"
    )



def _train_result(store: Any, metadata: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": metadata["model"],
        "version": metadata["version"],
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "production_version": store.production_version(metadata["model"]),
        "metrics": metadata["metrics"],
        "cv_metrics": metadata["cv_metrics"],
        "best_params": metadata["params"],
        "candidates": metadata["candidates"],
        "onnx_agreement": metadata["onnx_agreement"],
        "runtime": metadata["runtime"],
        "data": metadata["data"],
        "registry_path": store.uri(metadata["model"], metadata["version"]),
        "log": decision.get("log"),
    }


def _candidates_table(metadata: dict[str, Any]) -> Table:
    metric = metadata["selection_metric"]
    table = Table(title=f"candidates (ranked by cross-validated {metric}; holdout kept for the winner)")
    param_names = sorted({k for c in metadata["candidates"] for k in c["params"]})
    folds = metadata["training"]["cv_folds"]
    for column in ["#", *param_names, "cv accuracy", "cv macro-F1", "cv log-loss", "folds"]:
        table.add_column(column, justify="right" if column != "#" else "left")
    for rank, candidate in enumerate(metadata["candidates"], start=1):
        m = candidate["metrics"]
        table.add_row(
            "winner" if rank == 1 else str(rank),
            *[str(candidate["params"].get(p, "")) for p in param_names],
            f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['log_loss']:.4f}",
            _folds_cell(candidate.get("folds", folds), folds),
            style="bold green" if rank == 1 else None,
        )
    return table


def _folds_cell(done: int, folds: int) -> str:
    """How a candidate was scored: out of bag (0 folds), all ``folds``, or stopped early after ``done``."""
    if done == 0:
        return "out of bag"
    return str(done) if done == folds else f"{done} (stopped early)"


def compile_pipeline(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the IR YAML.")] = Path("pipeline.yaml"),
    policy: PolicyOption = None,
    image: ImageOption = "",
    registry: Annotated[str, typer.Option("--registry", help="Default registry URI baked into the pipeline (e.g. s3://bucket/registry).")] = "",
) -> None:
    """Compile the training pipeline to IR YAML (Kubeflow UI: Pipelines -> Upload pipeline)."""
    from kfloop.components.training import DEFAULT_IMAGE
    from kfloop.pipelines.training import compile_training_pipeline
    from kfloop.policies import load_policy

    path = compile_training_pipeline(load_policy(policy), output, image=image or DEFAULT_IMAGE, registry_uri=registry)
    err.print(f"wrote {path}")


def submit(
    host: Annotated[str, typer.Option("--host", envvar="KFLOOP_KFP_HOST", help="Kubeflow Pipelines API URL.")],
    registry: Annotated[str, typer.Option("--registry", help="Registry URI the cluster's pods can write (e.g. s3://bucket/registry).")],
    token: Annotated[Optional[str], typer.Option("--token", envvar="KFLOOP_KFP_TOKEN", help="Bearer token (default: from the kube config).")] = None,
    kube_context: Annotated[Optional[str], typer.Option("--kube-context", help="Kube config context for the token.")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="Kubeflow profile namespace (multi-user).")] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="Experiment name.")] = "kfloop",
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run name.")] = None,
    data: DataOption = None,
    target: TargetOption = None,
    model: ModelOption = None,
    policy: PolicyOption = None,
    image: ImageOption = "",
    wait: Annotated[bool, typer.Option("--wait", help="Block until the run ends.")] = False,
    kfp_allow_http: Annotated[bool, typer.Option("--kfp-allow-http", help="Send the token even to an http:// --host (only for a trusted network path; use https otherwise).")] = False,
) -> None:
    """Submit the training pipeline to a Kubeflow Pipelines cluster (kfp.Client)."""
    from kfloop.components.training import DEFAULT_IMAGE
    from kfloop.pipelines.cluster import KfpEndpoint, submit_training, token_from_kube_config
    from kfloop.policies import load_policy

    endpoint = KfpEndpoint(host=host, token=token or token_from_kube_config(kube_context), namespace=namespace,
                           allow_plain_http=kfp_allow_http)
    outcome = submit_training(
        load_policy(policy), endpoint, registry_uri=registry, data_uri=data, target=target, model=model,
        experiment=experiment, run_name=run_name, image=image or DEFAULT_IMAGE, wait=wait,
    )
    out.print_json(json.dumps(outcome))


@models_app.command("list")
def models_list(registry: RegistryOption = None, home: HomeOption = DEFAULT_HOME) -> None:
    """List models and versions with their status and holdout accuracy."""
    from kfloop.registry import ModelRegistry

    store = ModelRegistry(registry_uri(registry, home))
    table = Table(title=f"registry {store.root}")
    for column in ("model", "version", "status", "production", "accuracy", "created"):
        table.add_column(column)
    for name in store.models():
        production = store.production_version(name)
        for version in store.versions(name):
            meta = store.metadata(name, version)
            table.add_row(
                name, version, meta.get("status", "?"), "*" if version == production else "",
                f"{meta.get('metrics', {}).get('accuracy', float('nan')):.4f}", meta.get("created", ""),
            )
    out.print(table)


@models_app.command("show")
def models_show(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[Optional[str], typer.Argument(help="Version (default: production).")] = None,
    registry: RegistryOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Print a version's metadata as JSON (production version by default)."""
    from kfloop.registry import ModelRegistry

    store = ModelRegistry(registry_uri(registry, home))
    resolved = store.resolve(model, version)
    out.print_json(json.dumps({**store.metadata(model, resolved), "path": store.uri(model, resolved)}))


