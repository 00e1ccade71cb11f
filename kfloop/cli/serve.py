"""``kfloop predictor``, ``transformer`` and ``serve``: the KServe servers and the local serving stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kfloop.cli.options import (
    DEFAULT_HOME, AuthTokenFileOption, ControlPortOption, HomeOption, HostOption, PolicyOption, RegistryOption, ServerOptions, err, registry_uri,
    wait_for_stop_signal, with_options,
)

__all__ = ["predictor", "serve", "transformer"]

@with_options(ServerOptions)
def predictor(
    server: ServerOptions,
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="A registry version folder (KServe mounts storageUri at /mnt/models).")] = None,
    registry: RegistryOption = None,
    model: Annotated[Optional[str], typer.Option("--model", "--model_name", help="Model name clients use (the registry model name).")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Registry version (default: production).")] = None,
    fault_injection: Annotated[bool, typer.Option("--fault-injection", help="Expose PUT /kfloop/faults on --control-port to make this predictor fail on purpose (drills).")] = False,
    control_port: ControlPortOption = None,
    auth_token_file: AuthTokenFileOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve one model version: V1 and V2 REST + gRPC on scaled features (the KServe predictor)."""
    from kfloop.registry import ModelRegistry
    from kfloop.serving.entrypoints import Access, run_predictor

    if fault_injection and control_port is None:
        raise typer.BadParameter("--fault-injection needs --control-port (control never shares the client port)")
    address = server.address()
    access = Access(home, control_port, auth_token_file)
    if model_dir is not None:
        run_predictor(model or model_dir.parent.name, str(model_dir), address, access, server.limits(),
                      fault_injection=fault_injection)
        return
    if model is None:
        raise typer.BadParameter("give --model-dir, or --model with --registry")
    store = ModelRegistry(registry_uri(registry, home))
    if not store.is_local:
        raise typer.BadParameter("--registry must be a local path here; for remote storage mount the version and use --model-dir")
    resolved = store.resolve(model, version)
    run_predictor(model, store.uri(model, resolved), address, access, server.limits(), fault_injection=fault_injection)


@with_options(ServerOptions)
def transformer(
    server: ServerOptions,
    predictor_host: Annotated[str, typer.Option("--predictor-host", "--predictor_host", help="Predictor replica(s), host:port, comma-separated (the one route; --routes-file replaces it).")],
    model: Annotated[str, typer.Option("--model", "--model_name", help="Model name (the registry model name; the predictor's name).")],
    registry: RegistryOption = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Registry version (default: production).")] = None,
    predictor_protocol: Annotated[str, typer.Option("--predictor-protocol", "--predictor_protocol", help="Only v2 is supported.")] = "v2",
    logger_url: Annotated[Optional[str], typer.Option("--logger-url", help="Send payload CloudEvents here (local stand-in for KServe's logger).")] = None,
    logger_token_file: Annotated[Optional[Path], typer.Option("--logger-token-file", help="Send payload events with this bearer token (the watch's: HOME/token on one machine).")] = None,
    inference_service: Annotated[Optional[str], typer.Option("--inference-service", help="ce-inferenceservicename of payload events (default: the model name).")] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="ce-namespace of payload events.")] = "",
    routes_file: Annotated[Optional[Path], typer.Option("--routes-file", help="Start with this traffic split: a PUT /kfloop/routes body (the local runtime keeps one current), taken before the transformer reports ready.")] = None,
    control_port: ControlPortOption = None,
    auth_token_file: AuthTokenFileOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve the transformer: validate and scale raw rows, call the predictor, name the classes.

    --version and --predictor-host make one route; --routes-file replaces it with its split of routes."""
    from kfloop.serving.entrypoints import Access, run_transformer

    if predictor_protocol not in ("v2", "rest-v2"):
        raise typer.BadParameter(f"predictor protocol {predictor_protocol!r} is not supported; use v2")
    hosts = [h.strip().removeprefix("http://") for h in predictor_host.split(",") if h.strip()]
    run_transformer(
        model, registry_uri(registry, home), version, hosts, server.address(), Access(home, control_port, auth_token_file),
        limits=server.limits(), logger_url=logger_url, logger_token_file=logger_token_file,
        inference_service=inference_service, namespace=namespace, routes_file=routes_file,
    )


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
    auth_token_file: AuthTokenFileOption = None,
    policy: PolicyOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Serve a model locally: predictor replica(s) + transformer as supervised processes, until Ctrl-C.

    The admin API's changes need HOME's token (kfloop token prints it)."""
    from kfloop.local.stack import LocalStack, StackPorts
    from kfloop.policies import load_policy

    loaded_policy = load_policy(policy)
    name = model or loaded_policy.model
    stack = LocalStack(loaded_policy, policy, home, registry_uri(registry, home), model=name, host=host,
                       ports=StackPorts(http=http_port, grpc=grpc_port, admin=admin_port), inference_token_file=auth_token_file)
    stop = wait_for_stop_signal()
    with err.status(f"starting {replicas} predictor replica(s) and the transformer for {name}"):
        stack.start_serving(version=version, replicas=replicas, logger_url=logger_url, autoscale=autoscale)
    try:
        table = Table(title=f"serving {name} version {stack.runtime.version}")
        table.add_column("endpoint")
        table.add_column("address")
        for key, value in {**stack.runtime.endpoints, "admin": stack.urls["admin"]}.items():
            table.add_row(key, value)
        err.print(table)
        stop.wait()
    finally:
        stack.stop()
        err.print("stopped")
