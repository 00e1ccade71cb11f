"""The ``kfloop`` command line: the only place that reads argv and the environment.

Every :class:`~kfloop.errors.KfloopError` becomes one line on stderr and exit
code 1; progress and tables go to stderr, ``--json`` output alone to stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kfloop.errors import KfloopError

app = typer.Typer(
    help="kfloop: train -> serve -> watch -> act, on Kubeflow or on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True)
out = Console()

HomeOption = Annotated[
    Path,
    typer.Option("--home", envvar="KFLOOP_HOME", help="kfloop's working folder (runs, logs; default registry)."),
]
RegistryOption = Annotated[
    Optional[str],
    typer.Option("--registry", envvar="KFLOOP_REGISTRY", help="Registry root: a path or fsspec URI (default: HOME/registry)."),
]
PolicyOption = Annotated[
    Optional[Path],
    typer.Option("--policy", help="Policy YAML file (default: the shipped policies/default.yaml)."),
]
DataOption = Annotated[
    Optional[str],
    typer.Option("--data", help="Data URI: Kaggle leaf CSV, UCI 100-plant folder/zip, CSV (with --target), folder of CSV shards, or builtin:digits|iris|wine (default: builtin:digits)."),
]
TargetOption = Annotated[Optional[str], typer.Option("--target", help="Label column of a generic CSV.")]
ModelOption = Annotated[Optional[str], typer.Option("--model", help="Registry model name (default: the policy's 'model').")]
ImageOption = Annotated[str, typer.Option("--image", help="Container image of the pipeline components (has kfloop installed).")]

DEFAULT_HOME = Path.home() / ".kfloop"
PIPELINE_STEPS = (
    ("load-data", "load + validate"),
    ("prepare-data", "preprocess"),
    ("train-candidate", "train candidates"),
    ("select-best", "select best"),
    ("fit-and-export", "fit + export"),
    ("register-model", "register"),
    ("promotion-gate", "promotion gate"),
)


def _registry_uri(registry: str | None, home: Path) -> str:
    return registry or str(home / "registry")


@app.command()
def train(
    data: DataOption = None,
    target: TargetOption = None,
    registry: RegistryOption = None,
    policy: PolicyOption = None,
    model: ModelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result.")] = False,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Run the training pipeline locally (kfp.local): tune in parallel, select, register, gate."""
    from kfloop.pipelines.local import run_training_locally
    from kfloop.policies import load_policy
    from kfloop.registry import ModelRegistry

    loaded_policy = load_policy(policy)
    registry_uri = _registry_uri(registry, home)
    candidates = len(loaded_policy.training.search_space.candidates())
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=json_output,
    ) as progress:
        rows = {
            name: progress.add_task(label, total=candidates if name == "train-candidate" else 1, start=False)
            for name, label in PIPELINE_STEPS
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
                progress.update(task_id, description=f"[red]{dict(PIPELINE_STEPS)[name]} (failed)")

        data_uri = _absolute_if_local(data)
        decision = run_training_locally(
            loaded_policy, registry_uri=registry_uri, workdir=home, data_uri=data_uri,
            target=target, model=model, on_task=on_task,
        )
    store = ModelRegistry(registry_uri)
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


def _absolute_if_local(uri: str | None) -> str | None:
    if uri is None or "://" in uri or uri.startswith("builtin:"):
        return uri
    return str(Path(uri).resolve())


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
    for column in ["#", *param_names, "cv accuracy", "cv macro-F1", "cv log-loss"]:
        table.add_column(column, justify="right" if column != "#" else "left")
    for rank, candidate in enumerate(metadata["candidates"], start=1):
        m = candidate["metrics"]
        table.add_row(
            "winner" if rank == 1 else str(rank),
            *[str(candidate["params"].get(p, "")) for p in param_names],
            f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['log_loss']:.4f}",
            style="bold green" if rank == 1 else None,
        )
    return table


@app.command("compile")
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


@app.command()
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
) -> None:
    """Submit the training pipeline to a Kubeflow Pipelines cluster (kfp.Client)."""
    from kfloop.components.training import DEFAULT_IMAGE
    from kfloop.pipelines.cluster import KfpEndpoint, submit_training, token_from_kube_config
    from kfloop.policies import load_policy

    endpoint = KfpEndpoint(host=host, token=token or token_from_kube_config(kube_context), namespace=namespace)
    outcome = submit_training(
        load_policy(policy), endpoint, registry_uri=registry, data_uri=data, target=target, model=model,
        experiment=experiment, run_name=run_name, image=image or DEFAULT_IMAGE, wait=wait,
    )
    out.print_json(json.dumps(outcome))


@models_app.command("list")
def models_list(registry: RegistryOption = None, home: HomeOption = DEFAULT_HOME) -> None:
    """List models and versions with their status and holdout accuracy."""
    from kfloop.registry import ModelRegistry

    store = ModelRegistry(_registry_uri(registry, home))
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

    store = ModelRegistry(_registry_uri(registry, home))
    resolved = store.resolve(model, version)
    out.print_json(json.dumps({**store.metadata(model, resolved), "path": store.uri(model, resolved)}))


HostOption = Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless told otherwise).")]
MaxBatchOption = Annotated[int, typer.Option("--max-batch", help="Largest batch (rows) one request may carry.")]
# KServe's controller passes these with underscores to custom containers: accept both spellings.
HttpPortOption = Annotated[int, typer.Option("--http-port", "--http_port", help="REST port.")]
GrpcPortOption = Annotated[int, typer.Option("--grpc-port", "--grpc_port", help="gRPC port.")]
NoGrpcOption = Annotated[bool, typer.Option("--no-grpc", help="Serve REST only.")]
WorkersOption = Annotated[int, typer.Option("--workers", hidden=True, help="Accepted for KServe; kfloop scales by replicas.")]


@app.command()
def predictor(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="A registry version folder (KServe mounts storageUri at /mnt/models).")] = None,
    registry: RegistryOption = None,
    model: Annotated[Optional[str], typer.Option("--model", "--model_name", help="Model name clients use (the registry model name).")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Registry version (default: production).")] = None,
    host: HostOption = "127.0.0.1",
    http_port: HttpPortOption = 8080,
    grpc_port: GrpcPortOption = 8081,
    no_grpc: NoGrpcOption = False,
    max_batch: MaxBatchOption = 1024,
    fault_injection: Annotated[bool, typer.Option("--fault-injection", help="Expose PUT /kfloop/faults to make this predictor fail on purpose (drills).")] = False,
    workers: WorkersOption = 1,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve one model version: V1 and V2 REST + gRPC on scaled features (the KServe predictor)."""
    from kfloop.registry import ModelRegistry
    from kfloop.serving.entrypoints import ServerAddress, run_predictor

    address = ServerAddress(host, http_port, grpc_port, not no_grpc)
    if model_dir is not None:
        run_predictor(model or model_dir.parent.name, str(model_dir), address, max_batch=max_batch, fault_injection=fault_injection)
        return
    if model is None:
        raise typer.BadParameter("give --model-dir, or --model with --registry")
    store = ModelRegistry(_registry_uri(registry, home))
    if not store.is_local:
        raise typer.BadParameter("--registry must be a local path here; for remote storage mount the version and use --model-dir")
    resolved = store.resolve(model, version)
    run_predictor(model, store.uri(model, resolved), address, max_batch=max_batch, fault_injection=fault_injection)


@app.command()
def transformer(
    predictor_host: Annotated[str, typer.Option("--predictor-host", "--predictor_host", help="Predictor replica(s), host:port, comma-separated.")],
    model: Annotated[str, typer.Option("--model", "--model_name", help="Model name (the registry model name; the predictor's name).")],
    registry: RegistryOption = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Registry version (default: production).")] = None,
    predictor_protocol: Annotated[str, typer.Option("--predictor-protocol", "--predictor_protocol", help="Only v2 is supported.")] = "v2",
    logger_url: Annotated[Optional[str], typer.Option("--logger-url", help="Send payload CloudEvents here (local stand-in for KServe's logger).")] = None,
    inference_service: Annotated[Optional[str], typer.Option("--inference-service", help="ce-inferenceservicename of payload events (default: the model name).")] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="ce-namespace of payload events.")] = "",
    host: HostOption = "127.0.0.1",
    http_port: HttpPortOption = 8080,
    grpc_port: GrpcPortOption = 8081,
    no_grpc: NoGrpcOption = False,
    max_batch: MaxBatchOption = 1024,
    no_admin: Annotated[bool, typer.Option("--no-admin", help="Do not expose GET/PUT /kfloop/routes.")] = False,
    workers: WorkersOption = 1,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve the transformer: validate and scale raw rows, call the predictor, name the classes."""
    from kfloop.serving.entrypoints import ServerAddress, run_transformer

    if predictor_protocol not in ("v2", "rest-v2"):
        raise typer.BadParameter(f"predictor protocol {predictor_protocol!r} is not supported; use v2")
    hosts = [h.strip().removeprefix("http://") for h in predictor_host.split(",") if h.strip()]
    run_transformer(
        model, _registry_uri(registry, home), version, hosts, ServerAddress(host, http_port, grpc_port, not no_grpc),
        max_batch=max_batch, logger_url=logger_url, inference_service=inference_service, namespace=namespace,
        admin=not no_admin,
    )


@app.command()
def serve(
    registry: RegistryOption = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Registry model name (default: the policy's 'model').")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Version to serve (default: production).")] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Client-facing REST port (the transformer's).")] = 8080,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="Client-facing gRPC port.")] = 8081,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Predictor replicas.")] = 1,
    logger_url: Annotated[Optional[str], typer.Option("--logger-url", help="Send payload CloudEvents here.")] = None,
    admin_port: Annotated[int, typer.Option("--admin-port", help="Runtime admin API (GET /status, /metrics, POST /replicas|/version|/traffic); 0 picks a free port.")] = 8090,
    autoscale: Annotated[bool, typer.Option("--autoscale", help="Scale predictor replicas by the policy's scaling rules (Prometheus if the policy names one, else the servers' /metrics).")] = False,
    host: HostOption = "127.0.0.1",
    policy: PolicyOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve a model locally: predictor replica(s) + transformer as supervised processes, until Ctrl-C."""
    import signal
    import threading

    from kfloop.policies import load_policy
    from kfloop.serving.runtime import AdminServer, ServingRuntime

    loaded_policy = load_policy(policy)
    name = model or loaded_policy.model
    runtime = ServingRuntime(
        _registry_uri(registry, home), name, version=version, replicas=replicas, host=host,
        http_port=http_port, grpc_port=grpc_port, logger_url=logger_url, log_dir=home / "logs",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with err.status(f"starting {replicas} predictor replica(s) and the transformer for {name}"):
        runtime.start()
    admin = AdminServer(runtime, admin_port)
    admin.start()
    scaler = _start_autoscaler(runtime, loaded_policy.scaling, name, home) if autoscale else None
    try:
        status = runtime.status()
        table = Table(title=f"serving {name} version {status['version']}")
        table.add_column("endpoint")
        table.add_column("address")
        for key, value in {**status["endpoints"], "admin": admin.url}.items():
            table.add_row(key, value)
        err.print(table)
        stop.wait()
    finally:
        if scaler is not None:
            scaler.stop()
        admin.stop()
        runtime.stop()
        err.print("stopped")


def _start_autoscaler(runtime: Any, scaling: Any, model: str, home: Path) -> Any:
    from kfloop.policies.autoscaler import Autoscaler
    from kfloop.policies.sources import LocalMetricsSource, PrometheusSource

    source = (
        PrometheusSource(scaling.prometheus_url, model) if scaling.prometheus_url
        else LocalMetricsSource(model, runtime.metrics_urls)
    )
    scaler = Autoscaler(model, runtime, scaling, source, decision_log=home / "logs" / f"scaling-{model}.jsonl")
    scaler.start()
    return scaler


@app.command()
def watch(
    sink: Annotated[str, typer.Option("--sink", help="Where alarms (CloudEvents) go: a Knative Broker, or the trigger service.")],
    registry: RegistryOption = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Registry model name (default: the policy's 'model').")] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Port for payload CloudEvents (POST /).")] = 8085,
    backend: Annotated[str, typer.Option("--backend", help="Detector backend: scipy (default) or alibi (BSL 1.1, needs kfloop[alibi]).")] = "scipy",
    window: Annotated[int, typer.Option("--window", min=10, help="Rows per tested window.")] = 100,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Rows between tests (default: window / 4).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="False-alarm rate per tested window (split between drift and outlier tests).")] = 0.05,
    correction: Annotated[str, typer.Option("--correction", help="Multiple-testing correction over features: fdr (Benjamini-Hochberg) or bonferroni.")] = "fdr",
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="Outbox folder (default: HOME/watch/MODEL).")] = None,
    no_capture: Annotated[bool, typer.Option("--no-capture", help="Do not write payload rows to the registry's capture area.")] = False,
    capture_rows: Annotated[int, typer.Option("--capture-rows", min=1, help="Rows per capture shard (a shard is also written every 30 s).")] = 500,
    follow_seconds: Annotated[float, typer.Option("--follow-seconds", help="How often to check the registry's production version.")] = 5.0,
    host: HostOption = "127.0.0.1",
    policy: PolicyOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Watch payload CloudEvents for drift and outliers; send alarms to --sink."""
    from kfloop.policies import load_policy
    from kfloop.serving.detectors import BACKENDS, DetectorConfig
    from kfloop.serving.watch import WatchConfig, run_watch

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    name = model or load_policy(policy).model
    try:
        detector = DetectorConfig(alpha=alpha, correction=correction)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = WatchConfig(
        registry_uri=_registry_uri(registry, home), model=name, sink_url=sink,
        state_dir=state_dir or home / "watch" / name, window=window, stride=stride, backend=backend,
        detector=detector, capture=not no_capture, capture_flush_rows=capture_rows, follow_seconds=follow_seconds,
    )
    run_watch(config, host=host, port=http_port)


policy_app = typer.Typer(help="Compile the policy to cluster objects.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


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


@app.command()
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
    from kfloop.serving import trigger as triggering

    loaded = load_policy(policy)
    name = model or loaded.model
    registry_uri = _registry_uri(registry, home)
    config = triggering.TriggerConfig(name, registry_uri, loaded, state_dir or home / "trigger" / name, target=target)
    if kfp_host:
        retrainer: Any = triggering.ClusterRetrainer(loaded, KfpEndpoint(kfp_host, token), registry_uri, model=name,
                                                     image=image or DEFAULT_IMAGE)
    else:
        retrainer = triggering.LocalRetrainer(loaded, registry_uri, home, model=name)
    deployer: Any = None
    if inference_service:
        url = prometheus_url or loaded.scaling.prometheus_url
        if not url:
            raise typer.BadParameter("--inference-service needs --prometheus-url (or scaling.prometheus_url in the policy)")
        deployer = triggering.KServeDeployer(namespace, inference_service, registry_uri, name, url)
    elif admin_url:
        deployer = triggering.LocalDeployer(admin_url, name)
    service = triggering.TriggerService(config, retrainer, deployer)
    uvicorn.run(triggering.create_app(service), host=host, port=http_port, log_level="warning", access_log=False)


@app.command()
def up(
    data: DataOption = None,
    target: TargetOption = None,
    policy: PolicyOption = None,
    registry: RegistryOption = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Client-facing REST port.")] = 8080,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="Client-facing gRPC port.")] = 8081,
    admin_port: Annotated[int, typer.Option("--admin-port", help="Serving runtime admin API.")] = 8090,
    watch_port: Annotated[int, typer.Option("--watch-port", help="Drift/outlier service.")] = 8085,
    trigger_port: Annotated[int, typer.Option("--trigger-port", help="Trigger service.")] = 8095,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Start the whole loop locally (train if needed, serve, watch, trigger, autoscale) until Ctrl-C or 'kfloop down'."""
    import signal
    import threading

    from kfloop.policies import load_policy
    from kfloop.stack import LocalStack, StackPorts

    loaded = load_policy(policy)
    stack = LocalStack(loaded, policy, home, _registry_uri(registry, home), data_uri=_absolute_if_local(data), target=target,
                       ports=StackPorts(http_port, grpc_port, admin_port, watch_port, trigger_port))
    with err.status(f"training {loaded.model} (no production version yet)"):
        trained = stack.ensure_model()
    if trained is not None:
        err.print(f"trained {loaded.model} version {trained['version']}: {trained['reason']}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with err.status("starting predictor, transformer, watch, trigger and autoscaler"):
        stack.start()
    try:
        table = Table(title=f"kfloop loop for {loaded.model}")
        table.add_column("service")
        table.add_column("address")
        for name, url in stack.urls.items():
            table.add_row(name, url)
        err.print(table)
        stop.wait()
    finally:
        stack.stop()
        err.print("stopped")


@app.command()
def demo(
    data: DataOption = None,
    target: TargetOption = None,
    policy: PolicyOption = None,
    speed: Annotated[float, typer.Option("--speed", min=0.01, help="Divide the policy's windows, periods and cooldowns by this (10: about 4 minutes).")] = 10.0,
    report: Annotated[Path, typer.Option("--report", help="Folder for index.html and the PNG charts.")] = Path("report"),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end: rule firings, failed client requests, loop timings.")] = False,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Play the automation table on a fresh local stack: train, scale out and in, predictor failures, drift -> retrain -> canary.

    Everything runs under HOME/demo/<time> on free loopback ports and is stopped at the end.
    """
    from rich.live import Live

    from kfloop.demo import Demo, DemoSettings, new_demo_home, save_result
    from kfloop.demo_view import live_view, timings_table
    from kfloop.policies import load_policy
    from kfloop.report import write_report
    from kfloop.serving.runtime import free_port
    from kfloop.stack import StackPorts

    folder = new_demo_home(home)
    ports = StackPorts(http=free_port(), grpc=free_port(), admin=free_port(), watch=free_port(), trigger=free_port())
    settings = DemoSettings(load_policy(policy), folder, data_uri=_absolute_if_local(data), target=target, speed=speed, ports=ports)
    scenario = Demo(settings)
    with Live(console=err, refresh_per_second=2, get_renderable=lambda: live_view(scenario), transient=False):
        result = scenario.run()
    save_result(result, folder / "demo.json")
    page = write_report(result, report)
    err.print(timings_table(result))  # the live display's last frame stays: it holds the automation table
    err.print(f"{len(result.requests)} client requests, {len(result.failed_requests)} failed "
              f"({result.injected_failures} answered 503 while failures were injected); report: {page}")
    if json_output:
        out.print_json(json.dumps({**result.summary(), "report": str(page)}))


@app.command()
def status(home: HomeOption = DEFAULT_HOME, json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the running loop: version, replicas, request and failure rate, last p-value, last alarm, runs in flight."""
    import httpx

    from kfloop.errors import ClusterError
    from kfloop.stack import STACK_FILE, stack_status

    if not (home / STACK_FILE).exists():
        raise ClusterError(f"no loop is running for {home} (no {STACK_FILE}); start one with 'kfloop up'")
    try:
        state = stack_status(home)
    except httpx.HTTPError as exc:
        raise ClusterError(f"the loop recorded in {home / STACK_FILE} does not answer: {exc}") from None
    if json_output:
        out.print_json(json.dumps(state))
        return
    table = Table(title=f"kfloop loop: {state['model']}")
    table.add_column("what")
    table.add_column("value")
    rows = {
        "model version": state["version"],
        "traffic": ", ".join(f"v{v}: {w:.0f}%" for v, w in state["traffic"].items()),
        "predictor replicas": str(state["replicas"]),
        **{f"signal {rule}": f"{value:.3f}" for rule, value in state["signals"].items()},
        "last p-value": "-" if state["last_p_value"] is None else f"{state['last_p_value']:.2e}",
        "last alarm": "-" if not state["last_alarm"] else f"{state['last_alarm']['type']} ({state['last_alarm']['first_drifted_row_time']})",
        "runs in flight": str(state["runs_in_flight"]),
        "last run": "-" if not state["last_run"] else f"{state['last_run']['outcome']} (version {state['last_run'].get('version')})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    out.print(table)


@app.command()
def down(home: HomeOption = DEFAULT_HOME, timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a clean stop.")] = 60.0) -> None:
    """Stop the loop started by 'kfloop up' (every process it started)."""
    import os
    import signal
    import time

    from kfloop.errors import ClusterError
    from kfloop.stack import STACK_FILE

    path = home / STACK_FILE
    if not path.exists():
        raise ClusterError(f"no loop is running for {home} (no {STACK_FILE})")
    pid = json.loads(path.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        err.print(f"the loop's process {pid} was already gone; removed {path}")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and path.exists():
        time.sleep(0.2)
    if path.exists():
        raise ClusterError(f"process {pid} did not stop within {timeout:.0f} s")
    err.print(f"stopped the loop (pid {pid})")


from kfloop.cluster_cli import deploy, manifests  # noqa: E402 - it imports the option types above

app.command()(manifests)
app.command()(deploy)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KfloopError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
