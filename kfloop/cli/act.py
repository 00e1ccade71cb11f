"""``kfloop policy compile`` and ``kfloop trigger``: the policy as cluster objects, and the retraining service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kfloop.cli.options import (
    DEFAULT_HOME, HomeOption, HostOption, ImageOption, ModelOption, PolicyOption, RegistryOption, TargetOption,
    registry_uri,
)

__all__ = ["policy_app", "trigger"]

policy_app = typer.Typer(help="Compile the policy to cluster objects.", no_args_is_help=True)


@policy_app.command("compile")
def policy_compile(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the YAML files, one per object.")],
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of the InferenceService.")],
    inference_service: Annotated[str, typer.Option("--inference-service", help="InferenceService whose predictor Deployment is scaled.")],
    prometheus_url: Annotated[Optional[str], typer.Option("--prometheus-url", help="Prometheus that KEDA queries (default: the policy's scaling.prometheus_url).")] = None,
    broker: Annotated[str, typer.Option("--broker", help="Knative Broker the Triggers listen on.")] = "default",
    trigger_service: Annotated[str, typer.Option("--trigger-service", help="Service that receives the retraining events.")] = "kfloop-trigger",
    drift_service: Annotated[Optional[str], typer.Option("--drift-service", help="Service that receives the payload events (default: INFERENCE_SERVICE-watch).")] = None,
    policy: PolicyOption = None,
) -> None:
    """Compile the policy to a KEDA ScaledObject and Knative Triggers; print the paths of the files written."""
    from kfloop.errors import PolicyError
    from kfloop.policies import load_policy
    from kfloop.policies.compile import compile_scaled_object, compile_triggers, write_objects

    loaded_policy = load_policy(policy)
    url = prometheus_url or loaded_policy.scaling.prometheus_url
    if not url:
        raise PolicyError("give --prometheus-url, or set scaling.prometheus_url in the policy")
    objects = [
        compile_scaled_object(loaded_policy, namespace=namespace, inference_service=inference_service, prometheus_url=url),
        *compile_triggers(
            loaded_policy, namespace=namespace, broker=broker, trigger_service=trigger_service,
            drift_service=drift_service or f"{inference_service}-watch", inference_service=inference_service,
        ),
    ]
    for path in write_objects(objects, output):
        typer.echo(path)


def trigger(
    registry: RegistryOption = None,
    model: ModelOption = None,
    policy: PolicyOption = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Port for alarm CloudEvents (POST /).")] = 8095,
    admin_url: Annotated[Optional[str], typer.Option("--admin-url", help="Admin API of the local serving runtime (kfloop serve) for canary rollouts; without it (and without --inference-service) a promoted version is only recorded.")] = None,
    kfp_host: Annotated[Optional[str], typer.Option("--kfp-host", envvar="KFLOOP_KFP_HOST", help="Run the pipeline on this Kubeflow Pipelines API instead of kfp.local.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="KFLOOP_KFP_TOKEN", help="Bearer token for --kfp-host.")] = None,
    image: ImageOption = "",
    inference_service: Annotated[Optional[str], typer.Option("--inference-service", help="Roll out by patching this InferenceService (cluster).")] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of --inference-service.")] = "default",
    prometheus_url: Annotated[Optional[str], typer.Option("--prometheus-url", help="Prometheus for the canary's failure rate (cluster; default: the policy's).")] = None,
    target: TargetOption = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="State folder (pending runs survive restarts) (default: HOME/trigger/MODEL).")] = None,
    host: HostOption = "127.0.0.1",
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Retrain on drift/outlier alarms (cooldown, dedup, budget, one run at a time) and roll out via canary."""
    import uvicorn

    from kfloop.components.training import DEFAULT_IMAGE
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies import load_policy
    from kfloop.policies.retraining import ClusterRetrainer, LocalRetrainer, Retrainer, RetrainingConfig, RetrainingService
    from kfloop.policies.rollout import Deployer, KServeDeployer, LocalDeployer
    from kfloop.serving.trigger import create_app

    loaded = load_policy(policy)
    name = model or loaded.model
    registry_root = registry_uri(registry, home)
    config = RetrainingConfig(name, registry_root, loaded, state_dir or home / "trigger" / name, target=target)
    retrainer: Retrainer
    if kfp_host:
        retrainer = ClusterRetrainer(loaded, KfpEndpoint(kfp_host, token), registry_root, model=name, image=image or DEFAULT_IMAGE)
    else:
        retrainer = LocalRetrainer(loaded, registry_root, home, model=name)
    deployer: Deployer | None = None
    if inference_service:
        url = prometheus_url or loaded.scaling.prometheus_url
        if not url:
            raise typer.BadParameter("--inference-service needs --prometheus-url (or scaling.prometheus_url in the policy)")
        deployer = KServeDeployer(namespace, inference_service, registry_root, name, url)
    elif admin_url:
        deployer = LocalDeployer(admin_url, name)
    uvicorn.run(create_app(RetrainingService(config, retrainer, deployer)), host=host, port=http_port,
                log_level="warning", access_log=False)
