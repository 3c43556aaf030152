"""Shared pytest fixtures."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests that stop a sweep with SIGINT play a terminal's Ctrl-C. A suite started in the
# background by a shell without job control (`make test &` in a script) ignores SIGINT, and an
# ignored signal is passed on to every process it starts: give it back its usual handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo BadNet, built once into ``$FINE_PRUNING_CACHE`` or ``<repo>/.cache``."""
    from pruning.demo import ensure_demo

    return ensure_demo(os.environ.get("FINE_PRUNING_CACHE") or REPO / ".cache")


# The files a rerun, a resumed run or a SLURM run must reproduce byte for byte
# (manifest.json differs by design: it holds timings).
REPRODUCIBLE = ["results.csv", "channel_order.csv", "goodnet.csv", "model_X=2.h5", "model_X=4.h5",
                "model_X=10.h5", "goodnet_X=2.keras", "goodnet_X=4.keras", "goodnet_X=10.keras"]


# The demo's chunks of rows at --chunk-rows 256 (5 in each of its sets of 1,280, 1,280, 1,191 and
# 1,197 rows): the chunk size of the tests that stop a sweep mid-way and check it was mid-way.
# Smaller chunks would only cost CPU: each chunk's base pass is padded to 256 rows
# (pruning.prune.BATCH_ROWS). The runs at --chunk-rows 96 --workers 2 (test_demo_run.py's
# hung_up_then_a_worker_killed, test_same_everywhere.py) check that those small chunks on two
# workers give the reference's bytes: they stay at 96.
DEMO_CHUNKS_AT_256 = 20


# `make test` runs two pytest-xdist workers with ``--dist loadscope``, scoped here: a module's
# tests stay on one worker, so its module fixtures run once, and the modules that use this
# machine's one SLURM share one scope, so their tests run on one worker, one after the other.
# (xdist's own ``loadgroup`` marks are lost under pytest 9.2: it renames a node id pytest no
# longer reads.)
SLURM_MODULES = ("test_slurm.py", "test_slurm_cluster.py", "test_slurm_campaign.py")


def scope_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "slurm" if Path(module).name in SLURM_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadscope":
        from xdist.scheduler import LoadScopeScheduling

        class ByScope(LoadScopeScheduling):
            def _split_scope(self, nodeid):
                return scope_of(nodeid)

        return ByScope(config, log)
    return None


# The other modules that take longest (measured, most CPU first). Each worker takes the next
# scope when it is done with one: the long ones first, so that the last scopes are short and
# neither worker waits long for the other at the end. Not listed: after these, in file order.
LONGEST_FIRST = ("test_finetune.py", "test_demo_run.py", "test_campaign.py", "test_running_cluster.py",
                 "test_sweep.py", "test_same_everywhere.py", "test_bench.py", "test_bad_input.py",
                 "test_demo.py", "test_exactness.py", "test_realdata.py", "test_install.py")


def run_order(nodeid: str) -> int:
    scope = scope_of(nodeid)
    if scope == "slurm":
        return 0
    name = Path(scope).name
    return 1 + (LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST))


def pytest_collection_modifyitems(items):
    """SLURM's tests first: waiting on a real scheduler, they are the longest chain; a test
    that uses ``slurm_cluster`` outside ``SLURM_MODULES`` could race the others for it. Then
    the longest modules (``LONGEST_FIRST``)."""
    strays = [item.nodeid for item in items if "slurm_cluster" in item.fixturenames
              and scope_of(item.nodeid) != "slurm"]
    if strays:
        raise pytest.UsageError(f"{strays[0]} uses slurm_cluster: add its module to "
                                "SLURM_MODULES in tests/conftest.py")
    items.sort(key=lambda item: run_order(item.nodeid))


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session shared by all its pytest-xdist workers (each worker's own
    base folder is a subfolder of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def make_run(demo, tmp_path_factory):
    """`make run`'s command, ``python -m jobs.sweep --single-node --out OUT`` (the embedded demo),
    once per test session (the first xdist worker to ask runs it, the other reads its record):
    its exit status, stdout and stderr, and in ``out`` the reference other runs match. Once its
    cluster is up, every port its processes listen on is attacked (tests/attack.py): ``ports``,
    what each attempt ``tried`` met, and the ports ``still_listening`` during it."""
    shared = session_folder(tmp_path_factory)
    record = shared / "make-run.json"
    from pruning.files import exclusive_lock
    with exclusive_lock(shared / "make-run.lock"):
        if not record.exists():
            record.write_text(json.dumps(run_make_run(demo, shared / "demo-run" / "results")))
        run = json.loads(record.read_text())
    return SimpleNamespace(**run | {"out": Path(run["out"]),
                                    **{name: {tuple(port) for port in run[name]}
                                       for name in ("ports", "still_listening")}})


def run_make_run(demo, out: Path) -> dict:
    from attack import attack, attacker, listening
    ready = attacker(wait_s=4)  # its workers answer in a fraction of a second
    sweep = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--single-node", "--out", str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "FINE_PRUNING_CACHE": str(Path(demo.model).parent.parent)})
    stderr = []
    for line in sweep.stderr:  # until the cluster is up (its dashboard's line)
        stderr.append(line)
        if "Dask dashboard:" in line:
            break
    processes = [psutil.Process(sweep.pid), *psutil.Process(sweep.pid).children(recursive=True)]
    ports = listening(processes)
    # Sampled while the attack runs (its attempts all start at once; it then waits up to wait_s
    # for ports that never answer, by when a quick sweep may have finished and closed them).
    sampled: dict = {}
    during = threading.Timer(0.5, lambda: sampled.update(ports=listening(processes)))
    during.start()
    tried = attack(ready, ports)
    during.join()
    stdout, rest = sweep.communicate(timeout=600)
    return {"out": str(out), "returncode": sweep.returncode, "stdout": stdout,
            "stderr": "".join(stderr) + rest, "ports": sorted(ports), "tried": tried,
            "still_listening": sorted(sampled["ports"])}


@pytest.fixture(scope="session")
def demo_run(make_run):
    """The sweep's outputs on the demo, once (:func:`make_run`'s): the reference other runs match."""
    assert make_run.returncode == 0, make_run.stderr[-3000:]
    return make_run.out


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
