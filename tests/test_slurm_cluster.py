"""`python -m jobs.sweep --slurm-cluster N` from a "login node", on a real one-node SLURM
(scripts/slurm_local.sh): worker jobs submitted by dask-jobqueue's SLURMCluster."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO, assert_same_outputs
from slurm_fixtures import slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# Worker jobs that fit the test node (jobs/jobqueue.yaml asks for a GPU node's share).
SMALL_JOBS = {"DASK_JOBQUEUE__SLURM__JOB_CPU": "1", "DASK_JOBQUEUE__SLURM__MEMORY": "2GiB",
              "DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES": "[]"}
WORKER_JOB = "fine-pruning-worker"


def sweep_command(demo, out, jobs: int = 1) -> list[str]:
    return [sys.executable, "-m", "jobs.sweep", "--model", demo.model, "--data", demo.data_dir,
            "--out", str(out), "--slurm-cluster", str(jobs)]


def run_sweep(command, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=os.environ | SMALL_JOBS | env)


def queued_worker_jobs() -> list[str]:
    """Worker jobs waiting or running; not those already cancelled that SLURM is still ending
    (COMPLETING), such as the one an earlier test's cluster cancelled as it closed."""
    return subprocess.run(["squeue", "-h", "-n", WORKER_JOB, "-t", "PENDING,CONFIGURING,RUNNING", "-o", "%i"],
                          capture_output=True, text=True, check=True).stdout.split()


def test_slurm_cluster_gives_the_single_node_outputs(slurm_cluster, demo, demo_run, tmp_path):
    out = tmp_path / "out"
    done = run_sweep(sweep_command(demo, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"outputs in {out}" in done.stdout
    assert_same_outputs(out, demo_run)
    assert not queued_worker_jobs()  # the worker job was cancelled as the cluster closed


def test_a_rerun_of_a_finished_sweep_submits_no_worker_job(slurm_cluster, demo, demo_run, tmp_path):
    """Every chunk is checkpointed: the outputs are written again at once, here, byte for byte;
    a worker job would wait an hour in the queue."""
    out = tmp_path / "out"
    shutil.copytree(demo_run, out)
    started = time.monotonic()
    done = run_sweep(sweep_command(demo, out), timeout=120,
                     DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES='["--begin=now+3600"]')
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 to evaluate, so no Dask cluster is needed" in done.stderr, done.stderr[-3000:]
    assert not queued_worker_jobs() and not (out / ".dask").exists()
    assert_same_outputs(out, demo_run)
    assert time.monotonic() - started < 60


def test_a_worker_job_sees_the_distributed_settings_of_jobqueue_yaml(slurm_cluster, tmp_path):
    """The worker job's Python reads its own dask config: jobs/jobqueue.yaml's distributed:
    section (and a value set here over it) reaches it only through the job script."""
    import dask
    from dask_jobqueue import SLURMCluster
    from distributed import Client
    from jobs.settings import load_config, worker_job_options
    load_config()
    small = {"jobqueue.slurm.job-cpu": 1, "jobqueue.slurm.memory": "2GiB",
             "jobqueue.slurm.job-extra-directives": [], "distributed.comm.timeouts.connect": "45s"}
    with dask.config.set(small), SLURMCluster(scheduler_options={"dashboard_address": ":0"},
                                              **worker_job_options(SimpleNamespace(out=str(tmp_path)))) as jobs, \
            Client(jobs) as client:
        jobs.scale(jobs=1)
        client.wait_for_workers(1, timeout=120)
        seen = {key: list(client.run(dask.config.get, f"distributed.{key}").values())
                for key in ("comm.timeouts.connect", "comm.timeouts.tcp", "scheduler.allowed-failures")}
    assert seen == {"comm.timeouts.connect": ["45s"], "comm.timeouts.tcp": ["120s"],  # Dask's: 30s, 30s
                    "scheduler.allowed-failures": [3]}
    deadline = time.monotonic() + 120  # the closed cluster cancelled its job: the next tests count them
    while queued_worker_jobs():
        assert time.monotonic() < deadline, f"worker jobs {queued_worker_jobs()} outlived their cluster"
        time.sleep(0.5)


def test_a_worker_job_slurm_refuses_is_one_line_before_any_job(slurm_cluster, demo, tmp_path):
    done = run_sweep(sweep_command(demo, tmp_path / "out"), timeout=120,
                     DASK_JOBQUEUE__SLURM__MEMORY="100000GiB")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SLURM would not queue the worker job (") and "--mem=" in last, last
    assert "Traceback" not in done.stderr
    assert not queued_worker_jobs()
    assert not (tmp_path / "out").exists()  # nor its empty .dask/worker-logs


def test_worker_jobs_that_end_without_a_worker_stop_the_sweep(slurm_cluster, demo, tmp_path):
    # A worker job whose environment cannot start Python: here its prologue simply exits.
    done = run_sweep(sweep_command(demo, tmp_path / "out", jobs=2), timeout=180,
                     DASK_JOBQUEUE__SLURM__JOB_SCRIPT_PROLOGUE='["exit 3"]')
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the SLURM worker jobs (") and "ended before a Dask worker joined" in last, last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_kill_or_hangup_while_worker_jobs_wait_cancels_them(slurm_cluster, demo, tmp_path, signum):
    out = tmp_path / "out"
    sweep = subprocess.Popen(sweep_command(demo, out, jobs=2), cwd=REPO, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=os.environ | SMALL_JOBS | {
                                 # held in the queue for an hour: the sweep waits for them
                                 "DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES": '["--begin=now+3600"]'})
    deadline = time.monotonic() + 120
    while len(queued_worker_jobs()) < 2:
        assert sweep.poll() is None and time.monotonic() < deadline, "no worker jobs were queued"
        time.sleep(0.2)
    sweep.send_signal(signum)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signum, err[-3000:]
    assert err.splitlines()[-1] == (f"stopped by {signal.Signals(signum).name} before any chunk of "
                                    "rows was finished; no results or checkpoints were written")
    assert "Traceback" not in err, err[-3000:]
    assert not queued_worker_jobs()
