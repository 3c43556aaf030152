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

import collections
import contextlib
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pruning.counts import Counts, sum_chunks, tally
from pruning.data import CHUNK_ROWS, PREFIXES_PER_TASK, poisoned_set, poisoned_suffixes
from pruning.profile import channel_order
from pruning.progress import prefix_progress, progress

# A Dask scheduler unpickles the task graph, and so imports this module and the tasks'
# arguments' modules: what needs Keras (pruning.prune, pruning.finetune) is imported inside the
# tasks, so that the scheduler never imports TensorFlow.
if TYPE_CHECKING:
    from pruning.prune import Chunk, SplitModel

log = logging.getLogger(__name__)

FINE_TUNE_ONLY = "fine-tune only"  # the fine-tuning run of B itself, the paper's comparison

# ------------------------------------------------------------------ the tasks

_loading = threading.Lock()  # a worker's task threads build B's split once, not once each


def split_for(spec, conv: str, read: str) -> SplitModel:
    with _loading:
        return _split_for(spec, conv, read)


@functools.lru_cache(maxsize=2)
def _split_for(spec, conv: str, read: str) -> SplitModel:
    from pruning.prune import split_model
    return split_model(spec.load(), conv, read)


def activations_task(spec, conv: str, read: str, set_name: str, lab_set, start: int, stop: int) -> Chunk:
    from pruning.prune import compute_chunk
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
    from pruning.prune import evaluate_prefixes
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
    from pruning.prune import predict_classes

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

    def submit(self, function, *args, key=None, retries=0, priority=0):
        return Task(function, args)

    @staticmethod
    def as_completed(tasks):
        return InOrder(tasks)


class InOrder:
    """:class:`InProcess`'s ``as_completed``: the tasks in the order given, more added with
    :meth:`update` as distributed's allows."""

    def __init__(self, tasks=()):
        self.waiting = collections.deque(tasks)

    def update(self, tasks) -> None:
        self.waiting.extend(tasks)

    def __iter__(self):
        while self.waiting:
            yield self.waiting.popleft()


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

    Work is checkpointed per chunk of rows (all prefixes of it): a chunk's prefix tasks run as
    soon as its activations exist and then free them, so memory stays flat as the data grows
    (but for the clean validation set's activations, held until the channel order is known),
    and a rerun skips finished chunks entirely, base pass included.
    """
    graph = SweepGraph(inputs, checkpoints, chunk_rows, prefixes_per_task)
    futures = as_completed(client, graph.submit(client))
    with prefix_progress(graph.prefixes, len(graph.ranges), len(graph.done)) as bar:
        for future in futures:
            more, evaluated = graph.collect(client, future)
            futures.update(more)
            bar.update(evaluated)
    return graph.result()


# Dask runs a higher priority first: the clean validation set's base pass (the profile waits
# for it), then each chunk's prefix tasks before the next chunk's base pass, so that chunks are
# finished, checkpointed and freed one after another, not all together at the end.
PROFILE_PRIORITY, PREFIX_PRIORITY, BASE_PRIORITY = 2, 1, 0


class SweepGraph:
    """One sweep's tasks, in two steps: :meth:`submit` the base pass (and the profile, if the
    channel order is not checkpointed), then :meth:`collect` each finished future, which
    submits the prefix tasks once the order is known. One ``as_completed`` loop can so serve
    several sweeps on one cluster (:mod:`jobs.campaign`)."""

    def __init__(self, inputs, checkpoints, chunk_rows: int = CHUNK_ROWS,
                 prefixes_per_task: int = PREFIXES_PER_TASK):
        self.inputs, self.checkpoints, self.prefixes_per_task = inputs, checkpoints, prefixes_per_task
        # Dask gives a key's result to whoever asks for that key: a second sweep on the same
        # cluster with fixed keys would be handed this one's results. (8 hex digits: the
        # dashboard groups tasks by name without them.)
        self.run = uuid.uuid4().hex[:8]
        self.ranges = chunk_ranges(inputs.sets, chunk_rows)
        self.done = checkpoints.chunks(inputs.channels + 1)
        self.order = checkpoints.channel_order(inputs.channels)
        self.reused = {"chunks": len(self.ranges), "chunks_reused": len(self.done),
                       "channel_order_reused": self.order is not None}
        self.prefixes = inputs.channels + 1
        self.profile = None
        self.activations: dict = {}
        self.pending: dict = {}       # prefix task -> (chunk, first prefix)
        self.tallies: dict = {}
        self.started = self.profiled = time.perf_counter()

    def submit(self, client) -> list:
        """Submit the base pass; return the futures to hand to :meth:`collect`."""
        self.started = time.perf_counter()
        spec, conv, read, order, sets = self.inputs.spec, self.inputs.conv, self.inputs.read, self.order, self.inputs.sets
        needed = [key for key in self.ranges
                  if key not in self.done or (order is None and key[0] == "clean_valid")]
        self.activations = {
            key: client.submit(activations_task, spec, conv, read, key[0], sets[key[0]].part(*self.ranges[key]),
                               *self.ranges[key], key=f"activations-{key[0]}-{key[1]}-{self.run}",
                               priority=PROFILE_PRIORITY if order is None and key[0] == "clean_valid" else BASE_PRIORITY)
            for key in needed}
        if order is None:
            valid = [client.submit(channel_sums_task, future, key=f"channel-sums-{key[1]}-{self.run}",
                                   priority=PROFILE_PRIORITY)
                     for key, future in self.activations.items() if key[0] == "clean_valid"]
            self.profile = client.submit(profile_task, *valid, key=f"profile-{self.run}", priority=PROFILE_PRIORITY)
            return [self.profile]
        log.info("channel order read back from %s", self.checkpoints.folder)
        return self.submit_prefixes(client)

    def submit_prefixes(self, client) -> list:
        self.profiled = time.perf_counter()
        channels = tuple(self.order["channel"].tolist())
        todo = [key for key in self.ranges if key not in self.done]
        log.info("reused from checkpoints: %d of %d chunks (%d prefix evaluations); %d to evaluate",
                 len(self.done), len(self.ranges), len(self.done) * self.prefixes,
                 len(todo) * self.prefixes)
        self.tallies = {key: [None] * self.prefixes for key in todo}
        inputs = self.inputs
        for key in todo:  # chunk by chunk, so each chunk's activations are freed as soon as it is done
            for first in range(0, self.prefixes, self.prefixes_per_task):
                stop = min(first + self.prefixes_per_task, self.prefixes)
                future = client.submit(evaluate_prefixes_task, inputs.spec, inputs.conv, inputs.read,
                                       self.activations[key], channels, first, stop, retries=2,
                                       key=f"evaluate-prefixes-{first}-{stop}-{key[0]}-{key[1]}-{self.run}",
                                       priority=PREFIX_PRIORITY)
                self.pending[future] = (key, first)
        self.activations.clear()  # the scheduler keeps each chunk only while its prefix tasks need it
        return list(self.pending)

    def collect(self, client, future) -> tuple[list, int]:
        """Take one finished future of this sweep; return the futures it led to submit and the
        (chunk, prefix) evaluations it finished."""
        if future is self.profile:
            sums, values = future.result()
            self.profile = None
            self.order = self.checkpoints.save_channel_order(channel_order(sums, values))
            return self.submit_prefixes(client), 0
        key, first = self.pending.pop(future)
        block = future.result()
        self.tallies[key][first:first + len(block)] = block
        if all(counts is not None for counts in self.tallies[key]):
            self.done[key] = self.checkpoints.save_chunk(*key, self.tallies.pop(key))
        return [], len(block)

    def finished(self) -> bool:
        return self.order is not None and self.profile is None and not self.pending

    def result(self):
        """What :func:`run_sweep` returns, once :meth:`finished`."""
        timings = {"profile_s": self.profiled - self.started,
                   "prefixes_s": time.perf_counter() - self.profiled}
        return self.order, sum_chunks(self.done, self.prefixes), timings, self.reused


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
