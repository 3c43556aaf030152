"""Tallies of a model's answers on a set, per prefix: what the sweep keeps, checkpoints and sums.

Plain numbers, no Keras: the output folder's checkpoints are read back with them before
TensorFlow is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def sum_chunks(chunks: dict[tuple[str, int], list[Counts]], prefixes: int) -> dict[int, dict[str, Counts]]:
    """``{k: {set: Counts}}`` from every chunk's ``(set, index) -> [Counts for k = 0..C]``,
    added in chunk order."""
    totals = {k: {} for k in range(prefixes)}
    for (set_name, _), chunk_counts in sorted(chunks.items()):
        for k, counts in enumerate(chunk_counts):
            totals[k][set_name] = totals[k].get(set_name, Counts()) + counts
    return totals
