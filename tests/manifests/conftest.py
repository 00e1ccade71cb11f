"""Fixtures of the manifest tests: the default policy and the loop rendered from it (once per module)."""

from __future__ import annotations

import pytest

from loop_objects import render
from kfloop.policies import load_policy


@pytest.fixture(scope="module")
def policy():
    return load_policy()


@pytest.fixture(scope="module")
def objects(policy):
    return render(policy)

