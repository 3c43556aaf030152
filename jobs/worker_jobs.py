"""What SLURM's Dask processes are given beyond dask.config's ``jobqueue.slurm``: the shared
folder for scheduler files and worker logs, and for each ``--slurm-cluster`` worker job the
settings its own Python would not read (it sees only its node's dask config), checked with
``sbatch --test-only`` before any job is queued.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import dask

from jobs.cluster import load_config

# Our workers never pause on memory: TensorFlow's is unmanaged, so a worker paused at 80 % of
# its limit would wait forever. A SLURMCluster worker's nanny still restarts it at 95 % (the
# KilledWorker line); a SLURMRunner worker has no nanny, and Dask's "auto" limit is only its
# share of the job's memory by threads over CPUs (half of it with 2 threads on 4 CPUs).
NO_MEMORY_PAUSE = {"distributed.worker.memory.pause": False}


def dask_folder(args: argparse.Namespace) -> Path:
    """Where the scheduler file and worker logs go: OUT/.dask (the sweep's --out), shared by all nodes."""
    shared = dask.config.get("jobqueue.slurm.shared-temp-directory", None)
    if shared:
        return Path(os.path.expandvars(shared)).resolve()
    out = getattr(args, "out", None) or os.environ.get("SLURM_SUBMIT_DIR") or "."
    return (Path(out) / ".dask").resolve()


def exports(settings: dict) -> list[str]:
    """Shell lines that give a job's Python these dask.config settings (``{"a.b-c": value}``)
    as Dask reads them from its environment: ``export DASK_A__B_C=value``."""
    lines = []
    for key, value in settings.items():
        name = "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split("."))
        lines.append(f"export {name}={shlex.quote(value if isinstance(value, str) else repr(value))}")
    return lines


# What every worker job runs after the site's jobqueue.slurm.job-script-prologue (which loads
# its environment, and replaces the list rather than adding to it): TensorFlow takes GPU memory as
# it needs it, not all of it; and a worker never pauses (:data:`NO_MEMORY_PAUSE`).
WORKER_ENVIRONMENT = ("export TF_FORCE_GPU_ALLOW_GROWTH=true", *exports(NO_MEMORY_PAUSE))


def distributed_settings() -> list[str]:
    """The ``distributed:`` settings of jobs/jobqueue.yaml (timeouts, ...) for a worker job, at
    their values here (ours, or the site's or yours where set): the job's Python reads its own
    dask config, which that file is not part of."""
    def keys(prefix: str, tree: dict):
        for name, value in tree.items():
            if isinstance(value, dict):
                yield from keys(f"{prefix}.{name}", value)
            else:
                yield f"{prefix}.{name}"
    return exports({key: dask.config.get(key) for key in keys("distributed", load_config()["distributed"])})


def worker_job_options(args: argparse.Namespace) -> dict:
    """SLURMCluster's options beyond dask.config's jobqueue.slurm: the log folder (default
    OUT/.dask/worker-logs) and the prologue, between :func:`distributed_settings` (which a
    site's prologue may change) and :data:`WORKER_ENVIRONMENT`."""
    log_directory = dask.config.get("jobqueue.slurm.log-directory", None)
    prologue = dask.config.get("jobqueue.slurm.job-script-prologue", None) or []
    if log_directory:  # written into the job script as it is: no shell expands it there
        log_directory = os.path.expanduser(os.path.expandvars(log_directory))
    return {"log_directory": log_directory or str(dask_folder(args) / "worker-logs"),
            "job_script_prologue": [*distributed_settings(), *prologue, *WORKER_ENVIRONMENT]}


def sbatch_refusal(script: str) -> str | None:
    """Why SLURM would refuse ``script`` (``sbatch --test-only``: checked, not queued), or None."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as file:
        file.write(script)
        file.flush()
        result = subprocess.run(["sbatch", "--test-only", file.name], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = [line.strip().removeprefix("sbatch: error: ") for line in result.stderr.splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line)) or f"sbatch exit status {result.returncode}"
