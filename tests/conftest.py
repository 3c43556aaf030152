"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo():
    """The embedded demo BadNet, built once into ``$FINE_PRUNING_CACHE`` or ``<repo>/.cache``."""
    from pruning.demo import ensure_demo

    return ensure_demo(os.environ.get("FINE_PRUNING_CACHE") or REPO / ".cache")
