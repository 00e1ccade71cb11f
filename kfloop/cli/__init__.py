"""The ``kfloop`` command line: one module per area, and the one place an error becomes a message.

Commands read argv and kfloop's environment variables (``KFLOOP_HOME``,
``KFLOOP_REGISTRY``, ``KFLOOP_KFP_HOST``, ``KFLOOP_KFP_TOKEN``) through Typer's
options and hand values on; the library below takes everything as arguments
(the kubernetes client alone reads ``KUBECONFIG``, as kubectl does). Every :class:`~kfloop.errors.KfloopError` becomes
one line on stderr and exit code 1; progress and tables go to stderr,
``--json`` output alone to stdout.
"""

from __future__ import annotations

import typer

from kfloop.cli import act, cluster, explain, loop, serve, train, watch
from kfloop.cli.options import err
from kfloop.errors import KfloopError

__all__ = ["app", "main"]

app = typer.Typer(
    help="kfloop: train -> serve -> watch -> act, on Kubeflow or on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(train.train)
app.command("compile")(train.compile_pipeline)
app.command()(train.submit)
app.add_typer(train.models_app, name="models")
for command in (serve.predictor, serve.transformer, serve.serve, watch.watch, explain.explain):
    app.command()(command)
app.add_typer(act.policy_app, name="policy")
for command in (act.trigger, loop.up, loop.demo, loop.status, loop.down, loop.token, cluster.manifests, cluster.deploy):
    app.command()(command)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KfloopError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
