"""After the sweep: the curve, the selected B' models, GoodNets and the report files."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from pruning.backend import keras
import pandas as pd

from jobs.fine_pruning import file_label, save_fine_tuned
from jobs.inputs import versions
from jobs.outputs import GOODNET_NAME, MODEL_NAME, models_listed, remove_stale_models
from jobs.stopping import interrupt_held
from pruning.goodnet import build_goodnet, goodnet_scores
from pruning.counts import Counts
from pruning.data import poisoned_set, poisoned_suffixes
from pruning.prune import prune_conv_channels
from pruning.files import staged
from pruning.report import plot_curve, save_model, write_csv, write_json
from pruning.select import select_prefixes, threshold_label

log = logging.getLogger(__name__)


def curve_frame(order: pd.DataFrame, counts: dict[int, dict[str, Counts]]) -> pd.DataFrame:
    """results.csv from ``counts`` (``{k: {set: Counts}}``): one row per k = 0..C, percent,
    plus G's scores at every k; a column per set given (``valid_asr_NAME`` per named one)."""
    channels = len(order)
    rows = []
    for k in range(channels + 1):
        sets = counts[k]
        row = {"channels_pruned": k, "fraction_pruned": k / channels}
        for split in ("valid", "test"):
            if f"clean_{split}" in sets:
                row[f"{split}_accuracy"] = sets[f"clean_{split}"].percent("correct")
            for suffix in poisoned_suffixes(sets, split):
                row[f"{split}_asr{suffix}"] = sets[poisoned_set(split) + suffix].percent("correct")
        row["channel"] = int(order["channel"].iloc[k - 1]) if k else -1
        rows.append(row | {f"goodnet_{name}": value for name, value in test_scores(sets).items()})
    return pd.DataFrame(rows)


def test_scores(sets: dict[str, Counts]) -> dict[str, float]:
    """G's scores on the test sets given, in goodnet.csv's order: ``test_accuracy``, then
    ``test_asr`` and ``detection_rate`` of each poisoned test set (``_NAME`` for a named one),
    then ``false_alarm_rate``; none without a test set."""
    clean = sets.get("clean_test")
    per_set = {suffix: goodnet_scores(clean, sets[poisoned_set("test") + suffix])
               for suffix in poisoned_suffixes(sets, "test")} or {"": goodnet_scores(clean, None)}
    scores = {}
    for metric in ("test_accuracy", "test_asr", "detection_rate", "false_alarm_rate"):
        for suffix, each in per_set.items():
            if metric in each:
                scores[metric + ("" if metric in CLEAN_SCORES else suffix)] = each[metric]
    return scores


CLEAN_SCORES = ("test_accuracy", "false_alarm_rate")  # of the clean test set: one column each


def check_baseline(b: pd.Series, inputs) -> None:
    """Log B's own scores (the curve at k = 0) and warn where the inputs look swapped or
    transformed: the sweep runs either way, but its numbers would mean little."""
    sets = {name: s.path for name, s in inputs.sets.items()}
    said = []
    for split, words in (("valid", "validation"), ("test", "test")):
        scores = [f"accuracy {b[f'{split}_accuracy']:.2f} %"] if f"clean_{split}" in sets else []
        scores += [f"ASR{suffix.replace('_', ' ', 1)} {b[f'{split}_asr{suffix}']:.2f} %"
                   for suffix in poisoned_suffixes(sets, split)]
        said += [f"{words} {', '.join(scores)}"] if scores else []
    log.info("B: %s", "; ".join(said))
    if not any(name.startswith("poisoned_") for name in sets):
        log.info("no poisoned set given: the attack success rate was not measured (B' and G are "
                 "selected and saved on clean accuracy alone)")
    for suffix in poisoned_suffixes(sets, "valid"):
        if b[f"valid_asr{suffix}"] < 50:
            log.warning("B's attack success rate on %s is only %.1f %%: is it the poisoned set, "
                        "with the trigger, labelled with the attacker's target?",
                        sets[poisoned_set("valid") + suffix], b[f"valid_asr{suffix}"])
    if "test_accuracy" in b and abs(b["valid_accuracy"] - b["test_accuracy"]) > 20:
        log.warning("B's clean accuracy is %.1f %% on %s but %.1f %% on %s: are both clean sets "
                    "of B's task, stored alike?", b["valid_accuracy"], sets["clean_valid"],
                    b["test_accuracy"], sets["clean_test"])


def write_outputs(inputs, args, out: Path, order: pd.DataFrame, counts, timings,
                  reused: dict, tuned: dict | None = None) -> list[str]:
    """Write every output file and return their names: all of them, or none if the run fails
    or is stopped on the way (the earlier run's outputs then stay as they were). ``tuned``:
    the fine-tuning runs (jobs.fine_pruning), or None without --fine-tune."""
    started = time.perf_counter()
    earlier = models_listed(out, tuned is not None)  # before this run's manifest replaces the earlier run's
    counts = {k: {name: sets[name] for name in inputs.sets} for k, sets in counts.items()}  # columns in flag order
    curve = curve_frame(order, counts)
    check_baseline(curve.iloc[0], inputs)
    selected = select_prefixes(curve, args.thresholds, args.relative)
    with staged() as replace_all:
        written, goodnet_rows = save_models(inputs, args, out, order, counts, selected)
        columns = ["threshold", "channels_pruned", *test_scores(counts[0])]
        goodnet = pd.DataFrame(goodnet_rows, columns=columns)
        goodnet["channels_pruned"] = goodnet["channels_pruned"].astype("Int64")
        write_csv(out / "goodnet.csv", goodnet)
        write_csv(out / "channel_order.csv", order)
        write_csv(out / "results.csv", curve)
        finepruning = None
        if tuned is not None:
            models, finepruning, epochs = save_fine_tuned(inputs, out, tuned, test_scores)
            write_csv(out / "finepruning.csv", finepruning)
            write_csv(out / "finetune_log.csv", epochs)
            written += [*models, "finepruning.csv", "finetune_log.csv"]
        plot_curve(curve, selected, out / "results.png", finepruning)
        written += ["goodnet.csv", "channel_order.csv", "results.csv", "results.png"]
        timings = dict(timings, outputs_s=time.perf_counter() - started)
        write_json(out / "manifest.json", manifest(inputs, args, selected, timings, reused, tuned))
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
        scores = test_scores(counts[k])
        goodnet_rows.append({"threshold": threshold, "channels_pruned": k, **scores})
        log.info("X=%s: k=%d channels%s", label, k, "".join(
            f"{'; G test' if name == 'test_accuracy' or i == 0 else ','} "
            f"{name.replace('test_', '').replace('_rate', '').replace('asr', 'ASR').replace('_', ' ')} {value:.3f} %"
            for i, (name, value) in enumerate(scores.items()) if name != "false_alarm_rate"))
    return written, goodnet_rows


def manifest(inputs, args, selected, timings, reused, tuned=None) -> dict:
    fine_tune = {} if tuned is None else {"fine_tune": {
        "settings": asdict(args.fine_tune_settings),
        "runs": {file_label(run): {"channels_pruned": len(pruned), "epochs": result.epochs}
                 for run, (_, pruned, result) in tuned.items()}}}
    return fine_tune | {
        "inputs": {name: {"path": str(Path(path).resolve()), "sha256": inputs.hashes[name]}
                   for name, path in inputs.paths.items()},
        "demo": (args.demo or "standard") if inputs.demo else False,
        "weights_only": inputs.spec.weights_only,
        "layer": inputs.conv,
        "read_at": inputs.read,
        "channels": inputs.channels,
        "classes": inputs.classes,
        "rows": {name: s.rows for name, s in inputs.sets.items()},
        "rescale": str(inputs.rescale),
        "thresholds": list(args.thresholds),
        "relative": args.relative,
        "selected": {threshold_label(t): k for t, k in selected.items()},
        "versions": versions(),
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        "checkpoints": reused,  # a resumed run's timings cover only the work it did
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

