"""The pruning defense in one call, and what it gives: the curve, the channel order, the
selected B'_X and their GoodNets G, and the files the command line writes.

    import pruning
    defense = pruning.defend("bd_net.h5", clean_valid=(x, y), poisoned_valid=(xp, yp),
                             clean_test=(x2, y2), poisoned_test=(xq, yq), thresholds=(2, 4, 10))
    defense.curve             # results.csv's columns, one row per k
    defense.bprime(2)         # B'_X as a keras.Model; defense.goodnet(2): G
    defense.save("results/")  # the files of ``python -m jobs.sweep``

The command line (:mod:`jobs.sweep`) builds the same :class:`Defense` from the same sweep
(:func:`run_defense`), with checkpoints and a Dask cluster around it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pruning.counts import Counts
from pruning.data import CHUNK_ROWS, PREFIXES_PER_TASK, InputError, poisoned_set, poisoned_suffixes
from pruning.goodnet import goodnet_scores
from pruning.inputs import InMemoryModel, SweepInputs, check_thresholds, inspect_inputs, versions
from pruning.report import FINETUNED_NAME, GOODNET_FINETUNED_NAME, GOODNET_NAME, MODEL_NAME
from pruning.select import select_prefixes, threshold_label
from pruning.sweep import (FINE_TUNE_ONLY, InProcess, NoCheckpoints,
                           run_fine_tuning, run_sweep, runs_to_tune)

log = logging.getLogger(__name__)

def run_defense(inputs: SweepInputs, client, checkpoints, thresholds, relative: bool = False,
                fine_tune=None, chunk_rows: int = CHUNK_ROWS, prefixes_per_task: int = PREFIXES_PER_TASK,
                swept=None) -> Defense:
    """The defense: the sweep (unless ``swept`` holds its result, read back from checkpoints),
    selection, and with ``fine_tune`` (:class:`pruning.finetune_settings.Settings`) the
    fine-tuning of each selected B' and of B. ``client``: Dask's, or :class:`InProcess`."""
    if swept is None:
        swept = run_sweep(inputs, client, checkpoints, chunk_rows, prefixes_per_task)
    order, counts, timings, reused = swept
    defense = Defense(inputs, order, counts, tuple(thresholds), relative, fine_tune, timings, reused)
    if fine_tune is not None:
        started = time.perf_counter()
        runs = runs_to_tune(defense.selected, order)
        defense.tuned = run_fine_tuning(inputs, client, checkpoints, runs, fine_tune)
        defense.timings["fine_tune_s"] = time.perf_counter() - started
    return defense


def defend(model, clean_valid, clean_test=None, poisoned_valid=None, poisoned_test=None, *,
           thresholds=(2, 4, 10), relative: bool = False, layer: str | None = None, rescale=1,
           fine_tune=None, client=None, chunk_rows: int = CHUNK_ROWS,
           prefixes_per_task: int = PREFIXES_PER_TASK) -> Defense:
    """Run the pruning defense on B (``model``: a keras.Model or a model file) and return the
    :class:`Defense`.

    A set is ``(images, labels)`` (images N x H x W x C, or N x C x H x W like the lab's files;
    labels class numbers) or a lab HDF5 path. A poisoned set may be several, by name:
    ``{"sunglasses": set, "lipstick": set}`` (columns ``valid_asr_sunglasses``, ...).
    ``thresholds``: accuracy drops X in points (percent of B's accuracy with ``relative``).
    ``rescale``: what pixels are multiplied by before B (``"1/255"``). ``fine_tune``: True, a
    dict of :class:`pruning.finetune_settings.Settings` fields, or Settings: fine-tune each B'
    and B (fine-pruning). ``client``: a ``distributed.Client`` to spread the work; without one
    it runs in this process. The results equal ``python -m jobs.sweep``'s on the same data."""
    from pruning.finetune_settings import Settings
    from pruning.models import ModelSpec
    from pruning.scaling import parse_rescale

    thresholds = tuple(float(t) for t in thresholds)  # 2.0 as the command line reads it
    check_thresholds(thresholds, relative)
    if isinstance(model, (str, os.PathLike)):
        spec = ModelSpec(str(model)).stamped()
    else:
        spec = InMemoryModel(model)
    sources = {}
    for split, clean, poisoned in (("valid", clean_valid, poisoned_valid), ("test", clean_test, poisoned_test)):
        if clean is not None:
            sources[f"clean_{split}"] = clean
        named = poisoned if isinstance(poisoned, dict) else {} if poisoned is None else {"": poisoned}
        sources |= {poisoned_set(split, name): source for name, source in named.items()}
    if clean_valid is None:
        raise InputError("clean_valid is needed: B' is selected on the clean validation set")
    inputs = inspect_inputs(spec, sources, layer, parse_rescale(rescale))
    settings = (None if fine_tune in (None, False) else Settings() if fine_tune is True
                else Settings(**fine_tune) if isinstance(fine_tune, dict) else fine_tune)
    return run_defense(inputs, client or InProcess(), NoCheckpoints(), thresholds, relative,
                       settings, chunk_rows, prefixes_per_task)


@dataclass
class Defense:
    """The defense's result (:func:`defend`): ``order`` (channel_order.csv), ``counts``
    (``{k: {set: Counts}}``), ``curve`` (results.csv), ``selected`` (``{X: k}``, None where X
    is never reached), and with fine-tuning ``tuned`` (``run -> (X, pruned, FineTuneResult)``)."""

    inputs: SweepInputs
    order: pd.DataFrame
    counts: dict
    thresholds: tuple
    relative: bool = False
    fine_tune: object = None
    timings: dict = field(default_factory=dict)
    reused: dict = field(default_factory=dict)
    tuned: dict | None = None

    def __post_init__(self):  # columns in the inputs' order
        self.counts = {k: {name: sets[name] for name in self.inputs.sets} for k, sets in self.counts.items()}
        self.curve = curve_frame(self.order, self.counts)
        self.selected = select_prefixes(self.curve, self.thresholds, self.relative)
        check_baseline(self.curve.iloc[0], self.inputs)

    @property
    def channels(self) -> list[int]:
        return [int(c) for c in self.order["channel"]]

    def prefix(self, threshold: float) -> int:
        """k of B'_X: the selected one, or for another X the first prefix that reaches it."""
        k = self.selected.get(threshold) if threshold in self.selected else \
            select_prefixes(self.curve, [threshold], self.relative)[threshold]
        if k is None:
            raise ValueError(f"threshold X={threshold_label(threshold)} is never reached: pruning all "
                             f"{len(self.order)} channels keeps validation accuracy within it")
        return k

    def bprime(self, threshold: float):
        """B'_X: B with the first k channels of the order pruned (a new keras.Model)."""
        from pruning.prune import prune_conv_channels
        return prune_conv_channels(self.inputs.spec.load(), self.inputs.conv, self.channels[:self.prefix(threshold)])

    def goodnet(self, threshold: float):
        """G for B'_X: B's class where B and B'_X agree, else class N ("poisoned")."""
        from pruning.goodnet import build_goodnet
        return build_goodnet(self.inputs.spec.load(), self.bprime(threshold))

    def save(self, folder) -> list[str]:
        """Write the command line's files into ``folder`` (created if need be); return their names."""
        from pruning.files import staged
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with staged() as replace_all:
            written = self.write(folder)
            replace_all()
        return written

    def write(self, out: Path) -> list[str]:
        """Write every file into ``out``, within :func:`pruning.report.staged` (the caller
        replaces them all at once); return their names."""
        from pruning.report import plot_curve, write_csv, write_json
        started = time.perf_counter()
        written, goodnet_rows = self.save_models(out)
        columns = ["threshold", "channels_pruned", *test_scores(self.counts[0])]
        goodnet = pd.DataFrame(goodnet_rows, columns=columns)
        goodnet["channels_pruned"] = goodnet["channels_pruned"].astype("Int64")
        write_csv(out / "goodnet.csv", goodnet)
        write_csv(out / "channel_order.csv", self.order)
        write_csv(out / "results.csv", self.curve)
        finepruning = None
        if self.tuned is not None:
            models, finepruning, epochs = self.save_fine_tuned(out)
            write_csv(out / "finepruning.csv", finepruning)
            write_csv(out / "finetune_log.csv", epochs)
            written += [*models, "finepruning.csv", "finetune_log.csv"]
        plot_curve(self.curve, self.selected, out / "results.png", finepruning)
        written += ["goodnet.csv", "channel_order.csv", "results.csv", "results.png"]
        timings = dict(self.timings, outputs_s=time.perf_counter() - started)
        write_json(out / "manifest.json", self.manifest(timings))
        return written + ["manifest.json"]

    def save_models(self, out: Path) -> tuple[list[str], list[dict]]:
        """Save B' and G for each threshold reached; return their names and goodnet.csv's rows."""
        from pruning.backend import keras
        from pruning.goodnet import build_goodnet
        from pruning.prune import prune_conv_channels
        from pruning.report import save_model

        bd_model = self.inputs.spec.load()
        written, goodnet_rows = [], []
        for threshold, k in self.selected.items():
            label = threshold_label(threshold)
            if k is None:
                log.warning("threshold X=%s never reached: pruning all %d channels keeps validation "
                            "accuracy within %s %s of B's", label, len(self.order), label,
                            "percent" if self.relative else "points")
                goodnet_rows.append({"threshold": threshold, "channels_pruned": None})
                continue
            pruned = prune_conv_channels(bd_model, self.inputs.conv, self.channels[:k])
            save_model(pruned, out / MODEL_NAME.format(label))
            # Keras numbers unnamed ops per process; reset so G's file does not depend on what
            # ran before it (a resumed run, a SLURM run and a local run give the same bytes).
            # Only the names: a garbage collection each time (free_memory) took 0.2 s.
            keras.backend.clear_session(free_memory=False)
            save_model(build_goodnet(bd_model, pruned), out / GOODNET_NAME.format(label))
            written += [MODEL_NAME.format(label), GOODNET_NAME.format(label)]
            scores = test_scores(self.counts[k])
            goodnet_rows.append({"threshold": threshold, "channels_pruned": k, **scores})
            log.info("X=%s: k=%d channels%s", label, k, "".join(
                f"{'; G test' if name == 'test_accuracy' or i == 0 else ','} "
                f"{name.replace('test_', '').replace('_rate', '').replace('asr', 'ASR').replace('_', ' ')} {value:.3f} %"
                for i, (name, value) in enumerate(scores.items()) if name != "false_alarm_rate"))
        return written, goodnet_rows

    def save_fine_tuned(self, out: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
        """Save each fine-tuning run's model and its G; return their names, finepruning.csv's
        and finetune_log.csv's frames."""
        from pruning.backend import keras
        from pruning.goodnet import build_goodnet
        from pruning.prune import prune_conv_channels
        from pruning.report import save_model

        bd_model = self.inputs.spec.load()
        written, rows, logs = [], [], []
        for run, (threshold, pruned, result) in self.tuned.items():
            model = prune_conv_channels(bd_model, self.inputs.conv, pruned)
            model.set_weights(result.weights)
            label = "B" if run == FINE_TUNE_ONLY else run
            save_model(model, out / FINETUNED_NAME.format(label))
            keras.backend.clear_session(free_memory=False)  # G's file as save_models says
            save_model(build_goodnet(bd_model, model), out / GOODNET_FINETUNED_NAME.format(label))
            written += [FINETUNED_NAME.format(label), GOODNET_FINETUNED_NAME.format(label)]
            row = fine_tuned_row(run, threshold, pruned, result)
            rows.append(row)
            logs.append(result.log.assign(run=run)[["run", *result.log.columns]])
            log.info("%s: %d channels pruned, %d epochs kept, held-out accuracy %.2f %%%s", run,
                     len(pruned), result.epochs, row["heldout_accuracy"],
                     "".join(f", {name.replace('_', ' ')} {row[name]:.2f} %" for name in row
                             if name.startswith(("test_accuracy", "test_asr"))))
        summary = pd.DataFrame(rows)
        summary["threshold"] = summary["threshold"].astype("Float64")
        return written, summary, pd.concat(logs, ignore_index=True)

    def manifest(self, timings: dict) -> dict:
        inputs = self.inputs
        fine_tune = {} if self.tuned is None else {"fine_tune": {
            "settings": asdict(self.fine_tune),
            "runs": {("B" if run == FINE_TUNE_ONLY else run): {"channels_pruned": len(pruned), "epochs": result.epochs}
                     for run, (_, pruned, result) in self.tuned.items()}}}
        return fine_tune | {
            "inputs": {name: {"path": str(Path(path).resolve()) if os.path.isabs(path) or os.path.exists(path)
                              else path, "sha256": inputs.hashes[name]}
                       for name, path in inputs.paths.items()},
            "demo": inputs.demo,
            "weights_only": inputs.spec.weights_only,
            "layer": inputs.conv,
            "read_at": inputs.read,
            "channels": inputs.channels,
            "classes": inputs.classes,
            "rows": {name: s.rows for name, s in inputs.sets.items()},
            "rescale": str(inputs.rescale),
            "thresholds": list(self.thresholds),
            "relative": self.relative,
            "selected": {threshold_label(t): k for t, k in self.selected.items()},
            "versions": versions(),
            "timings_s": {name: round(value, 3) for name, value in timings.items()},
            "checkpoints": self.reused,  # a resumed run's timings cover only the work it did
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


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


def fine_tuned_row(run: str, threshold: float | None, pruned: tuple[int, ...], result) -> dict:
    """finepruning.csv's row of one fine-tuning run (``result``: its
    :class:`pruning.sweep.FineTuneResult`): the fine-tuned model's test accuracy and ASR, then
    its G's scores."""
    row = {"run": run, "threshold": threshold, "channels_pruned": len(pruned),
           "epochs": result.epochs, "heldout_accuracy": result.heldout_accuracy}
    sets = result.counts
    if "clean_test" in sets:
        row["test_accuracy"] = sets["clean_test"].percent("correct")
    row |= {"test_asr" + name[len("poisoned_test"):]: counts.percent("correct")
            for name, counts in sets.items() if name.startswith("poisoned_test")}
    return row | {f"goodnet_{name}": value for name, value in test_scores(sets).items()}


CLEAN_SCORES = ("test_accuracy", "false_alarm_rate")  # of the clean test set: one column each


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


def check_baseline(b: pd.Series, inputs: SweepInputs) -> None:
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
