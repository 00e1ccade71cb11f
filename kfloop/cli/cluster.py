"""``kfloop manifests`` and ``kfloop deploy``: the loop's cluster objects, written to files or applied.

Two Typer command functions that :mod:`kfloop.cli` registers on its app; both
take the same rendering options (:class:`RenderOptions`, declared once and
added to both signatures by :func:`~kfloop.cli.options.with_options`) and render with
:func:`kfloop.manifests.render.render_objects`, so what ``manifests`` writes is
what ``deploy`` applies. Like every command, they leave argv and the
environment to the CLI and raise :class:`~kfloop.errors.KfloopError` s that
``kfloop.cli.main`` prints as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfloop.cli.options import ImageOption, PolicyOption, err, out, with_options

__all__ = ["RenderOptions", "deploy", "manifests"]

NamespaceOption = Annotated[str, typer.Option("--namespace", help="Namespace of the loop (a Kubeflow profile namespace on multi-user Kubeflow).")]
StorageUriOption = Annotated[str, typer.Option("--storage-uri", help="Registry version to serve: REGISTRY/MODEL/VERSION/ (KServe storageUri; rendered with the final '/', "
                                  "without which KServe's storage initializer also copies versions VERSION0, VERSION00, ...).")]
ClusterRegistryOption = Annotated[str, typer.Option("--registry", envvar="KFLOOP_REGISTRY", help="Registry root the cluster reads and writes (s3://... or gs://...).")]
PrometheusOption = Annotated[Optional[str], typer.Option("--prometheus-url", help="Prometheus that KEDA and the trigger service query (default: the policy's scaling.prometheus_url).")]
BrokerOption = Annotated[str, typer.Option("--broker", help="Knative Broker of the loop's events.")]
IstioOption = Annotated[bool, typer.Option("--istio", help="Pods get Istio sidecars; the failure-rate rule reads istio_requests_total.")]
KfpHostOption = Annotated[Optional[str], typer.Option("--kfp-host", help="Kubeflow Pipelines API as seen from inside the cluster (default: http://ml-pipeline.kubeflow.svc.cluster.local:8888).")]
MonitoringNamespaceOption = Annotated[str, typer.Option("--monitoring-namespace", help="Namespace of Prometheus (allowed to scrape the loop's pods).")]


@dataclass(frozen=True)
class RenderOptions:
    """The options both commands render from."""

    namespace: NamespaceOption
    storage_uri: StorageUriOption
    registry: ClusterRegistryOption
    image: ImageOption = ""
    policy: PolicyOption = None
    prometheus_url: PrometheusOption = None
    broker: BrokerOption = "default"
    istio: IstioOption = False
    kfp_host: KfpHostOption = None
    monitoring_namespace: MonitoringNamespaceOption = "monitoring"

    def render(self) -> list[dict[str, Any]]:
        """The loop's cluster objects for these options."""
        from kfloop.components.training import DEFAULT_IMAGE
        from kfloop.errors import PolicyError
        from kfloop.manifests.render import DEFAULT_KFP_HOST, render_objects
        from kfloop.policies import load_policy

        loaded = load_policy(self.policy)
        url = self.prometheus_url or loaded.scaling.prometheus_url
        if not url:
            raise PolicyError("give --prometheus-url, or set scaling.prometheus_url in the policy")
        return render_objects(
            loaded, namespace=self.namespace, image=self.image or DEFAULT_IMAGE, storage_uri=self.storage_uri,
            registry_uri=self.registry, prometheus_url=url, broker=self.broker, istio=self.istio,
            kfp_host=self.kfp_host or DEFAULT_KFP_HOST, monitoring_namespace=self.monitoring_namespace,
        )


@with_options(RenderOptions)
def manifests(
    options: RenderOptions,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for one YAML file per object plus kustomization.yaml.")],
) -> None:
    """Render the loop's cluster objects to a kustomize base folder; print the paths of the files written."""
    from kfloop.manifests.render import kustomization
    from kfloop.policies.compile import write_objects

    paths = write_objects(options.render(), output)
    index = output / "kustomization.yaml"
    index.write_text(kustomization([path.name for path in paths], options.namespace))
    for path in [*paths, index]:
        typer.echo(path)


@with_options(RenderOptions)
def deploy(
    options: RenderOptions,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the objects that would be applied; contact no cluster.")] = False,
    context: Annotated[Optional[str], typer.Option("--context", help="Kube config context (default: the current one).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds to wait for the InferenceService to be Ready (0: do not wait).")] = 600.0,
) -> None:
    """Apply the loop's objects (server-side apply, field manager kfloop), wait until it serves, report what changed.

    Knative Eventing must have authentication-oidc enabled (the Broker then checks who sends alarms):
    deploy reads knative-eventing/config-features first and refuses, naming the kubectl patch, when it is off.
    """
    from kfloop.manifests.deploy import Cluster
    from kfloop.manifests.render import RECOMMENDED_EVENTING_FEATURES, REQUIRED_EVENTING_FEATURES

    namespace = options.namespace
    objects = options.render()
    if dry_run:
        out.print(_objects_table(objects, title=f"{len(objects)} objects for namespace {namespace} (dry run: nothing applied)"))
        _print_features(REQUIRED_EVENTING_FEATURES, RECOMMENDED_EVENTING_FEATURES)
        return
    cluster = Cluster.connect(context)
    for warning in cluster.check_eventing_features(REQUIRED_EVENTING_FEATURES, RECOMMENDED_EVENTING_FEATURES):
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    with err.status(f"applying {len(objects)} objects to kube context {cluster.context} ({cluster.server})"):
        changes = cluster.apply(objects)
    table = Table(title=f"kube context {cluster.context}: server-side apply (field manager kfloop)")
    for column in ("kind", "namespace/name", "action"):
        table.add_column(column)
    colours = {"created": "green", "configured": "yellow", "unchanged": "dim"}
    for change in changes:
        table.add_row(change.kind, f"{change.namespace}/{change.name}", f"[{colours[change.action]}]{change.action}")
    out.print(table)
    counts = {action: sum(c.action == action for c in changes) for action in colours}
    err.print(", ".join(f"{n} {action}" for action, n in counts.items()))
    isvc = next(obj for obj in objects if obj["kind"] == "InferenceService")
    name = isvc["metadata"]["name"]
    if timeout == 0:
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task(f"InferenceService {namespace}/{name}: waiting", total=None)

        def on_progress(conditions: dict[str, str], message: str) -> None:
            state = " ".join(f"{kind}={'[green]' if value == 'True' else '[yellow]'}{value}[/]" for kind, value in conditions.items())
            progress.update(task, description=f"InferenceService {namespace}/{name}: {state or 'no status yet'} - {message}")

        ready = cluster.wait_ready(namespace, name, timeout, on_progress=on_progress)
    url = (ready.get("status") or {}).get("url") or f"http://{name}.{namespace}.svc.cluster.local"
    err.print(f"[green]InferenceService {namespace}/{name} is Ready[/] at {url}")


def _print_features(required: dict[str, tuple[str, ...]], recommended: dict[str, tuple[str, ...]]) -> None:
    """The Knative Eventing feature flags the loop needs and recommends, and the kubectl lines that set them."""
    from kfloop.manifests.deploy import EVENTING_FEATURES, feature_patch_command

    namespace, name = EVENTING_FEATURES
    table = Table(title=f"Knative Eventing features (ConfigMap {namespace}/{name})")
    for column in ("feature", "value", "needed"):
        table.add_column(column)
    for flags, need in ((required, "required"), (recommended, "recommended")):
        for flag, values in flags.items():
            table.add_row(flag, " or ".join(values), need)
    out.print(table)
    for flags, need in ((required, "required"), (recommended, "recommended")):
        out.print(f"{need}: {feature_patch_command(flags)}", soft_wrap=True, highlight=False, markup=False)


def _objects_table(objects: list[dict[str, Any]], *, title: str) -> Table:
    table = Table(title=title)
    for column in ("#", "kind", "apiVersion", "namespace/name"):
        table.add_column(column)
    for number, obj in enumerate(objects, start=1):
        meta = obj["metadata"]
        table.add_row(str(number), obj["kind"], obj["apiVersion"], f"{meta.get('namespace', '')}/{meta['name']}")
    return table
