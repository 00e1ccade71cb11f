"""``kfloop policy compile`` and ``kfloop trigger``: the policy as cluster objects, and the retraining service."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kfloop.cli.options import (
    DEFAULT_HOME, HomeOption, HostOption, ImageOption, ModelOption, OidcOptions, PolicyOption, RegistryOption, TargetOption,
    registry_uri, with_options,
)

__all__ = ["AlarmAuth", "policy_app", "trigger"]


class AlarmAuth(str, Enum):
    """Who the trigger service takes alarms from."""

    token = "token"
    oidc = "oidc"


policy_app = typer.Typer(help="Compile the policy to cluster objects.", no_args_is_help=True)


@policy_app.command("compile")
def policy_compile(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the YAML files, one per object.")],
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of the InferenceService.")],
    inference_service: Annotated[str, typer.Option("--inference-service", help="InferenceService whose predictor Deployment is scaled.")],
    prometheus_url: Annotated[Optional[str], typer.Option("--prometheus-url", help="Prometheus that KEDA queries (default: the policy's scaling.prometheus_url).")] = None,
    broker: Annotated[str, typer.Option("--broker", help="Knative Broker the Triggers listen on.")] = "default",
    trigger_service: Annotated[str, typer.Option("--trigger-service", help="Service that receives the retraining events.")] = "kfloop-trigger",
    drift_service: Annotated[Optional[str], typer.Option("--drift-service", help="Also route payload events from the Broker to this Service (a Broker without OIDC only; kfloop's manifests have KServe's logger post to the watch directly).")] = None,
    audience: Annotated[Optional[str], typer.Option("--audience", help="spec.subscriber.audience of the alarm Triggers: Knative (OIDC on) sends the trigger service a token for it.")] = None,
    dead_letter_service: Annotated[Optional[str], typer.Option("--dead-letter-service", help="The alarm Triggers' deadLetterSink: this Service (the watch, run with --dead-letter-port) takes back alarms not delivered within the policy's retraining.delivery retries. Without it such alarms are dropped.")] = None,
    dead_letter_port: Annotated[int, typer.Option("--dead-letter-port", min=1, max=65535, help="Port of --dead-letter-service (the watch's --dead-letter-port).")] = 8081,
    dead_letter_audience: Annotated[Optional[str], typer.Option("--dead-letter-audience", help="deadLetterSink.audience: Knative (OIDC on) sends dead letters a token of the Trigger's ServiceAccount for it.")] = None,
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
            drift_service=drift_service, inference_service=inference_service, audience=audience,
            dead_letter_service=dead_letter_service, dead_letter_port=dead_letter_port, dead_letter_audience=dead_letter_audience,
        ),
    ]
    for path in write_objects(objects, output):
        typer.echo(path)


@with_options(OidcOptions)
def trigger(
    oidc: OidcOptions,
    registry: RegistryOption = None,
    model: ModelOption = None,
    policy: PolicyOption = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Port for alarm CloudEvents (POST /).")] = 8095,
    admin_url: Annotated[Optional[str], typer.Option("--admin-url", help="Admin API of the local serving runtime (kfloop serve) for canary rollouts; without it (and without --inference-service) a promoted version is only recorded.")] = None,
    watch_url: Annotated[Optional[str], typer.Option("--watch-url", help="The local watch (kfloop watch): canaries are judged on its realised accuracy too (cluster: Prometheus has it).")] = None,
    kfp_host: Annotated[Optional[str], typer.Option("--kfp-host", envvar="KFLOOP_KFP_HOST", help="Run the pipeline on this Kubeflow Pipelines API instead of kfp.local.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="KFLOOP_KFP_TOKEN", help="Bearer token for --kfp-host.")] = None,
    kfp_allow_http: Annotated[bool, typer.Option("--kfp-allow-http", help="Send the --token to a plain-http --kfp-host (in-cluster Service traffic only).")] = False,
    alarm_auth: Annotated[AlarmAuth, typer.Option("--alarm-auth", help="Who may send alarms: 'token' (HOME's bearer token, one machine) or 'oidc' (a Knative Trigger's ServiceAccount JWT, cluster).")] = AlarmAuth.token,
    image: ImageOption = "",
    inference_service: Annotated[Optional[str], typer.Option("--inference-service", help="Roll out by patching this InferenceService (cluster).")] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of --inference-service.")] = "default",
    prometheus_url: Annotated[Optional[str], typer.Option("--prometheus-url", help="Prometheus for the canary's failure rate (cluster; default: the policy's).")] = None,
    target: TargetOption = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="State folder (pending runs survive restarts) (default: HOME/trigger/MODEL).")] = None,
    host: HostOption = "127.0.0.1",
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Retrain on alarms -- drift, outliers, low realised accuracy -- (cooldown, dedup, budget, one run at a time) and
    roll out via a canary judged on its 5xx share and, with labels, its realised accuracy."""
    from kfloop.credentials import local_token
    from kfloop.components.training import DEFAULT_IMAGE
    from kfloop.pipelines.cluster import KfpEndpoint
    from kfloop.policies import load_policy
    from kfloop.policies.retraining import ClusterRetrainer, LocalRetrainer, Retrainer, RetrainingConfig, RetrainingService
    from kfloop.policies.rollout import Deployer, KServeDeployer, LocalDeployer
    from kfloop.serving.auth import Authenticator, LocalToken, is_loopback
    from kfloop.serving.listeners import listening, serve
    from kfloop.serving.trigger import create_app

    authenticator: Authenticator
    if alarm_auth is AlarmAuth.oidc:
        authenticator = oidc.authenticator("--alarm-auth oidc")
    else:
        authenticator = LocalToken(local_token(home), loopback_only=is_loopback(host))
    loaded = load_policy(policy)
    name = model or loaded.model
    registry_root = registry_uri(registry, home)
    config = RetrainingConfig(name, registry_root, loaded, state_dir or home / "trigger" / name, target=target)
    retrainer: Retrainer
    if kfp_host:
        retrainer = ClusterRetrainer(loaded, KfpEndpoint(kfp_host, token, allow_plain_http=kfp_allow_http), registry_root,
                                     model=name, image=image or DEFAULT_IMAGE)
    else:
        retrainer = LocalRetrainer(loaded, registry_root, home, model=name)
    deployer: Deployer | None = None
    if inference_service:
        url = prometheus_url or loaded.scaling.prometheus_url
        if not url:
            raise typer.BadParameter("--inference-service needs --prometheus-url (or scaling.prometheus_url in the policy)")
        deployer = KServeDeployer(namespace, inference_service, registry_root, name, url)
    elif admin_url:
        deployer = LocalDeployer(admin_url, name, local_token(home), watch_url=watch_url)
    sock = listening(host, http_port, "alarms")
    serve(create_app(RetrainingService(config, retrainer, deployer), authenticator), sock)
