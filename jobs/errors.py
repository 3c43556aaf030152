"""The sweep's own failures, which every layer of ``jobs/`` may raise or report (a leaf: it
imports nothing of the project). Bad input is :class:`pruning.data.InputError` (exit status 2);
how each failure becomes one line and an exit status is :func:`jobs.arguments.explain`."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster could not run the sweep (no worker came): reported as it is, exit status 1."""


# The reason given to a run's tasks when no worker can ever come to run them (every SLURM worker
# job has ended, or every worker rank of a batch job is gone): they are cancelled with a message
# that jobs.arguments.explain reports as it is.
NO_WORKERS_LEFT = "no-workers-left"
