"""``kfloop up``, ``status``, ``down`` and ``demo``: the whole loop on one machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kfloop.cli.options import (
    DEFAULT_HOME, AuthTokenFileOption, DataOption, HomeOption, PolicyOption, RegistryOption, TargetOption, absolute_if_local, err, out,
    registry_uri, wait_for_stop_signal,
)

__all__ = ["demo", "down", "status", "token", "up"]


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
    auth_token_file: AuthTokenFileOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Start the whole loop locally (train if needed, serve, watch, trigger, autoscale) until Ctrl-C or 'kfloop down'.

    Control calls, payload events and alarms need HOME's token (kfloop token prints it)."""
    from kfloop.local.stack import LocalStack, StackPorts
    from kfloop.policies import load_policy

    loaded = load_policy(policy)
    stack = LocalStack(loaded, policy, home, registry_uri(registry, home), data_uri=absolute_if_local(data), target=target,
                       ports=StackPorts(http_port, grpc_port, admin_port, watch_port, trigger_port),
                       inference_token_file=auth_token_file)
    with err.status(f"training {loaded.model} (no production version yet)"):
        trained = stack.ensure_model()
    if trained is not None:
        err.print(f"trained {loaded.model} version {trained['version']}: {trained['reason']}")
    stop = wait_for_stop_signal()
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


def demo(
    data: DataOption = None,
    target: TargetOption = None,
    policy: PolicyOption = None,
    speed: Annotated[float, typer.Option("--speed", min=0.01, help="Divide the policy's windows, periods and cooldowns by this (10: about 4 minutes).")] = 10.0,
    report: Annotated[Path, typer.Option("--report", help="Folder for index.html and the PNG charts.")] = Path("report"),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end: rule firings, failed client requests, loop timings.")] = False,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Play the automation table on a fresh local stack: train, scale out and in, predictor failures, concept drift
    (labels) -> accuracy alarm -> retrain -> shadow -> canary, covariate drift -> retrain -> shadow -> canary.

    Everything runs under HOME/demo/<time> on free loopback ports and is stopped at the end.
    """
    from rich.live import Live

    from kfloop.demo.results import save_result
    from kfloop.demo.scenario import Demo, DemoSettings, new_demo_home
    from kfloop.demo.view import live_view, timings_table
    from kfloop.policies import load_policy
    from kfloop.demo.report import write_report
    from kfloop.local.supervisor import free_port
    from kfloop.local.stack import StackPorts

    try:  # the report's charts; an extra, so the image's serving containers do not carry it
        import matplotlib  # noqa: F401
    except ImportError:
        raise typer.BadParameter("kfloop demo draws its report with matplotlib: pip install 'kfloop[demo]'") from None
    folder = new_demo_home(home)
    ports = StackPorts(http=free_port(), grpc=free_port(), admin=free_port(), watch=free_port(), trigger=free_port())
    settings = DemoSettings(load_policy(policy), folder, data_uri=absolute_if_local(data), target=target, speed=speed, ports=ports)
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


def status(home: HomeOption = DEFAULT_HOME, json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the running loop: version, replicas, request and failure rate, last p-value, realised accuracy per
    version (labelled answers), last alarm, runs in flight."""
    import httpx

    from kfloop.errors import ClusterError
    from kfloop.local.stack import STACK_FILE, stack_status

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
        **{f"realised accuracy v{version}": f"{figure['accuracy']:.3f} over {figure['labels']:.0f} labels"
           for version, figure in state["realised_accuracy"].items()},
        "last alarm": "-" if not state["last_alarm"] else
        f"{state['last_alarm']['type']} ({state['last_alarm']['first_drifted_row_time'] or state['last_alarm']['id']})",
        "runs in flight": str(state["runs_in_flight"]),
        "last run": "-" if not state["last_run"] else f"{state['last_run']['outcome']} (version {state['last_run'].get('version')})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    out.print(table)


def down(home: HomeOption = DEFAULT_HOME, timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a clean stop.")] = 60.0) -> None:
    """Stop the loop started by 'kfloop up' (every process it started)."""
    import os
    import signal
    import time

    from kfloop.errors import ClusterError
    from kfloop.local.stack import STACK_FILE

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




def token(home: HomeOption = DEFAULT_HOME) -> None:
    """Print HOME's bearer token (created at first use, mode 0600): send it as 'Authorization: Bearer <token>'."""
    from kfloop.credentials import local_token

    typer.echo(local_token(home))
