"""Fine-pruning (``--fine-tune``) on a tiny BadNet-shaped model: the fine-tuned files keep exactly
the pruned prefix at zero and change the rest, finepruning.csv equals scores recomputed from the
saved files, a rerun writes the same bytes, and a fine-tuning killed mid-way resumes to the same
weights as an uninterrupted one. On the demos, docs/finetune.md's targets, from B'_X=4's
fine-tuning alone (which the tiny model shows is the command's)."""
import json
import threading
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest

import tiny
from jobs.sweep import main
from pruning.data import lab_paths, open_lab_set
from pruning.finetune import fine_tune, split_clean
from pruning.finetune_settings import Settings
from pruning.prune import predict_classes

CLASSES = 10
TUNED = ["finepruning.csv", "finetune_log.csv"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fine-tune")
    model = tiny.tiny_deepid(seed=7, classes=CLASSES)
    model.save(folder / "bd_net.keras")
    tiny.write_sets(model, folder / "data", rows=(200, 90, 110, 100))
    out = folder / "out"
    argv = ["--model", str(folder / "bd_net.keras"), "--data", str(folder / "data"), "--out", str(out),
            "--single-node", "--workers", "1", "--thresholds", "2", "4", "99", "--fine-tune",
            "--fine-tune-epochs", "3", "--fine-tune-patience", "1"]
    assert main(argv) == 0
    summary = pd.read_csv(out / "finepruning.csv", keep_default_na=False)
    return SimpleNamespace(folder=folder, out=out, argv=argv, summary=summary,
                           order=pd.read_csv(out / "channel_order.csv")["channel"].tolist())


def label(run_name: str) -> str:
    return "B" if run_name == "fine-tune only" else run_name


def read(folder, name):
    return open_lab_set(lab_paths(folder / "data")[name], (55, 47, 3), CLASSES).read()


def test_a_run_per_threshold_reached_and_one_of_b_alone(run):
    goodnet = pd.read_csv(run.out / "goodnet.csv")
    reached = goodnet[goodnet["channels_pruned"].notna()]
    assert run.summary["run"].tolist() == [f"X={t:g}" for t in reached["threshold"]] + ["fine-tune only"]
    assert run.summary["channels_pruned"].tolist() == [*reached["channels_pruned"].astype(int), 0]
    for name in run.summary["run"]:
        assert (run.out / f"finetuned_{label(name)}.h5").is_file()
        assert (run.out / f"goodnet_finetuned_{label(name)}.keras").is_file()
    assert not (run.out / "finetuned_X=99.h5").exists()
    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["fine_tune"]["settings"]["epochs"] == 3
    assert set(manifest["fine_tune"]["runs"]) == {label(name) for name in run.summary["run"]}


def test_pruned_channels_are_exactly_the_prefix_and_exactly_zero_and_the_rest_changed(run):
    bd = keras.models.load_model(run.folder / "bd_net.keras", compile=False)
    for name, k in zip(run.summary["run"], run.summary["channels_pruned"]):
        tuned = keras.models.load_model(run.out / f"finetuned_{label(name)}.h5", compile=False)
        kernel, bias = tuned.get_layer("conv_3").get_weights()
        zero = {c for c in range(kernel.shape[-1]) if not kernel[..., c].any() and bias[c] == 0}
        assert zero == set(run.order[:k]), name
        assert not np.signbit(kernel[..., run.order[:k]]).any()  # +0.0, not -0.0
        before = bd if k == 0 else keras.models.load_model(run.out / f"model_X={name[2:]}.h5", compile=False)
        for layer in tuned.layers:
            for new, old in zip(layer.get_weights(), before.get_layer(layer.name).get_weights()):
                kept = np.ones(new.shape[-1], bool)
                if layer.name == "conv_3":
                    kept[run.order[:k]] = False
                assert not np.array_equal(new[..., kept], old[..., kept]), (name, layer.name)


def test_finepruning_csv_equals_the_saved_files_scores(run):
    bd = keras.models.load_model(run.folder / "bd_net.keras", compile=False)
    x_valid, y_valid = read(run.folder, "clean_valid")
    _, held = split_clean(y_valid, Settings().seed, Settings().heldout)
    for row in run.summary.itertuples():
        tuned = keras.models.load_model(run.out / f"finetuned_{label(row.run)}.h5", compile=False)
        goodnet = keras.models.load_model(run.out / f"goodnet_finetuned_{label(row.run)}.keras", compile=False)
        percent = lambda hits: float(np.sum(hits)) / len(hits) * 100.0  # noqa: E731
        assert row.heldout_accuracy == percent(predict_classes(tuned, x_valid[held]) == y_valid[held])
        (x, y), (x_bad, target) = read(run.folder, "clean_test"), read(run.folder, "poisoned_test")
        assert row.test_accuracy == percent(predict_classes(tuned, x) == y)
        assert row.test_asr == percent(predict_classes(tuned, x_bad) == target)
        g, g_bad = predict_classes(goodnet, x), predict_classes(goodnet, x_bad)
        assert row.goodnet_test_accuracy == percent(g == y)
        assert row.goodnet_test_asr == percent(g_bad == target)
        assert row.goodnet_detection_rate == percent(g_bad == CLASSES)
        assert row.goodnet_false_alarm_rate == percent(g == CLASSES)
        assert (predict_classes(bd, x) == predict_classes(tuned, x)).mean() < 1 or row.channels_pruned == 0


def test_the_log_holds_every_epoch_and_the_kept_one_is_the_last_near_the_best_held_out(run):
    log = pd.read_csv(run.out / "finetune_log.csv")
    assert list(log.columns) == ["run", "epoch", "loss", "heldout_accuracy", "valid_asr"]
    assert log["run"].unique().tolist() == run.summary["run"].tolist()
    tolerance = Settings().tolerance
    for row in run.summary.itertuples():
        epochs = log[log["run"] == row.run]
        assert epochs["epoch"].tolist() == list(range(1, len(epochs) + 1)) and len(epochs) <= 3
        near = epochs[epochs["heldout_accuracy"] >= epochs["heldout_accuracy"].max() - tolerance]
        assert row.epochs == near["epoch"].iloc[-1]
        # stopped early only after --fine-tune-patience 1 epoch further below the best so far
        if len(epochs) < 3:
            last = epochs["heldout_accuracy"].iloc[-1]
            assert last < epochs["heldout_accuracy"].iloc[:-1].max() - tolerance


def test_the_kept_epoch_is_the_last_within_the_tolerance_of_the_best():
    from pruning.finetune import kept_epoch
    assert kept_epoch([90.0, 95.0, 94.0, 92.0], 2.0) == 2
    assert kept_epoch([90.0, 95.0, 94.0, 92.0], 0.0) == 1
    assert kept_epoch([95.0, 90.0, 93.5, 97.0, 95.5], 1.5) == 4
    assert kept_epoch([95.0, 93.0], 2.0) == 1  # exactly the tolerance below: kept


def test_a_rerun_reads_the_finished_fine_tuning_back_and_writes_the_same_files(run, tmp_path):
    import shutil
    copy = tmp_path / "out"
    shutil.copytree(run.out, copy)
    argv = list(run.argv)
    argv[argv.index("--out") + 1] = str(copy)
    assert main(argv) == 0
    names = TUNED + [f"{kind}_{label(name)}.{ext}" for name in run.summary["run"]
                     for kind, ext in (("finetuned", "h5"), ("goodnet_finetuned", "keras"))]
    for name in names:
        assert (copy / name).read_bytes() == (run.out / name).read_bytes(), name


def test_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), [10, 5, 2, 1, 7])
    train, held = split_clean(labels, seed=3, heldout=0.2)
    assert sorted(np.concatenate([train, held])) == list(range(len(labels)))
    assert [int((labels[held] == c).sum()) for c in range(5)] == [2, 1, 0, 0, 1]
    again, held_again = split_clean(labels, seed=3, heldout=0.2)
    assert np.array_equal(train, again) and np.array_equal(held, held_again)
    assert not np.array_equal(split_clean(labels, seed=4, heldout=0.2)[1], held)


def small_task(seed=2):
    """A model whose pruned channels would get gradients (sigmoid(0) = 0.5 is not flat) and
    raw-pixel images labelled by the model itself."""
    model = tiny.tiny_batchnorm_sigmoid(seed=seed)
    images = tiny.random_images(96, seed=seed)
    labels = predict_classes(model, images)
    labels[::5] = (labels[::5] + 1) % 7
    return model, (images[:72], labels[:72]), (images[72:], labels[72:])


def test_pruned_channels_stay_zero_where_gradients_would_move_them(tmp_path):
    model, train, held = small_task()
    tuned = fine_tune(model, "target", [0, 4], train, held, settings=Settings(epochs=2, patience=5))
    kernel, bias = tuned.model.get_layer("target").get_weights()
    assert not kernel[..., [0, 4]].any() and not bias[[0, 4]].any()
    assert kernel[..., [1, 2, 3]].all(axis=(0, 1, 2)).any()
    assert not any(w.constraint for w in tuned.model.weights)  # a plain copy, like B'


def test_a_fine_tuning_stopped_mid_way_resumes_to_the_same_weights(tmp_path):
    model, train, held = small_task()
    settings = Settings(epochs=4, patience=10, batch_size=16)
    whole = fine_tune(model, "target", [1], train, held, settings=settings, folder=tmp_path / "whole")

    def stop(epoch, logs):  # after epoch 3's log and best weights, before its backup
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(model, "target", [1], train, held, settings=settings, folder=tmp_path / "resumed",
                  on_epoch=stop)
    assert (tmp_path / "resumed" / "backup").is_dir()
    resumed = fine_tune(model, "target", [1], train, held, settings=settings, folder=tmp_path / "resumed")
    pd.testing.assert_frame_equal(resumed.log, whole.log)
    assert resumed.epochs == whole.epochs
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights()):
        assert np.array_equal(a, b)


def test_a_trainer_that_fine_tuned_another_b_prime_gives_what_a_new_one_gives(monkeypatch):
    """fine_tune keeps one compiled copy of the network per thread (its training step traced
    once): a B' fine-tuned on it after another B' ends with the weights and log of the same B'
    fine-tuned on a new one."""
    from pruning import finetune
    monkeypatch.setattr(finetune, "_trainers", threading.local())
    model, train, held = small_task()
    settings = Settings(epochs=3, patience=5)
    trained = {}  # the pruned layer's kernel as training left it (the result's is zeroed again)
    first = fine_tune(model, "target", [1], train, held, settings=settings)
    trainer = finetune.trainer_for(model, "target", settings)
    other = fine_tune(model, "target", [0, 4], train, held, settings=settings)
    trained["other"] = trainer.model.get_layer("target").get_weights()[0]
    again = fine_tune(model, "target", [1], train, held, settings=settings)
    trained["again"] = trainer.model.get_layer("target").get_weights()[0]
    assert finetune.trainer_for(model, "target", settings) is trainer  # it served all three
    pd.testing.assert_frame_equal(again.log, first.log)
    for a, b in zip(again.model.get_weights(), first.model.get_weights()):
        assert np.array_equal(a, b)
    assert not np.array_equal(other.model.get_weights()[2], first.model.get_weights()[2])
    assert not trained["other"][..., [0, 4]].any() and trained["other"][..., 1].any()  # each its own
    assert not trained["again"][..., 1].any() and trained["again"][..., [0, 4]].any()  # channels held
    # A network with state beyond its weights (a Dropout's seed) gets a new copy every time.
    dropout = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(2, name="d")])
    assert finetune.trainer_for(dropout, "d", settings) is not finetune.trainer_for(dropout, "d", settings)


def test_the_plot_gains_a_panel_of_each_run_before_and_after(run):
    from pruning.report import curve_figure
    from pruning.select import select_prefixes
    curve = pd.read_csv(run.out / "results.csv")
    figure = curve_figure(curve, select_prefixes(curve, [2, 4, 99]), run.summary)
    heights = [bar.get_height() for bar in figure.axes[2].patches]
    before = curve.set_index("channels_pruned").loc[run.summary["channels_pruned"]]
    assert heights == [*before["test_accuracy"], *run.summary["test_accuracy"],
                       *before["test_asr"], *run.summary["test_asr"]]


def command_inputs(argv: list[str]) -> tuple:
    """``python -m jobs.sweep ARGV``'s checked arguments and inputs, as its main() resolves them
    (a demo from the tests' demo cache, the ``demo`` fixture's)."""
    import os
    from conftest import REPO
    from jobs.inputs import resolve_inputs
    from jobs.sweep import parse_args
    args = parse_args(argv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINE_PRUNING_CACHE", os.environ.get("FINE_PRUNING_CACHE") or str(REPO / ".cache"))
        return args, resolve_inputs(args)


def fine_prune(command: tuple, order: list[int], k: int, folder) -> dict:
    """finepruning.csv's row X=4 of a ``--fine-tune`` command (``command``: its arguments and
    inputs) whose channel order is ``order`` and whose X = 4 prunes ``k`` channels: that
    fine-tuning alone, by the task the command's workers run, and the row the command writes
    of its result."""
    from pruning.defense import fine_tuned_row
    from pruning.sweep import fine_tune_task
    args, inputs = command
    pruned = tuple(order[:k])
    result = fine_tune_task(inputs.spec, inputs.conv, inputs.sets, pruned, args.fine_tune_settings, str(folder))
    return fine_tuned_row("X=4", 4.0, pruned, result)


def test_the_demo_tests_fine_tuning_is_the_commands(run, tmp_path):
    """The demo tests below fine-tune B'_X=4 alone (:func:`fine_prune`), not the whole command:
    on the tiny model, that gives finepruning.csv's X=4 row, every column."""
    k = pd.read_csv(run.out / "goodnet.csv").set_index("threshold").loc[4.0, "channels_pruned"]
    row = fine_prune(command_inputs(run.argv), run.order, int(k), tmp_path / "fine-tune")
    expected = run.summary.set_index("run").loc["X=4"].drop("threshold").to_dict()
    assert {name: value for name, value in row.items() if name not in ("run", "threshold")} == expected
    assert row["threshold"] == 4.0 and set(row) == {"run", "threshold", *expected}


DEMO_ARGV = ["--single-node", "--fine-tune", "--thresholds", "4"]


@pytest.fixture(scope="module")
def pruning_aware(tmp_path_factory):
    """``python -m jobs.sweep --single-node --demo pruning-aware --fine-tune --thresholds 4``'s
    curve (results.csv) and finepruning.csv row X=4, without its fine-tuning of B alone: the
    sweep as :func:`pruning.defend` runs it, in this process (the command's curve, to the bit:
    tests/test_api.py), then :func:`fine_prune`."""
    from pruning.defense import run_defense
    from pruning.sweep import InProcess, NoCheckpoints
    args, inputs = command = command_inputs([*DEMO_ARGV, "--demo", "pruning-aware"])
    defense = run_defense(inputs, InProcess(), NoCheckpoints(), args.thresholds, args.relative)
    row = fine_prune(command, defense.channels, defense.selected[4.0], tmp_path_factory.mktemp("fine-tune"))
    return SimpleNamespace(row=row, curve=defense.curve.set_index("channels_pruned"))


@pytest.mark.slow
def test_on_the_pruning_aware_demo_pruning_alone_fails_and_fine_pruning_removes_the_backdoor(pruning_aware):
    """The issue's targets (docs/finetune.md): at X = 4, B' keeps test ASR >= 50 %; fine-pruned
    at the default settings, it is <= 5 %, with clean test accuracy within 3 points of B's."""
    run, b = pruning_aware.row, pruning_aware.curve.loc[0]
    assert pruning_aware.curve.loc[run["channels_pruned"], "test_asr"] >= 50.0
    assert run["test_asr"] <= 5.0
    assert abs(run["test_accuracy"] - b["test_accuracy"]) <= 3.0
    assert b["test_asr"] >= 90.0  # a working BadNet to begin with


@pytest.mark.slow
def test_on_the_standard_demo_fine_pruning_keeps_the_backdoor_out(demo_run, tmp_path):
    """Fine-pruning at X = 4 on the standard demo: ``make run``'s channel order and X = 4
    (its goodnet.csv), fine-tuned as ``--fine-tune`` would (:func:`fine_prune`)."""
    k = pd.read_csv(demo_run / "goodnet.csv").set_index("threshold").loc[4.0, "channels_pruned"]
    order = pd.read_csv(demo_run / "channel_order.csv")["channel"].tolist()
    row = fine_prune(command_inputs([*DEMO_ARGV, "--demo", "standard"]), order, int(k), tmp_path / "fine-tune")
    assert row["test_asr"] <= 5.0
