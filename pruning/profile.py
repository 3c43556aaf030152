"""Profile once: the mean activation of each channel over the clean validation set.

The channel order (increasing mean activation, ties by channel index) is the pruning order of
the paper, written to ``channel_order.csv`` so resumed runs and every task read the same one.

The sums are exact: each chunk of rows adds its activations as integers (in units of the
smallest float64, 2**-UNIT_BITS), so the mean is the same float however the rows were chunked,
spread over workers or resumed, and rounded once, at the end.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd

# Every finite float64 is an integer multiple of 2**-1074: frexp's mantissa times 2**53 is an
# integer, and 2**(exponent - 53) at least 2**-(1074 + 52).
UNIT_BITS = 1126
_BLOCK_VALUES = 1 << 23  # values converted at once (64 MB of float64); a bin's sums stay exact


def exact_channel_sums(activations: np.ndarray) -> np.ndarray:
    """Per-channel (last axis) sums of ``activations``, exactly: Python ints in units of
    ``2**-UNIT_BITS``, one per channel (an object array, so chunks' sums add with ``+``).

    Each value is split into integer mantissas and a power of two (``np.frexp``); the mantissas
    of each (power, channel) bin are added in float64, exactly since they stay below 2**53
    (24-bit mantissas for float32 and narrower; float64's 53 are split in two), then shifted.
    """
    channels = activations.shape[-1]
    flat = np.asarray(activations).reshape(-1, channels)
    narrow = flat.dtype.itemsize <= 4  # float16, bfloat16 and float32 are exact in float32
    totals = [0] * channels
    block = max(1, _BLOCK_VALUES // channels)
    for start in range(0, len(flat), block):
        values = flat[start:start + block].astype(np.float32 if narrow else np.float64)
        if not np.isfinite(values).all():
            raise ValueError("activations are not all finite (inf or NaN)")
        mantissa, exponent = np.frexp(values)  # values = mantissa * 2**exponent, 0.5 <= |m| < 1
        if narrow:
            bits, parts = 24, [(mantissa * np.float32(2 ** 24), 0)]
        else:
            mantissa *= 2.0 ** 53
            high = np.floor(mantissa / 2.0 ** 26)
            bits, parts = 53, [(high, 26), (mantissa - high * 2.0 ** 26, 0)]
        lowest = int(exponent.min())
        bins = ((exponent - lowest) * channels + np.arange(channels)).ravel()
        width = (int(exponent.max()) - lowest + 1) * channels
        for weights, shift in parts:
            binned = np.bincount(bins, weights.ravel(), width).reshape(-1, channels)
            for row, channel in zip(*np.nonzero(binned)):
                totals[channel] += int(binned[row, channel]) << (shift + lowest + int(row) - bits + UNIT_BITS)
    exact = np.empty(channels, dtype=object)
    exact[:] = totals
    return exact


def channel_order(channel_sums: np.ndarray, values_per_channel: int) -> pd.DataFrame:
    """The pruning order from exact per-channel activation sums (:func:`exact_channel_sums`)
    over ``values_per_channel`` values.

    Each mean is the exact mean rounded once to a float64, and the sort is stable, so channels
    with equal means (e.g. dead ones at 0) keep index order and every run on every machine that
    computed the same activations gets the same order.
    """
    if values_per_channel <= 0:
        raise ValueError("no activations to profile: the clean validation set is empty")
    means = np.array([float(Fraction(int(total), values_per_channel << UNIT_BITS))
                      for total in channel_sums], dtype=np.float64)
    order = np.argsort(means, kind="stable")
    return pd.DataFrame({"rank": np.arange(len(order)), "channel": order,
                         "mean_activation": means[order]})
