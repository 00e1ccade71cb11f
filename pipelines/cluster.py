"""Send the training pipeline to a Kubeflow Pipelines API with ``kfp.Client``.

The API is probed once before ``kfp.Client`` is built, so an unreachable host
or refused credentials give one clear :class:`~kfloop.errors.ClusterError`
instead of kfp's five retries. A token never goes to an ``http://`` host unless
the endpoint says so (:attr:`KfpEndpoint.allow_plain_http`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kfloop.components.training import DEFAULT_IMAGE
from kfloop.errors import ClusterError, InputError
from kfloop.kube import first_line
from kfloop.pipelines.training import compile_training_pipeline, pipeline_arguments
from kfloop.policies import Policy
from kfloop.search import Search

HEALTHZ_PATH = "/apis/v2beta1/healthz"
ALLOW_HTTP_FLAG = "--kfp-allow-http"  # how a user says allow_plain_http, in 'kfloop submit' and 'kfloop trigger'


@dataclass(frozen=True)
class KfpEndpoint:
    """Where the Kubeflow Pipelines API is and how to authenticate.

    A ``token`` with an ``http://`` host is refused (:class:`InputError`) unless
    ``allow_plain_http``: anyone on the path could read and replay it. Allow it
    only where the path is the cluster's own pod network (the in-cluster
    ``ml-pipeline`` Service); use https for anything else. Checked when the
    endpoint is made, so a misconfigured service fails at start rather than at
    its first retraining run.
    """

    host: str
    token: str | None = None
    namespace: str | None = None
    verify_tls: bool = True
    allow_plain_http: bool = False

    def __post_init__(self) -> None:
        if self.token and self.host.lower().startswith("http://") and not self.allow_plain_http:
            raise InputError(
                f"refusing to send the Kubeflow Pipelines token over plain http to {self.host}: "
                f"use https, or pass {ALLOW_HTTP_FLAG} (allow_plain_http) if this is a trusted in-cluster address"
            )


def token_from_kube_config(context: str | None = None) -> str | None:
    """The bearer token of the kube config's (current) context, if it has one."""
    from kubernetes import config

    try:
        api_client = config.new_client_from_config(context=context)
    except (config.ConfigException, OSError):
        return None
    value = api_client.configuration.api_key.get("authorization", "")
    return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else None


def probe(endpoint: KfpEndpoint, timeout: float = 10.0) -> None:
    """Raise :class:`ClusterError` unless the API answers its health check with these credentials."""
    url = endpoint.host.rstrip("/") + HEALTHZ_PATH
    headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout, verify=endpoint.verify_tls, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {endpoint.host}: {exc}") from None
    if response.status_code in (401, 403):
        raise ClusterError(
            f"Kubeflow Pipelines at {endpoint.host} refused the credentials (HTTP {response.status_code}): "
            "pass --token or set KFLOOP_KFP_TOKEN"
        )
    if response.is_redirect:
        raise ClusterError(
            f"Kubeflow Pipelines at {endpoint.host} redirects to {response.headers.get('location')} "
            "(a login page?): pass a token with --token"
        )
    if response.status_code >= 400:
        raise ClusterError(f"Kubeflow Pipelines at {endpoint.host} answered HTTP {response.status_code} to {HEALTHZ_PATH}")


def submit_training(
    policy: Policy,
    endpoint: KfpEndpoint,
    *,
    registry_uri: str,
    data_uri: str | None = None,
    target: str | None = None,
    model: str | None = None,
    experiment: str = "kfloop",
    run_name: str | None = None,
    image: str = DEFAULT_IMAGE,
    wait: bool = False,
    timeout_seconds: int = 3600,
    move_production: bool = True,
    search: Search | None = None,
) -> dict[str, Any]:
    """Create a run of the training pipeline; with ``wait``, block until it ends
    (``move_production`` and ``search``: see :func:`~kfloop.pipelines.training.pipeline_arguments`)."""
    import kfp
    import urllib3
    from kfp_server_api import ApiException

    probe(endpoint)
    client = kfp.Client(host=endpoint.host, existing_token=endpoint.token, namespace=endpoint.namespace or "kubeflow")
    arguments = pipeline_arguments(policy, data_uri=data_uri, target=target, registry_uri=registry_uri, model=model,
                                   move_production=move_production, search=search)
    with tempfile.TemporaryDirectory(prefix="kfloop-submit-") as tmp:
        package = compile_training_pipeline(policy, Path(tmp) / "pipeline.yaml", image=image, registry_uri=registry_uri)
        try:
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=endpoint.namespace,
            )
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            raise ClusterError(f"Kubeflow Pipelines at {endpoint.host} refused the run: {first_line(exc)}") from None
    outcome: dict[str, Any] = {"run_id": result.run_id, "host": endpoint.host, "experiment": experiment}
    if wait:
        run = result.wait_for_run_completion(timeout=timeout_seconds)
        outcome["state"] = str(getattr(run, "state", "unknown"))
    return outcome
