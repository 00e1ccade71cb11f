"""Which candidates a run evaluates: the full grid, or a search warm-started from the parent version's own,
and how they are spread over the pipeline's tasks."""

from __future__ import annotations

from kfloop.policies import ForestGrid, Policy
from kfloop.search import full_search, warm_search

GRID = ForestGrid().candidates()  # n_estimators 100|300, max_features sqrt|log2, min_samples_leaf 1|2
WINNER = {"n_estimators": 300, "max_features": "sqrt", "min_samples_leaf": 1}


def parent(ranked: list[dict]) -> dict:
    return {"params": ranked[0], "candidates": [{"params": p, "metrics": {"accuracy": 0.9}} for p in ranked]}


def test_a_warm_search_takes_the_winner_and_its_closest_grid_neighbours_in_the_parents_ranking_order():
    # the parent ranked min_samples_leaf=2 above 100 trees and log2; KFP hands numbers back as floats
    ranked = [WINNER, {**WINNER, "min_samples_leaf": 2.0}, {"n_estimators": 100, "max_features": "log2", "min_samples_leaf": 1},
              {**WINNER, "n_estimators": 100.0}, {**WINNER, "max_features": "log2"}]
    search = warm_search(GRID, "3", parent(ranked), neighbourhood=2)
    assert search.candidates == [WINNER, {**WINNER, "min_samples_leaf": 2}, {**WINNER, "n_estimators": 100}]
    assert search.lineage() == {"search": "warm", "candidates": 3, "parent_version": "3", "seed_params": WINNER,
                                "pinned": [], "evaluation": "oob"}
    everything = warm_search(GRID, "3", parent(ranked), neighbourhood=64)
    assert len(everything.candidates) == 4  # the winner and its 3 neighbours: one step along each axis
    assert all(c in GRID for c in everything.candidates)


def test_pinned_sets_join_a_warm_search_once_and_a_parent_without_a_search_gives_the_full_grid():
    pinned = [{"n_estimators": 300, "max_features": 0.5, "min_samples_leaf": 1}, WINNER]
    search = warm_search(GRID, "3", parent([WINNER]), neighbourhood=0, pinned=pinned)
    assert search.candidates == [WINNER, pinned[0]]
    assert search.lineage()["pinned"] == pinned
    assert warm_search(GRID, "1", {"params": {}}, neighbourhood=2) == full_search(GRID)
    assert full_search(GRID).lineage() == {"search": "full", "candidates": 8, "evaluation": "cv"}


def test_candidates_are_spread_over_parallelism_tasks_or_packed_candidates_per_task_balanced_by_cost():
    spread = Policy.model_validate({"training": {"parallelism": 3}}).training
    batches = spread.batches(GRID)
    assert sorted(len(b) for b in batches) == [2, 3, 3] and sorted(map(str, sum(batches, []))) == sorted(map(str, GRID))
    # the two dearest forests (300 trees, sqrt) land on different tasks
    dearest = [b for b in batches if any(p["n_estimators"] == 300 and p["max_features"] == "sqrt" for p in b)]
    assert len(dearest) == 2
    packed = Policy.model_validate({"training": {"candidates_per_task": 3}}).training
    assert sorted(len(b) for b in packed.batches(GRID)) == [2, 3, 3]
    single = Policy.model_validate({"training": {"candidates_per_task": 1}}).training
    assert len(single.batches(GRID)) == 8 and spread.batches([]) == []
