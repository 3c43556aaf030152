"""--single-node's LocalCluster (real scheduler and worker processes): how its workers start,
and what any scheduler imports as it unpickles the sweep's tasks."""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import psutil

from conftest import REPO, cluster_args
import tiny
from jobs import cluster, stopping


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


def test_unpickling_the_sweeps_tasks_imports_no_tensorflow(tmp_path):
    """A Dask scheduler unpickles the task graph it is sent (distributed's update_graph): the
    sweep's tasks and their arguments (B's spec, lab and array sets, the fine-tuning settings)
    must load no Keras there, or every scheduler would import TensorFlow (seconds of CPU,
    hundreds of MB) for tasks it never runs."""
    import cloudpickle

    from pruning.data import ArraySet, LabSet
    from pruning.finetune_settings import Settings
    from pruning.models import ModelSpec
    from pruning.sweep import activations_task, evaluate_prefixes_task, fine_tune_task

    spec = ModelSpec(str(tmp_path / "bd_net.h5")).stamped()
    lab_set = LabSet(str(tmp_path / "valid.h5"), rows=100, channels_first=True, scale=Fraction(1, 255))
    arrays = ArraySet(np.zeros((10, 55, 47, 3), np.float32), np.zeros(10, np.int64), channels_first=False)
    tasks = [(activations_task, spec, "conv_3", "pool_3", "clean_valid", lab_set.part(0, 50), 0, 50),
             (activations_task, spec, "conv_3", "pool_3", "clean_test", arrays.part(0, 5), 0, 5),
             # (a chunk reaches the scheduler as the key of the task that computes it)
             (evaluate_prefixes_task, spec, "conv_3", "pool_3", "activations-clean_valid-0", (2, 0, 1), 0, 4),
             (fine_tune_task, spec, "conv_3", {"clean_valid": lab_set, "clean_test": arrays}, (2, 0),
              Settings(epochs=3), str(tmp_path / "finetune"), "fine-tune-1234")]
    loads = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print(*(m for m in "
             "('keras', 'tensorflow', 'pruning.models', 'pruning.sweep') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", loads], input=cloudpickle.dumps(tasks), cwd=REPO,
                          capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().split() == ["pruning.models", "pruning.sweep"]  # unpickled, no Keras


def test_ctrl_c_while_a_cluster_starts_is_held_until_it_can_be_closed():
    before = signal.getsignal(signal.SIGINT)
    with stopping.interrupt_held() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, but held: no KeyboardInterrupt
        deadline = time.monotonic() + 30  # a busy machine may run the handler a moment later
        while not interrupted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert interrupted
    assert signal.getsignal(signal.SIGINT) is before


async def leave_a_gather_wait_behind():
    """What Client._gather leaves when a stop interrupts it: a wait that nobody awaits any
    more, ended by the run's cancelled tasks (seen with --slurm-cluster after a lost worker)."""
    from distributed.client import AllExit

    async def wait():
        raise AllExit()
    asyncio.ensure_future(wait())
    await asyncio.sleep(0.01)


def test_a_stopped_runs_closing_cluster_logs_nothing_from_distributed():
    """A stop with tasks in flight: the in-process scheduler's tracebacks about the client that
    is leaving (``Closed comm ... while trying to write``) must not bury the run's one line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("distributed").addHandler(handler)  # as distributed sets up its own
    logging.getLogger().addHandler(handler)
    scheduler, ours = logging.getLogger("distributed.scheduler"), logging.getLogger("jobs.sweep")
    try:
        with stopping.quiet_distributed():
            try:
                raise ConnectionError("Comm <TCP (closed) Scheduler->Client> already closed.")
            except ConnectionError:
                scheduler.critical("Closed comm <BatchedSend: closed> while trying to write", exc_info=True)
            asyncio.run(leave_a_gather_wait_behind())
            gc.collect()  # asyncio logs the task's exception, never retrieved, as it goes
            ours.warning("still shown")
        scheduler.warning("shown again")
    finally:
        logging.getLogger("distributed").removeHandler(handler)
        logging.getLogger().removeHandler(handler)
    assert "Closed comm" not in stream.getvalue() and "Traceback" not in stream.getvalue()
    assert "AllExit" not in stream.getvalue()
    assert "still shown" in stream.getvalue() and "shown again" in stream.getvalue()


def test_the_scheduler_counts_a_chunks_activations_as_its_size(tmp_path):
    """Dask sized a chunk as the 56 bytes of an object: the dashboard showed none of what the
    workers held as their data, and a worker past its memory target had nothing to spill.
    Spilled, a chunk is read back as it was."""
    import dask
    import numpy as np
    from distributed import Client, LocalCluster, wait

    from pruning.sweep import activations_task
    from pruning.data import lab_paths, open_lab_set
    from pruning.models import ModelSpec
    from pruning.prune import predict_activations, split_model

    model = tiny.tiny_deepid()
    model.save(tmp_path / "b.keras")
    tiny.write_sets(model, tmp_path / "data", rows=(50, 10, 10, 10))
    lab_set = open_lab_set(lab_paths(tmp_path / "data")["clean_valid"], tiny.SHAPE)
    # a memory target of a few KB: the worker spills the chunk to disk as soon as it holds it
    with dask.config.set({"distributed.worker.memory.target": 1e-7}), \
            LocalCluster(n_workers=1, processes=False, dashboard_address=None, memory_limit="1 GiB") as local, \
            Client(local) as client:
        future = client.submit(activations_task, ModelSpec(str(tmp_path / "b.keras")), "conv_3", "pool_3",
                               "clean_valid", lab_set, 0, 50)
        wait(future)
        counted = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.tasks[future.key].nbytes)
        spilled = client.run(lambda dask_worker: list(dask_worker.data.slow))
        activations = future.result().activations
    assert activations.nbytes <= counted < 2 * activations.nbytes
    assert list(spilled.values()) == [[future.key]]
    assert np.array_equal(activations, predict_activations(split_model(model, "conv_3", "pool_3").base,
                                                           lab_set.read()[0]))
