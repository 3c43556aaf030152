"""The functions Dask runs on workers. Each worker loads B and splits it once (cached per
process) and reads its own rows from the HDF5 files, so only file names, channel lists and
small tallies travel through the scheduler; a chunk's activations stay on the worker that
computed them, where its prefix tasks are scheduled."""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
from dask.sizeof import sizeof
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from pruning.data import InputError, LabSet, poisoned_set, poisoned_suffixes
from pruning.models import ModelSpec
from pruning.counts import Counts, tally
from pruning.prune import (Chunk, SplitModel, compute_chunk, evaluate_prefixes, predict_classes,
                           split_model)


_loading = threading.Lock()  # a worker's task threads build B's split once, not once each


def split_for(spec: ModelSpec, conv: str, read: str) -> SplitModel:
    with _loading:
        return _split_for(spec, conv, read)


@functools.lru_cache(maxsize=2)
def _split_for(spec: ModelSpec, conv: str, read: str) -> SplitModel:
    return split_model(spec.load(), conv, read)


@sizeof.register(Chunk)
def _chunk_bytes(chunk: Chunk) -> int:
    """A chunk's size as Dask counts it (else 56 bytes, an object's): the dashboard then shows
    the chunks a worker holds as its managed memory, and a worker past its memory target spills
    them to its local folder."""
    return sum(value.nbytes for value in vars(chunk).values() if isinstance(value, np.ndarray))


def activations_task(spec: ModelSpec, conv: str, read: str, set_name: str, lab_set: LabSet,
                     start: int, stop: int) -> Chunk:
    images, labels = lab_set.read(start, stop)
    return compute_chunk(split_for(spec, conv, read), set_name, start, stop, images, labels)


def channel_sums_task(chunk: Chunk) -> tuple[np.ndarray, int]:
    """What the profile needs of a chunk: its exact per-channel sums and value count. It runs
    where the chunk is, so only these few numbers travel to the profile task."""
    return chunk.channel_sums, chunk.values_per_channel


def profile_task(*parts: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """Per-channel activation sums and value count over the clean validation chunks: exact
    integers, so the same however the rows were chunked or spread over workers."""
    return sum(sums for sums, _ in parts), sum(values for _, values in parts)


def evaluate_prefixes_task(spec: ModelSpec, conv: str, read: str, chunk: Chunk,
                           order: tuple[int, ...], first: int, stop: int) -> list[Counts]:
    """Counts of B'_k for k = first..stop-1 on one chunk."""
    return evaluate_prefixes(split_for(spec, conv, read), chunk, order, first, stop)


@dataclass
class FineTuneResult:
    """What a fine-tuning task hands back: the kept weights (B's layout), the epochs' log, the
    epoch kept (1-based), and per test set the tallies of the fine-tuned model against B."""

    weights: list
    log: pd.DataFrame
    epochs: int
    heldout_accuracy: float
    counts: dict[str, Counts]


def fine_tune_task(spec: ModelSpec, conv: str, sets: dict[str, LabSet], pruned: tuple[int, ...],
                   settings, folder: str, topic: str | None = None) -> FineTuneResult:
    """Fine-tune B with ``pruned`` channels of ``conv`` held at zero on the fine-tuning share of
    the clean validation set (training state kept in ``folder``, so that a rerun resumes);
    each finished epoch is a ``topic`` event on the worker (the client's progress line)."""
    from pruning.finetune import fine_tune, split_clean

    x, y = sets["clean_valid"].read()
    train, held = split_clean(y, settings.seed, settings.heldout)
    poisoned = {f"valid_asr{suffix}": sets[poisoned_set("valid") + suffix].read()
                for suffix in poisoned_suffixes(sets, "valid")}

    def tell(epoch, logs):
        with contextlib.suppress(ValueError):  # not on a worker: nobody to tell
            get_worker().log_event(topic, {"pruned": len(pruned), "epoch": epoch})

    model = spec.load()
    tuned = fine_tune(model, conv, pruned, (x[train], y[train]), (x[held], y[held]), poisoned,
                      settings, folder, tell if topic else None)
    counts = {}
    for name in ["clean_test", *(poisoned_set("test") + s for s in poisoned_suffixes(sets, "test"))]:
        if name in sets:
            images, labels = sets[name].read()
            counts[name] = tally(predict_classes(tuned.model, images), predict_classes(model, images), labels)
    return FineTuneResult(tuned.model.get_weights(), tuned.log, tuned.epochs, tuned.heldout_accuracy, counts)


class QuietWorkerLogs(WorkerPlugin):
    """A Dask worker plugin for workers the sweep started, so that what the client reports in
    one line is not also a block in the workers' logs:

    - a task that stops on an :class:`InputError` (say NaN pixels in a chunk, found only when a
      worker reads it) is one WARNING line, not distributed's "Compute Failed" block with a
      traceback;
    - a task cut short because its worker closes (a stopped run), and a heartbeat that the
      scheduler drops as it lets a closing worker go, are INFO lines, not a WARNING and an
      ERROR traceback.

    Register with ``client.register_plugin(QuietWorkerLogs())``. The filters recognise
    distributed's own wording: tests/test_distributed_messages.py fails when it changes.
    """

    name = "quiet-worker-logs"

    def setup(self, worker=None):
        # One worker per process (the sweep's workers are processes), so each filter knows its worker.
        for name, log_filter in (("distributed.worker", InputErrorLogFilter()),
                                 ("distributed.worker", ClosingWorkerLogFilter(worker)),
                                 ("distributed.worker.state_machine", ClosingWorkerLogFilter(worker))):
            logger = logging.getLogger(name)
            if not any(type(f) is type(log_filter) for f in logger.filters):
                logger.addFilter(log_filter)


class InputErrorLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if (isinstance(record.msg, str) and record.msg.startswith("Compute Failed")
                and len(args) >= 4 and str(args[3]).startswith(InputError.__name__ + "(")):
            record.msg = "task %s stopped on an input problem (the client reports it): %s"
            record.args = (args[0], args[3])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ClosingWorkerLogFilter(logging.Filter):
    def __init__(self, worker=None):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
            pass  # a worker closing mid-task
        elif message.startswith("Failed to communicate with scheduler during heartbeat") and self.closing():
            # retire_workers removed this worker while its heartbeat was on the way
            record.msg, record.args = "heartbeat not answered as this worker closes: %s", (
                record.exc_info[1] if record.exc_info else "",)
            record.exc_info = record.exc_text = None
        else:
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)

    def closing(self) -> bool:
        from distributed.core import Status
        return self.worker is not None and self.worker.status in (
            Status.closing_gracefully, Status.closing, Status.closed)
