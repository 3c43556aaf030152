"""Shared pytest fixtures."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo():
    """The embedded demo BadNet, built once into ``$FINE_PRUNING_CACHE`` or ``<repo>/.cache``."""
    from pruning.demo import ensure_demo

    return ensure_demo(os.environ.get("FINE_PRUNING_CACHE") or REPO / ".cache")


# The files a rerun, a resumed run or a SLURM run must reproduce byte for byte
# (manifest.json differs by design: it holds timings).
REPRODUCIBLE = ["results.csv", "channel_order.csv", "goodnet.csv", "model_X=2.h5", "model_X=4.h5",
                "model_X=10.h5", "goodnet_X=2.keras", "goodnet_X=4.keras", "goodnet_X=10.keras"]


@pytest.fixture(scope="session")
def demo_run(demo, tmp_path_factory):
    """``python -m jobs.sweep --single-node`` on the demo, once: the reference other runs match."""
    from jobs.sweep import main

    out = tmp_path_factory.mktemp("demo-run") / "out"
    assert main(["--model", demo.model, "--data", demo.data_dir, "--single-node", "--out", str(out)]) == 0
    return out


def assert_same_outputs(out: Path, reference: Path) -> None:
    for name in REPRODUCIBLE:
        assert (reference / name).is_file(), name
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"


def cluster_args(argv: list[str]) -> argparse.Namespace:
    """The "where to run" flags parsed as jobs.sweep parses them."""
    from jobs import cluster
    parser = argparse.ArgumentParser()
    cluster.add_cluster_arguments(parser)
    return parser.parse_args(argv)
