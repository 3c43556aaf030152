"""Select B' for each threshold: the first prefix whose validation accuracy has dropped enough."""
from __future__ import annotations

import math

import pandas as pd


def accuracy_limit(base_accuracy: float, threshold: float, relative: bool = False) -> float:
    """Validation accuracy at or below which a threshold is reached (percent)."""
    if relative:  # X percent of B's accuracy, e.g. 10 % of 98.6 = 9.86 points
        return base_accuracy * (1.0 - threshold / 100.0)
    return base_accuracy - threshold  # X points below B's accuracy, the lab's definition


def select_prefixes(curve: pd.DataFrame, thresholds, relative: bool = False) -> dict[float, int | None]:
    """For each threshold, the first ``channels_pruned`` k with ``valid_accuracy`` at least
    X points below B's (k = 0), or None when pruning every channel never gets there."""
    curve = curve.sort_values("channels_pruned")
    if curve["channels_pruned"].iloc[0] != 0:
        raise ValueError("the curve needs its k = 0 row (B itself) to measure drops from")
    base = float(curve["valid_accuracy"].iloc[0])
    chosen: dict[float, int | None] = {}
    for threshold in thresholds:
        limit = accuracy_limit(base, threshold, relative)
        reached = curve[curve["valid_accuracy"] <= limit + 1e-9 * max(1.0, abs(limit))]
        reached = reached[reached["channels_pruned"] > 0]
        chosen[threshold] = int(reached["channels_pruned"].iloc[0]) if len(reached) else None
    return chosen


def threshold_label(threshold: float) -> str:
    """``2`` for 2.0, ``2.5`` for 2.5: the X in ``model_X=2.h5``."""
    return str(int(threshold)) if float(threshold).is_integer() else repr(float(threshold))


def is_valid_threshold(value: float) -> bool:
    return math.isfinite(value) and 0 <= value < 100
