"""Files in the output folder: the curve, B', G and their plot, each written whole
(:mod:`pruning.files`).

A reader (or a resumed run) never sees a half-written ``results.csv`` or model, and files that
do not depend on when they were written (the curve, B', G) are byte-identical between runs.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pruning.files import atomic_path
from pruning.select import threshold_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# The files of an output folder: the reports, and per threshold X reached B' and G (formatted
# with the threshold's label), per fine-tuning run ("X=2" ... or "B") the fine-tuned model and G.
REPORT_NAMES = ("results.csv", "channel_order.csv", "goodnet.csv", "results.png", "manifest.json")
MODEL_NAME = "model_X={}.h5"
GOODNET_NAME = "goodnet_X={}.keras"
FINETUNED_NAME = "finetuned_{}.h5"
GOODNET_FINETUNED_NAME = "goodnet_finetuned_{}.keras"
FINE_TUNE_REPORTS = ("finepruning.csv", "finetune_log.csv")

CURVE_COLUMNS = ["channels_pruned", "fraction_pruned", "valid_accuracy", "valid_asr",
                 "test_accuracy", "test_asr"]
GOODNET_COLUMNS = ["threshold", "channels_pruned", "test_accuracy", "test_asr",
                   "detection_rate", "false_alarm_rate"]


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    # repr-exact floats: the curve is a contract other tools read back.
    write_text(path, frame.to_csv(index=False, float_format=None))


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_model(model, path: str | os.PathLike) -> None:
    """Save a Keras model (``.h5`` legacy or ``.keras``) atomically and reproducibly."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with _quiet_legacy_warning():
            model.save(temporary)
        if path.suffix == ".keras":
            _strip_save_date(temporary)


def _strip_save_date(path: Path) -> None:
    """Keras stamps the save time into a .keras zip, and numbers objects that layers share by
    their memory address; drop the one and renumber the other, so equal models give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(buffer, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif item.filename == "config.json" and b"shared_object_id" in data:
                data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
            target.writestr(zipfile.ZipInfo(item.filename, date_time=(1980, 1, 1, 0, 0, 0)),
                            data, compress_type=item.compress_type)
    path.write_bytes(buffer.getvalue())


def _renumber_shared_objects(config, numbers: dict):
    """``config`` with each ``shared_object_id`` replaced by 1, 2, ... in order of first use."""
    if isinstance(config, list):
        return [_renumber_shared_objects(item, numbers) for item in config]
    if not isinstance(config, dict):
        return config
    renumbered = {key: _renumber_shared_objects(value, numbers) for key, value in config.items()}
    if "shared_object_id" in config:
        renumbered["shared_object_id"] = numbers.setdefault(config["shared_object_id"], len(numbers) + 1)
    return renumbered


@contextlib.contextmanager
def _quiet_legacy_warning():
    # The lab's format is .h5 on purpose (model_X=2.h5); Keras warns that it is legacy.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def plot_curve(curve: pd.DataFrame, selected: dict, path: str | os.PathLike,
               finepruning: pd.DataFrame | None = None) -> None:
    """Write results.png (see ``curve_figure``); the same inputs give the same bytes."""
    with atomic_path(path) as temporary:
        curve_figure(curve, selected, finepruning).savefig(temporary, format="png")


def curve_figure(curve: pd.DataFrame, selected: dict[float, int | None],
                 finepruning: pd.DataFrame | None = None) -> Figure:
    """results.png's figure: accuracy and ASR in percent against the fraction pruned, B' (valid
    and test) on top, G (test) below.

    ``curve`` is results.csv; ``selected`` maps each threshold X to its k, or None where it was
    never reached. Each selected k is a dotted line with one label for all the X that chose it;
    unreached thresholds are named in B''s legend.
    """
    # A Figure of its own needs no pyplot and no backend: a library does not choose the
    # process's backend, and nothing is left open in pyplot's registry.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    # G's curves track B''s within a few points (G answers B's class wherever B and B' agree),
    # so on one axes they hide each other: G gets its own panel, on the same x and y scales.
    if finepruning is None:
        figure = Figure(figsize=(8, 7.5), dpi=120, layout="constrained")
        top, bottom = figure.subplots(2, 1, sharex=True, sharey=True, height_ratios=[3, 2])
    else:  # a third panel: each fine-tuning run's test scores before and after
        figure = Figure(figsize=(8, 10.5), dpi=120, layout="constrained")
        top, bottom, after = figure.subplots(3, 1, height_ratios=[3, 2, 2.2])
        bottom.sharex(top)
        bottom.sharey(top)
        top.tick_params(labelbottom=False)
        fine_tuning_panel(after, curve, finepruning)
    x = 100 * curve["fraction_pruned"]
    # one colour per poisoned set (C3: a bare one's, as before sets were named), valid solid,
    # test dashed; only the columns of the sets given
    suffixes = list(dict.fromkeys(column.partition("_asr")[2] for column in curve.columns
                                  if column.startswith(("valid_asr", "test_asr"))))
    colours = itertools.cycle(["C1", "C4", "C5", "C6", "C7", "C8", "C9"])
    lines = [(f"{split}_accuracy", f"C0{dash}", f"accuracy ({split})") for split, dash in SPLITS]
    for suffix in suffixes:
        colour, name = ("C3", "") if not suffix else (next(colours), f", {suffix[1:]}")
        lines += [(f"{split}_asr{suffix}", f"{colour}{dash}", f"attack success rate{name} ({split})")
                  for split, dash in SPLITS]
    for column, style, label in lines:
        if column in curve:
            top.plot(x, curve[column], style, label=label)
    goodnet = [(column, column.replace("goodnet_test_asr", "G attack success rate").replace("_", ", ", 1))
               for column in curve.columns if column.startswith("goodnet_test_asr")]
    for column, label in [("goodnet_test_accuracy", "G accuracy")] + goodnet:
        if column in curve:
            colour = {"goodnet_test_accuracy": "tab:green", "goodnet_test_asr": "tab:orange"}.get(column)
            bottom.plot(x, curve[column], color=colour, label=f"{label} (test)")

    channels = int(curve["channels_pruned"].max())
    by_k: dict[int, list[str]] = {}
    for threshold, k in sorted(selected.items(), key=lambda item: item[0]):
        by_k.setdefault(k, []).append(threshold_label(threshold))
    unreached = by_k.pop(None, [])
    levels = _label_levels([100 * k / channels for k in sorted(by_k)])
    for (k, labels), level in zip(sorted(by_k.items()), levels):
        position = 100 * k / channels
        for axes in (top, bottom):
            axes.axvline(position, color="grey", lw=0.8, ls=":", zorder=1)
        top.text(position, LABEL_HEIGHTS[level],
                 f"X={', '.join(labels)} (k={k})", transform=top.get_xaxis_transform(),
                 rotation=90, fontsize=8, color="dimgrey", ha="center", va="center", zorder=3,
                 bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="lightgrey"))

    handles, _ = top.get_legend_handles_labels()
    if unreached:  # a text-only legend row: the threshold has no line to mark
        handles.append(Line2D([], [], linestyle="none",
                              label=f"X={', '.join(unreached)}: not reached"))
    top.legend(handles=handles, loc="lower left", fontsize=8)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="lower left", fontsize=8)
    else:
        bottom.text(0.5, 0.5, "no test set given", transform=bottom.transAxes, ha="center",
                    color="dimgrey")
    top.set_title("B': B with the first k channels pruned", fontsize=10)
    bottom.set_title("G: B's class where B and B' agree, else class N", fontsize=10)
    figure.suptitle("Fine-pruning sweep: accuracy and attack success rate")
    for axes in (top, bottom):
        axes.set_ylabel("percent")
    top.set_ylim(-2, 102)
    bottom.set_xlabel(f"channels pruned (% of {channels})")
    return figure


def fine_tuning_panel(axes, curve: pd.DataFrame, finepruning: pd.DataFrame) -> None:
    """Bars per fine-tuning run: test accuracy and ASR of the model before fine-tuning (B'_k,
    or B: the curve at its k) and after (finepruning.csv)."""
    import numpy as np

    scores = [(column, name) for column, name in (("test_accuracy", "accuracy"), ("test_asr", "ASR"))
              if column in finepruning]
    axes.set_title("Fine-tuning: test scores before and after", fontsize=10)
    if not scores:
        axes.text(0.5, 0.5, "no test set given", transform=axes.transAxes, ha="center", color="dimgrey")
        return
    x = np.arange(len(finepruning))
    width = 0.8 / (2 * len(scores))
    before = curve.set_index("channels_pruned").loc[finepruning["channels_pruned"]]
    bars = 0
    for column, name in scores:
        for values, when, hatch in ((before[column].to_numpy(), "before", "//"),
                                    (finepruning[column].to_numpy(), "after", "")):
            colour = "C0" if column == "test_accuracy" else "C3"
            axes.bar(x - 0.4 + width * (bars + 0.5), values, width, color=colour, hatch=hatch,
                     alpha=0.45 if when == "before" else 1.0, label=f"{name} {when}")
            bars += 1
    axes.set_xticks(x, [f"{run}\n(k={k})" for run, k in zip(finepruning["run"], finepruning["channels_pruned"])],
                    fontsize=8)
    axes.set_ylim(0, 102)
    axes.set_ylabel("percent")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7, ncols=4)


SPLITS = (("valid", "-"), ("test", "--"))  # line styles of the validation and test sets

# Heights (fraction of the axes) of the threshold labels, by level: the middle of the panel is
# clear of the curves but for the drops, which a label's white box hides only locally.
LABEL_HEIGHTS = (0.5, 0.22, 0.78)


def _label_levels(positions: list[float], gap: float = 3.5) -> list[int]:
    """For sorted x positions (percent), each label's level (index into ``LABEL_HEIGHTS``): the
    lowest whose labels so far are all ``gap`` to the left, so labels of near-equal k do not
    overlap; when none is free, the level whose last label is farthest.
    A rotated label's box is about 20 pixels wide; 3.5 % of the x axis is about 27."""
    last = [-math.inf] * len(LABEL_HEIGHTS)  # per level, the position of its rightmost label
    levels = []
    for position in positions:
        free = [level for level, right in enumerate(last) if position - right >= gap]
        level = free[0] if free else last.index(min(last))
        last[level] = position
        levels.append(level)
    return levels
