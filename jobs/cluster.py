"""Where the sweep's Dask tasks run: a LocalCluster, a running scheduler, or SLURM.

Cluster settings come from dask.config (``slurm/jobqueue.yaml`` and the site's own files);
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
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import dask
import dask.system
import yaml
from distributed import Client, LocalCluster

log = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).resolve().parent.parent / "slurm" / "jobqueue.yaml"
RUNNER_TASKS = 3           # SLURMRunner: scheduler + client + at least one worker
# TensorFlow's own thread pool uses all the cores for one task; a second task thread reads and
# prepares the next chunk meanwhile. More would only hold more chunks in memory.
TASK_THREADS = 2
WORKER_WAIT_S = 300        # how long the --slurm-runner client waits for all workers to join
# --single-node's workers are forked from a process that imported TensorFlow early (see
# prepare_local_workers) where the platform can (Linux, macOS); elsewhere Dask spawns them.
LOCAL_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"

_config = None


def load_config() -> dict:
    """Install ``slurm/jobqueue.yaml`` as Dask defaults (once); return what was loaded.

    Defaults, so the usual Dask ways override them: the site's and the user's yaml files
    (``/etc/dask``, ``~/.config/dask``, ``$DASK_CONFIG``), ``DASK_*`` environment variables and
    ``dask.config.set``. They replace dask_jobqueue's and distributed's own defaults, also after
    a ``dask.config.refresh()``.
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
    dask.config.update_defaults(_config)
    # refresh() re-applies the registered defaults first-come-first-served: put ours first.
    dask.config.defaults.insert(0, dask.config.defaults.pop())
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
                            "jobqueue.slurm, defaults in slurm/jobqueue.yaml)")
    group.add_argument("--workers", type=int, default=1,
                       help="LocalCluster worker processes (default: 1)")
    group.add_argument("--threads-per-worker", type=int,
                       help="task threads per worker with --single-node and --slurm-runner "
                            f"(default: {TASK_THREADS}, fewer when --workers would need more "
                            "than this machine's cores)")


def check_cluster_arguments(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str | None:
    """Return a one-line problem with the cluster flags, or None."""
    if not (args.single_node or args.scheduler_address or args.scheduler_file
            or args.slurm_runner or args.slurm_cluster is not None):
        return ("say where to run: --single-node (this machine), --scheduler-address ADDR or "
                "--scheduler-file PATH (a running cluster), --slurm-cluster N (SLURM worker jobs "
                "from a login node), or submit slurm/sweep.sh")
    if args.workers < 1 or (args.threads_per_worker is not None and args.threads_per_worker < 1):
        return "--workers and --threads-per-worker must be at least 1"
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


def task_threads(args: argparse.Namespace, cores: int | None = None) -> int:
    """Task threads per worker: --threads-per-worker, else TASK_THREADS within the cores
    left to each local worker (a SLURM worker has its node's cores to itself)."""
    if args.threads_per_worker is not None:
        return args.threads_per_worker
    if not args.single_node:
        return TASK_THREADS
    cores = cores or dask.system.CPU_COUNT  # Dask's count honours CPU affinity and cgroup limits
    return max(1, min(TASK_THREADS, cores // args.workers))


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
        # Ctrl-C in a terminal interrupts every process of its group. Only this one should act
        # on it (closing the cluster in order, one line on stderr); an ignored SIGINT survives
        # exec, so the fork server and the workers forked from it keep ignoring it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)


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
        with _slurm_runner_client(args) as client:
            yield client
    elif args.slurm_cluster is not None:
        with _slurm_cluster_client(args) as client:
            yield client
    elif args.single_node:
        with dask.config.set({"distributed.worker.multiprocessing-method": LOCAL_START_METHOD}), \
                interrupt_held() as interrupted:
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=task_threads(args),
                                   processes=True, dashboard_address=":0")
        with cluster, Client(cluster) as client:
            if interrupted:
                raise KeyboardInterrupt  # now that the cluster can be closed in order
            log.info("%s", dashboard_hint(client))
            yield client
    elif args.scheduler_file:
        with Client(scheduler_file=args.scheduler_file) as client:
            log.info("%s", dashboard_hint(client))
            yield client
    else:
        with Client(args.scheduler_address) as client:
            log.info("%s", dashboard_hint(client))
            yield client


@contextlib.contextmanager
def interrupt_held() -> Iterator[list]:
    """Hold Ctrl-C while a LocalCluster starts: interrupted half-way, it cannot be closed, and
    Dask's clean-up at exit prints tracebacks. The list it yields is non-empty if Ctrl-C came;
    the caller raises KeyboardInterrupt once the cluster is up."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    except ValueError:  # not the main thread, where signals are not delivered anyway
        previous = _NOT_SET
    try:
        yield received
    finally:
        if previous is not _NOT_SET:
            signal.signal(signal.SIGINT, previous)


_NOT_SET = object()


def dashboard_hint(client, env: Mapping[str, str] = os.environ, login_host: str | None = None) -> str:
    """The dashboard's URL and, on a cluster, the ssh tunnel that reaches it from your machine.

    The login host is ``login_host`` or, inside a SLURM job, ``$SLURM_SUBMIT_HOST``; without
    either the hint is the URL alone.
    """
    link = client.dashboard_link
    if not link:
        return "no Dask dashboard (bokeh is not installed)"
    login_host = login_host or env.get("SLURM_SUBMIT_HOST")
    if not login_host:
        return f"Dask dashboard: {link}"
    url = urlsplit(link)
    node, port = url.hostname, url.port or 80
    if node in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and "SLURMD_NODENAME" in env:
        node = env["SLURMD_NODENAME"]
    user = env.get("USER") or getpass.getuser()
    return (f"Dask dashboard: {link}  (from your machine: ssh -L 8787:{node}:{port} {user}@{login_host}"
            f" then open http://localhost:8787{url.path})")


def _dask_folder(args: argparse.Namespace) -> Path:
    """Where the scheduler file and worker logs go: OUT/.dask (the sweep's --out), shared by all nodes."""
    shared = dask.config.get("jobqueue.slurm.shared-temp-directory", None)
    if shared:
        return Path(os.path.expandvars(shared)).resolve()
    out = getattr(args, "out", None) or os.environ.get("SLURM_SUBMIT_DIR") or "."
    return (Path(out) / ".dask").resolve()


@contextlib.contextmanager
def _slurm_runner_client(args: argparse.Namespace) -> Iterator[Client]:
    env = os.environ
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    rank = int(env["SLURM_PROCID"])
    role = {0: "scheduler", 1: "client"}.get(rank, "worker")
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    log.info("SLURM rank %d on %s: %s, GPU %s", rank, socket.gethostname(), role, gpus or "none")
    if role == "worker" and gpus and "," in gpus:
        log.warning("worker rank %d sees GPUs %s; slurm/sweep.sh gives each worker one", rank, gpus)

    from dask_jobqueue.slurm import SLURMRunner
    # The runner ends the scheduler and worker ranks with SIGINT; this turns it into sys.exit().
    signal.signal(signal.SIGINT, lambda *_: sys.exit())
    folder = _dask_folder(args)
    folder.mkdir(parents=True, exist_ok=True)
    # A requeued job keeps its id: the restart count keeps it off the last run's scheduler file.
    scheduler_file = folder / f"scheduler-{{job_id}}.{env.get('SLURM_RESTART_COUNT', '0')}.json"
    conf = dask.config.get("jobqueue.slurm")
    scheduler_options = {"dashboard_address": ":8787"}
    # memory_limit stays Dask's "auto" (the node's memory or the job's cgroup limit): a tighter
    # limit makes a worker pause on TensorFlow's unmanaged memory, and without a nanny it stays paused.
    worker_options = {"nthreads": task_threads(args), "death_timeout": conf.get("death-timeout")}
    if conf.get("interface"):
        scheduler_options["interface"] = worker_options["interface"] = conf["interface"]
    if conf.get("local-directory"):
        worker_options["local_directory"] = os.path.expandvars(conf["local-directory"])
    with SLURMRunner(scheduler_file=str(scheduler_file), scheduler_options=scheduler_options,
                     worker_options=worker_options) as runner:
        # Only the client rank gets here.
        with Client(runner) as client:
            try:
                client.wait_for_workers(runner.n_workers, timeout=WORKER_WAIT_S)
            except TimeoutError:
                joined = len(client.scheduler_info(n_workers=-1)["workers"])
                if not joined:
                    raise RuntimeError(f"no Dask worker joined in {WORKER_WAIT_S} s; see the job log") from None
                log.warning("%d of %d workers joined in %d s; going on with those",
                            joined, runner.n_workers, WORKER_WAIT_S)
            log.info("%d workers, scheduler file %s", runner.n_workers, runner.scheduler_file)
            log.info("%s", dashboard_hint(client))
            yield client
            # Let the workers leave before the scheduler goes, so they exit without a traceback.
            with contextlib.suppress(Exception):
                client.retire_workers(close_workers=True)


@contextlib.contextmanager
def _slurm_cluster_client(args: argparse.Namespace) -> Iterator[Client]:
    from dask_jobqueue import SLURMCluster
    log_directory = dask.config.get("jobqueue.slurm.log-directory", None)
    if not log_directory:
        log_directory = str(_dask_folder(args) / "worker-logs")
    with SLURMCluster(log_directory=log_directory) as cluster:
        log.debug("worker job script:\n%s", cluster.job_script())
        cluster.scale(jobs=args.slurm_cluster)
        log.info("submitting %d SLURM worker jobs (logs in %s); they start when SLURM schedules them",
                 args.slurm_cluster, log_directory)
        with Client(cluster) as client:
            login_host = os.environ.get("SLURM_SUBMIT_HOST") or socket.gethostname()
            log.info("%s", dashboard_hint(client, login_host=login_host))
            yield client
