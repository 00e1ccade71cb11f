"""Which hyper-parameter sets a training run evaluates: the policy's full grid, or a search warm-started
from the production version's own search.

A warm search evaluates the parent's winner again (on the new data), its closest neighbours on the policy's
grid -- the sets that differ from the winner in one parameter by one step, best-ranked in the parent's search
first -- and any sets the policy pins. It scores them out of bag (one fit each; the parent's search already
ranked the grid by k-fold CV), where the full grid is cross-validated. Its :meth:`Search.lineage` (parent
version, seed parameters, search mode, evaluation) goes into the pipeline run's parameters and the new
version's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kfloop.training import normalise_params

Params = dict[str, Any]
SearchMode = Literal["full", "warm"]
Evaluation = Literal["cv", "oob"]  # k-fold cross-validation, or out-of-bag from one fit


@dataclass(frozen=True)
class Search:
    """The candidates of one run and where they came from."""

    candidates: list[Params]
    mode: SearchMode = "full"
    parent_version: str | None = None
    seed_params: Params | None = None
    pinned: list[Params] = field(default_factory=list)
    evaluation: Evaluation = "cv"

    def lineage(self) -> dict[str, Any]:
        """The search mode and size; for a warm search also the parent version, seed and pinned sets
        (JSON with no nulls: KFP takes it as a pipeline parameter)."""
        lineage: dict[str, Any] = {"search": self.mode, "candidates": len(self.candidates), "evaluation": self.evaluation}
        if self.mode == "warm":
            lineage.update(parent_version=self.parent_version, seed_params=self.seed_params, pinned=self.pinned)
        return lineage


def full_search(grid: list[Params]) -> Search:
    """Every combination of the grid (``ForestGrid.candidates()``)."""
    return Search(candidates=list(grid))


def warm_search(grid: list[Params], parent_version: str, parent: dict[str, Any], *, neighbourhood: int,
                pinned: list[Params] | None = None) -> Search:
    """The parent's winner, its ``neighbourhood`` closest grid neighbours and the pinned sets.

    ``parent`` is the parent version's registry metadata: its winning ``params`` and its ranked
    ``candidates`` (with their cross-validated metrics). Neighbours the parent did evaluate come in the
    parent's ranking order; the others follow in grid order. A parent without ``params`` (registered by
    hand) leaves nothing to start from: the full grid is searched.
    """
    if not parent.get("params"):
        return full_search(grid)
    winner = normalise_params(parent["params"])
    ranked = [normalise_params(c["params"]) for c in parent.get("candidates", []) if c.get("params")]
    neighbours = [params for params in grid if _one_step_apart(winner, params, grid)]
    neighbours.sort(key=lambda params: ranked.index(params) if params in ranked else len(ranked) + grid.index(params))
    pinned_sets = [normalise_params(p) for p in pinned or []]
    chosen: list[Params] = [winner]
    for params in [*neighbours[:neighbourhood], *pinned_sets]:
        if params not in chosen:
            chosen.append(params)
    return Search(candidates=chosen, mode="warm", parent_version=parent_version, seed_params=winner,
                  pinned=pinned_sets, evaluation="oob")


def _one_step_apart(winner: Params, params: Params, grid: list[Params]) -> bool:
    """Whether ``params`` differs from ``winner`` in exactly one parameter, by one step of that axis."""
    if params.keys() != winner.keys():
        return False
    different = [name for name in params if params[name] != winner[name]]
    if len(different) != 1:
        return False
    name = different[0]
    axis = sorted({candidate[name] for candidate in grid}, key=_axis_order)
    if winner[name] not in axis:
        return True  # the winner came from another grid: every value of that axis is as close
    return abs(axis.index(params[name]) - axis.index(winner[name])) == 1


def _axis_order(value: Any) -> tuple[int, float | str]:
    """Numbers in numeric order, then names (``sqrt``, ``log2``) in name order."""
    return (0, float(value)) if isinstance(value, (int, float)) else (1, str(value))
