"""The sweep, written once: profile -> B'_k for every prefix k on every chunk of rows -> the
tallies, then (fine-pruning) each selected B'_X and B fine-tuned.

It runs on whatever submits tasks Dask's way (``submit(fn, *args, key=...)`` returning futures
with ``.result()``): a ``distributed.Client`` spreads the tasks over a cluster
(``python -m jobs.sweep``), :class:`InProcess` runs them here, one after another
(:func:`pruning.defend`). The task functions below are what a Dask worker runs: each loads B and
splits it once (cached per process) and reads its own rows, so only file names, channel lists
and small tallies travel through the scheduler.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd
from dask.sizeof import sizeof

from pruning.counts import Counts, sum_chunks, tally
from pruning.data import CHUNK_ROWS, PREFIXES_PER_TASK, poisoned_set, poisoned_suffixes
from pruning.profile import channel_order
from pruning.progress import prefix_progress, progress
from pruning.prune import (Chunk, SplitModel, compute_chunk, evaluate_prefixes, predict_classes,
                           split_model)

log = logging.getLogger(__name__)

FINE_TUNE_ONLY = "fine-tune only"  # the fine-tuning run of B itself, the paper's comparison

# ------------------------------------------------------------------ the tasks

_loading = threading.Lock()  # a worker's task threads build B's split once, not once each


def split_for(spec, conv: str, read: str) -> SplitModel:
    with _loading:
        return _split_for(spec, conv, read)


@functools.lru_cache(maxsize=2)
def _split_for(spec, conv: str, read: str) -> SplitModel:
    return split_model(spec.load(), conv, read)


@sizeof.register(Chunk)
def _chunk_bytes(chunk: Chunk) -> int:
    """A chunk's size as Dask counts it (else 56 bytes, an object's): the dashboard then shows
    the chunks a worker holds as its managed memory, and a worker past its memory target spills
    them to its local folder."""
    return sum(value.nbytes for value in vars(chunk).values() if isinstance(value, np.ndarray))


def activations_task(spec, conv: str, read: str, set_name: str, lab_set, start: int, stop: int) -> Chunk:
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


def evaluate_prefixes_task(spec, conv: str, read: str, chunk: Chunk,
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


def fine_tune_task(spec, conv: str, sets: dict, pruned: tuple[int, ...], settings, folder: str,
                   topic: str | None = None) -> FineTuneResult:
    """Fine-tune B with ``pruned`` channels of ``conv`` held at zero on the fine-tuning share of
    the clean validation set (training state kept in ``folder``, so that a rerun resumes);
    each finished epoch is a ``topic`` event on the worker (the client's progress line)."""
    from pruning.finetune import fine_tune, split_clean

    x, y = sets["clean_valid"].read()
    train, held = split_clean(y, settings.seed, settings.heldout)
    poisoned = {f"valid_asr{suffix}": sets[poisoned_set("valid") + suffix].read()
                for suffix in poisoned_suffixes(sets, "valid")}

    def tell(epoch, logs):
        from distributed import get_worker
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


# ------------------------------------------------------------------ where the tasks run

class InProcess:
    """Runs the sweep's tasks in this process, each when its result is first asked for, in the
    order the sweep asks: chunk after chunk, so one chunk's activations are held at a time (and
    the clean validation set's until the channel order is known), as on a cluster."""

    def submit(self, function, *args, key=None, retries=0):
        return Task(function, args)

    @staticmethod
    def as_completed(tasks):
        return iter(list(tasks))


class Task:
    def __init__(self, function, args):
        self.function, self.args, self.done = function, args, False

    def result(self):
        if not self.done:
            args = [arg.result() if isinstance(arg, Task) else arg for arg in self.args]
            self.value, self.done = self.function(*args), True
            self.function = self.args = None  # let go of the chunk this task read
        return self.value


def as_completed(client, futures):
    if isinstance(client, InProcess):
        return client.as_completed(futures)
    from distributed import as_completed
    return as_completed(futures)


class NoCheckpoints:
    """Nothing kept, nothing read back: the sweep of :func:`pruning.defend`."""

    fingerprint: dict = {}
    folder = None

    def chunks(self, prefixes=None) -> dict:
        return {}

    def channel_order(self, channels=None) -> None:
        return None

    def save_channel_order(self, order: pd.DataFrame) -> pd.DataFrame:
        return order

    def save_chunk(self, set_name: str, index: int, prefixes: list[Counts]) -> list[Counts]:
        return prefixes


# ------------------------------------------------------------------ the sweep

def chunk_ranges(sets: dict, chunk_rows: int) -> dict[tuple[str, int], tuple[int, int]]:
    """``(set, index) -> (start, stop)``: the chunks of rows, as tasks and checkpoints cut them."""
    return {(name, i): bounds for name, lab_set in sets.items()
            for i, bounds in enumerate(lab_set.chunks(chunk_rows))}


def run_sweep(inputs, client, checkpoints, chunk_rows: int = CHUNK_ROWS,
              prefixes_per_task: int = PREFIXES_PER_TASK):
    """Submit the task graph; return (channel order, {k: {set: Counts}}, timings, what was
    reused from checkpoints).

    Work is checkpointed per chunk of rows (all prefixes of it): Dask runs a chunk's prefix
    tasks as soon as its activations exist and then frees them, so memory stays flat as the
    data grows (but for the clean validation set's activations, held until the channel order
    is known), and a rerun skips finished chunks entirely, base pass included.
    """
    started = time.perf_counter()
    spec, conv, read = inputs.spec, inputs.conv, inputs.read
    # Dask gives a key's result to whoever asks for that key: a second sweep on the same cluster
    # with fixed keys would be handed this one's results. (8 hex digits: the dashboard groups
    # tasks by name without them.)
    run = uuid.uuid4().hex[:8]
    ranges = chunk_ranges(inputs.sets, chunk_rows)
    done = checkpoints.chunks(inputs.channels + 1)
    order = checkpoints.channel_order(inputs.channels)
    reused = {"chunks": len(ranges), "chunks_reused": len(done), "channel_order_reused": order is not None}
    needed = [key for key in ranges if key not in done or (order is None and key[0] == "clean_valid")]
    activations = {key: client.submit(activations_task, spec, conv, read, key[0],
                                      inputs.sets[key[0]].part(*ranges[key]), *ranges[key],
                                      key=f"activations-{key[0]}-{key[1]}-{run}")
                   for key in needed}
    if order is None:
        valid = [client.submit(channel_sums_task, future, key=f"channel-sums-{key[1]}-{run}")
                 for key, future in activations.items() if key[0] == "clean_valid"]
        sums, values = client.submit(profile_task, *valid, key=f"profile-{run}").result()
        order = checkpoints.save_channel_order(channel_order(sums, values))
    else:
        log.info("channel order read back from %s", checkpoints.folder)
    profiled = time.perf_counter()

    channels = order["channel"].tolist()
    prefixes = len(channels) + 1
    todo = [key for key in ranges if key not in done]
    log.info("reused from checkpoints: %d of %d chunks (%d prefix evaluations); %d to evaluate",
             len(done), len(ranges), len(done) * prefixes, len(todo) * prefixes)
    pending, tallies = {}, {key: [None] * prefixes for key in todo}
    for key in todo:  # chunk by chunk, so each chunk's activations are freed as soon as it is done
        for first in range(0, prefixes, prefixes_per_task):
            stop = min(first + prefixes_per_task, prefixes)
            future = client.submit(evaluate_prefixes_task, spec, conv, read, activations[key],
                                   tuple(channels), first, stop, retries=2,
                                   key=f"evaluate-prefixes-{first}-{stop}-{key[0]}-{key[1]}-{run}")
            pending[future] = (key, first)
    activations.clear()  # the scheduler keeps each chunk only while its prefix tasks need it
    with prefix_progress(prefixes, len(ranges), len(done)) as bar:
        for future in as_completed(client, pending):
            key, first = pending.pop(future)
            block = future.result()
            tallies[key][first:first + len(block)] = block
            bar.update(len(block))
            if all(counts is not None for counts in tallies[key]):
                done[key] = checkpoints.save_chunk(*key, tallies.pop(key))
    timings = {"profile_s": profiled - started, "prefixes_s": time.perf_counter() - profiled}
    return order, sum_chunks(done, prefixes), timings, reused


def read_back(inputs, checkpoints, chunk_rows: int):
    """What :func:`run_sweep` returns, from checkpoints alone when they hold the channel order
    and every chunk of these inputs; else None (something is left to compute)."""
    ranges = chunk_ranges(inputs.sets, chunk_rows)
    order, done = checkpoints.channel_order(inputs.channels), checkpoints.chunks(inputs.channels + 1)
    if order is None or not set(ranges) <= set(done):
        return None
    prefixes = len(order) + 1
    log.info("reused from checkpoints: %d of %d chunks (%d prefix evaluations); 0 to evaluate, "
             "so no Dask cluster is needed", len(ranges), len(ranges), len(ranges) * prefixes)
    reused = {"chunks": len(ranges), "chunks_reused": len(ranges), "channel_order_reused": True}
    return order, sum_chunks(done, prefixes), {"profile_s": 0.0, "prefixes_s": 0.0}, reused


# ------------------------------------------------------------------ fine-pruning

def runs_to_tune(selected: dict, order: pd.DataFrame) -> dict[str, tuple[float | None, tuple[int, ...]]]:
    """``run -> (threshold, pruned channels)``: each threshold reached (``X=2``, ...), then B itself."""
    from pruning.select import threshold_label
    channels = [int(c) for c in order["channel"]]
    runs = {f"X={threshold_label(t)}": (t, tuple(channels[:k])) for t, k in selected.items() if k is not None}
    return runs | {FINE_TUNE_ONLY: (None, ())}


def fine_tune_folder(fingerprint: dict, settings, pruned: tuple[int, ...]) -> str:
    """The checkpoint folder of one fine-tuning: another input, setting or B' is another folder."""
    import hashlib
    import json
    from dataclasses import asdict
    key = json.dumps([fingerprint, asdict(settings), list(pruned)], sort_keys=True, default=str)
    return f"finetune-k{len(pruned)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_fine_tuning(inputs, client, checkpoints, runs: dict, settings) -> dict:
    """Fine-tune every run's model (:func:`runs_to_tune`), one task per distinct model; return
    ``run -> (threshold, pruned, FineTuneResult)``. Progress is shown in epochs (on a cluster
    each task reports its own). Training state is kept under the checkpoints' folder, or in a
    temporary one without checkpoints."""
    tag = uuid.uuid4().hex[:8]
    topic = None if isinstance(client, InProcess) else f"fine-tune-{tag}"
    models = list(dict.fromkeys(pruned for _, pruned in runs.values()))  # one task per distinct model
    log.info("fine-tuning %d models (%s) for up to %d epochs each", len(models),
             ", ".join(runs), settings.epochs)
    with contextlib.ExitStack() as stack:
        folder = checkpoints.folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="fine-tune-"))
        pending = {client.submit(fine_tune_task, inputs.spec, inputs.conv, inputs.sets, pruned, settings,
                                 # absolute: workers of a joined cluster may run in another folder
                                 os.path.abspath(os.path.join(folder, fine_tune_folder(
                                     checkpoints.fingerprint, settings, pruned))),
                                 topic, key=f"fine-tune-k{len(pruned)}-{tag}"): pruned for pruned in models}
        results, told = {}, {len(pruned): 0 for pruned in models}
        with progress(len(models) * settings.epochs, "epochs", "epoch") as bar:
            def epoch_done(event):
                told[event[1]["pruned"]] += 1
                bar.update(1)

            if topic:
                client.subscribe_topic(topic, epoch_done)
            try:
                for future in as_completed(client, pending):
                    pruned = pending.pop(future)
                    results[pruned] = future.result()
                    bar.update(settings.epochs - told[len(pruned)])  # stopped early, or resumed
                    told[len(pruned)] = settings.epochs
            finally:
                if topic:
                    client.unsubscribe_topic(topic)
    return {run: (threshold, pruned, results[pruned]) for run, (threshold, pruned) in runs.items()}
