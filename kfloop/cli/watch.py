"""``kfloop watch``: the drift and outlier service."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kfloop.cli.options import (
    DEFAULT_HOME, HomeOption, HostOption, OidcOptions, PolicyOption, RegistryOption, registry_uri, with_options,
)

__all__ = ["DeadLetterAuth", "EventAuth", "watch"]


class EventAuth(str, Enum):
    """Who the watch takes payload events from."""

    token = "token"
    none = "none"


class DeadLetterAuth(str, Enum):
    """Who the watch takes dead letters (alarms a Knative Trigger could not deliver) from."""

    token = "token"
    oidc = "oidc"
    none = "none"


@with_options(OidcOptions)
def watch(
    oidc: OidcOptions,
    sink: Annotated[str, typer.Option("--sink", help="Where alarms (CloudEvents) go: a Knative Broker, or the trigger service.")],
    registry: RegistryOption = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Registry model name (default: the policy's 'model').")] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="Port for payload CloudEvents (POST /) and labels (POST /v2/models/MODEL/labels, or io.kfloop.label events).")] = 8085,
    backend: Annotated[str, typer.Option("--backend", help="Detector backend: scipy (default) or alibi (BSL 1.1, needs kfloop[alibi]).")] = "scipy",
    window: Annotated[int, typer.Option("--window", min=10, help="Rows per tested window.")] = 100,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Rows between tests (default: window / 4).")] = None,
    stride_seconds: Annotated[float, typer.Option("--stride-seconds", min=0, help="And at least this many seconds between tests (at high rates).")] = 1.0,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch (rows) one payload event may carry: the model's batch limit.")] = 1024,
    alpha: Annotated[float, typer.Option("--alpha", help="False-alarm rate per tested window (split between drift and outlier tests).")] = 0.05,
    correction: Annotated[str, typer.Option("--correction", help="Multiple-testing correction over features: fdr (Benjamini-Hochberg) or bonferroni.")] = "fdr",
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="State folder: alarm outbox, delivery memory, capture journal (default: HOME/watch/MODEL).")] = None,
    no_capture: Annotated[bool, typer.Option("--no-capture", help="Do not write payload rows to the registry's capture area.")] = False,
    capture_rows: Annotated[int, typer.Option("--capture-rows", min=1, help="Rows per capture shard (a shard is also written every 30 s).")] = 500,
    follow_seconds: Annotated[float, typer.Option("--follow-seconds", help="How often to check the registry's production version.")] = 5.0,
    event_auth: Annotated[EventAuth, typer.Option("--event-auth", help="Who may post payload events: 'token' (HOME's bearer token) or 'none' (a cluster, where a NetworkPolicy admits only the transformer's pods: KServe's logger sends no credentials).")] = EventAuth.token,
    sink_token_file: Annotated[Optional[Path], typer.Option("--sink-token-file", help="Alarms carry the bearer token in this file, re-read when it changes (default: HOME/token; a cluster: the projected ServiceAccount token for the Broker).")] = None,
    dead_letter_port: Annotated[int, typer.Option("--dead-letter-port", min=0, max=65535, help="Also take back, on this port, alarms a Knative Trigger could not deliver (its deadLetterSink): they go into the outbox and are sent again. 0: off.")] = 0,
    dead_letter_auth: Annotated[DeadLetterAuth, typer.Option("--dead-letter-auth", help="Who may post dead letters: 'token' (HOME's bearer token), 'oidc' (a Knative Trigger's ServiceAccount JWT, cluster) or 'none' (a NetworkPolicy alone).")] = DeadLetterAuth.token,
    host: HostOption = "127.0.0.1",
    policy: PolicyOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Watch payload CloudEvents for drift and outliers, and judge the answers on the labels clients send (realised
    accuracy, the policy's accuracy rule); send alarms to --sink."""
    from kfloop.policies import load_policy
    from kfloop.drift.backends import BACKENDS
    from kfloop.drift.detectors import DetectorConfig
    from kfloop.credentials import local_token, token_path
    from kfloop.serving.auth import Authenticator, LocalToken, is_loopback
    from kfloop.serving.dead_letters import DeadLetterPort
    from kfloop.serving.watch import WatchConfig
    from kfloop.serving.watch_app import run_watch

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dead_letter_port and dead_letter_port == http_port:
        raise typer.BadParameter(f"--dead-letter-port must differ from --http-port ({http_port})")
    dead_letter_oidc = bool(dead_letter_port) and dead_letter_auth is DeadLetterAuth.oidc
    loaded = load_policy(policy)
    name = model or loaded.model
    try:
        detector = DetectorConfig(alpha=alpha, correction=correction)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = WatchConfig(
        registry_uri=registry_uri(registry, home), model=name, sink_url=sink,
        state_dir=state_dir or home / "watch" / name, window=window, stride=stride, stride_seconds=stride_seconds,
        max_batch=max_batch, backend=backend,
        detector=detector, capture=not no_capture, capture_flush_rows=capture_rows, follow_seconds=follow_seconds,
        sink_token_file=sink_token_file or token_path(home), capture_retention=loaded.captures.retention(),
        accuracy=loaded.accuracy, explain=loaded.explain,
    )
    dead_letter_token = bool(dead_letter_port) and dead_letter_auth is DeadLetterAuth.token
    if event_auth is EventAuth.token or sink_token_file is None or dead_letter_token:
        token = local_token(home)  # created at first use
    authenticator = LocalToken(token, loopback_only=is_loopback(host)) if event_auth is EventAuth.token else None
    dead_letters = None
    if dead_letter_port:
        dead_letter_authenticator: Authenticator | None = None
        if dead_letter_oidc:
            dead_letter_authenticator = oidc.authenticator("--dead-letter-auth oidc")
        elif dead_letter_token:
            dead_letter_authenticator = LocalToken(token, loopback_only=is_loopback(host))
        dead_letters = DeadLetterPort(dead_letter_port, dead_letter_authenticator)
    run_watch(config, authenticator, host=host, port=http_port, dead_letters=dead_letters)


