"""GoodNet G: B and B' side by side; where they disagree, G answers class N ("poisoned").

G is one Keras model with N+1 outputs built from stock layers and ops, so it loads with plain
``keras.models.load_model`` and no custom objects.
"""
from __future__ import annotations

from pruning.backend import keras
import numpy as np
from keras import ops

from pruning.models import output_tensor
from pruning.counts import Counts


def build_goodnet(bd_model: keras.Model, pruned_model: keras.Model) -> keras.Model:
    """G(x) = B's output plus a score for class N below B's best where argmax B == argmax B',
    else one-hot N.

    That score is 0 when all of B's scores are above 0 (probabilities: G's row stays a
    distribution), else one below B's lowest (logits can all be negative, and a 0 would win).
    """
    classes = int(output_tensor(bd_model).shape[-1])
    inputs = keras.Input(shape=tuple(bd_model.inputs[0].shape[1:]), name="image")
    bd = rename(bd_model, "bd_net")(inputs)
    pruned = rename(pruned_model, "pruned_net")(inputs)
    bd = bd[0] if isinstance(bd, (list, tuple)) else bd
    pruned = pruned[0] if isinstance(pruned, (list, tuple)) else pruned
    bd_class = ops.argmax(bd, axis=-1)
    agree = ops.expand_dims(ops.equal(bd_class, ops.argmax(pruned, axis=-1)), -1)
    poisoned = ops.one_hot(ops.full_like(bd_class, classes), classes + 1)
    lowest = ops.min(bd, axis=-1, keepdims=True)
    below = ops.where(lowest > 0, ops.zeros_like(lowest), lowest - 1)
    outputs = ops.where(agree, ops.concatenate([bd, below], axis=-1), poisoned)
    return keras.Model(inputs, outputs, name="goodnet")


def rename(model: keras.Model, name: str) -> keras.Model:
    """A functional copy of ``model`` under a new name (B and B' share layer names)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.name = name
    return copy


def goodnet_scores(clean: Counts | None, poisoned: Counts | None) -> dict[str, float]:
    """G's test scores (percent) from B'-vs-B tallies on the clean and poisoned test sets
    (either may be None: not given, not scored).

    G predicts the label when B and B' agree on it; it says N when they disagree.
    """
    scores = {}
    if clean is not None:
        scores["test_accuracy"] = clean.percent("agree_correct")
    if poisoned is not None:
        scores["test_asr"] = poisoned.percent("agree_correct")
        scores["detection_rate"] = poisoned.percent("disagree")
    if clean is not None:
        scores["false_alarm_rate"] = clean.percent("disagree")
    return scores


def goodnet_predictions(bd_predictions: np.ndarray, pruned_predictions: np.ndarray,
                        classes: int) -> np.ndarray:
    """G's classes from B's and B''s classes (N where they differ)."""
    return np.where(bd_predictions == pruned_predictions, bd_predictions, classes)
