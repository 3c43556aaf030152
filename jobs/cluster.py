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

The two SLURM clients are in :mod:`jobs.slurm`, the running scheduler's in :mod:`jobs.running`;
how a stop signal ends a run is :mod:`jobs.stopping`, what the log says when every worker is
lost mid-sweep :mod:`jobs.lost_workers`. This module chooses, and owns what all
places share: the config, the flags and the local cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import dask
import dask.system
import yaml
from distributed import Client, LocalCluster

from jobs.security import new_security, plain_tcp_problem
from jobs.stopping import TERMINAL_SIGNALS, Stopped, interrupt_held
from pruning.data import first_line

log = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).resolve().parent / "jobqueue.yaml"  # package data, beside this module (as dask_jobqueue keeps its own)
RUNNER_TASKS = 3           # SLURMRunner: scheduler + client + at least one worker
# TensorFlow's own thread pool uses all the cores for one task; a second task thread reads and
# prepares the next chunk meanwhile. More would only hold more chunks in memory.
TASK_THREADS = 2
# --single-node's workers are forked from a process that imported TensorFlow early (see
# prepare_local_workers) where the platform can (Linux, macOS); elsewhere Dask spawns them.
LOCAL_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class ClusterError(RuntimeError):
    """The cluster could not run the sweep (no worker came): reported as it is, exit status 1."""


# The reason given to a run's tasks when no worker can ever come to run them (every SLURM worker
# job has ended): they are cancelled with a message that jobs.failures reports as it is.
NO_WORKERS_LEFT = "no-workers-left"


_config = None


def load_config() -> dict:
    """Install ``jobs/jobqueue.yaml`` as Dask defaults (once); return what was loaded.

    Defaults, so the usual Dask ways override them: the site's and the user's yaml files
    (``/etc/dask``, ``~/.config/dask``, ``$DASK_CONFIG``), ``DASK_*`` environment variables and
    ``dask.config.set`` after this call. They replace dask_jobqueue's and distributed's own
    defaults, also after a ``dask.config.refresh()``.
    """
    global _config
    if _config is not None:
        return _config
    # dask_jobqueue registers its defaults when imported: import it first so ours go on top.
    # Importing it also sets a SIGINT handler (for SLURMRunner); keep the caller's.
    handler = signal.getsignal(signal.SIGINT)
    import dask_jobqueue  # noqa: F401
    if handler is not None:
        with contextlib.suppress(ValueError):      # not the main thread: nothing was changed
            signal.signal(signal.SIGINT, handler)
    with open(CONFIG_FILE) as f:
        _config = yaml.safe_load(f)
    # refresh() applies the registered defaults first-come-first-served (ours first), then the
    # files and DASK_* variables. Not update_defaults(): it replaces a setting that equals an
    # earlier default, so a site's walltime "00:30:00" (dask_jobqueue's) would become ours.
    dask.config.defaults.insert(0, _config)
    dask.config.refresh()
    return _config


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


def task_threads(args: argparse.Namespace, cores: int | None = None) -> int:
    """Task threads per worker: --threads-per-worker, else TASK_THREADS within the cores
    left to each local worker (a SLURM worker has its node's cores to itself)."""
    if args.threads_per_worker is not None:
        return args.threads_per_worker
    if not args.single_node:
        return TASK_THREADS
    cores = cores or dask.system.CPU_COUNT  # Dask's count honours CPU affinity and cgroup limits
    return max(1, min(TASK_THREADS, cores // local_workers(args)))


def local_workers(args: argparse.Namespace) -> int:
    """--single-node's worker processes: --workers, else 1."""
    return args.workers or 1


def prepare_local_workers(args: argparse.Namespace) -> None:
    """With --single-node, start the process that the LocalCluster's workers will be forked
    from (Dask's ``forkserver`` method), so that it imports TensorFlow and our tasks while this
    process checks the inputs: the workers then start with them loaded, seconds sooner than
    importing them themselves. It runs no task and writes nothing; if the inputs are bad, it
    ends by itself when its imports are done."""
    if args.single_node and LOCAL_START_METHOD == "forkserver":
        import multiprocessing.forkserver  # POSIX only
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["distributed", "jobs.tasks"])
        # Only this process should act on a terminal's signals (closing the cluster in order, one
        # line on stderr); an ignored signal survives exec, so the fork server and the workers
        # forked from it keep ignoring them.
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in TERMINAL_SIGNALS}
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


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
        from jobs.slurm import slurm_runner_client
        with slurm_runner_client(args) as client:
            yield client
    elif args.slurm_cluster is not None:
        from jobs.slurm import slurm_cluster_client
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
        from jobs.running import running_cluster_client
        with running_cluster_client(args) as client:
            yield client


def dashboard_hint(client, env: Mapping[str, str] = os.environ, login_host: str | None = None,
                   listens_on: str | None = None) -> str:
    """The dashboard's URL and, on a cluster, the ssh tunnel that reaches it from your machine.

    ``listens_on``: the host the dashboard was bound to, when the sweep chose it (a loopback
    address: only this node itself reaches it). The login host is ``login_host`` or, inside a
    SLURM job, ``$SLURM_SUBMIT_HOST``; without either the hint is the URL alone. A dashboard on a
    compute node's loopback is reached through the login node (``ssh -J``) to the node itself.
    """
    link = client.dashboard_link
    if not link:
        return "no Dask dashboard (bokeh is not installed)"
    url = urlsplit(link)
    node, port = url.hostname, url.port or 80
    if listens_on:  # Dask's link names the scheduler's address, which the dashboard may not be on
        node = listens_on
        link = url._replace(netloc=f"{node}:{port}").geturl()
    login_host = login_host or env.get("SLURM_SUBMIT_HOST")
    if not login_host:
        return f"Dask dashboard: {link}"
    user = env.get("USER") or getpass.getuser()
    tunnel = f"ssh -L 8787:{node}:{port} {user}@{login_host}"
    if node in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        tunnel = f"ssh -L 8787:localhost:{port} {user}@{login_host}"
        if "SLURMD_NODENAME" in env:  # this compute node's own loopback
            tunnel = f"ssh -J {user}@{login_host} -L 8787:localhost:{port} {user}@{env['SLURMD_NODENAME']}"
    return f"Dask dashboard: {link}  (from your machine: {tunnel} then open http://localhost:8787{url.path})"
