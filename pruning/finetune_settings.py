"""How fine-pruning fine-tunes (``python -m jobs.sweep --fine-tune-*``), without Keras: the
command line reads its defaults before TensorFlow is imported."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Adam at ``learning_rate``, ``epochs`` epochs of ``batch_size`` images; the epoch kept is
    the last whose held-out accuracy is within ``tolerance`` points of the best epoch's, and
    ``patience`` epochs in a row further below stop training early; ``heldout``: the share of
    the clean validation set held out (per class) to choose the epoch on; ``seed``: that
    split's, the batch order's and Keras'."""

    epochs: int = 10
    learning_rate: float = 1e-3
    patience: int = 10
    tolerance: float = 2.0
    seed: int = 0
    heldout: float = 0.2
    batch_size: int = 32
