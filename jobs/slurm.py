"""SLURM clients for the sweep: inside one batch job (``--slurm-runner``, dask_jobqueue's
SLURMRunner) and from a login node (``--slurm-cluster N``, dask_jobqueue's SLURMCluster).
:func:`jobs.cluster.open_client` picks between them and the other places to run; what the
worker jobs are given beyond dask.config is in :mod:`jobs.settings`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import dask
from distributed import Client, Future
from distributed.core import rpc

from jobs.errors import NO_WORKERS_LEFT, ClusterError
from jobs.monitor import dashboard_hint
from jobs.security import new_security, private_folder, read_key_file, write_key_file
from jobs.settings import (NO_MEMORY_PAUSE, dask_folder, sbatch_refusal, task_threads,
                           worker_job_counts_problem, worker_job_options)
from jobs.stopping import ClosedStreamFilter, serve_until_told
from pruning.data import InputError

log = logging.getLogger(__name__)

WORKER_WAIT_S = 300        # how long the --slurm-runner client waits for all workers to join
QUEUE_POLL_S = 10          # --slurm-cluster: how often the queue is read until a worker joins


def distributed_log_level() -> int | str:
    """dask config ``logging.distributed`` as :mod:`logging` takes it (ours: warning)."""
    level = dask.config.get("logging.distributed")
    return level.upper() if isinstance(level, str) else level


@contextlib.contextmanager
def slurm_runner_client(args: argparse.Namespace) -> Iterator[Client]:
    """Inside ``srun``: rank 0 serves as the scheduler, ranks 2.. as workers (they exit the
    process when the client is done); rank 1 gets the Client once the workers joined."""
    env = os.environ
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    rank = int(env["SLURM_PROCID"])
    role = {0: "scheduler", 1: "client"}.get(rank, "worker")
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    log.info("SLURM rank %d on %s: %s, GPU %s", rank, socket.gethostname(), role, gpus or "none")
    if role == "worker" and gpus and "," in gpus:
        log.warning("worker rank %d sees GPUs %s; slurm/sweep.sh gives each worker one", rank, gpus)

    from dask_jobqueue.slurm import SLURMRunner
    if role != "client":
        serve_until_told()  # SIGINT from the runner ends the rank; SIGTERM is the client's to act on
        dask.config.set(NO_MEMORY_PAUSE)  # this process is the worker (or the scheduler)
    if role == "scheduler":
        logging.getLogger("distributed.batched").addFilter(ClosedStreamFilter())
        quiet_dashboard_port_warning()
    # At INFO, distributed logs every connection and every worker's start and stop: most of the
    # job's log. LocalCluster and SLURMCluster quiet it (silence_logs); the runner does not.
    logging.getLogger("distributed").setLevel(distributed_log_level())
    private_folder(dask_folder(args))
    # TLS: the scheduler rank makes this job's key; the others, on any node, read it from the
    # shared folder (jobs.security). It is removed when the scheduler ends.
    key_file = runner_key_file(args, env["SLURM_JOB_ID"])
    if role == "scheduler":
        security = new_security()
        write_key_file(security, key_file)
    else:
        security = read_key_file(key_file, WORKER_WAIT_S)
        if security is None:
            raise ClusterError(f"the scheduler rank wrote no TLS key ({key_file}) in {WORKER_WAIT_S} s; "
                               "see the job log")
    if role != "client":
        os.umask(0o077)  # the scheduler file, the workers' scratch: the owner's alone
    scheduler_options, worker_options = runner_options(args, security)
    global _runner_joined
    _runner_joined = True
    try:
        runner = SLURMRunner(scheduler_file=str(runner_scheduler_file(args)),
                             scheduler_options=scheduler_options, worker_options=worker_options)
    finally:
        if role == "scheduler":  # it served until the client was done (or failed to start)
            key_file.unlink(missing_ok=True)
    # Only the client rank gets here. dask_jobqueue 0.9 opens its own connection to the
    # scheduler (the one that shuts it down at the end) without credentials: give it the job's.
    runner.scheduler_comm = rpc(runner.scheduler_address, connection_args=security.get_connection_args("client"))
    with runner:
        with Client(runner, security=security) as client:
            try:
                client.wait_for_workers(runner.n_workers, timeout=WORKER_WAIT_S)
            except TimeoutError:
                joined = len(client.scheduler_info(n_workers=-1)["workers"])
                if not joined:
                    raise ClusterError(f"no Dask worker joined in {WORKER_WAIT_S} s; see the job log") from None
                log.warning("%d of %d workers joined in %d s; going on with those",
                            joined, runner.n_workers, WORKER_WAIT_S)
            log.info("%d worker%s, scheduler file %s", runner.n_workers, "s" if runner.n_workers != 1 else "",
                     runner.scheduler_file)
            log.info("%s", dashboard_hint(client, listens_on=dashboard_host(scheduler_options)))
            try:
                yield client
            finally:  # also when the run stops early: the runner then closes the scheduler
                with contextlib.suppress(Exception):
                    _retire_workers(client)


def dashboard_host(scheduler_options: dict) -> str | None:
    """The host the dashboard listens on (jobqueue.slurm.scheduler-options' dashboard_address),
    or None for every interface."""
    return str(scheduler_options.get("dashboard_address", "")).rpartition(":")[0] or None


def quiet_dashboard_port_warning() -> None:
    """distributed's warning, over three lines, that port 8787 is taken and 'Perhaps you already
    have a cluster running?': on a shared node or login node it is another job's or user's
    dashboard, and the dashboard line names the port taken instead. (Its wording is pinned by
    tests/test_distributed_messages.py.)"""
    warnings.filterwarnings("ignore", r"Port \d+ is already in use", UserWarning)


def runner_scheduler_file(args: argparse.Namespace, job_id: str = "{job_id}") -> Path:
    """The scheduler file of this job's SLURMRunner (``{job_id}``: filled in by the runner)."""
    # A requeued job keeps its id: the restart count keeps it off the last run's scheduler file.
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return dask_folder(args) / f"scheduler-{job_id}.{restart}.json"


def runner_key_file(args: argparse.Namespace, job_id: str) -> Path:
    """This job's TLS key and certificate (0600), made by its scheduler rank for this start."""
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return dask_folder(args) / f"tls-{job_id}.{restart}.pem"


_runner_joined = False  # this process entered the SLURMRunner (set by slurm_runner_client)


def end_unjoined_runner(args: argparse.Namespace, wait_s: float = 60) -> None:
    """On the client rank, when the run ended before it joined the job's Dask cluster (bad
    input, --out in use, a stop): shut the scheduler and the workers down, which ends the srun
    step. Without this the scheduler would wait for its client for
    fine-pruning.runner-idle-timeout, holding the allocation. Best effort: a scheduler that is
    not up within ``wait_s`` is left to that timeout."""
    if _runner_joined:
        return  # the runner closes the scheduler itself
    scheduler_file = runner_scheduler_file(args, os.environ["SLURM_JOB_ID"])
    deadline = time.monotonic() + wait_s
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    security = read_key_file(runner_key_file(args, os.environ["SLURM_JOB_ID"]), wait_s=0)
    with contextlib.suppress(Exception, KeyboardInterrupt), \
            Client(scheduler_file=str(scheduler_file), timeout=10, security=security) as client:
        # Workers still starting would find the scheduler gone and log tracebacks: let them join.
        with contextlib.suppress(TimeoutError):
            client.wait_for_workers(int(os.environ["SLURM_NTASKS"]) - 2, timeout=wait_s)
        # As a run's workers have them: a heartbeat on its way as a worker retires is no error.
        from jobs.tasks import QuietWorkerLogs
        with contextlib.suppress(Exception):
            client.register_plugin(QuietWorkerLogs())
        _retire_workers(client)
        client.shutdown()


def runner_options(args: argparse.Namespace, security=None) -> tuple[dict, dict]:
    """The scheduler's and the workers' options inside ``sbatch slurm/sweep.sh``, from dask.config
    (the scheduler's: jobqueue.slurm.scheduler-options, as SLURMCluster's), with TLS (``security``)."""
    conf = dask.config.get("jobqueue.slurm")
    tls = {"protocol": "tls://", "security": security}
    scheduler_options = {"dashboard_address": ":8787", **(conf.get("scheduler-options") or {}), **tls,
                         "idle_timeout": dask.config.get("fine-pruning.runner-idle-timeout", None)}
    # memory_limit stays Dask's "auto"; the workers do not pause at any limit (NO_MEMORY_PAUSE).
    worker_options = {"nthreads": task_threads(args), "death_timeout": conf.get("death-timeout"), **tls}
    if conf.get("interface"):
        scheduler_options["interface"] = worker_options["interface"] = conf["interface"]
    if conf.get("local-directory"):
        worker_options["local_directory"] = os.path.expandvars(conf["local-directory"])
    return scheduler_options, worker_options


def _retire_workers(client: Client, wait_s: float = 10) -> None:
    """Let every worker leave before the scheduler goes, so that neither logs a traceback about
    a lost connection. A worker holding results cannot retire, and the results the client just
    dropped are released by messages that may still be on their way: wait for those first. A
    retired worker then closes its connection a few milliseconds later: wait for that too."""
    deadline = time.monotonic() + wait_s
    while any(client.has_what().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    before = client.run_on_scheduler(_open_streams)
    client.retire_workers(workers, close_workers=True)
    while client.run_on_scheduler(_open_streams) > before - len(workers) and time.monotonic() < deadline:
        time.sleep(0.05)


def _open_streams(dask_scheduler) -> int:
    """Connections the scheduler is serving: one per worker, the client's, and this call's."""
    return dask_scheduler.incoming_comms_active


@contextlib.contextmanager
def slurm_cluster_client(args: argparse.Namespace) -> Iterator[Client]:
    """From a login node: a Client on a SLURMCluster of ``--slurm-cluster`` worker jobs, checked
    by SLURM before they are submitted, once a first worker joined; the jobs end with it."""
    from dask_jobqueue import SLURMCluster
    options = worker_job_options(args)
    log_directory = options["log_directory"]
    where = ("in ~/.config/dask/jobqueue.yaml or with DASK_JOBQUEUE__SLURM__* variables "
             "(defaults: jobs/jobqueue.yaml)")
    problem = worker_job_counts_problem()
    if problem:
        raise InputError(f"jobqueue.slurm in dask.config: {problem}; change it {where}")
    quiet_dashboard_port_warning()
    # TLS: the worker jobs read this run's key from OUT/.dask (0700, the file 0600: jobs.security);
    # their logs are the owner's alone too (SLURM_UMASK, which sbatch reads).
    folder = dask_folder(args)
    made = next((path for path in reversed([folder, *folder.parents]) if not path.exists()), None)
    for private in {folder, Path(log_directory)} & {folder, folder / "worker-logs"}:
        private_folder(private)
    key_file = folder / "tls-worker-jobs.pem"
    write_key_file(new_security(), key_file)
    umask = os.environ.get("SLURM_UMASK")  # this process's own, given back when the jobs are gone
    os.environ["SLURM_UMASK"] = "0077"
    try:
        try:
            cluster = SLURMCluster(**options, security=read_key_file(key_file, wait_s=0))
        except Exception as error:
            # A value that dask_jobqueue or distributed cannot use (memory: lots, interface: ib9); the
            # scheduler's come as RuntimeError("Cluster failed to start: ...") from the ValueError.
            cause = error.__cause__ if isinstance(error, RuntimeError) else error
            if not isinstance(cause, ValueError):
                raise
            _remove(made)
            raise InputError(f"jobqueue.slurm in dask.config: {cause}; change it {where}") from error
        with cluster:
            script = cluster.job_script()
            log.debug("worker job script:\n%s", script)
            refused = sbatch_refusal(script)
            if refused:
                directives = "; ".join(line.split(None, 1)[1] for line in script.splitlines()
                                       if line.startswith("#SBATCH ") and line[8:10] not in ("-e", "-o"))
                _remove(made)
                raise InputError(f"SLURM would not queue the worker job ({refused}); its #SBATCH lines "
                                 f"({directives}) come from jobqueue.slurm in dask.config: change them {where}")
            cluster.scale(jobs=args.slurm_cluster)
            log.info("submitting %d SLURM worker job%s (logs in %s); they start when SLURM schedules them",
                     args.slurm_cluster, "s" if args.slurm_cluster > 1 else "", log_directory)
            with Client(cluster) as client:
                login_host = os.environ.get("SLURM_SUBMIT_HOST") or socket.gethostname()
                log.info("%s", dashboard_hint(client, login_host=login_host,
                                              listens_on=dashboard_host(cluster.scheduler_spec["options"])))
                _wait_for_worker_jobs(client, cluster, log_directory)
                with _stop_when_worker_jobs_end(client, cluster):
                    yield client
    finally:
        key_file.unlink(missing_ok=True)
        if umask is None:
            os.environ.pop("SLURM_UMASK", None)
        else:
            os.environ["SLURM_UMASK"] = umask


def _remove(made: Path | None) -> None:
    """Bad input: remove the folder this run made (``--out``'s, with OUT/.dask), as it was."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def _wait_for_worker_jobs(client: Client, cluster, log_directory: str) -> None:
    """Wait until a worker joins, saying what the queue holds whenever that changes. If every
    worker job has left the queue and none joined (e.g. the job's Python environment is
    missing), stop with an error instead of waiting forever."""
    said = None
    while True:
        try:
            client.wait_for_workers(1, timeout=QUEUE_POLL_S)
            return
        except TimeoutError:
            pass
        jobs = [job.job_id for job in list(cluster.workers.values()) if getattr(job, "job_id", None)]
        queued = _queue_states(jobs)
        if queued is None:
            continue
        if jobs and not queued:
            raise ClusterError(f"the SLURM worker jobs ({', '.join(jobs)}) ended before a Dask "
                               f"worker joined; see their logs in {log_directory} (a job that "
                               "cannot start the workers' Python may need jobqueue.slurm."
                               "job-script-prologue to set up its environment)")
        state = ", ".join(f"{job} {state}" for job, state in queued.items()) or "not submitted yet"
        if state != said:
            log.info("waiting for a worker; worker jobs: %s", state)
            said = state


@contextlib.contextmanager
def _stop_when_worker_jobs_end(client: Client, cluster) -> Iterator[None]:
    """Meanwhile, if every worker job has left the queue (their time limit, scancel) and no
    Dask worker is left, nothing will ever run the tasks (SLURMCluster does not replace ended
    jobs): cancel them with a message (:data:`NO_WORKERS_LEFT`), so that the run stops with one
    line, keeping its checkpoints, instead of waiting forever."""
    jobs, done = set(), threading.Event()

    def watch():
        while not done.wait(QUEUE_POLL_S):
            # (the cluster lists a job once all are submitted, and forgets it a while after it ends)
            jobs.update(job.job_id for job in list(cluster.workers.values()) if getattr(job, "job_id", None))
            if not jobs or cluster.scheduler_info["workers"] or _queue_states(sorted(jobs)) != {}:
                continue  # a worker is left, one may come, or squeue did not answer
            with contextlib.suppress(Exception):  # the run may have ended meanwhile
                client.cancel([Future(key, client) for key in list(client.futures)],
                              reason=NO_WORKERS_LEFT, msg=(
                                  f"every SLURM worker job ({', '.join(sorted(jobs))}) ended mid-sweep and "
                                  "no Dask worker is left (their time limit, jobqueue.slurm.walltime, or scancel?)"))

    threading.Thread(target=watch, name="watch-worker-jobs", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _queue_states(jobs: list[str]) -> dict[str, str] | None:
    """``squeue``'s state (and reason) of those of ``jobs`` still queued or running; None if
    squeue did not answer."""
    if not jobs:
        return {}
    result = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T %r"],
                            capture_output=True, text=True)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        return None  # SLURM did not answer this time
    states = {}
    for line in result.stdout.splitlines():
        job, state, reason = (line.split(None, 2) + ["", ""])[:3]
        states[job] = f"{state} ({reason})" if reason and reason != "None" else state
    return states
