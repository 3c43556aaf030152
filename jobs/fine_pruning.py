"""Fine-pruning in the sweep (``--fine-tune``): after selection, each selected B'_X and B itself
are fine-tuned on clean validation data, one Dask task per distinct model; then their files.

Runs are named ``X=2``, ``X=4``, ... and ``fine-tune only`` (B fine-tuned, the paper's
comparison); their files ``finetuned_X=2.h5`` ... ``finetuned_B.h5`` and
``goodnet_finetuned_X=2.keras`` ... (G from B and the fine-tuned model). A task keeps its
training state in ``OUT/checkpoints/finetune-k<K>-<key>/`` (:mod:`pruning.finetune`), keyed on
the inputs, the settings and the pruned channels, so that a stopped run resumes mid-training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from distributed import as_completed

from jobs.outputs import FINETUNED_NAME, GOODNET_FINETUNED_NAME
from jobs.progress import progress
from pruning.select import select_prefixes, threshold_label

log = logging.getLogger("jobs.sweep")

ONLY = "fine-tune only"  # the run of B itself


def file_label(run: str) -> str:
    return "B" if run == ONLY else run


def runs_to_tune(curve: pd.DataFrame, order: pd.DataFrame, args) -> dict[str, tuple[float | None, tuple[int, ...]]]:
    """``run -> (threshold, pruned channels)``: each threshold reached, then B itself."""
    selected = select_prefixes(curve, args.thresholds, args.relative)
    channels = [int(c) for c in order["channel"]]
    runs = {f"X={threshold_label(t)}": (t, tuple(channels[:k])) for t, k in selected.items() if k is not None}
    return runs | {ONLY: (None, ())}


def folder_name(fingerprint: dict, settings, pruned: tuple[int, ...]) -> str:
    """The checkpoint folder of one fine-tuning: another input, setting or B' is another folder."""
    key = json.dumps([fingerprint, asdict(settings), list(pruned)], sort_keys=True, default=str)
    return f"finetune-k{len(pruned)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_fine_tuning(inputs, args, client, checkpoints, order: pd.DataFrame, counts) -> dict:
    """Fine-tune every run's model as Dask tasks; return ``run -> (threshold, pruned,
    FineTuneResult)``. Progress is shown in epochs (each task reports its own)."""
    from jobs.finish import curve_frame
    from jobs.tasks import fine_tune_task

    settings = args.fine_tune_settings
    runs = runs_to_tune(curve_frame(order, counts), order, args)
    tag = uuid.uuid4().hex[:8]
    topic = f"fine-tune-{tag}"
    models = list(dict.fromkeys(pruned for _, pruned in runs.values()))  # one task per distinct model
    pending = {client.submit(fine_tune_task, inputs.spec, inputs.conv, inputs.sets, pruned, settings,
                             # absolute: workers of a joined cluster may run in another folder
                             os.path.abspath(checkpoints.folder / folder_name(checkpoints.fingerprint, settings, pruned)),
                             topic, key=f"fine-tune-k{len(pruned)}-{tag}"): pruned for pruned in models}
    log.info("fine-tuning %d models (%s) for up to %d epochs each", len(models),
             ", ".join(runs), settings.epochs)
    results, told = {}, {len(pruned): 0 for pruned in models}
    with progress(len(models) * settings.epochs, "epochs", "epoch") as bar:
        def epoch_done(event):
            told[event[1]["pruned"]] += 1
            bar.update(1)

        client.subscribe_topic(topic, epoch_done)
        try:
            for future in as_completed(pending):
                pruned = pending.pop(future)
                results[pruned] = future.result()
                bar.update(settings.epochs - told[len(pruned)])  # stopped early, or resumed
                told[len(pruned)] = settings.epochs
        finally:
            client.unsubscribe_topic(topic)
    return {run: (threshold, pruned, results[pruned]) for run, (threshold, pruned) in runs.items()}


def save_fine_tuned(inputs, out: Path, tuned: dict, test_scores) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Save each run's fine-tuned model and its G; return their names, finepruning.csv's and
    finetune_log.csv's frames. ``test_scores``: G's scores from tallies (jobs.finish)."""
    from pruning.backend import keras
    from pruning.goodnet import build_goodnet
    from pruning.prune import prune_conv_channels
    from pruning.report import save_model

    bd_model = inputs.spec.load()
    written, rows, logs = [], [], []
    for run, (threshold, pruned, result) in tuned.items():
        model = prune_conv_channels(bd_model, inputs.conv, pruned)
        model.set_weights(result.weights)
        label = file_label(run)
        save_model(model, out / FINETUNED_NAME.format(label))
        keras.backend.clear_session()  # G's file must not depend on what ran before (jobs.finish)
        save_model(build_goodnet(bd_model, model), out / GOODNET_FINETUNED_NAME.format(label))
        written += [FINETUNED_NAME.format(label), GOODNET_FINETUNED_NAME.format(label)]
        row = {"run": run, "threshold": threshold, "channels_pruned": len(pruned),
               "epochs": result.epochs,
               "heldout_accuracy": result.heldout_accuracy}
        sets = result.counts
        if "clean_test" in sets:
            row["test_accuracy"] = sets["clean_test"].percent("correct")
        row |= {"test_asr" + name[len("poisoned_test"):]: counts.percent("correct")
                for name, counts in sets.items() if name.startswith("poisoned_test")}
        rows.append(row | {f"goodnet_{name}": value for name, value in test_scores(sets).items()})
        logs.append(result.log.assign(run=run)[["run", *result.log.columns]])
        log.info("%s: %d channels pruned, %d epochs kept, held-out accuracy %.2f %%%s", run,
                 len(pruned), result.epochs, row["heldout_accuracy"],
                 "".join(f", {name.replace('_', ' ')} {row[name]:.2f} %" for name in row
                         if name.startswith(("test_accuracy", "test_asr"))))
    summary = pd.DataFrame(rows)
    summary["threshold"] = summary["threshold"].astype("Float64")
    return written, summary, pd.concat(logs, ignore_index=True)
