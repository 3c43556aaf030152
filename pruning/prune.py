"""B'_k: B with the first k channels of the channel order pruned, literally and fast.

Literal pruning zeroes the conv layer's kernel and bias for the pruned channels. Then, for
every input, a pruned channel's conv output is activation(0) everywhere, and it stays one
input-independent map through the per-channel layers after the conv (pooling, activation,
batch norm). So we split B at the end of that chain (``pool_3`` for the lab model): the
expensive base runs once per image, and B'_k is the head applied to the base's output with
the pruned channels replaced by that constant map. Rows where a pruned channel already equals
its pruned map are unchanged, so their prediction is B's and the head is not re-run for them.
tests/test_exactness.py checks this against the literally pruned model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pruning.backend import keras
import numpy as np

from pruning.models import output_tensor

BATCH_ROWS = 1024
BUCKETS = (64, 256, BATCH_ROWS)  # padded batch sizes: few compiled shapes, little waste


def prune_conv_channels(model: keras.Model, conv_name: str, channels) -> keras.Model:
    """A new model equal to ``model`` but with ``channels`` of ``conv_name`` zeroed (kernel, bias).

    ``model`` itself is never modified.
    """
    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    layer = pruned.get_layer(conv_name)
    channels = np.asarray(channels, dtype=np.int64)
    weights = layer.get_weights()
    weights[0][..., channels] = 0.0  # kernel: (..., in, out); the last axis is the channel
    if layer.use_bias:
        weights[1][channels] = 0.0
    layer.set_weights(weights)
    return pruned


def predict_batches(model: keras.Model, x: np.ndarray, batch_rows: int = BATCH_ROWS):
    """Yield ``(start, output)`` over ``x`` in batches padded up to one of a few sizes, so that
    each model compiles a few shapes (any backend) instead of one per remainder."""
    for start in range(0, len(x), batch_rows):
        batch = x[start:start + batch_rows]
        rows = len(batch)
        padded = next((size for size in BUCKETS if size >= rows), rows)
        if padded > rows:
            batch = np.concatenate([batch, np.zeros((padded - rows,) + batch.shape[1:], batch.dtype)])
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

    @property
    def channels(self) -> int:
        return int(self.pruned_map.shape[-1])


def split_model(model: keras.Model, conv: str, read: str) -> SplitModel:
    read_output = model.get_layer(read).output
    base = keras.Model(model.inputs, read_output, name="base")
    try:
        head = keras.Model(read_output, output_tensor(model), name="head")
    except ValueError:  # graph disconnected: something after the cut bypasses it
        head = None
    # All channels pruned, any finite input: every channel shows its pruned map.
    all_pruned = prune_conv_channels(model, conv, range(model.get_layer(conv).filters))
    probe = np.zeros((1,) + tuple(model.inputs[0].shape[1:]), dtype=np.float32)
    pruned_base = keras.Model(all_pruned.inputs, all_pruned.get_layer(read).output)
    pruned_map = predict_activations(pruned_base, probe)[0]
    return SplitModel(model, conv, read, base, head, pruned_map)


@dataclass
class Counts:
    """Tallies over a set for one prefix; G's scores follow from them (see pruning.goodnet).

    ``correct``: B'_k predicts the label. ``agree_correct``: B'_k and B agree and predict the
    label (so G predicts it). ``disagree``: B'_k and B differ (G answers "poisoned").
    """

    rows: int = 0
    correct: int = 0
    agree_correct: int = 0
    disagree: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.rows + other.rows, self.correct + other.correct,
                      self.agree_correct + other.agree_correct, self.disagree + other.disagree)

    def percent(self, name: str) -> float:
        # share first, then percent: the lab's np.mean(...) * 100, to the last bit
        return getattr(self, name) / self.rows * 100.0 if self.rows else float("nan")


def tally(predictions: np.ndarray, b_predictions: np.ndarray, labels: np.ndarray) -> Counts:
    correct = predictions == labels
    agree = predictions == b_predictions
    return Counts(len(labels), int(correct.sum()), int((correct & agree).sum()), int((~agree).sum()))


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
    channel_sums: np.ndarray = field(repr=False)  # (C,) float64 sums over rows and positions
    values_per_channel: int = 0


def compute_chunk(split: SplitModel, set_name: str, start: int, stop: int,
                  images: np.ndarray, labels: np.ndarray) -> Chunk:
    """Run the base once over a chunk of images: activations, B's predictions, channel sums."""
    activations = predict_activations(split.base, images)
    changes = (activations != split.pruned_map).reshape(len(images), -1, split.channels).any(axis=1)
    if split.head is not None:
        b_predictions = predict_classes(split.head, activations)
    else:
        b_predictions = predict_classes(split.model, images)
    sums = activations.reshape(-1, split.channels).sum(axis=0, dtype=np.float64)
    kept = activations if split.head is not None else images
    return Chunk(set_name, start, stop, labels, b_predictions, kept, changes, sums,
                 int(np.prod(activations.shape[:-1])))


def evaluate_prefix(split: SplitModel, chunk: Chunk, pruned) -> Counts:
    """Counts of B'_k on a chunk, where ``pruned`` lists the k pruned channels."""
    return tally(prefix_predictions(split, chunk, pruned), chunk.b_predictions, chunk.labels)


def prefix_predictions(split: SplitModel, chunk: Chunk, pruned) -> np.ndarray:
    """B'_k's classes for a chunk: the head re-run only on rows that pruning changes."""
    pruned = np.asarray(pruned, dtype=np.int64)
    predictions = chunk.b_predictions.copy()
    rows = np.flatnonzero(chunk.changes[:, pruned].any(axis=1)) if len(pruned) else []
    if len(rows):
        if split.head is None:
            literal = prune_conv_channels(split.model, split.conv, pruned)
            predictions[rows] = predict_classes(literal, chunk.activations[rows])
        else:
            x = chunk.activations[rows]
            x[..., pruned] = split.pruned_map[..., pruned]
            predictions[rows] = predict_classes(split.head, x)
    return predictions
