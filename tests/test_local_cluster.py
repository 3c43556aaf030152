"""--single-node's LocalCluster (real scheduler and worker processes): how its workers start."""
from __future__ import annotations

import os
import signal
import sys

import psutil

from conftest import cluster_args
from jobs import cluster


def started_with() -> tuple[int, list[str]]:
    """Run on a worker: its parent process and which of our heavy modules it already holds.
    (This module imports none of them, so unpickling this function loads none.)"""
    return os.getppid(), sorted(name for name in ("jobs.tasks", "keras") if name in sys.modules)


def test_local_workers_are_forked_with_keras_and_our_tasks_loaded():
    args = cluster_args(["--single-node", "--workers", "2"])
    cluster.prepare_local_workers(args)
    with cluster.open_client(args) as client:
        started = client.run(started_with)
    assert len(started) == 2
    for parent, loaded in started.values():
        assert loaded == ["jobs.tasks", "keras"]
        assert parent != os.getpid() and "forkserver" in " ".join(psutil.Process(parent).cmdline())


def test_ctrl_c_while_a_cluster_starts_is_held_until_it_can_be_closed():
    before = signal.getsignal(signal.SIGINT)
    with cluster.interrupt_held() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, but held: no KeyboardInterrupt
        assert interrupted
    assert signal.getsignal(signal.SIGINT) is before
