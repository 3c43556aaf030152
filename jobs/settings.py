"""The cluster's settings: ``jobs/jobqueue.yaml`` loaded as Dask's defaults, Dask's own
settings checked as inputs before any work, the task threads per worker, and what SLURM's
worker jobs are given beyond dask.config.

Cluster settings live in dask.config (the site's and the user's files, ``DASK_*`` variables);
only the choice of cluster is a flag (:mod:`jobs.cluster`). Distributed reads a setting only
where it uses it: a time it cannot parse, or a word where a number belongs, would stop the run
deep in the cluster's start (a worker's traceback, "Nanny failed to start") or mid-sweep. Here
each ``distributed.*`` value is compared with the kind of its default, and the one wrong is
named with where it was set. The worker jobs' counts (``jobqueue.slurm`` cores, processes,
job-cpu), which have no default to compare with, are checked as whole numbers before
``--slurm-cluster`` submits any job, and the job script itself with ``sbatch --test-only``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import dask
import dask.system
import yaml
from dask.utils import parse_bytes, parse_timedelta

from jobs.stopping import sigint_kept

CONFIG_FILE = Path(__file__).resolve().parent / "jobqueue.yaml"  # package data, beside this module (as dask_jobqueue keeps its own)
# TensorFlow's own thread pool uses all the cores for one task; a second task thread reads and
# prepares the next chunk meanwhile. More would only hold more chunks in memory.
TASK_THREADS = 2

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
    with sigint_kept():
        import dask_jobqueue  # noqa: F401
    with open(CONFIG_FILE) as f:
        _config = yaml.safe_load(f)
    # refresh() applies the registered defaults first-come-first-served (ours first), then the
    # files and DASK_* variables. Not update_defaults(): it replaces a setting that equals an
    # earlier default, so a site's walltime "00:30:00" (dask_jobqueue's) would become ours.
    dask.config.defaults.insert(0, _config)
    dask.config.refresh()
    return _config


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



def settings_problem(env: Mapping[str, str] = os.environ) -> str | None:
    """A ``distributed`` setting of the wrong kind, or None: a time or a size that distributed
    cannot read, a word where a number or True/False belongs. Distributed would trip over it
    only deep in the cluster's start (a worker's traceback, "Nanny failed to start") or mid-run."""
    load_config()
    defaults = dask.config.merge(*dask.config.defaults).get("distributed", {})
    for key, default in _settings(defaults, "distributed"):
        value = dask.config.get(key, default)
        wanted = _wrong_kind(value, default)
        if wanted:
            return (f"Dask setting {key} is {value!r} ({_where_set(key, env)}), not {wanted}; "
                    "correct it or unset it")
    scratch = dask.config.get("temporary-directory", None)  # the workers' folders go in it
    if scratch:
        existing = next(p for p in [Path(scratch), *Path(scratch).parents] if p.exists())
        if not existing.is_dir():
            return (f"Dask setting temporary-directory is {scratch!r} "
                    f"({_where_set('temporary-directory', env)}): {existing} is a file, not a "
                    "folder; correct it or unset it")
    return None


def _settings(tree: dict, prefix: str) -> Iterator[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a config tree."""
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _settings(value, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", value


def _wrong_kind(value, default) -> str | None:
    """What ``value`` should be, when it is not of its default's kind (None turns most off)."""
    if value is None or value == default:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, (bool, int)) else "True or False"
    if isinstance(default, (int, float)):  # a fraction of memory may also be False
        return None if isinstance(value, (bool, int, float)) else "a number"
    if isinstance(default, str) and re.search("[a-z]", default) and _reads(parse_timedelta, default):
        return None if _reads(parse_timedelta, value) else f"a time like {default!r}"
    if isinstance(default, str) and _reads(parse_bytes, default):
        return None if _reads(parse_bytes, value) else f"a size like {default!r}"
    return None


def _reads(parse, value) -> bool:
    try:
        parse(value)
    except (ValueError, TypeError, KeyError):  # parse_timedelta raises KeyError for a unit
        return False
    return True


def _where_set(key: str, env: Mapping[str, str]) -> str:
    """Where a setting came from, as Dask reads them: a DASK_* variable, else a yaml file."""
    for name in env:
        if name.startswith("DASK_") and \
                name[5:].lower().replace("__", ".").replace("_", "-") == key.replace("_", "-"):
            return f"from ${name}"
    return "in a Dask config file: ~/.config/dask, /etc/dask or $DASK_CONFIG"


# ------------------------------------------------------------ SLURM worker jobs
# What SLURM's Dask processes are given beyond dask.config's ``jobqueue.slurm``: the shared
# folder for scheduler files and worker logs, and for each ``--slurm-cluster`` worker job the
# settings its own Python would not read (it sees only its node's dask config).

# Our workers never pause on memory: TensorFlow's is unmanaged, so a worker paused at 80 % of
# its limit would wait forever. A SLURMCluster worker's nanny still restarts it at 95 % (the
# KilledWorker line); a SLURMRunner worker has no nanny, and Dask's "auto" limit is only its
# share of the job's memory by threads over CPUs (half of it with 2 threads on 4 CPUs).
NO_MEMORY_PAUSE = {"distributed.worker.memory.pause": False}


def worker_job_counts_problem() -> str | None:
    """A jobqueue.slurm count that is not a whole number of at least 1, which dask_jobqueue
    would only fail on with a TypeError naming no setting (DASK_JOBQUEUE__SLURM__CORES=two)."""
    conf = dask.config.get("jobqueue.slurm")
    for key in ("cores", "processes", "job-cpu"):
        value = conf.get(key)
        if value is None and key == "job-cpu":
            continue  # then cores
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key} is {value!r}, not a whole number of at least 1"
    return None


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
