"""The functions Dask runs on workers. Each worker loads B and splits it once (cached per
process) and reads its own rows from the HDF5 files, so only file names, channel lists and
small tallies travel through the scheduler; a chunk's activations stay on the worker that
computed them, where its prefix tasks are scheduled."""
from __future__ import annotations

import functools
import threading

import numpy as np

from pruning.data import LabSet
from pruning.models import ModelSpec
from pruning.counts import Counts
from pruning.prune import Chunk, SplitModel, compute_chunk, evaluate_prefixes, split_model


_loading = threading.Lock()  # a worker's task threads build B's split once, not once each


def split_for(spec: ModelSpec, conv: str, read: str) -> SplitModel:
    with _loading:
        return _split_for(spec, conv, read)


@functools.lru_cache(maxsize=2)
def _split_for(spec: ModelSpec, conv: str, read: str) -> SplitModel:
    return split_model(spec.load(), conv, read)


def activations_task(spec: ModelSpec, conv: str, read: str, set_name: str, lab_set: LabSet,
                     start: int, stop: int) -> Chunk:
    images, labels = lab_set.read(start, stop)
    return compute_chunk(split_for(spec, conv, read), set_name, start, stop, images, labels)


def channel_sums_task(chunk: Chunk) -> tuple[int, np.ndarray, int]:
    """What the profile needs of a chunk: its start, per-channel sums and value count. It runs
    where the chunk is, so only these few numbers travel to the profile task."""
    return chunk.start, chunk.channel_sums, chunk.values_per_channel


def profile_task(*parts: tuple[int, np.ndarray, int]) -> tuple[np.ndarray, int]:
    """Per-channel activation sums and value count over the clean validation chunks, summed in
    row order (the same float64 sums however the chunks were spread over workers)."""
    parts = sorted(parts, key=lambda part: part[0])
    sums = np.zeros_like(parts[0][1])
    for _, chunk_sums, _ in parts:
        sums += chunk_sums
    return sums, sum(values for _, _, values in parts)


def evaluate_prefixes_task(spec: ModelSpec, conv: str, read: str, chunk: Chunk,
                           order: tuple[int, ...], first: int, stop: int) -> list[Counts]:
    """Counts of B'_k for k = first..stop-1 on one chunk."""
    return evaluate_prefixes(split_for(spec, conv, read), chunk, order, first, stop)
