"""``kfloop explain``: why a model version answers what it answers, row by row, from a CSV.

Against a registry version (in this process, :class:`~kfloop.explain.ForestExplainer`) or, with ``--url``,
against a running loop's transformer (``POST /v1/models/{model}:explain``, as any client would).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from kfloop.cli.options import DEFAULT_HOME, HomeOption, RegistryOption, out, registry_uri

__all__ = ["explain"]


def explain(
    data: Annotated[str, typer.Argument(help="A CSV with the model's feature columns (labelled or not; an id column names the rows).")],
    model: Annotated[str, typer.Option("--model", help="Registry model name.")] = "classifier",
    version: Annotated[Optional[str], typer.Option("--version", help="Registry version (default: production); not with --url.")] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="A running loop's transformer (e.g. http://127.0.0.1:8080): ask it, as a client would.")] = None,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="With --url: send this bearer token (the runtime's inference token).")] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Explain the first N rows of DATA.")] = 5,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Features shown per row (0: every feature).")] = 10,
    method: Annotated[str, typer.Option("--method", help="exact (TreeSHAP) or approximate (Saabas, labelled so).")] = "exact",
    json_output: Annotated[bool, typer.Option("--json", help="Print the explanations as JSON.")] = False,
    registry: RegistryOption = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Explain rows of a CSV: each row's predicted class, its probability and the features that moved it most."""
    from kfloop.data import load_feature_rows
    from kfloop.explain import ExplainOptions
    from kfloop.registry import ModelRegistry

    options = ExplainOptions.parse({"method": method, "top_k": top_k})
    store = ModelRegistry(registry_uri(registry, home))
    if url is not None:
        if version is not None:
            raise typer.BadParameter("--version goes with the registry; a running loop answers with the versions it serves")
        feature_names = tuple(store.metadata(model, store.resolve(model, None))["feature_names"])
        features, ids = load_feature_rows(data, feature_names)
        explanations = _ask(url, model, features[:rows], options, token_file)
    else:
        from kfloop.explain import ForestExplainer

        resolved = store.resolve(model, version)
        features, ids = load_feature_rows(data, tuple(store.metadata(model, resolved)["feature_names"]))
        with store.local_version(model, resolved) as folder:
            explanations = ForestExplainer.load(folder, resolved).explain(features[:rows], options).rows()
    names = [str(i) for i in ids[:rows]] if ids is not None else [str(n + 1) for n in range(len(explanations))]
    if json_output:
        out.print_json(json.dumps([{"row": name, **row} for name, row in zip(names, explanations)]))
        return
    out.print(_table(names, explanations))


def _ask(url: str, model: str, rows: Any, options: Any, token_file: Path | None) -> list[dict[str, Any]]:
    """The explanations a running transformer gives (an :class:`UpstreamError` for an answer that is not 200)."""
    from kfloop.credentials import bearer, read_token
    from kfloop.errors import UpstreamError
    from kfloop.http_clients import http_client

    headers = bearer(read_token(token_file)) if token_file else {}
    with http_client(timeout=120.0) as client:
        answer = client.post(f"{url.rstrip('/')}/v1/models/{model}:explain", headers=headers,
                             json={"instances": rows.tolist(), **options.to_fields()})
    if answer.status_code != 200:
        raise UpstreamError(f"{url} answered HTTP {answer.status_code}: {answer.text[:300]}")
    return answer.json()["explanations"]


def _table(names: list[str], explanations: list[dict[str, Any]]) -> Table:
    first = explanations[0] if explanations else {"method": "exact", "version": "?"}
    title = f"version {first['version']}, {first['method']} attributions" + (" (approximate)" if first.get("approximate") else "")
    table = Table(title=title)
    for column in ("row", "prediction", "probability", "base value", "features that moved it most"):
        table.add_column(column)
    for name, row in zip(names, explanations):
        explained = row["classes"][0]
        moved = ", ".join(f"{feature} {value:+.3f}" for feature, value in explained["attributions"].items())
        table.add_row(name, row["prediction"], f"{explained['probability']:.3f}", f"{explained['base_value']:.3f}", moved)
    return table
