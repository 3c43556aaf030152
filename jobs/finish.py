"""After the sweep: the curve, the selected B' models, GoodNets and the report files."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pruning.backend import keras
import pandas as pd

from jobs.inputs import versions
from jobs.outputs import GOODNET_NAME, MODEL_NAME, models_listed, remove_stale_models
from jobs.stopping import interrupt_held
from pruning.goodnet import build_goodnet, goodnet_scores
from pruning.counts import Counts
from pruning.prune import prune_conv_channels
from pruning.report import (CURVE_COLUMNS, GOODNET_COLUMNS, plot_curve, save_model, staged,
                            write_csv, write_json)
from pruning.select import select_prefixes, threshold_label

log = logging.getLogger(__name__)


def curve_frame(order: pd.DataFrame, counts: dict[int, dict[str, Counts]]) -> pd.DataFrame:
    """results.csv from ``counts`` (``{k: {set: Counts}}``): one row per k = 0..C, percent,
    plus G's scores at every k."""
    channels = len(order)
    rows = []
    for k in range(channels + 1):
        sets = counts[k]
        rows.append({
            "channels_pruned": k,
            "fraction_pruned": k / channels,
            "valid_accuracy": sets["clean_valid"].percent("correct"),
            "valid_asr": sets["poisoned_valid"].percent("correct"),
            "test_accuracy": sets["clean_test"].percent("correct"),
            "test_asr": sets["poisoned_test"].percent("correct"),
            "channel": int(order["channel"].iloc[k - 1]) if k else -1,
            **{f"goodnet_{name}": value
               for name, value in goodnet_scores(sets["clean_test"], sets["poisoned_test"]).items()},
        })
    frame = pd.DataFrame(rows)
    return frame[CURVE_COLUMNS + [c for c in frame.columns if c not in CURVE_COLUMNS]]


def check_baseline(b: pd.Series, inputs) -> None:
    """Log B's own scores (the curve at k = 0) and warn where the inputs look swapped or
    transformed: the sweep runs either way, but its numbers would mean little."""
    log.info("B: validation accuracy %.2f %%, ASR %.2f %%; test accuracy %.2f %%, ASR %.2f %%",
             b["valid_accuracy"], b["valid_asr"], b["test_accuracy"], b["test_asr"])
    sets = {name: s.path for name, s in inputs.sets.items()}
    if b["valid_asr"] < 50:
        log.warning("B's attack success rate on %s is only %.1f %%: is it the poisoned set, with "
                    "the trigger, labelled with the attacker's target?", sets["poisoned_valid"],
                    b["valid_asr"])
    if abs(b["valid_accuracy"] - b["test_accuracy"]) > 20:
        log.warning("B's clean accuracy is %.1f %% on %s but %.1f %% on %s: are both clean sets "
                    "of B's task, stored alike?", b["valid_accuracy"], sets["clean_valid"],
                    b["test_accuracy"], sets["clean_test"])


def write_outputs(inputs, args, out: Path, order: pd.DataFrame, counts, timings,
                  reused: dict) -> list[str]:
    """Write every output file and return their names: all of them, or none if the run fails
    or is stopped on the way (the earlier run's outputs then stay as they were)."""
    started = time.perf_counter()
    earlier = models_listed(out)  # before this run's manifest replaces the earlier run's
    curve = curve_frame(order, counts)
    check_baseline(curve.iloc[0], inputs)
    selected = select_prefixes(curve, args.thresholds, args.relative)
    with staged() as replace_all:
        written, goodnet_rows = save_models(inputs, args, out, order, counts, selected)
        goodnet = pd.DataFrame(goodnet_rows, columns=GOODNET_COLUMNS)
        goodnet["channels_pruned"] = goodnet["channels_pruned"].astype("Int64")
        write_csv(out / "goodnet.csv", goodnet)
        write_csv(out / "channel_order.csv", order)
        write_csv(out / "results.csv", curve)
        plot_curve(curve, selected, out / "results.png")
        written += ["goodnet.csv", "channel_order.csv", "results.csv", "results.png"]
        timings = dict(timings, outputs_s=time.perf_counter() - started)
        write_json(out / "manifest.json", manifest(inputs, args, selected, timings, reused))
        written.append("manifest.json")
        # The renames take a moment; a stop in it would leave some new files among the
        # earlier run's. It is held, and dropped: the run is done.
        with interrupt_held():
            replace_all()
            remove_stale_models(out, written, earlier)
    return written


def save_models(inputs, args, out: Path, order: pd.DataFrame, counts,
                selected: dict) -> tuple[list[str], list[dict]]:
    """Save B' and G for each threshold reached; return their names and goodnet.csv's rows."""
    bd_model = inputs.spec.load()
    channels = order["channel"].tolist()
    written, goodnet_rows = [], []
    for threshold, k in selected.items():
        label = threshold_label(threshold)
        if k is None:
            log.warning("threshold X=%s never reached: pruning all %d channels keeps validation "
                        "accuracy within %s %s of B's", label, len(channels), label,
                        "percent" if args.relative else "points")
            goodnet_rows.append({"threshold": threshold, "channels_pruned": None})
            continue
        pruned = prune_conv_channels(bd_model, inputs.conv, channels[:k])
        save_model(pruned, out / MODEL_NAME.format(label))
        # Keras numbers unnamed ops per process; reset so G's file does not depend on what
        # ran before it (a resumed run, a SLURM run and a local run give the same bytes).
        keras.backend.clear_session()
        save_model(build_goodnet(bd_model, pruned), out / GOODNET_NAME.format(label))
        written += [MODEL_NAME.format(label), GOODNET_NAME.format(label)]
        sets = counts[k]
        scores = goodnet_scores(sets["clean_test"], sets["poisoned_test"])
        goodnet_rows.append({"threshold": threshold, "channels_pruned": k, **scores})
        log.info("X=%s: k=%d channels; G test accuracy %.3f %%, ASR %.3f %%, detection %.3f %%",
                 label, k, scores["test_accuracy"], scores["test_asr"], scores["detection_rate"])
    return written, goodnet_rows


def manifest(inputs, args, selected, timings, reused) -> dict:
    return {
        "inputs": {name: {"path": str(Path(path).resolve()), "sha256": inputs.hashes[name]}
                   for name, path in inputs.paths.items()},
        "demo": inputs.demo,
        "weights_only": inputs.spec.weights_only,
        "layer": inputs.conv,
        "read_at": inputs.read,
        "channels": inputs.channels,
        "classes": inputs.classes,
        "rows": {name: s.rows for name, s in inputs.sets.items()},
        "thresholds": list(args.thresholds),
        "relative": args.relative,
        "selected": {threshold_label(t): k for t, k in selected.items()},
        "versions": versions(),
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        "checkpoints": reused,  # a resumed run's timings cover only the work it did
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

