"""How fine-pruning fine-tunes (``python -m jobs.sweep --fine-tune-*``), without Keras: the
command line reads its defaults before TensorFlow is imported."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Adam at ``learning_rate``, up to ``epochs`` epochs of ``batch_size`` images, stopped after
    ``patience`` epochs without a better held-out accuracy; ``heldout``: the share of the clean
    validation set held out (per class) to choose the epoch on; ``seed``: that split's, the batch
    order's and Keras'."""

    epochs: int = 10
    learning_rate: float = 1e-3
    patience: int = 3
    seed: int = 0
    heldout: float = 0.2
    batch_size: int = 64
