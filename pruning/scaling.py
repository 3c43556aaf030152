"""What B sees: the stored pixels times ``--rescale R`` (Keras' ``Rescaling`` by another name).

The lab's B takes raw 0-255 pixels; the CSAW-HackML-2020 BadNets take them divided by 255, as
their evaluation script feeds them. The data stays as stored and B, B' and G stay as they are:
a chunk of pixels is multiplied by R as it is read (:class:`pruning.data.LabSet`), so the saved
B' and G take what B takes. Before any work, :func:`check_scale` runs B on a sample of the
clean validation set under R and under the other usual scale, and stops when B is right far
more often under the other one.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from pruning.data import InputError

ONE = Fraction(1)
SAMPLE_ROWS = 256  # clean validation rows the scale check runs B on (well under a second)
MARGIN = 20.0      # points of accuracy the other scale must win by: "far more often"


def parse_rescale(text: str) -> Fraction:
    """``--rescale R``: a positive number or fraction, ``255``, ``0.5``, ``1/255``."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--rescale {text}: give a positive number or fraction that pixels are "
                         "multiplied by before B, e.g. --rescale 1/255") from None
    if value <= 0:
        raise InputError(f"--rescale {text}: it must be above 0 (pixels are multiplied by it), "
                         "e.g. --rescale 1/255")
    return value


def scale_pixels(images: np.ndarray, scale: Fraction) -> np.ndarray:
    """``images`` times ``scale`` as float32, computed in float64 as numpy's ``x / 255`` is
    (the 2020 lab's own evaluation): 1/255 divides by 255 and 255 undoes it, bit for bit."""
    if scale == ONE:
        return images
    scaled = np.asarray(images, dtype=np.float64)
    if scale.numerator != 1:
        scaled = scaled * scale.numerator
    if scale.denominator != 1:
        scaled = scaled / scale.denominator
    return scaled.astype(np.float32)


def other_scale(scale: Fraction, high: float) -> Fraction:
    """The other usual scale: B sees raw 0-255 pixels under ``scale`` (the largest pixel it
    sees is above 1) then the other is /255, else x255."""
    return scale / 255 if high * scale > 1 else scale * 255


def flag_for(scale: Fraction) -> str:
    return "no --rescale (or --rescale 1)" if scale == ONE else f"--rescale {scale}"


def check_scale(model, lab_set, what: str = "the clean validation set") -> dict[Fraction, float]:
    """Run ``model`` on the first rows of ``lab_set`` under its scale and under the other usual
    one; return both accuracies (percent). When the other one is right at least :data:`MARGIN`
    points more often, raise :class:`InputError` with one line that says both and the flag."""
    from dataclasses import replace

    from pruning.prune import predict_classes

    pixels, labels = replace(lab_set, scale=ONE).read(0, min(lab_set.rows, SAMPLE_ROWS))
    given = lab_set.scale
    other = other_scale(given, float(pixels.max()))
    accuracy = {scale: float(np.mean(predict_classes(model, scale_pixels(pixels, scale)) == labels) * 100)
                for scale in (given, other)}
    if accuracy[other] >= accuracy[given] + MARGIN:
        raise InputError(
            f"B is right on {accuracy[given]:.1f} % of the first {len(labels)} images of {what} "
            f"({lab_set.path}) with pixels x {given} but on {accuracy[other]:.1f} % with pixels x "
            f"{other}: B takes pixels x {other}; pass {flag_for(other)}")
    return accuracy
