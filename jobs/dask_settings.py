"""Dask's own settings, checked as inputs before any work.

Distributed reads a setting only where it uses it: a time it cannot parse, or a word where a
number belongs, would stop the run deep in the cluster's start (a worker's traceback, "Nanny
failed to start") or mid-sweep. Here each ``distributed.*`` value is compared with the kind of
its default, and the one wrong is named with where it was set. The worker jobs' counts
(``jobqueue.slurm`` cores, processes, job-cpu), which have no default to compare with, are
checked as whole numbers before ``--slurm-cluster`` submits any job.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Mapping

import dask
from dask.utils import parse_bytes, parse_timedelta

from jobs.cluster import load_config


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
