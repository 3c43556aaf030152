"""Where the sweep's Dask tasks run: a LocalCluster, a running scheduler, or SLURM.

Cluster settings come from dask.config (``jobs/jobqueue.yaml`` and the site's own files);
only the choice of cluster is a command-line flag:

``--single-node``
    a LocalCluster on this machine.
``--scheduler-address ADDR`` / ``--scheduler-file PATH``
    join a running Dask scheduler.
``--slurm-runner``
    inside a SLURM job step (``sbatch slurm/sweep.sh`` runs ``srun python -m jobs.sweep
    --slurm-runner``): dask_jobqueue's SLURMRunner makes rank 0 the scheduler, rank 1 the client
    that runs the sweep and ranks 2.. the workers. Scheduler and worker ranks never return from
    :func:`open_client` (they exit when the client is done), so whatever the caller does *before*
    ``open_client`` runs in every rank and must not claim anything (locks, output files).
    GPUs: slurm/sweep.sh sets CUDA_VISIBLE_DEVICES per rank before Python starts: one GPU for
    each worker rank, none for the scheduler and client.
``--slurm-cluster N``
    from a login node: a SLURMCluster submits N worker jobs whose ``#SBATCH`` lines come from
    ``jobqueue.slurm`` in dask.config.

This module owns the flags, chooses, and opens the local cluster and the running one; the two
SLURM clients are in :mod:`jobs.slurm`, the settings they all read in :mod:`jobs.settings`. How
a stop signal ends a run is :mod:`jobs.stopping`; what the log says when every worker is lost
mid-sweep, and the dashboard's address, :mod:`jobs.monitor`.

A running cluster (``--scheduler-*``) outlives the sweep and may serve others: the sweep checks
that it can run our tasks, says what it waits for, and leaves nothing installed on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Mapping

import dask
from dask.utils import parse_timedelta
from distributed import Client, Future, LocalCluster
from distributed.utils import json_load_robust

from jobs.errors import ClusterError
from jobs.monitor import dashboard_hint, say_when_no_worker_is_left
from jobs.security import PLAIN_TCP_RISK, new_security, plain_tcp_problem
from jobs.settings import TASK_THREADS, load_config, local_workers, task_threads
from jobs.slurm import slurm_cluster_client, slurm_runner_client
from jobs.stopping import Stopped, interrupt_held, quiet_distributed, terminal_signals_ignored
from pruning.data import InputError, first_line

log = logging.getLogger(__name__)

RUNNER_TASKS = 3           # SLURMRunner: scheduler + client + at least one worker
# --single-node's workers are forked from a process that imported TensorFlow early (see
# prepare_local_workers) where the platform can (Linux, macOS); elsewhere Dask spawns them.
LOCAL_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where to run")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--single-node", action="store_true",
                       help="start a LocalCluster on this machine")
    where.add_argument("--scheduler-address", metavar="ADDR",
                       help="join a running Dask scheduler, e.g. tcp://node01:8786")
    where.add_argument("--scheduler-file", metavar="PATH",
                       help="join the scheduler described by this file (dask scheduler --scheduler-file)")
    where.add_argument("--slurm-runner", action="store_true",
                       help="inside `srun` (slurm/sweep.sh does this): rank 0 is the scheduler, "
                            "rank 1 runs the sweep, the others are workers, one per GPU")
    where.add_argument("--slurm-cluster", type=int, metavar="N",
                       help="from a login node: submit N SLURM worker jobs (settings: dask config "
                            "jobqueue.slurm, defaults in jobs/jobqueue.yaml)")
    group.add_argument("--allow-tcp", action="store_true",
                       help="join a --scheduler-* cluster that takes plain tcp:// (anyone who can "
                            "reach it can run code as its owner); also dask config fine-pruning.allow-tcp")
    group.add_argument("--workers", type=int,
                       help="--single-node's worker processes (default: 1)")
    group.add_argument("--threads-per-worker", type=int,
                       help="task threads per worker with --single-node and --slurm-runner "
                            f"(default: {TASK_THREADS}, fewer when --workers would need more "
                            "than this machine's cores)")


def check_cluster_arguments(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str | None:
    """Return a one-line problem with the cluster flags, or None. With ``--check`` (which
    starts no cluster) a place to run may be left out; the flags given are still checked."""
    if any(n is not None and n < 1 for n in (args.workers, args.threads_per_worker)):
        return "--workers and --threads-per-worker must be at least 1"
    joined = args.scheduler_address or args.scheduler_file
    elsewhere = joined or args.slurm_runner or args.slurm_cluster is not None
    if args.workers is not None and elsewhere:
        return ("--workers sets --single-node's worker processes; elsewhere the cluster has its "
                "own: --slurm-cluster N worker jobs, slurm/sweep.sh's --ntasks=2+WORKERS, or the "
                "workers you started for --scheduler-*")
    if args.threads_per_worker is not None and (joined or args.slurm_cluster is not None):
        return ("--threads-per-worker is for --single-node and slurm/sweep.sh; "
                + ("set jobqueue.slurm.cores in dask.config for --slurm-cluster" if not joined
                   else "your workers' own --nthreads decide on a running cluster"))
    if not (args.single_node or elsewhere):
        return None if getattr(args, "check", False) else (
            "say where to run: --single-node (this machine), --scheduler-address ADDR or "
            "--scheduler-file PATH (a running cluster), --slurm-cluster N (SLURM worker jobs "
            "from a login node), or submit slurm/sweep.sh")
    if args.scheduler_address:
        problem = address_problem(args.scheduler_address) or \
            plain_tcp_problem(args.scheduler_address, args.allow_tcp)
        if problem:
            return problem
    if args.scheduler_file and not is_scheduler_file(args.scheduler_file):
        return (f"--scheduler-file {args.scheduler_file} is not a Dask scheduler file (JSON with "
                "the scheduler's address); give the file that `dask scheduler --scheduler-file "
                "PATH` wrote")
    if args.scheduler_file and os.path.isfile(args.scheduler_file):  # (else checked once it is there)
        with open(args.scheduler_file) as handle:
            problem = plain_tcp_problem(json.load(handle)["address"], args.allow_tcp)
        if problem:
            return problem
    if args.slurm_runner:
        if not all(name in env for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")):
            return ("--slurm-runner runs in every task of a SLURM job step; submit "
                    "`sbatch slurm/sweep.sh ...`, which runs `srun python -m jobs.sweep --slurm-runner ...`")
        if int(env["SLURM_NTASKS"]) < RUNNER_TASKS:
            return (f"--slurm-runner needs at least {RUNNER_TASKS} SLURM tasks (scheduler, client, "
                    f"workers), this step has {env['SLURM_NTASKS']}: sbatch --ntasks=2+WORKERS")
    if args.slurm_cluster is not None:
        if args.slurm_cluster < 1:
            return "--slurm-cluster N needs at least 1 worker job"
        if shutil.which("sbatch") is None:
            return "--slurm-cluster submits worker jobs with sbatch, which is not on PATH here"
    return None


def address_problem(address: str) -> str | None:
    """What is wrong with a ``--scheduler-address`` (say, the dashboard's URL), or None."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme not in registry.backends:
            raise ValueError(f"{scheme}:// is not a Dask protocol")
        if scheme != "inproc":
            parse_host_port(location, 8786)
    except ValueError as error:
        return (f"--scheduler-address {address}: {error}; give the scheduler's address, "
                "tcp://HOST:PORT (port 8786 by default), not its dashboard's URL")
    return None


def is_scheduler_file(path: str, wait_s: float = 1.0) -> bool:
    """Whether ``path`` holds a scheduler's address, as Dask's scheduler writes it; True for a
    file that is not there yet, which the client waits for (a folder is said elsewhere). One
    that a starting scheduler is still writing is read again, for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while os.path.isfile(path):
        try:
            with open(path) as handle:
                info = json.load(handle)
            if isinstance(info, dict) and isinstance(info.get("address"), str):
                return True
        except (OSError, ValueError):  # not JSON, or not all of it yet
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def prepare_local_workers(args: argparse.Namespace) -> None:
    """With --single-node, start the process that the LocalCluster's workers will be forked
    from (Dask's ``forkserver`` method), so that it imports TensorFlow and our tasks while this
    process checks the inputs: the workers then start with them loaded, seconds sooner than
    importing them themselves. It runs no task and writes nothing; if the inputs are bad, it
    ends by itself when its imports are done."""
    if args.single_node and LOCAL_START_METHOD == "forkserver":
        import multiprocessing.forkserver  # POSIX only
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["distributed", "jobs.tasks", "pruning.prune"])
        # Only this process acts on a terminal's signals: the fork server and the workers
        # forked from it ignore them.
        with terminal_signals_ignored():
            multiprocessing.forkserver.ensure_running()


def is_service_rank(args: argparse.Namespace) -> bool:
    """Under ``--slurm-runner``, every rank but the client (1) only serves: scheduler or worker."""
    return bool(args.slurm_runner) and os.environ.get("SLURM_PROCID", "1") != "1"


@contextlib.contextmanager
def open_client(args: argparse.Namespace) -> Iterator[Client]:
    """A connected Client for the chosen cluster; the cluster is closed on exit if we made it.

    With ``--slurm-runner`` only the client rank (1) gets the Client: the scheduler and worker
    ranks serve until the client is done and then exit the process (SystemExit, status 0).
    """
    load_config()
    if args.slurm_runner:
        with slurm_runner_client(args) as client:
            yield client
    elif args.slurm_cluster is not None:
        with slurm_cluster_client(args) as client:
            yield client
    elif args.single_node:
        with dask.config.set({"distributed.worker.multiprocessing-method": LOCAL_START_METHOD}), \
                interrupt_held() as interrupted:
            try:
                # TLS with this run's own key (jobs.security); all on loopback, the dashboard too
                cluster = LocalCluster(n_workers=local_workers(args), threads_per_worker=task_threads(args),
                                       processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                       protocol="tls://", security=new_security())
            except RuntimeError as error:  # "Cluster failed to start: <a folder, a port, ...>"
                why = first_line(error, 200).removeprefix("Cluster failed to start: ")
                raise ClusterError(f"the local Dask cluster did not start ({why}); check this "
                                   "machine and Dask's settings (DASK_* variables, "
                                   "~/.config/dask)") from error
        with cluster, Client(cluster) as client:
            if interrupted:
                raise Stopped(interrupted[0])  # now that the cluster can be closed in order
            log.info("%s", dashboard_hint(client))
            yield client
    else:
        with running_cluster_client(args) as client:
            yield client


@contextlib.contextmanager
def running_cluster_client(args: argparse.Namespace) -> Iterator[Client]:
    """A Client on a running scheduler (``--scheduler-address``/``--scheduler-file``) that has
    a worker, saying what it waits for."""
    where = args.scheduler_address or f"the one in {args.scheduler_file}"
    if args.scheduler_file and not Path(args.scheduler_file).exists():
        log.info("waiting for %s to appear: a Dask scheduler writes it as it starts", args.scheduler_file)
    try:
        # (Client(scheduler_file=...) would read the file the same way, but only to connect)
        address = args.scheduler_address or json_load_robust(
            args.scheduler_file, timeout=parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))["address"]
        problem = plain_tcp_problem(address, args.allow_tcp)
        if problem:
            raise InputError(problem)
        if address.startswith("tcp://"):
            log.warning("joining the Dask scheduler at %s over plain TCP (--allow-tcp): %s", address, PLAIN_TCP_RISK)
        client = Client(address)  # with the security of your own Dask config (distributed.comm.tls)
    except OSError as error:  # timeouts included
        stale = (" (a scheduler file outlives its scheduler: is this one from a scheduler that"
                 " still runs?)" if args.scheduler_file else "")
        raise ClusterError(f"could not reach the Dask scheduler at {where}: "
                           f"{' '.join(str(error).split())}; is it running, and reachable from "
                           f"this machine?{stale}") from None
    with client:
        log.info("%s", dashboard_hint(client))
        if not client.scheduler_info()["workers"]:
            log.info("waiting for a worker to join the scheduler at %s (dask worker %s)",
                     client.scheduler.address, client.scheduler.address)
        client.wait_for_workers(1)
        check_project_imports(client)
        yield client


# What a process must import to take our tasks: the scheduler unpickles the task graph (the
# tasks' module, no TensorFlow), a worker runs the tasks (TensorFlow).
SCHEDULER_IMPORT = "import pruning.sweep"
WORKER_IMPORT = "import jobs.tasks, pruning.prune"


def check_project_imports(client: Client) -> None:
    """Stop with a :class:`ClusterError` if the scheduler or a worker of a cluster we did not
    start cannot import this project: the scheduler would refuse the task graph, and such a
    worker would die on its first task, leaving the sweep waiting for ever."""
    advice = ("start the scheduler and workers from this project's environment, at the same "
              "version (docs/dask-cluster.md)")
    try:
        client.run_on_scheduler(exec, SCHEDULER_IMPORT)  # a builtin: unpickled anywhere
    except ImportError as error:
        raise ClusterError(f"the Dask scheduler at {client.scheduler.address} cannot import this "
                           f"project ({error}); {advice}") from None
    results = client.run(exec, WORKER_IMPORT, on_error="return")
    failed = {worker: error for worker, error in results.items() if error is not None}
    if failed:
        worker, error = next(iter(failed.items()))
        raise ClusterError(f"{len(failed)} of the {len(results)} Dask workers cannot import this "
                           f"project ({worker}: {error}); {advice}")


@contextlib.contextmanager
def working_client(args):
    """A client of the chosen cluster, for a run's tasks: our workers' logs quietened, the log
    told when every worker is lost, and a stop or failure ending in one line with the run's
    tasks released."""
    from jobs.tasks import QuietWorkerLogs

    with contextlib.ExitStack() as stopping, open_client(args) as client:
        if not (args.scheduler_address or args.scheduler_file):
            # Only on workers this run started: a plugin stays on a running cluster, and
            # every worker that later joins it would have to import this project.
            with contextlib.suppress(Exception):  # only quietens the workers' logs
                client.register_plugin(QuietWorkerLogs())
        try:
            with say_when_no_worker_is_left(client, args):
                yield client
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt) or not args.traceback:
                # a stop or a failure ends in one line: no tracebacks from distributed while
                # the cluster closes (a lost scheduler's cancelled reconnect, tasks in flight)
                stopping.enter_context(quiet_distributed())
            release_tasks(client)
            raise


def release_tasks(client) -> None:
    """Cancel every task this client still holds. A stopped or failed run's traceback keeps
    its futures alive until after the cluster closes: without this, the workers would hold its
    chunks (and a batch job's could not retire)."""
    with contextlib.suppress(Exception):  # the scheduler may be gone
        client.cancel([Future(key, client) for key in list(client.futures)])
