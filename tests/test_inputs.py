"""What a defender has: B and clean validation data, any number of named poisoned sets, pixels
at any scale (``--rescale``). On a hand-planted two-trigger, two-target BadNet
(:func:`tiny.tiny_multi_trigger`), each run on a Dask cluster in this process."""
from __future__ import annotations

import contextlib
import logging
import re

import numpy as np
import pandas as pd
import pytest

import jobs.cluster
import tiny
from jobs.sweep import main
from pruning.data import write_lab_h5
from pruning.prune import predict_classes, prune_conv_channels

TARGETS = {"red": 1, "green": 2}
ROWS = {"valid": {"red": 40, "green": 30}, "test": {"red": 30, "green": 50}}
THRESHOLDS = ["2", "10", "30"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """B, its clean sets, one poisoned set per trigger and split, and each split's two poisoned
    sets in one file (what a single --poisoned-valid would be)."""
    folder = tmp_path_factory.mktemp("defender")
    model = tiny.tiny_multi_trigger(targets=tuple(TARGETS.values()))
    model.save(folder / "bd_net.keras")
    rng = np.random.default_rng(5)
    files = {}
    for split, clean_rows in (("valid", 120), ("test", 100)):
        images = tiny.random_images(clean_rows, seed=clean_rows)
        labels = predict_classes(model, images)
        noise = rng.random(clean_rows) < 0.1
        labels[noise] = rng.integers(0, 6, noise.sum())
        write_lab_h5(folder / f"clean_{split}.h5", images, labels)
        files[f"clean_{split}"] = (images, labels)
        both = []
        for trigger, rows in ROWS[split].items():
            poisoned = tiny.with_trigger(tiny.random_images(rows, seed=rows + len(split)), trigger)
            write_lab_h5(folder / f"{trigger}_{split}.h5", poisoned, np.full(rows, TARGETS[trigger]))
            files[f"{trigger}_{split}"] = (poisoned, np.full(rows, TARGETS[trigger]))
            both.append(files[f"{trigger}_{split}"])
        write_lab_h5(folder / f"both_{split}.h5", *map(np.concatenate, zip(*both)))
    write_lab_h5(folder / "scaled_valid.h5", files["clean_valid"][0] / 255, files["clean_valid"][1])
    return folder, model, files


@pytest.fixture(scope="module")
def sweep_here():
    """Run ``python -m jobs.sweep ARGV`` in process on a one-thread cluster in this process
    (no worker processes to start); returns (status, its outputs)."""
    from distributed import Client, LocalCluster

    @contextlib.contextmanager
    def open_client(args):
        with LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client

    loggers = [logging.getLogger(name) for name in ("distributed.worker", "distributed.worker.state_machine")]
    filters = [list(logger.filters) for logger in loggers]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs.cluster, "open_client", open_client)
        patch.setattr(jobs.cluster, "prepare_local_workers", lambda args: None)

        def run(folder, out, *flags):
            argv = ["--model", folder / "bd_net.keras", *flags, "--out", folder / out,
                    "--single-node", "--chunk-rows", "64", "--thresholds", *THRESHOLDS]
            status = main([str(a) for a in argv])
            return status, (pd.read_csv(folder / out / "results.csv"), pd.read_csv(folder / out / "goodnet.csv"))

        yield run
    for logger, before in zip(loggers, filters):  # the sweep quietens this process's workers' logs
        logger.filters[:] = before


def sets(folder, *names):
    """Set flags: ``clean_valid`` is --clean-valid; ``both_valid`` a bare --poisoned-valid;
    ``red=red_test`` a named --poisoned-test."""
    flags = []
    for name in names:
        file = name.rpartition("=")[2]
        kind, split = ("clean" if file.startswith("clean") else "poisoned"), file.rpartition("_")[2]
        flags += [f"--{kind}-{split}", name.replace(file, str(folder / f"{file}.h5"))]
    return flags


@pytest.fixture(scope="module")
def full(lab, sweep_here):
    folder = lab[0]
    status, outputs = sweep_here(folder, "full", *sets(folder, "clean_valid", "both_valid", "clean_test", "both_test"))
    assert status == 0
    return outputs


@pytest.fixture(scope="module")
def named(lab, sweep_here):
    folder = lab[0]
    status, outputs = sweep_here(folder, "named", *sets(
        folder, "clean_valid", "red=red_valid", "green=green_valid", "clean_test", "red=red_test",
        "green=green_test"))
    assert status == 0
    return outputs


def test_named_sets_get_columns_whose_row_weighted_mean_is_the_single_sets(full, named):
    (curve, goodnet), (one_curve, one_goodnet) = named, full
    assert list(curve.columns) == [
        "channels_pruned", "fraction_pruned", "valid_accuracy", "valid_asr_red", "valid_asr_green",
        "test_accuracy", "test_asr_red", "test_asr_green", "channel", "goodnet_test_accuracy",
        "goodnet_test_asr_red", "goodnet_test_asr_green", "goodnet_detection_rate_red",
        "goodnet_detection_rate_green", "goodnet_false_alarm_rate"]
    assert list(goodnet.columns) == ["threshold", "channels_pruned", "test_accuracy", "test_asr_red",
                                     "test_asr_green", "detection_rate_red", "detection_rate_green",
                                     "false_alarm_rate"]
    for frame, one, column in ((curve, one_curve, "valid_asr"), (curve, one_curve, "test_asr"),
                               (curve, one_curve, "goodnet_test_asr"),
                               (curve, one_curve, "goodnet_detection_rate"),
                               (goodnet.dropna(), one_goodnet.dropna(), "test_asr"),
                               (goodnet.dropna(), one_goodnet.dropna(), "detection_rate")):
        rows = ROWS["valid" if "valid" in column else "test"]
        mean = (frame[f"{column}_red"] * rows["red"] + frame[f"{column}_green"] * rows["green"]) / sum(rows.values())
        np.testing.assert_allclose(mean, one[column], rtol=1e-12)
    # the rest is the single set's run, value for value
    same = [c for c in one_curve.columns if c in curve.columns]
    pd.testing.assert_frame_equal(curve[same], one_curve[same])


def test_each_named_sets_asr_is_the_literally_pruned_models(lab, named):
    _, model, files = lab
    curve, _ = named
    assert curve.loc[0, ["valid_asr_red", "valid_asr_green", "test_asr_red", "test_asr_green"]].min() == 100
    order = curve["channel"].tolist()[1:]
    assert sorted(order[:2]) == [6, 7]  # the trigger channels never fire on clean images
    for k in (1, 2):  # the one pruned first loses its trigger only
        pruned = prune_conv_channels(model, "conv", order[:k])
        for trigger in TARGETS:
            for split in ("valid", "test"):
                images, labels = files[f"{trigger}_{split}"]
                expected = 100 * np.mean(predict_classes(pruned, images) == labels)
                assert curve.loc[k, f"{split}_asr_{trigger}"] == expected
    assert curve.loc[2, ["valid_asr_red", "valid_asr_green"]].max() < 50


def test_clean_sets_alone_give_the_same_curve_and_k(lab, sweep_here, full, caplog):
    folder = lab[0]
    with caplog.at_level(logging.INFO, logger="pruning.defense"):
        status, (curve, goodnet) = sweep_here(folder, "clean", *sets(folder, "clean_valid", "clean_test"))
    assert status == 0
    one_curve, one_goodnet = full
    assert list(curve.columns) == ["channels_pruned", "fraction_pruned", "valid_accuracy", "test_accuracy",
                                   "channel", "goodnet_test_accuracy", "goodnet_false_alarm_rate"]
    pd.testing.assert_frame_equal(curve, one_curve[curve.columns])
    pd.testing.assert_frame_equal(goodnet, one_goodnet[goodnet.columns])
    assert goodnet["channels_pruned"].notna().any()
    for k in goodnet["channels_pruned"].dropna().astype(int):
        assert (folder / "clean" / f"goodnet_X={THRESHOLDS[list(goodnet['channels_pruned']).index(k)]}.keras").is_file()
    assert any("attack success rate was not measured" in r.getMessage() for r in caplog.records)


def test_clean_validation_alone_writes_validation_columns_only(lab, sweep_here, full):
    folder = lab[0]
    status, (curve, goodnet) = sweep_here(folder, "valid-only", *sets(folder, "clean_valid"))
    assert status == 0
    assert list(curve.columns) == ["channels_pruned", "fraction_pruned", "valid_accuracy", "channel"]
    assert list(goodnet.columns) == ["threshold", "channels_pruned"]
    pd.testing.assert_frame_equal(curve, full[0][curve.columns])
    pd.testing.assert_frame_equal(goodnet, full[1][goodnet.columns])
    assert {p.name for p in (folder / "valid-only").glob("goodnet_X=*.keras")} == {
        f"goodnet_X={t}.keras" for t, k in zip(THRESHOLDS, goodnet["channels_pruned"]) if k == k}


def test_pixels_stored_divided_by_255_need_rescale_255(lab, sweep_here, full, capsys):
    folder = lab[0]
    status, (curve, _) = sweep_here(folder, "scaled", "--clean-valid", folder / "scaled_valid.h5",
                                    "--rescale", "255")
    assert status == 0
    pd.testing.assert_frame_equal(curve, full[0][curve.columns])
    capsys.readouterr()
    status = main([str(a) for a in ["--model", folder / "bd_net.keras", "--clean-valid",
                                    folder / "scaled_valid.h5", "--single-node", "--out", folder / "unscaled"]])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(r"right on \d+\.\d % .* with pixels x 1 but on \d+\.\d % with pixels x 255: .*"
                     r"pass --rescale 255$", err.strip()), err
    assert not (folder / "unscaled").exists()
