"""B'_k: B with the first k channels of the channel order pruned, literally and fast.

Literal pruning zeroes the conv layer's kernel and bias for the pruned channels. Then, for
every input, a pruned channel's conv output is activation(0) everywhere, and it stays one
input-independent map through the per-channel layers after the conv (pooling, activation,
batch norm). So we split B at the end of that chain (``pool_3`` for the lab model): the
expensive base runs once per image, and B'_k is the head applied to the base's output with
the pruned channels replaced by that constant map. Pruning a channel that already equals its
pruned map on a row leaves that row's head input bit for bit as it was, and so its prediction:
from B'_{k-1} to B'_k the head is re-run only on the rows where the newly pruned channel is
active. tests/test_exactness.py checks this against the literally pruned model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pruning.backend import keras
import numpy as np
from dask.sizeof import sizeof

from pruning.counts import Counts, tally
from pruning.data import InputError, first_line
from pruning.layers import channelwise_chain, conv_layer_names, layer_output
from pruning.models import output_tensor
from pruning.profile import exact_channel_sums

# Every batch a model runs is padded to one fixed number of rows, whatever the chunk, the task or
# the worker: TensorFlow's CPU kernels (oneDNN) and cuDNN pick their algorithm, and so their
# rounding, by the batch's shape, so a row run in a batch of 32 can differ in the last bit from
# the same row in a batch of 1024. In one shape a row's output depends on that row alone.
BATCH_ROWS = 256        # images per base batch: ~8 % slower per image than 1024, less padding per chunk
HEAD_BATCH_ROWS = 1024  # rows per head batch (the head is small: larger batches gain little)
ROW_LADDER = (64, 256, HEAD_BATCH_ROWS)  # head batch sizes for wide rows (see head_batch_rows)
# A head batch's input at most (wider rows get fewer rows a batch): a 4 x 4 x 2048 read is
# 128 KB a row, and 4096 of them, gathered and then masked, took a task thread 1 GB.
HEAD_BATCH_BYTES = 128 << 20


# A conv layer's weights whose last axis is its output channel: kernel (..., in, out), bias,
# and with LoRA (``enable_lora``) the factor of ``kernel + lora_kernel_a @ lora_kernel_b`` that
# ends in the channel. Zeroed, they make the channel's output activation(0) for every input.
CHANNEL_WEIGHTS = ("kernel", "bias", "lora_kernel_b")


def prune_conv_channels(model: keras.Model, conv_name: str, channels) -> keras.Model:
    """A new model equal to ``model`` but with ``channels`` of ``conv_name`` zeroed (kernel, bias).

    ``model`` itself is never modified.
    """
    pruned = copy_model(model)
    pruned.set_weights(model.get_weights())
    zero_conv_channels(pruned, conv_name, channels)
    return pruned


def zero_conv_channels(pruned: keras.Model, conv_name: str, channels) -> None:
    """Zero ``channels`` of ``conv_name`` (kernel, bias) in ``pruned`` itself: a copy of B's
    own, never B."""
    channels = np.asarray(channels, dtype=np.int64)
    for weight in pruned.get_layer(conv_name).weights:
        if weight.name in CHANNEL_WEIGHTS:
            value = keras.ops.convert_to_numpy(weight.value).copy()
            value[..., channels] = 0.0
            weight.assign(value)


def copy_model(model: keras.Model) -> keras.Model:
    """A new model with new layers, or a one-line :class:`InputError` for one Keras cannot copy.

    ``clone_model`` rebuilds each layer from its config. A model loaded from a file always
    can be; one built in this process may hold Python code no config can name."""
    try:
        return keras.models.clone_model(model)
    except Exception as error:  # Keras raises many types for a layer it cannot rebuild
        while error.__cause__ or error.__context__:  # the first error names what was missing
            error = error.__cause__ or error.__context__
        raise InputError(f"B cannot be copied to prune it: Keras cannot rebuild one of its "
                         f"layers from its config ({first_line(error, 200)}); register functions "
                         "and layers of your own (keras.saving.register_keras_serializable), and "
                         "write Lambda layers as layers of your own") from None


def predict_batches(model: keras.Model, x: np.ndarray, batch_rows: int = BATCH_ROWS):
    """Yield ``(start, output)`` over ``x`` in batches of exactly ``batch_rows`` rows (the last one
    padded with zeros), so that a row's output does not depend on how many rows came with it
    (see BATCH_ROWS), and each model compiles one shape."""
    for start in range(0, len(x), batch_rows):
        batch = x[start:start + batch_rows]
        rows = len(batch)
        if rows < batch_rows:
            batch = np.concatenate([batch, np.zeros((batch_rows - rows,) + batch.shape[1:], batch.dtype)])
        output = model.predict_on_batch(batch)
        output = output[0] if isinstance(output, (list, tuple)) else output
        yield start, np.asarray(output)[:rows]


def predict_classes(model: keras.Model, x: np.ndarray, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """Argmax predictions (ties go to the lower class, as ``np.argmax`` does for B)."""
    predictions = np.empty(len(x), dtype=np.int64)
    for start, output in predict_batches(model, x, batch_rows):
        predictions[start:start + len(output)] = np.argmax(output, axis=1)
    return predictions


def predict_activations(model: keras.Model, x: np.ndarray, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """``model``'s output for ``x`` (the base's read-layer activations)."""
    return np.concatenate([output for _, output in predict_batches(model, x, batch_rows)])


def head_batch_rows(row_bytes: int) -> int:
    """Rows per head batch: ``HEAD_BATCH_ROWS``, or for wide rows the largest of ``ROW_LADDER``
    within ``HEAD_BATCH_BYTES``. It depends on the row's size alone, so a model's head batches
    all have one shape."""
    fitting = [size for size in ROW_LADDER if size * row_bytes <= HEAD_BATCH_BYTES]
    return min(HEAD_BATCH_ROWS, max(fitting, default=ROW_LADDER[0]))


@dataclass
class SplitModel:
    """B cut after the pruned conv layer's per-channel chain.

    ``head`` is None when later layers also read tensors from before the cut (skip
    connections around it); then prefixes are evaluated literally on the images.
    """

    model: keras.Model
    conv: str
    read: str
    base: keras.Model
    head: keras.Model | None
    pruned_map: np.ndarray  # (H, W, C): what the read layer gives for a pruned channel
    pruned_class: int | None = None  # the head's class for pruned_map: every channel pruned

    @property
    def channels(self) -> int:
        return int(self.pruned_map.shape[-1])


def cut_head(model: keras.Model, read: str) -> keras.Model | None:
    """The layers after ``read`` as a model of their own, or None when some of them also read
    tensors from before it (a skip connection around the cut, or a branch from an earlier layer).
    When ``read`` gives B's output itself (global pooling as the logits), an identity."""
    cut = layer_output(model, read)
    if cut is output_tensor(model):  # Keras refuses a model whose output is its input
        rows = keras.Input(cut.shape[1:])
        return keras.Model(rows, keras.layers.Identity()(rows), name="head")
    try:
        return keras.Model(cut, output_tensor(model), name="head")
    except ValueError:  # graph disconnected: something after the cut bypasses it
        return None


def where_b_can_be_cut(model: keras.Model) -> str:
    """The last conv layer after which B can be cut (the fast sweep), for the warning about one
    that cannot: in a residual net that is not the default --layer, whose block has a skip
    connection around it, and it may be none."""
    for conv in reversed(conv_layer_names(model)):
        try:
            read = channelwise_chain(model, conv)[-1].name
        except InputError:  # softmax over its channels, shared, channels_first: not prunable anyway
            continue
        if cut_head(model, read) is not None:
            return f"the last conv layer B can be cut after is {conv} (--layer {conv})"
    return "B cannot be cut after any of its conv layers (skip connections around them all)"


def split_model(model: keras.Model, conv: str, read: str) -> SplitModel:
    base = keras.Model(model.inputs, layer_output(model, read), name="base")
    head = cut_head(model, read)
    # All channels pruned, any finite input: every channel shows its pruned map.
    all_pruned = prune_conv_channels(model, conv, range(model.get_layer(conv).filters))
    probe = np.zeros((1,) + tuple(model.inputs[0].shape[1:]), dtype=np.float32)
    pruned_base = keras.Model(all_pruned.inputs, layer_output(all_pruned, read))
    pruned_map = predict_activations(pruned_base, probe)[0]
    pruned_class = None if head is None else int(
        predict_classes(head, pruned_map[None], head_batch_rows(pruned_map.nbytes))[0])
    return SplitModel(model, conv, read, base, head, pruned_map, pruned_class)


@dataclass
class Chunk:
    """What the base computed once for rows ``[start, stop)`` of one set."""

    set_name: str
    start: int
    stop: int
    labels: np.ndarray
    b_predictions: np.ndarray
    activations: np.ndarray       # read-layer output (N, H, W, C), or the images without a head
    changes: np.ndarray           # (N, C) bool: pruning channel c changes row r
    channel_sums: np.ndarray = field(repr=False)  # (C,) exact sums over rows and positions
    values_per_channel: int = 0


@sizeof.register(Chunk)
def _chunk_bytes(chunk: Chunk) -> int:
    """A chunk's size as Dask counts it (else 56 bytes, an object's): the dashboard then shows
    the chunks a worker holds as its managed memory, and a worker past its memory target spills
    them to its local folder."""
    return sum(value.nbytes for value in vars(chunk).values() if isinstance(value, np.ndarray))


def compute_chunk(split: SplitModel, set_name: str, start: int, stop: int,
                  images: np.ndarray, labels: np.ndarray) -> Chunk:
    """Run the base once over a chunk of images: activations, B's predictions, channel sums."""
    activations = predict_activations(split.base, images)
    changes = (activations != split.pruned_map).reshape(len(images), -1, split.channels).any(axis=1)
    if split.head is not None:
        b_predictions = predict_classes(split.head, activations, head_batch_rows(activations[0].nbytes))
    else:
        b_predictions = predict_classes(split.model, images)
    try:
        sums = exact_channel_sums(activations)
    except ValueError as error:
        raise InputError(f"{set_name} rows {start}-{stop - 1}: B's {split.read} {error}; "
                         "B overflows on these images") from None
    kept = activations if split.head is not None else images
    return Chunk(set_name, start, stop, labels, b_predictions, kept, changes, sums,
                 int(np.prod(activations.shape[:-1])))


def evaluate_prefixes(split: SplitModel, chunk: Chunk, order, first: int, stop: int) -> list[Counts]:
    """Counts of B'_k on a chunk for k = first..stop-1, where B'_k prunes ``order[:k]``."""
    return [tally(predictions, chunk.b_predictions, chunk.labels)
            for _, predictions in prefix_predictions(split, chunk, order, first, stop)]


def prefix_predictions(split: SplitModel, chunk: Chunk, order, first: int, stop: int):
    """Yield ``(k, classes of B'_k on the chunk)`` for k = first..stop-1.

    B'_first is re-run on the rows where any of its pruned channels is active; each later
    B'_k only on the rows where channel ``order[k-1]`` is, since the others keep B'_{k-1}'s
    input to the head exactly. A row none of whose active channels is left unpruned gives
    the head the all-pruned input, whose class is known once. The head runs on the remaining
    (prefix, row) pairs in large batches mixed across prefixes, which makes it cheap per prefix.
    """
    order = np.asarray(order, dtype=np.int64)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))  # channel c is pruned in B'_k when rank[c] < k
    last = np.where(chunk.changes, rank, -1).max(axis=1, initial=-1)  # a row's last active channel
    prefixes = range(first, stop)
    rerun, settled = {}, {}
    for k in prefixes:
        touched = (chunk.changes[:, order[:k]].any(axis=1) if k == first
                   else chunk.changes[:, order[k - 1]])
        if split.head is None:  # literal pruning: nothing is known without running it
            rerun[k], settled[k] = np.flatnonzero(touched), []
        else:
            rerun[k] = np.flatnonzero(touched & (last >= k))
            settled[k] = np.flatnonzero(touched & (last < k))
    if split.head is None:
        classes = _literal_classes(split, chunk, order, rerun)
    else:
        classes = _head_classes(split, chunk, rank, rerun)
    predictions = chunk.b_predictions.copy()
    for k in prefixes:
        predictions[rerun[k]] = classes[k]
        if len(settled[k]):
            predictions[settled[k]] = split.pruned_class
        yield k, predictions.copy()


def _literal_classes(split: SplitModel, chunk: Chunk, order: np.ndarray, rows: dict) -> dict:
    """B'_k's classes for each ``rows[k]`` (images), k in increasing order, from one copy of B
    whose channels are zeroed prefix by prefix: a copy per prefix would be a clone and a new
    traced predict function each, ten times a small ResNet's prediction on 200 rows."""
    pruned = prune_conv_channels(split.model, split.conv, order[:min(rows, default=0)])
    classes = {}
    for k, rerun in rows.items():
        if len(rerun):
            zero_conv_channels(pruned, split.conv, order[:k])
            classes[k] = predict_classes(pruned, chunk.activations[rerun])
        else:
            classes[k] = []
    return classes


def _head_classes(split: SplitModel, chunk: Chunk, rank: np.ndarray, rows: dict) -> dict:
    """The head's classes for each ``rows[k]`` with the channels of rank < k pruned, in mixed
    batches."""
    if not rows:
        return {}
    prefix = np.concatenate([np.full(len(r), k) for k, r in rows.items()]).astype(np.int64)
    row = np.concatenate(list(rows.values())).astype(np.int64)
    classes = np.empty(len(row), dtype=np.int64)
    batch_rows = head_batch_rows(chunk.activations[0].nbytes)
    for start in range(0, len(row), batch_rows):
        part = slice(start, start + batch_rows)
        x = chunk.activations[row[part]]  # a copy, masked in place
        pruned = rank[None, :] < prefix[part, None]  # (rows, C), broadcast over positions
        np.copyto(x, split.pruned_map, where=pruned.reshape((len(x),) + (1,) * (x.ndim - 2) + (-1,)))
        classes[part] = predict_classes(split.head, x, batch_rows)
    bounds = np.cumsum([0] + [len(r) for r in rows.values()])
    return {k: classes[a:b] for k, a, b in zip(rows, bounds[:-1], bounds[1:])}
