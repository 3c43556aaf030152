"""Profile once: the mean activation of each channel over the clean validation set.

The channel order (increasing mean activation, ties by channel index) is the pruning order of
the paper, written to ``channel_order.csv`` so resumed runs and every task read the same one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def channel_order(channel_sums: np.ndarray, values_per_channel: int) -> pd.DataFrame:
    """The pruning order from per-channel activation sums over ``values_per_channel`` values.

    A stable sort, so channels with equal means (e.g. dead ones at 0) keep index order and
    every run on every machine gets the same order.
    """
    if values_per_channel <= 0:
        raise ValueError("no activations to profile: the clean validation set is empty")
    means = np.asarray(channel_sums, dtype=np.float64) / values_per_channel
    order = np.argsort(means, kind="stable")
    return pd.DataFrame({"rank": np.arange(len(order)), "channel": order,
                         "mean_activation": means[order]})
