"""What ``kfloop demo`` shows while it runs and when it ends (Rich renderables)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group
from rich.table import Table

from kfloop.demo.results import DemoResult
from kfloop.demo.scenario import Demo


def live_view(demo: Demo) -> Group:
    """The stack's state now and the automation table with the time each row first fired."""
    state = demo.live_state()
    sample: dict[str, Any] = state["sample"]
    status = Table(title=f"kfloop demo: {demo.policy.model} (x{demo.settings.speed:g}) - {state['elapsed']:.0f} s",
                   show_header=False, title_justify="left")
    status.add_column("what")
    status.add_column("value")
    status.add_row("phase", f"{state['phase']}: {state['line']}")
    if state["phase"] == "train":
        status.add_row("pipeline tasks done", str(state["tasks_done"]))
    if sample:
        traffic = ", ".join(f"v{v} {w:.0f}%" for v, w in sample["traffic"].items())
        status.add_row("served", f"{traffic}; {sample['replicas']} predictor replica(s)")
        status.add_row("client requests/s", f"{sample['client_rate']:.1f}")
        for rule, value in sample["signals"].items():
            status.add_row(f"signal {rule}", "-" if value is None or math.isnan(value) else f"{value:.3g}")
        p_value = sample.get("min_p_value")
        status.add_row("drift: smallest p-value", "-" if p_value is None else f"{p_value:.1e}")
    status.add_row("client requests", f"{state['requests']} sent, {state['failed']} failed"
                   + (f" (+{state['injected']} during injected 503s)" if state["injected"] else ""))
    return Group(status, automation_table(demo.result, state["fired"]))


def automation_table(result: DemoResult, fired: dict[str, float]) -> Table:
    """The rows of the automation table and when each first fired (``fired``: rule -> time)."""
    table = Table(title="automation table", title_justify="left")
    for column in ("stage", "event", "action", "fired at"):
        table.add_column(column)
    for row in result.rows:
        when = fired.get(row.key)
        table.add_row(row.stage, row.event, row.action, "-" if when is None else f"{when - result.started:.1f} s")
    return table


def timings_table(result: DemoResult) -> Table:
    table = Table(title="loop timings", title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, value in result.timings.items():
        table.add_row(name.removesuffix("_s").replace("_", " "), "-" if value is None else f"{value:.1f}")
    return table
