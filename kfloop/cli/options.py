"""What every ``kfloop`` command shares: the consoles, the common options and their defaults.

Options are ``Annotated`` types, so every command that takes a registry, a
policy or a home folder spells and documents it the same way.
"""

from __future__ import annotations

import functools
import inspect
import signal
import threading
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, TypeVar, get_type_hints

import typer
from rich.console import Console

if TYPE_CHECKING:
    from kfloop.serving.entrypoints import RequestLimits, ServerAddress
    from kfloop.serving.oidc import ServiceAccountTokens

__all__ = [
    "DEFAULT_HOME", "AuthTokenFileOption", "ControlPortOption", "DataOption", "GrpcPortOption", "HomeOption", "HostOption", "HttpPortOption", "ImageOption",
    "MaxBatchOption", "ModelOption", "NoGrpcOption", "OidcOptions", "PolicyOption", "RegistryOption", "TargetOption", "WorkersOption",
    "ServerOptions", "absolute_if_local", "err", "out", "registry_uri", "wait_for_stop_signal", "with_options",
]

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

HostOption = Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless told otherwise).")]
MaxBatchOption = Annotated[int, typer.Option("--max-batch", help="Largest batch (rows) one request may carry.")]
MaxExplainRowsOption = Annotated[int, typer.Option("--max-explain-rows", min=1, help="Most rows one explain request may carry (the policy's explain.max_rows); more: 413.")]
# KServe's controller passes these with underscores to custom containers: accept both spellings.
HttpPortOption = Annotated[int, typer.Option("--http-port", "--http_port", help="REST port.")]
GrpcPortOption = Annotated[int, typer.Option("--grpc-port", "--grpc_port", help="gRPC port.")]
NoGrpcOption = Annotated[bool, typer.Option("--no-grpc", help="Serve REST only.")]
ControlPortOption = Annotated[
    Optional[int],
    typer.Option("--control-port", help="Serve the control routes (/kfloop/...) on this loopback port, behind HOME's token (kfloop token)."),
]
AuthTokenFileOption = Annotated[
    Optional[Path],
    typer.Option("--auth-token-file", help="Require 'Authorization: Bearer <the token in this file>' on inference calls (REST and gRPC); health and metrics stay open."),
]
WorkersOption = Annotated[int, typer.Option("--workers", hidden=True, help="Accepted for KServe; kfloop scales by replicas.")]


def registry_uri(registry: str | None, home: Path) -> str:
    """The registry root: the one given, or ``HOME/registry``; a local one made absolute (pipeline tasks,
    servers and containers started elsewhere read it at the same path)."""
    return absolute_if_local(registry or str(home / "registry"))


def absolute_if_local(uri: str | None) -> str | None:
    """A local data path made absolute (processes started elsewhere read it too); URIs unchanged."""
    if uri is None or "://" in uri or uri.startswith("builtin:"):
        return uri
    return str(Path(uri).resolve())


def wait_for_stop_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM (Ctrl-C, ``kfloop down``)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


Options = TypeVar("Options")


def with_options(options_type: type[Options]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give ``command(options, ...)`` the fields of the dataclass ``options_type`` as its own CLI options.

    Commands that share options declare them once, as an ``Annotated`` field of
    a dataclass; the command gets them as one value object. Typer reads the
    returned function's signature: the dataclass' fields, then the command's
    own parameters.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        # Typer reads each option from its parameter's Annotated[...] annotation: give it the evaluated types.
        shared_types = get_type_hints(options_type, include_extras=True)
        own_types = get_type_hints(command, include_extras=True)
        shared = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=shared_types[f.name],
                              default=inspect.Parameter.empty if f.default is MISSING else f.default)
            for f in fields(options_type)  # type: ignore[arg-type]
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_types[p.name])
               for p in list(inspect.signature(command).parameters.values())[1:]]

        @functools.wraps(command)
        def with_shared(**values: Any) -> None:
            command(options_type(**{p.name: values.pop(p.name) for p in shared}), **values)

        with_shared.__signature__ = inspect.Signature([*shared, *own], return_annotation=None)  # type: ignore[attr-defined]
        with_shared.__annotations__ = {p.name: p.annotation for p in [*shared, *own]}
        del with_shared.__wrapped__  # Typer must read the new signature, not the wrapped one
        return with_shared

    return decorate


@dataclass(frozen=True)
class ServerOptions:
    """Where a KServe server (predictor, transformer) listens and how much one request may carry."""

    host: HostOption = "127.0.0.1"
    http_port: HttpPortOption = 8080
    grpc_port: GrpcPortOption = 8081
    no_grpc: NoGrpcOption = False
    max_batch: MaxBatchOption = 1024
    max_explain_rows: MaxExplainRowsOption = 32
    workers: WorkersOption = 1

    def address(self) -> "ServerAddress":
        """Where the server listens, as the entry points take it."""
        from kfloop.serving.entrypoints import ServerAddress

        return ServerAddress(self.host, self.http_port, self.grpc_port, not self.no_grpc)

    def limits(self) -> "RequestLimits":
        """How much one request may carry, as the entry points take it."""
        from kfloop.serving.entrypoints import RequestLimits

        return RequestLimits(self.max_batch, self.max_explain_rows)


@dataclass(frozen=True)
class OidcOptions:
    """Which Kubernetes ServiceAccount JWTs a server takes (a cluster's Knative Triggers, OIDC on)."""

    oidc_audience: Annotated[Optional[str], typer.Option("--oidc-audience", help="With oidc auth: the audience the Triggers ask Knative's tokens for (spec.subscriber.audience, or spec.delivery.deadLetterSink.audience).")] = None
    oidc_subject: Annotated[Optional[list[str]], typer.Option("--oidc-subject", help="With oidc auth: an admitted subject, system:serviceaccount:NS:SA with SA a Trigger's status.auth.serviceAccountName (Knative shortens long names with a hash; kfloop manifests computes them); repeat per Trigger.")] = None
    oidc_issuer_url: Annotated[str, typer.Option("--oidc-issuer-url", help="With oidc auth: where the cluster's OIDC discovery document is served.")] = "https://kubernetes.default.svc"

    def authenticator(self, flag: str) -> "ServiceAccountTokens":
        """The verifier these options describe; ``flag`` (``--alarm-auth oidc``) names what asked for it in errors."""
        if not self.oidc_audience or not self.oidc_subject:
            raise typer.BadParameter(f"{flag} needs --oidc-audience and at least one --oidc-subject")
        from kfloop.serving.oidc import ServiceAccountTokens

        return ServiceAccountTokens(self.oidc_audience, self.oidc_subject, issuer_url=self.oidc_issuer_url)
