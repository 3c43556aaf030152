"""How a run that did not finish is told: one line on stderr and an exit status.

2 for bad input, 1 for anything else (with where it happened, for an internal error), 128 +
the signal for a stopped run; a stopped or disconnected run also says what the same command
resumes from.
"""
from __future__ import annotations

import signal
import traceback
from pathlib import Path

from distributed.client import FutureCancelledError
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from jobs.errors import NO_WORKERS_LEFT, ClusterError
from jobs.outdir import OutputFolder
from pruning.data import InputError


def interrupted_line(out: OutputFolder | None, signum: int = signal.SIGINT) -> str:
    """What an interrupted run leaves to resume from: its finished chunks, if any."""
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    kept = resume_note(out)
    if kept:
        return f"{how}; {kept}"
    return f"{how} before any chunk of rows was finished; no results or checkpoints were written"


def resume_note(out: OutputFolder | None) -> str | None:
    """Where a stopped run's finished chunks are kept, if there are any of its inputs."""
    kept = out.checkpoints.finished() if out is not None and out.checkpoints else 0
    if not kept:
        return None
    return f"{out.checkpoints.folder} holds {kept} finished chunks of rows: the same command resumes from them"


def lost_scheduler_line(out: OutputFolder | None, why: str) -> str:
    """What a run that lost its scheduler leaves to resume from, once the cluster is back."""
    kept = resume_note(out)
    return (f"lost the connection to the Dask scheduler ({why}); "
            + (f"{kept} once the cluster is back" if kept else "no chunk of rows was finished"))


def _kept_per_chunk_size(out: OutputFolder | None) -> str:
    """What following the advice of a smaller --chunk-rows costs: chunks are checkpointed per
    chunk size, and a run with another one replaces them."""
    kept = resume_note(out)
    return f"; {kept} (another --chunk-rows starts over)" if kept else ""


def explain(error: Exception, args, out: OutputFolder | None = None) -> tuple[str, int]:
    """One line and an exit status for a failure: 2 for bad input, 1 for anything else."""
    if isinstance(error, InputError):
        return str(error), 2
    if isinstance(error, ClusterError):
        return str(error), 1
    if isinstance(error, KilledWorker):
        logs = ("the job log (fine-pruning-<jobid>.out)" if args.slurm_runner else
                f"{Path(args.out) / '.dask' / 'worker-logs'} (or jobqueue.slurm.log-directory)"
                if args.slurm_cluster is not None else
                "the lines above" if args.single_node else "the workers' own logs")
        return (f"task {error.task} killed {error.allowed_failures + 1} Dask worker(s), the "
                f"last {getattr(error.last_worker, 'address', error.last_worker)}: a worker "
                "process died while running it (most often out of memory, or a crash while "
                f"reading the data); see the worker logs in {logs}, and try a smaller "
                f"--chunk-rows or more memory per worker{_kept_per_chunk_size(out)}"), 1
    # Not an input problem. One line, as for every other failure (a malformed input that slips
    # past the checks still must not end in a traceback), but exit status 1, and it names where
    # it happened; --traceback shows the full traceback, for a bug report.
    text = " ".join(str(error).split())[:300]
    if isinstance(error, FutureCancelledError) and error.reason == NO_WORKERS_LEFT:
        return f"{error.msg}; {resume_note(out) or 'no chunk of rows was finished'}", 1
    if isinstance(error, FutureCancelledError) and error.reason == "scheduler-connection-lost":
        return lost_scheduler_line(out, error.reason), 1
    if isinstance(error, (CommClosedError, ConnectionError)):
        return lost_scheduler_line(out, text), 1
    if isinstance(error, OSError):  # the environment: a full disk, a lost connection
        if error.filename:
            text = f"{error.filename}: {error.strerror or text}; check the disk space and permissions there"
        kept = resume_note(out)  # finished chunks outlive a full disk, as they do a stop
        return f"{text}{f'; {kept}' if kept else ''} (rerun with --traceback for the details)", 1
    root = Path(__file__).resolve().parents[1]
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().parent.parent == root]
    place = f" at {Path((ours or frames)[-1].filename).name}:{(ours or frames)[-1].lineno}" if frames else ""
    return (f"internal error ({error.__class__.__name__}: {text}){place}; not a problem with the "
            "inputs: rerun with --traceback and report it"), 1
