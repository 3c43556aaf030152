"""pruning.defend, the Python API: the command line's results from arrays in memory."""
from __future__ import annotations

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

import pruning
import tiny
from conftest import REPRODUCIBLE
from pruning.data import InputError, lab_paths
from pruning.prune import predict_classes, prune_conv_channels


def lab_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """A lab file's arrays as stored: N x C x H x W pixels, float labels."""
    with h5py.File(path, "r") as f:
        return f["data"][()], f["label"][()]


@pytest.mark.slow
def test_defend_on_arrays_gives_the_command_lines_files(demo, demo_run, tmp_path):
    """The demo's sets as arrays (the lab's NCHW layout, float labels) and its B as a
    keras.Model: the curve is the command line's results.csv, and save() writes its files."""
    sets = {name: lab_arrays(path) for name, path in lab_paths(demo.data_dir).items()}
    model = keras.models.load_model(demo.model, compile=False)
    defense = pruning.defend(model, **sets, thresholds=(2, 4, 10))
    expected = pd.read_csv(demo_run / "results.csv")
    pd.testing.assert_frame_equal(defense.curve, expected, check_exact=True)
    pd.testing.assert_frame_equal(defense.order, pd.read_csv(demo_run / "channel_order.csv"), check_exact=True)
    manifest = pd.read_json(demo_run / "manifest.json", typ="series")
    assert {f"{x:g}": k for x, k in defense.selected.items()} == manifest["selected"]
    written = defense.save(tmp_path / "api")
    assert set(written) == {p.name for p in demo_run.iterdir() if p.is_file() and not p.name.startswith(".")}
    for name in REPRODUCIBLE:
        assert (tmp_path / "api" / name).read_bytes() == (demo_run / name).read_bytes(), name
    # B'_X is B with the first k channels of the order pruned, literally
    images = sets["clean_test"][0][:300].transpose(0, 2, 3, 1)
    k = defense.selected[4.0]
    literal = prune_conv_channels(model, "conv_3", defense.order["channel"][:k].tolist())
    assert np.array_equal(predict_classes(defense.bprime(4), images), predict_classes(literal, images))
    assert defense.goodnet(4).output_shape[-1] == model.output_shape[-1] + 1


def test_defend_gives_the_literally_pruned_models_scores():
    """Every row of the curve, from B'_k pruned literally (kernel and bias zeroed) and run on
    every image: the sweep's chunks (three, one short) and blocks of prefixes change nothing."""
    model = tiny.with_ties_and_dead_channels(tiny.tiny_deepid(seed=5))
    x, xt = tiny.random_images(150, seed=2), tiny.random_images(70, seed=3)
    b = predict_classes(model, x)
    y = np.where(np.arange(150) % 4 == 0, (b + 1) % 10, b)  # B is right on three rows in four
    yt = predict_classes(model, xt)
    defense = pruning.defend(model, clean_valid=(x, y), clean_test=(xt, yt), chunk_rows=64,
                             prefixes_per_task=5)
    channels = defense.order["channel"].tolist()
    for k, row in defense.curve.iterrows():
        pruned = prune_conv_channels(model, "conv_3", channels[:k])
        assert row["valid_accuracy"] == np.mean(predict_classes(pruned, x) == y) * 100, k
        literal = predict_classes(pruned, xt)
        assert row["test_accuracy"] == np.mean(literal == yt) * 100, k
        assert row["goodnet_false_alarm_rate"] == np.mean(literal != yt) * 100, k  # B is right on all of them
    assert defense.curve["valid_accuracy"].iloc[-1] < defense.curve["valid_accuracy"].iloc[0]


def test_defend_with_a_dask_client_gives_the_in_process_curve(tmp_path):
    """Named poisoned sets, NHWC arrays, a model file: the same curve in this process and
    spread over a real Dask worker process (its tasks and sets pickled to it)."""
    from distributed import Client, LocalCluster

    model = tiny.tiny_multi_trigger()
    model.save(tmp_path / "b.keras")
    x = tiny.random_images(160, seed=1)
    y = predict_classes(model, x)
    poisoned = {name: (tiny.with_trigger(tiny.random_images(60, seed=i), name), np.full(60, target))
                for i, (name, target) in enumerate(zip(tiny.TRIGGERS, (1, 2)))}
    kwargs = dict(clean_valid=(x, y), poisoned_valid=poisoned, thresholds=(1, 5), chunk_rows=64,
                  prefixes_per_task=5)
    here = pruning.defend(model, **kwargs)
    assert [c for c in here.curve.columns if "asr" in c] == [f"valid_asr_{name}" for name in tiny.TRIGGERS]
    assert len(here.curve) == here.inputs.channels + 1 and here.curve["channel"].iloc[0] == -1
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        spread = pruning.defend(str(tmp_path / "b.keras"), **kwargs, client=client)
    pd.testing.assert_frame_equal(spread.curve, here.curve, check_exact=True)
    assert spread.selected == here.selected


def test_defend_refuses_bad_arrays_in_one_line():
    model = tiny.tiny_deepid()
    x = tiny.random_images(20)
    with pytest.raises(InputError, match=r"^clean_valid \(arrays\): images have shape \(47, 55, 2\)"):
        pruning.defend(model, clean_valid=(x[..., :2].transpose(0, 2, 1, 3), np.zeros(20)))
    with pytest.raises(InputError, match=r"^clean_valid \(arrays\): 19 labels for 20 images"):
        pruning.defend(model, clean_valid=(x, np.zeros(19)))
    x[3, 1, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"^clean_valid \(arrays\): NaN or infinite pixels in row 3"):
        pruning.defend(model, clean_valid=(x, np.zeros(20)))
    with pytest.raises(InputError, match=r"^--thresholds 120"):
        pruning.defend(model, clean_valid=(x, np.zeros(20)), thresholds=(120,))


def test_defend_fine_tunes_each_selected_bprime_and_b(tmp_path):
    model = tiny.tiny_deepid()
    x = tiny.random_images(200, seed=4)
    y = predict_classes(model, x)
    defense = pruning.defend(model, clean_valid=(x, y), clean_test=(x[:50], y[:50]), thresholds=(5,),
                             fine_tune={"epochs": 1, "batch_size": 32})
    assert list(defense.tuned) == ["X=5", "fine-tune only"]
    written = defense.save(tmp_path)
    assert {"finepruning.csv", "finetune_log.csv", "finetuned_X=5.h5", "finetuned_B.h5"} <= set(written)
    summary = pd.read_csv(tmp_path / "finepruning.csv")
    assert summary["run"].tolist() == ["X=5", "fine-tune only"]
    assert summary["channels_pruned"].tolist() == [defense.selected[5.0], 0]
    # the pruned channels stay pruned through fine-tuning
    tuned = keras.models.load_model(tmp_path / "finetuned_X=5.h5", compile=False)
    kernel = tuned.get_layer("conv_3").get_weights()[0]
    assert not kernel[..., defense.order["channel"][:defense.selected[5.0]].tolist()].any()
