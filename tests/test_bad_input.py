"""Bad input and broken files: one clear line, a non-zero exit, nothing lost.

Every case goes through the command line (``jobs.sweep.main`` in process, a few as real
``python -m jobs.sweep`` processes) and must end in one ``error: ...`` line on stderr naming
the problem, exit status 2, no traceback, no Dask cluster started, and the output folder
as it was -- every entry there, each file's bytes, size and mode (the lock file's line aside:
it names the last run to hold it) -- whether it holds a previous run's results or does not
exist yet (then it is not created). Problems only a worker can see
end in one line too, after the cluster ran, with the previous results untouched: NaN pixels in
rows the up-front scan did not read (status 2), a task that kills its worker (status 1). An
unexpected error is one ``error: internal error ...`` line, status 1. And a fuzzer throws
malformed HDF5 files at the loader: only InputErrors may come out.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dask
import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers

import jobs.cluster
import jobs.finish
import jobs.inputs
import jobs.settings
import pruning.report
import pruning.sweep
import pruning.data
import tiny
from conftest import REPO
from jobs.checkpoints import Checkpoints, chunk_file, may_hold_every_chunk
from jobs.outdir import OutputFolder
from jobs.arguments import explain, interrupted_line
from jobs.finish import output_names
from jobs.sweep import main
from pruning.counts import Counts
from pruning.data import InputError, LabSet, open_lab_set
from pruning.goodnet import build_goodnet
from pruning.prune import prune_conv_channels

CLASSES = 10
ROWS = (40, 30, 30, 30)  # clean valid, poisoned valid, clean test, poisoned test


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny B (with a legacy .h5 copy and a weights file), its four sets, and odd models."""
    folder = tmp_path_factory.mktemp("bad_input")
    model = tiny.tiny_deepid(seed=7, classes=CLASSES)
    model.save(folder / "bd_net.keras")
    model.save(folder / "bd_net.h5")
    model.save_weights(folder / "bd.weights.h5")
    tiny.write_sets(model, folder / "data", rows=ROWS)
    keras.Sequential([keras.Input(tiny.SHAPE), layers.Flatten(),
                      layers.Dense(CLASSES, activation="softmax")]).save(folder / "no_conv.keras")
    keras.Sequential([keras.Input((4, 4, 4)), layers.Conv2D(2, 3, name="conv"), layers.Flatten(),
                      layers.Dense(3, activation="softmax")]).save(folder / "cube.keras")
    x = inputs = keras.Input((None, None, 3))
    x = layers.GlobalMaxPooling2D()(layers.Conv2D(4, 3)(x))
    keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x)).save(folder / "any_size.keras")
    x = inputs = keras.Input((3, 55, 47))
    x = layers.Flatten()(layers.Conv2D(4, 3, data_format="channels_first", name="conv")(x))
    keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x)).save(folder / "nchw.keras")
    build_goodnet(model, prune_conv_channels(model, "conv_3", [0])).save(folder / "goodnet.keras")
    broken = keras.models.clone_model(model)
    kernel, bias = model.get_layer("conv_2").get_weights()
    kernel[0, 0, 0, 0] = np.nan
    broken.set_weights(model.get_weights())
    broken.get_layer("conv_2").set_weights([kernel, bias])
    broken.save(folder / "nan_weights.keras")
    x = inputs = keras.Input((55, 47, 3))
    x = layers.Lambda(lambda pixels: pixels / 255.0)(x)  # code in the file: Keras won't run it
    x = layers.Flatten()(layers.MaxPooling2D(8)(layers.Conv2D(4, 3, activation="relu", name="conv")(x)))
    keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x)).save(folder / "lambda.keras")
    return SimpleNamespace(folder=folder, model=folder / "bd_net.keras", data=folder / "data")


# ---------------------------------------------------------------- building bad inputs

def lab_images(rows: int) -> np.ndarray:
    """``rows`` random images in the lab's N x 3 x 55 x 47 layout."""
    return tiny.random_images(rows, seed=rows).transpose(0, 3, 1, 2)


def write_h5(path: Path, **datasets) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if isinstance(value, str) and value == "group":
                f.create_group(name)
            else:
                f[name] = value
    return path


def data_with(lab, tmp: Path, writer, rel: str = "cl/valid.h5") -> Path:
    """A copy of the lab's data folder with one set replaced by ``writer(path)``."""
    data = tmp / "data"
    if not data.exists():
        shutil.copytree(lab.data, data)
    (data / rel).unlink()
    writer(data / rel)
    return data


def lab_set_with(rows=ROWS[0], **change):
    """A writer for a lab set (NCHW pixels, float labels) with some of its parts changed."""
    def write(path):
        parts = {"data": lab_images(rows), "label": (np.arange(rows) % CLASSES).astype("f4")}
        parts.update(change)
        write_h5(path, **{k: v for k, v in parts.items() if v is not None})
    return write


def with_pixel(value):
    images = lab_images(ROWS[0])
    images[7, 1, 20, 30] = value
    return lab_set_with(data=images)


def truncated(source: Path):
    def write(path):
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a half-copied file
    return write


def half_written(path: Path, compression: str | None = None):
    """Pixels in chunks, only the first of which was written before the writer died."""
    with h5py.File(path, "w") as f:
        data = f.create_dataset("data", shape=(ROWS[0], 3, 55, 47), dtype="f4", chunks=(8, 3, 55, 47),
                                compression=compression)
        data[:8] = lab_images(8)
        f["label"] = np.zeros(ROWS[0], "f4")


def text_file(path: Path, text: str = "these are not the bytes you are looking for\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fifo(path: Path) -> Path:
    """A named pipe: opening it to read would wait for a writer forever."""
    os.mkfifo(path)
    return path


def broken_link(path: Path) -> Path:
    """A symbolic link to a folder that is not there (unmounted, moved, or never made)."""
    path.symlink_to(path.parent / "nowhere")
    return path


def linked_lock(out: Path, target: Path) -> Path:
    """A previous run's folder whose lock file is a symbolic link to ``target``."""
    (previous_run(out) / ".sweep.lock").unlink()
    (out / ".sweep.lock").symlink_to(target)
    return out


def model_args(lab):
    return ["--model", lab.model]


# name -> (argv builder (lab, tmp) -> list, words the error line must hold)
CASES = {
    "missing model": (lambda lab, tmp: ["--model", tmp / "nope.keras", "--data", lab.data],
                      ["nope.keras: no such file"]),
    "model is a directory": (lambda lab, tmp: ["--model", lab.data, "--data", lab.data],
                             ["is a directory"]),
    "model is not HDF5": (lambda lab, tmp: ["--model", text_file(tmp / "bd_net.h5"), "--data", lab.data],
                          ["not an HDF5 file"]),
    "model is not a Keras file": (lambda lab, tmp: ["--model", text_file(tmp / "bd_net.keras"),
                                                    "--data", lab.data],
                                  ["is not a .keras file"]),
    "model is not a model file": (lambda lab, tmp: ["--model", text_file(tmp / "bd_net.txt"),
                                                    "--data", lab.data],
                                  ["must be a .h5 or .keras file", "--weights PATH --arch deepid"]),
    "model is HDF5 but not a model": (lambda lab, tmp: ["--model", write_h5(tmp / "bd_net.h5", x=np.zeros(3)),
                                                        "--data", lab.data],
                                      ["holds no Keras model"]),
    "model is weights only": (lambda lab, tmp: ["--model", lab.folder / "bd.weights.h5", "--data", lab.data],
                              ["holds weights only", "--weights PATH --arch deepid"]),
    "model is a data set": (lambda lab, tmp: ["--model", lab.data / "cl/valid.h5", "--data", lab.data],
                            ["is a data set", "not a model"]),
    "model .h5 truncated": (lambda lab, tmp: ["--model", truncated_copy(lab.folder / "bd_net.h5", tmp),
                                              "--data", lab.data],
                            ["truncated", "copy it again"]),
    "model .keras truncated": (lambda lab, tmp: ["--model", truncated_copy(lab.model, tmp),
                                                 "--data", lab.data],
                               ["truncated", "copy it again"]),
    "weights do not fit": (lambda lab, tmp: ["--weights", lab.folder / "bd.weights.h5", "--classes", "12",
                                             "--data", lab.data],
                           ["do not fit --arch deepid with --classes 12", "conv_1/kernel"]),
    "weights not HDF5": (lambda lab, tmp: ["--weights", text_file(tmp / "w.weights.h5"), "--data", lab.data],
                         ["not an HDF5 file"]),
    "unknown architecture": (lambda lab, tmp: ["--weights", lab.folder / "bd.weights.h5", "--arch", "vgg",
                                               "--data", lab.data],
                             ["--arch vgg is unknown"]),
    "model is a pipe": (lambda lab, tmp: ["--model", fifo(tmp / "bd_net.keras"), "--data", lab.data],
                        ["is not a regular file"]),
    "model with a Lambda layer": (lambda lab, tmp: ["--model", lab.folder / "lambda.keras", "--data", lab.data],
                                  ["holds a Lambda layer with Python code", "Rebuild the model"]),
    "model with NaN weights": (lambda lab, tmp: ["--model", lab.folder / "nan_weights.keras",
                                                 "--data", lab.data],
                               ["conv_2/kernel holds NaN or infinite values"]),
    "model without conv layer": (lambda lab, tmp: ["--model", lab.folder / "no_conv.keras", "--data", lab.data],
                                 ["no Conv2D layer"]),
    "a GoodNet as the model": (lambda lab, tmp: ["--model", lab.folder / "goodnet.keras", "--data", lab.data],
                               ["no Conv2D layer", "nested model bd_net, pruned_net"]),
    "model of any input size": (lambda lab, tmp: ["--model", lab.folder / "any_size.keras", "--data", lab.data],
                                ["unspecified size"]),
    "channels_first model": (lambda lab, tmp: ["--model", lab.folder / "nchw.keras", "--data", lab.data],
                             ["channels_first"]),
    "--layer not found": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--layer", "conv_9"],
                          ["--layer conv_9 not found; conv layers are: conv_1, conv_2, conv_3, conv_4"]),
    "--layer not a conv": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--layer", "pool_1"],
                           ["--layer pool_1 is a MaxPooling2D, not a Conv2D; conv layers are: conv_1"]),
    "missing set": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, lambda p: None,
                                                                            "cl/test.h5")],
                    ["cl/test.h5: no such file"]),
    "set is a directory": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, Path.mkdir)],
                           ["valid.h5 is a directory"]),
    "set is a pipe": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, fifo)],
                      ["valid.h5 is not a regular file"]),
    "--data above the lab layout": (lambda lab, tmp: [*model_args(lab), "--data", lab.folder],
                                    ["none of cl/valid.h5, bd/bd_valid.h5", "/data holds them: --data /"]),
    "--data without the lab layout": (lambda lab, tmp: [*model_args(lab), "--data", tmp],
                                      ["none of cl/valid.h5", "give the folder holding cl/ and bd/"]),
    "--data is a file": (lambda lab, tmp: [*model_args(lab), "--data", lab.data / "cl/valid.h5"],
                         ["not a directory"]),
    "set is not HDF5": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, text_file)],
                        ["valid.h5 is not an HDF5 file; is it truncated or another format?"]),
    "set truncated": (lambda lab, tmp: [*model_args(lab), "--data",
                                        data_with(lab, tmp, truncated(lab.data / "cl/valid.h5"))],
                      ["valid.h5 is truncated", "copy it again"]),
    "set half written": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, half_written)],
                         ["not completely written"]),
    # compressed, its size says nothing of what is missing: the other chunks read as zeros
    "set half written, compressed": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lambda path: half_written(path, "gzip"))],
        ["only 1 of the 5 chunks of 'data' are stored", "not completely written"]),
    "set without data and label": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lambda p: write_h5(p, images=lab_images(4), labels=np.zeros(4)))],
        ["no 'data' or 'label' dataset", "found ['images', 'labels']"]),
    "data is a group": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(data="group"))], ["must be datasets"]),
    "images of the wrong size": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(data=np.zeros((ROWS[0], 3, 32, 32), "f4")))],
        ["images have shape (3, 32, 32)", "55x47x3"]),
    "height and width swapped": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(data=np.zeros((ROWS[0], 3, 47, 55), "f4")))],
        ["height and width look swapped"]),
    "images flattened": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(data=np.zeros((ROWS[0], 55 * 47 * 3), "f4")))],
        ["images are flattened to 7755 values each"]),
    "NCHW and NHWC ambiguous": (lambda lab, tmp: ["--model", lab.folder / "cube.keras", "--data", data_with(
        lab, tmp, lab_set_with(data=np.zeros((ROWS[0], 4, 4, 4), "f4"), label=np.zeros(ROWS[0])))],
        ["NCHW and NHWC cannot be told apart"]),
    "pixels are not numbers": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(data=np.full((ROWS[0], 3, 55, 47), b"x")))], ["not numbers"]),
    "NaN pixels": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, with_pixel(np.nan))],
                   ["NaN or infinite pixels in row 7"]),
    "infinite pixels": (lambda lab, tmp: [*model_args(lab), "--data", data_with(lab, tmp, with_pixel(np.inf))],
                        ["NaN or infinite pixels in row 7"]),
    "labels out of range": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.full(ROWS[0], CLASSES, "f4")))],
        ["labels range 10..10", "classes 0..9"]),
    "negative labels": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.full(ROWS[0], -1)))], ["labels range -1..-1"]),
    "labels not integers": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.full(ROWS[0], 2.5)))], ["whole class numbers", "2.5"]),
    "NaN labels": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.full(ROWS[0], np.nan)))], ["whole class numbers"]),
    "labels are text": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.full(ROWS[0], b"cat")))], ["whole class numbers", "cat"]),
    "one-hot labels": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.eye(CLASSES)[np.arange(ROWS[0]) % CLASSES]))], ["one-hot"]),
    "fewer labels than images": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(label=np.zeros(ROWS[0] - 1)))], ["39 labels for 40 images"]),
    "empty set": (lambda lab, tmp: [*model_args(lab), "--data", data_with(
        lab, tmp, lab_set_with(rows=0))], ["the set is empty"]),
    "--demo with a model": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--demo", "pruning-aware"],
                            ["--demo pruning-aware is the embedded demo's BadNet and data"]),
    "fine-tune 0 epochs": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                             "--fine-tune-epochs", "0"],
                           ["--fine-tune-epochs must be at least 1, got 0"]),
    "fine-tune lr 0": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                         "--fine-tune-lr", "0"], ["--fine-tune-lr must be a positive number"]),
    "fine-tune lr inf": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                           "--fine-tune-lr", "inf"], ["--fine-tune-lr must be a positive number"]),
    "fine-tune lr not a number": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                                    "--fine-tune-lr", "fast"], ["--fine-tune-lr", "invalid float"]),
    "fine-tune held out 1": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                               "--fine-tune-heldout", "1"], ["--fine-tune-heldout must be a share"]),
    "fine-tune tolerance negative": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune",
                                                      "--fine-tune-tolerance", "-1"],
                                     ["--fine-tune-tolerance must be points between 0 and 100, got -1.0"]),
    "fine-tune setting without --fine-tune": (
        lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--fine-tune-patience", "5"],
        ["--fine-tune-patience is a setting of --fine-tune; add --fine-tune"]),
    "negative threshold": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--thresholds", "2", "-1"],
                           ["--thresholds -1: each must be a number of points from 0 to below 100"]),
    "threshold 100": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--thresholds", "100"],
                      ["--thresholds 100:"]),
    "relative threshold 100": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--relative",
                                                 "--thresholds", "100"],
                               ["--thresholds 100: each must be a number of percent of B's"]),
    "threshold NaN": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--thresholds", "nan"],
                      ["--thresholds nan:"]),
    "threshold not a number": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--thresholds", "2%"],
                               ["--thresholds: invalid float value: '2%'"]),
    # root writes through permission bits, so these folders fail for root too: a path under a
    # regular file (ENOTDIR) and /proc (a pseudo filesystem that takes no new files)
    "--out under a file": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                             "--out", lab.model / "results"],
                           ["bd_net.keras is a file, not a folder"]),
    "--out in /proc": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                         "--out", "/proc/fine-pruning-results"],
                       ["/proc is a pseudo filesystem"]),
    "--classes with --model": (lambda lab, tmp: ["--model", lab.model, "--data", lab.data, "--classes", "10"],
                               ["--classes is for a weights-only file (--weights PATH)"]),
    "--out is a broken link": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                                 "--out", broken_link(tmp / "out-link") / "run1"],
                               ["out-link is a broken symbolic link (to", "nowhere"]),
    # the lock is written in place: through a link, into whatever file it points to
    "lock file is a link": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                              "--out", linked_lock(tmp / "prev", text_file(tmp / "notes.txt"))],
                            [".sweep.lock is a symbolic link (to", "notes.txt", "remove the link"]),
    # a folder of that common name that another tool wrote: replacing it would delete them
    "--out holds another tool's checkpoints": (lambda lab, tmp: [
        *model_args(lab), "--data", lab.data,
        "--out", text_file(tmp / "proj" / "checkpoints" / "epoch-3.ckpt").parents[1]],
        ["proj/checkpoints holds files that no sweep writes (epoch-3.ckpt)", "move them"]),
    "--out is a file": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--out", lab.model],
                        ["is a file; give a folder"]),
    "--scheduler-file is a directory": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                                          "--scheduler-file", tmp],
                                        ["--scheduler-file", "is a directory"]),
    # (a scheduler file not there yet is waited for: the scheduler writes it as it starts)
    "--scheduler-file is not JSON": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                                       "--scheduler-file", text_file(tmp / "sched.json")],
                                     ["--scheduler-file", "sched.json is not a Dask scheduler file"]),
    "--scheduler-file without an address": (lambda lab, tmp: [
        *model_args(lab), "--data", lab.data, "--scheduler-file", text_file(tmp / "sched.json", '{"id": 1}')],
        ["sched.json is not a Dask scheduler file", "dask scheduler --scheduler-file PATH"]),
    "no place to run": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--nowhere"],
                        ["say where to run: --single-node"]),
    "--chunk-rows 0": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--chunk-rows", "0"],
                       ["--chunk-rows must be at least 1"]),
    "--prefixes-per-task 0": (lambda lab, tmp: [*model_args(lab), "--data", lab.data,
                                                "--prefixes-per-task", "0"],
                              ["--prefixes-per-task must be at least 1"]),
    "unknown option": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--prune-harder"],
                       ["unrecognized arguments: --prune-harder"]),
    "NAME=PATH without a name": (lambda lab, tmp: [*model_args(lab), "--clean-valid", lab.data / "cl/valid.h5",
                                                   "--poisoned-valid", "=nope.h5"],
                                 ["--poisoned-valid =nope.h5: give NAME=PATH"]),
    "NAME=PATH without a path": (lambda lab, tmp: [*model_args(lab), "--clean-valid", lab.data / "cl/valid.h5",
                                                   "--poisoned-test", "lipstick="],
                                 ["--poisoned-test lipstick=: give NAME=PATH"]),
    "a name that ends no column": (lambda lab, tmp: [*model_args(lab), "--clean-valid", lab.data / "cl/valid.h5",
                                                     "--poisoned-valid", f"multi-trigger={lab.data / 'bd/bd_valid.h5'}"],
                                   ["the name 'multi-trigger' ends column names", "letters, digits and _"]),
    "a name given twice": (lambda lab, tmp: [*model_args(lab), "--clean-valid", lab.data / "cl/valid.h5",
                                             "--poisoned-valid", f"red={lab.data / 'bd/bd_valid.h5'}",
                                             "--poisoned-valid", f"red={lab.data / 'bd/bd_test.h5'}"],
                           ["--poisoned-valid named red is given twice"]),
    "two bare poisoned sets": (lambda lab, tmp: [*model_args(lab), "--clean-valid", lab.data / "cl/valid.h5",
                                                 "--poisoned-test", lab.data / "bd/bd_valid.h5",
                                                 "--poisoned-test", lab.data / "bd/bd_test.h5"],
                               ["--poisoned-test without a name is given twice"]),
    "no clean validation set": (lambda lab, tmp: [*model_args(lab), "--clean-test", lab.data / "cl/test.h5"],
                                ["missing --clean-valid"]),
    "--data and a named set": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--poisoned-valid",
                                                 f"red={lab.data / 'bd/bd_valid.h5'}"],
                               ["give either --data DIR or the set files, not both"]),
    "--rescale abc": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--rescale", "abc"],
                      ["--rescale abc: give a positive number or fraction"]),
    "--rescale 0": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--rescale", "0"],
                    ["--rescale 0: it must be above 0"]),
    "--rescale 1/0": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--rescale", "1/0"],
                      ["--rescale 1/0: give a positive number or fraction"]),
    "--rescale negative": (lambda lab, tmp: [*model_args(lab), "--data", lab.data, "--rescale=-1/255"],
                           ["--rescale -1/255: it must be above 0"]),
    # B' of an earlier run given as B, with that run's folder as --out: the run would replace
    # the very file it was given (or remove it, as a model of other thresholds)
    "--model is a B' in --out": (lambda lab, tmp: ["--model", earlier_model(lab, tmp, "model_X=10.h5"),
                                                   "--data", lab.data, "--out", tmp / "prev",
                                                   "--thresholds", "2"],
                                 ["--out", "holds the model", "model_X=10.h5", "replace or remove it"]),
}


def earlier_model(lab, tmp: Path, name: str) -> Path:
    """B copied into a previous run's folder under the name of one of its B' models."""
    shutil.copy(lab.folder / "bd_net.h5", previous_run(tmp / "prev") / name)
    (tmp / "prev" / "manifest.json").write_text('{"selected": {"10": 5}}\n')
    return tmp / "prev" / name


def truncated_copy(source: Path, tmp: Path) -> Path:
    target = tmp / source.name
    truncated(source)(target)
    return target


# ---------------------------------------------------------------- the output folder

def previous_run(out: Path) -> Path:
    """An output folder as a finished run leaves it: results, models, lock, checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.csv": "channels_pruned,valid_accuracy\n0,98.6\n", "goodnet.csv": "threshold\n2\n",
             "channel_order.csv": "channel\n3\n", "manifest.json": "{}\n", "model_X=2.h5": "B'",
             "goodnet_X=2.keras": "G", "results.png": "png", ".sweep.lock": "host old pid 1\n",
             "checkpoints/fingerprint.json": '{"inputs": "other"}\n',
             "checkpoints/channel_order.csv": "channel\n3\n",
             "checkpoints/chunk-clean_valid-00000.json": '{"set": "clean_valid", "chunk": 0, "prefixes": []}\n'}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


def listing(path: Path) -> dict | None:
    """Everything under ``path`` (or the file itself): type, mode, and a file's size and bytes
    (of the lock file, which is no output, its type alone)."""
    if not os.path.lexists(path):
        return None
    entries = {}
    for entry in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        info = entry.lstat()
        content = entry.is_file() and entry.name != ".sweep.lock"
        entries[str(entry.relative_to(path))] = (
            stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_size if content else None,
            entry.read_bytes() if content else None)
    return entries


@pytest.fixture(params=["previous results", "no folder yet"])
def out(request, tmp_path):
    folder = tmp_path / "out"
    if request.param == "previous results":
        previous_run(folder)
    return folder


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if the sweep starts a Dask cluster (or joins one)."""
    started = []

    def open_client(args):
        started.append(args)
        raise AssertionError("a Dask cluster was started for a bad input")

    monkeypatch.setattr(jobs.cluster, "open_client", open_client)
    return started


def sweep(capsys, argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def full_argv(argv, out: Path) -> list:
    argv = list(argv)
    if "--nowhere" in argv:
        argv.remove("--nowhere")
    elif "--scheduler-file" not in argv:
        argv.append("--single-node")
    return argv if "--out" in argv else [*argv, "--out", out]


def assert_one_error_line(err: str, words) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# ---------------------------------------------------------------- every case, in process

@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_any_work(lab, case, out, tmp_path, capsys, no_cluster):
    build, words = CASES[case]
    argv = full_argv(build(lab, tmp_path), out)
    target = Path(argv[argv.index("--out") + 1])
    before = listing(target)
    started = time.perf_counter()
    status, stdout, err = sweep(capsys, argv)
    assert (status, stdout) == (2, "")
    assert_one_error_line(err, words)
    assert no_cluster == []
    assert time.perf_counter() - started < 30  # found up front, not after a sweep
    assert listing(target) == before  # None stays None: the folder is not created


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_out_is_bad_input(lab, capsys, no_cluster, empty):
    """Not in CASES: the folder it would have meant is the current one, too big to compare
    (or a folder named by blanks in it)."""
    status, stdout, err = sweep(capsys, [*map(str, model_args(lab)), "--data", str(lab.data),
                                         "--single-node", "--out", empty])
    assert (status, stdout, no_cluster) == (2, "", [])
    assert_one_error_line(err, ["--out is empty; give a folder"])


def test_flag_defaults_are_the_ones_the_help_and_readme_give():
    from jobs.sweep import parse_args
    args = parse_args(["--weights", "bd_weights.h5", "--check"])
    assert (args.thresholds, args.arch, args.classes, args.out) == ([2.0, 4.0, 10.0], "deepid", 1283, "results")


@pytest.mark.parametrize("flags", [["--arch", "deepid"], ["--classes", "10"]])
def test_architecture_flags_without_weights_are_refused(flags):
    """With the demo (no model given) they would be ignored without a word."""
    from jobs.sweep import parse_args
    with pytest.raises(InputError, match=f"{flags[0]} is for a weights-only file"):
        parse_args([*flags, "--check"])


def test_check_flag_checks_everything_and_starts_nothing(lab, out, capsys, no_cluster):
    before = listing(out)
    # no --single-node: slurm/sweep.sh runs --check with the user's arguments alone
    status, stdout, err = sweep(capsys, ["--check", *model_args(lab), "--data", lab.data, "--out", out])
    assert status == 0 and no_cluster == []
    assert stdout.startswith("inputs OK: ") and stdout.count("\n") == 1
    assert "layer conv_3 (12 channels, read at pool_3)" in stdout and "40+30+30+30 images" in stdout
    assert listing(out) == before

    status, stdout, err = sweep(capsys, ["--check", *model_args(lab), "--data", lab.data,
                                         "--out", out, "--layer", "conv_9"])
    assert (status, stdout) == (2, "")
    assert_one_error_line(err, ["--layer conv_9 not found"])
    assert listing(out) == before


def test_check_flag_refuses_an_output_folder_in_use(lab, tmp_path, capsys, no_cluster):
    out = previous_run(tmp_path / "out")
    before = listing(out)
    with open(out / ".sweep.lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, stdout, err = sweep(capsys, ["--check", *model_args(lab), "--data", lab.data, "--out", out])
    assert (status, stdout) == (2, "")
    assert_one_error_line(err, ["in use by a running sweep (host old pid 1)"])
    assert listing(out) == before


def test_an_unexpected_error_is_one_line_with_status_1(lab, out, capsys, monkeypatch, no_cluster):
    def broken(args, before_the_model=None):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(jobs.inputs, "resolve_inputs", broken)
    before = listing(out)
    status, stdout, err = sweep(capsys, [*model_args(lab), "--data", lab.data, "--single-node", "--out", out])
    assert (status, stdout) == (1, "")
    assert_one_error_line(err, ["internal error (RuntimeError: something unforeseen)", "--traceback"])
    assert listing(out) == before
    with pytest.raises(RuntimeError):
        main([*map(str, model_args(lab)), "--data", str(lab.data), "--single-node", "--out", str(out),
              "--traceback"])


def test_a_failure_while_closing_after_a_stop_is_the_stop(lab, out, capsys, monkeypatch, no_cluster):
    """Closing a cluster after a stop can fail inside distributed (a call whose coroutine was
    cancelled, seen once in CI after SIGHUP): the run still ends with the stop's line and status."""
    from jobs.stopping import Stopped

    def stopped_then_failed(args, before_the_model=None):
        try:
            raise Stopped(signal.SIGHUP)
        except KeyboardInterrupt:  # as a context's exit does when its close fails
            raise UnboundLocalError("cannot access local variable 'result'") from None

    monkeypatch.setattr(jobs.inputs, "resolve_inputs", stopped_then_failed)
    before = listing(out)
    status, stdout, err = sweep(capsys, [*model_args(lab), "--data", lab.data, "--single-node", "--out", out])
    assert (status, stdout) == (128 + signal.SIGHUP, "")
    assert err.count("\n") == 1 and err.startswith("stopped by SIGHUP"), err
    assert listing(out) == before


# ---------------------------------------------------------------- real processes

SUBPROCESS_CASES = ["set truncated", "--layer not found", "--out under a file"]


def test_command_line_prints_exactly_one_line_and_no_traceback(lab, tmp_path):
    """As a user (or slurm/sweep.sh) runs it, TensorFlow's start-up lines included: stderr is
    the one error line. Also ``--check`` on good inputs: one ``inputs OK`` line on stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "jobs.sweep"]
    runs = {}
    for case in SUBPROCESS_CASES:
        tmp = tmp_path / case.replace(" ", "_")
        tmp.mkdir()
        argv = full_argv(CASES[case][0](lab, tmp), previous_run(tmp / "out"))
        target = Path(argv[argv.index("--out") + 1])
        runs[case] = (target, listing(target), subprocess.Popen(
            [*command, *map(str, argv)], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    check_out = tmp_path / "check" / "out"
    check = subprocess.Popen([*command, "--check", "--model", str(lab.model), "--data", str(lab.data),
                              "--out", str(check_out)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for case, (target, before, process) in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        assert (process.returncode, stdout) == (2, ""), (case, stderr)
        assert_one_error_line(stderr, CASES[case][1])
        assert listing(target) == before, case
    stdout, stderr = check.communicate(timeout=120)
    assert check.returncode == 0, stderr
    assert stdout.startswith("inputs OK: ") and stdout.count("\n") == 1
    assert "Traceback" not in stderr and not check_out.exists()


@pytest.mark.parametrize("setting, says", [
    ({"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "sixty"},
     "Dask setting distributed.comm.timeouts.connect is 'sixty' (from "
     "$DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT), not a time like '30s'"),
    ({"DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "most"},  # a worker's traceback, then a Nanny error
     "distributed.worker.memory.target is 'most' (from $DASK_DISTRIBUTED__WORKER__MEMORY__TARGET), "
     "not a number"),
    ({"DASK_CONFIG": "{tmp}/dask.yaml"}, "A dask config file at '{tmp}/dask.yaml' is malformed ("),
    ({"DASK_CONFIG": "{tmp}/list.yaml"}, "config files must have a dict as the top level object"),
    ({"DASK_TEMPORARY_DIRECTORY": "{tmp}/list.yaml/scratch"},
     "Dask setting temporary-directory is '{tmp}/list.yaml/scratch' (from $DASK_TEMPORARY_DIRECTORY): "
     "{tmp}/list.yaml is a file, not a folder"),
])
def test_bad_dask_settings_are_one_line_before_any_work(lab, tmp_path, setting, says):
    """Dask's own settings (DASK_* variables, its yaml files) are inputs too: a value that
    distributed cannot read failed deep in the cluster's start as an internal error, and a
    malformed file as dask was imported, with its traceback."""
    (tmp_path / "dask.yaml").write_text("distributed:\n  comm: [timeouts\n")  # a bracket not closed
    (tmp_path / "list.yaml").write_text("- distributed\n")
    env = os.environ | {name: value.format(tmp=tmp_path) for name, value in setting.items()}
    out = previous_run(tmp_path / "out")
    before = listing(out)
    done = subprocess.run([sys.executable, "-m", "jobs.sweep", *map(str, model_args(lab)), "--data",
                           str(lab.data), "--single-node", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert_one_error_line(done.stderr, [says.format(tmp=tmp_path)])
    assert listing(out) == before


@pytest.mark.parametrize("setting, wanted", [
    ({"distributed.worker.memory.target": False}, None),  # off, as Dask's docs say
    ({"distributed.worker.memory.pause": 0.9}, None),
    ({"distributed.scheduler.work-stealing": False}, None),
    ({"distributed.scheduler.work-stealing": 0}, None),   # DASK_..._WORK_STEALING=0
    ({"distributed.comm.timeouts.connect": "2s"}, None),
    ({"distributed.comm.timeouts.connect": 60}, None),    # seconds
    ({"distributed.comm.shard": "1 GiB"}, None),
    ({"distributed.worker.memory.target": "most"}, "not a number"),
    ({"distributed.scheduler.work-stealing": "maybe"}, "not True or False"),
    ({"distributed.comm.timeouts.connect": "sixty"}, "not a time like '30s'"),
    ({"distributed.comm.shard": "lots"}, "not a size like '64MiB'"),
])
def test_each_dask_setting_is_checked_against_the_kind_of_its_default(setting, wanted):
    """(In process: test_bad_dask_settings_are_one_line_before_any_work runs the command.)"""
    from jobs.settings import load_config, settings_problem
    load_config()
    [(key, value)] = setting.items()
    variable = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
    with dask.config.set(setting):
        problem = settings_problem({variable: str(value)})
    if wanted is None:
        assert problem is None
    else:
        assert problem == (f"Dask setting {key} is {value!r} (from ${variable}), {wanted}; "
                           "correct it or unset it")


@pytest.mark.parametrize("setting, says", [
    ({}, None),
    ({"jobqueue.slurm.job-cpu": 8}, None),
    ({"jobqueue.slurm.job-cpu": None}, None),  # then cores, as dask_jobqueue does
    ({"jobqueue.slurm.cores": 0}, "cores is 0, not a whole number of at least 1"),
    ({"jobqueue.slurm.processes": True}, "processes is True, not a whole number of at least 1"),
    ({"jobqueue.slurm.job-cpu": "four"}, "job-cpu is 'four', not a whole number of at least 1"),
])
def test_worker_job_counts_are_whole_numbers_of_at_least_one(setting, says):
    from jobs.settings import load_config, worker_job_counts_problem
    load_config()
    with dask.config.set(setting):
        assert worker_job_counts_problem() == says


def test_a_local_cluster_that_does_not_start_is_one_line_naming_why(lab, tmp_path, capsys, monkeypatch):
    """Not an internal error to report: a port, a folder or a setting of this machine's."""
    def fails(**options):
        raise RuntimeError("Cluster failed to start: [Errno 28] No space left on device: '/scratch'")

    monkeypatch.setattr(jobs.cluster, "LocalCluster", fails)
    out = previous_run(tmp_path / "out")
    before = listing(out)
    status, stdout, err = sweep(capsys, [*model_args(lab), "--data", lab.data, "--single-node", "--out", out])
    assert (status, stdout) == (1, "")
    assert_one_error_line(err, ["the local Dask cluster did not start ([Errno 28] No space left on "
                                "device: '/scratch')", "Dask's settings"])
    assert "internal error" not in err and listing(out) == before


@pytest.mark.parametrize("argv, says", [
    (["--prune-harder"], "error: unrecognized arguments: --prune-harder"),
    (["--model", "bd_net.h5", "--data", "no-such-folder", "--single-node", "--out", "{tmp}/out"],
     "error: --data no-such-folder: not a directory;"),
])
def test_flags_and_paths_are_checked_before_tensorflow_is_imported(argv, says, tmp_path):
    """--help, a mistyped flag or path need no TensorFlow (which takes seconds to import), and
    --single-node starts no process for its workers before the paths are found."""
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    probe = ("import sys, psutil\nfrom jobs.sweep import main\n"
             f"status = main({argv!r})\n"
             "print(status, 'tensorflow' in sys.modules, 'keras' in sys.modules, "
             "len(psutil.Process().children()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False", "False", "0"], done.stderr
    assert done.stderr.startswith(says), done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- found late, on a worker

def nan_rows(lab, tmp: Path, rel: str) -> Path:
    images = lab_images(ROWS[list(pruning.data.LAB_LAYOUT.values()).index(rel)])
    images[-3, 0, 5, 5] = np.nan  # in the last chunk
    rows = len(images)
    return data_with(lab, tmp, lab_set_with(rows=rows, data=images,
                                            label=np.zeros(rows, "f4")), rel)


@pytest.mark.parametrize("rel", ["cl/valid.h5", "bd/bd_test.h5"])
def test_nan_found_by_a_worker_is_one_line_and_keeps_previous_results(
        lab, tmp_path, capfd, monkeypatch, rel):
    """The up-front scan reads a sample of a big set; here it reads nothing, so the NaN row is
    found by a worker inside a Dask task, and the InputError travels back to the client.
    (A folder that did not exist is not left behind either: see
    test_a_failed_run_puts_the_folder_back_as_it_was.)"""
    monkeypatch.setattr(pruning.data, "SCAN_BYTES", 0)
    out = previous_run(tmp_path / "out")
    before = listing(out)
    data = nan_rows(lab, tmp_path, rel)
    status = main([*map(str, model_args(lab)), "--data", str(data), "--out", str(out),
                   "--single-node", "--chunk-rows", "16"])
    err = capfd.readouterr().err  # this process and its worker processes
    assert status == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: {data / rel}: NaN or infinite pixels in row")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert "Traceback" not in err  # nor from the worker: it logs one line, the client reports
    after = listing(out)
    if rel == "cl/valid.h5":  # fails before the first checkpoint: not a byte changes
        assert after == before
    else:  # finished chunks may be checkpointed for a rerun; nothing else changes
        assert {k: v for k, v in after.items() if not k.startswith("checkpoints")} == \
            {k: v for k, v in before.items() if not k.startswith("checkpoints")}


def die(*args):
    os._exit(3)  # a worker process dying mid-task (out of memory, a crash in a library)


def test_a_task_that_kills_its_workers_is_one_line(lab, tmp_path, capfd, monkeypatch):
    jobs.settings.load_config()  # the yaml defaults first, then this test's setting on top
    monkeypatch.setattr(pruning.sweep, "activations_task", die)
    out = previous_run(tmp_path / "out")
    before = listing(out)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        status = main([*map(str, model_args(lab)), "--data", str(lab.data), "--out", str(out),
                       "--single-node", "--chunk-rows", "16"])
    lines = capfd.readouterr().err.strip().splitlines()
    assert status == 1
    # (the restarted worker may log distributed's own traceback as the cluster closes under it:
    # worker log lines, not ours; ours is the last line, and the only error line)
    assert lines[-1].startswith("error: task activations-") and "killed 1 Dask worker(s)" in lines[-1]
    assert "see the worker logs" in lines[-1]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert listing(out) == before


# ---------------------------------------------------------------- the loader, fuzzed

SHAPE = (4, 5, 3)  # H, W, C of a small model

def often(common, *rare, times: int = 5):
    """``common`` about ``times`` times as often as each of ``rare``: most files get far enough
    to meet the later checks (labels, pixels), the rest break early in every way."""
    return st.sampled_from([common] * times + list(rare))


dims = st.sampled_from([0, 1, 2, 3, 4, 5])
pixel_dtypes = often("f4", "f8", "f2", "i1", "u1", "i8", "u8", "?", "S2", "c8", times=8)
label_dtypes = often("f4", "f8", "f2", "i4", "u2", "i8", "u8", "?", "S3", times=8)
good_values = st.sampled_from([0.0, 1.0, 2.0, 5.0, 255.0])
bad_values = st.sampled_from([6.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e30, 2.0 ** 63])
kinds = often("array", "missing", "group", "scalar", "empty", "dangling link", "unwritten", times=18)


@st.composite
def lab_files(draw):
    rows = draw(often(3, 0, 1, 2, 7, times=2))
    layout = draw(often((3, 4, 5), (4, 5, 3), (4, 5, 3), (5, 4, 3), (3, 5, 4), (4, 5), ()))
    shape = draw(often((rows, *layout), st.lists(dims, max_size=5).map(tuple), times=8))
    shape = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    label_shape = draw(often((rows,), (rows, 1), (rows, 2), (), (rows + 1,), (max(rows - 1, 0),),
                             times=12))
    parts = {}
    for name, dtypes, part_shape in (("data", pixel_dtypes, shape), ("label", label_dtypes, label_shape)):
        kind, dtype = draw(kinds), np.dtype(draw(dtypes))
        size = int(np.prod(part_shape))
        fill = draw(st.lists(good_values, min_size=1, max_size=4))
        if draw(st.integers(0, 3)) == 0:  # a bad value somewhere
            fill.insert(draw(st.integers(0, len(fill))), draw(bad_values))
        array = np.resize(np.asarray(fill, dtype="f8"), size).reshape(part_shape) if size else \
            np.zeros(part_shape)
        if dtype.kind in "iu?":
            array = np.nan_to_num(array, nan=0, posinf=0, neginf=0).clip(-100, 100)
        with np.errstate(all="ignore"):
            array = array.astype(dtype) if dtype.kind != "S" else array.astype(str).astype(dtype)
        parts[name] = (kind, array, draw(st.sampled_from([None, "chunked", "gzip"])))
    damage = draw(often("none", "truncate", "flip", "flip", "garbage", "zero", times=12))
    cut = draw(st.floats(0, 1))
    flips = draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6))
    return parts, damage, cut, flips


def write_fuzz(path: Path, parts, damage, cut, flips) -> None:
    with h5py.File(path, "w") as f:
        for name, (kind, array, storage) in parts.items():
            options = {}
            if storage and array.ndim and array.size:
                options = {"chunks": True, "compression": "gzip" if storage == "gzip" else None}
            if kind == "array":
                f.create_dataset(name, data=array, **options)
            elif kind == "group":
                f.create_group(name)
            elif kind == "scalar":
                f[name] = array.reshape(-1)[0] if array.size else 0
            elif kind == "empty":
                f[name] = h5py.Empty(array.dtype if array.dtype.kind != "S" else "f4")
            elif kind == "dangling link":
                f[name] = h5py.SoftLink("/nowhere")
            elif kind == "unwritten":
                f.create_dataset(name, shape=array.shape, dtype=array.dtype, **options)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: int(len(raw) * cut)]
    elif damage == "flip" and raw:
        for where, value in flips:
            raw[min(int(where * len(raw)), len(raw) - 1)] = value
    elif damage == "garbage":
        raw = bytearray(os.urandom(int(cut * 4096)))
    elif damage == "zero":
        raw = bytearray()
    path.write_bytes(bytes(raw))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=lab_files(), classes=st.sampled_from([None, 3, 6]))
def test_malformed_hdf5_files_give_only_input_errors(tmp_path, spec, classes):
    path = tmp_path / "set.h5"  # rewritten by every example
    write_fuzz(path, *spec)
    try:
        lab_set = open_lab_set(path, SHAPE, classes)
        images, labels = lab_set.read()
        assert images.shape == (lab_set.rows, *SHAPE) and labels.shape == (lab_set.rows,)
        assert np.isfinite(images).all() and labels.dtype == np.int64
        for start, stop in lab_set.chunks(2):
            lab_set.read(start, stop)
    except InputError as error:
        message = str(error)
        assert message and "\n" not in message and str(path) in message


def test_a_file_damaged_after_the_check_is_an_input_error_on_read(lab, tmp_path):
    """A worker reading a file that changed under it (re-copied, cut short) gets an InputError."""
    path = tmp_path / "set.h5"
    shutil.copy(lab.data / "cl/valid.h5", path)
    lab_set = open_lab_set(path, tiny.SHAPE, CLASSES)
    truncated(lab.data / "cl/valid.h5")(path)
    with pytest.raises(InputError, match="truncated"):
        lab_set.read(0, 8)
    with h5py.File(path, "w") as f:
        f["data"], f["label"] = lab_images(4), np.zeros(4)
    with pytest.raises(InputError, match="rows 0-8 hold 4 images"):
        LabSet(str(path), 8, True).read(0, 8)


def test_big_sets_are_scanned_in_spread_out_blocks():
    ranges = pruning.data.scan_ranges(100_000, 31_020)
    scanned = sum(stop - start for start, stop in ranges)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100_000
    assert scanned * 31_020 <= pruning.data.SCAN_BYTES and scanned > 500
    assert pruning.data.scan_ranges(40, 31_020) == [(0, 40)]  # a small set: every row


def test_chunks_of_rows_cover_the_set_once():
    lab_set = LabSet("valid.h5", rows=10, channels_first=True)
    assert lab_set.chunks(4) == [(0, 4), (4, 8), (8, 10)]
    assert lab_set.chunks(10) == lab_set.chunks(64) == [(0, 10)]


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_set_missing_only_its_last_chunk_of_pixels_is_refused(tmp_path, compression):
    """A chunk never written reads as zeros: black images, scored as if they were the set's."""
    path = tmp_path / "valid.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("data", shape=(40, 3, 55, 47), dtype="f4", chunks=(8, 3, 55, 47),
                                compression=compression)
        data[:32] = lab_images(32)
        f["label"] = np.zeros(40, "f4")
    with pytest.raises(InputError, match="the file was not completely written"):
        open_lab_set(path, (55, 47, 3), CLASSES)


def test_nan_pixels_met_in_a_later_chunk_name_their_row_in_the_set(tmp_path):
    images = lab_images(24)
    images[19, 1, 5, 5] = np.nan
    write_h5(tmp_path / "valid.h5", data=images, label=np.zeros(24, "f4"))
    lab_set = LabSet(str(tmp_path / "valid.h5"), rows=24, channels_first=True)
    lab_set.read(0, 16)
    with pytest.raises(InputError, match="NaN or infinite pixels in row 19 "):
        lab_set.read(16, 24)


def test_a_damaged_demo_cache_is_built_again(tmp_path, monkeypatch):
    """A demo.json cut short (a full disk, a partial copy of the cache) is no demo: it is
    built again, not an internal error in the sweep and a traceback in pruning.demo."""
    import pruning.demo
    folder = tmp_path / f"demo-v{pruning.demo.VERSION}-seed0"
    folder.mkdir()
    (folder / "demo.json").write_text('{"target": 0, "clas')
    built = []

    def build(path: Path, seed: int, train: bool, attack: str = "standard") -> None:
        built.append(seed)
        (path / "demo.json").write_text('{"target": 0, "classes": 3, "seed": 0, '
                                        '"clean_accuracy": 1.0, "attack_success_rate": 1.0}')

    monkeypatch.setattr(pruning.demo, "_build", build)
    assert pruning.demo.ensure_demo(tmp_path).classes == 3 and built == [0]


def test_a_demo_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys, no_cluster):
    """$FINE_PRUNING_CACHE (or --cache) naming a file: bad input, exit 2, in a sweep without
    inputs and in pruning.demo (an OSError there, exit 1 with "check the disk space")."""
    import pruning.demo
    cache = text_file(tmp_path / "cache")
    monkeypatch.setenv("FINE_PRUNING_CACHE", str(cache))
    status, stdout, err = sweep(capsys, ["--single-node", "--out", tmp_path / "out"])
    assert (status, stdout) == (2, "")
    assert_one_error_line(err, [f"the demo cache {cache} is not a folder", "FINE_PRUNING_CACHE"])
    with pytest.raises(SystemExit) as stopped:
        pruning.demo.main(["--cache", str(cache / "sub")])
    assert stopped.value.code == 2
    assert_one_error_line(capsys.readouterr().err, [f"the demo cache {cache / 'sub'} is not a folder"])


# ---------------------------------------------------------------- the output folder itself

@pytest.mark.parametrize("state", ["previous results", "no folder yet"])
def test_a_failed_run_puts_the_folder_back_as_it_was(tmp_path, state):
    out = tmp_path / "deep" / "out"
    if state == "previous results":
        previous_run(out)
        (out / "plots").mkdir()  # the user's, empty
    before, parent_before = listing(out), listing(tmp_path)
    folder = OutputFolder(out)
    with pytest.raises(KeyError):
        with folder.locked():
            assert (out / ".sweep.lock").read_text().startswith("host ")
            checkpoints = Checkpoints(out / "checkpoints", {"inputs": "these"})
            assert checkpoints.chunks() == {}  # another run's: not read, not yet removed
            (out / ".dask" / "worker-logs").mkdir(parents=True)  # as SLURMCluster makes it
            raise KeyError("a failure during the run")
    assert listing(out) == before
    assert listing(tmp_path) == parent_before


def test_inputs_the_run_would_replace_or_remove_are_refused(tmp_path):
    out = previous_run(tmp_path / "out")
    (out / "manifest.json").write_text('{"selected": {"10": 5, "4": null}}\n')
    folder = OutputFolder(out, output_names([2.0]))
    (tmp_path / "link.h5").symlink_to(out / "model_X=2.h5")
    for path in (out / "model_X=2.h5", tmp_path / "link.h5",  # written by this run
                 out / "model_X=10.h5",                         # the earlier run's: removed
                 out / "checkpoints" / "set.h5"):               # replaced with other inputs'
        with pytest.raises(InputError, match=f"holds the clean_valid set {path}"):
            folder.check_inputs({"model": str(tmp_path / "bd_net.h5"), "clean_valid": str(path)})
    for path in (out / "model_X=4.h5", out / "my_model.h5"):  # no run of ours writes these
        folder.check_inputs({"model": str(path)})


def test_checkpoints_linked_elsewhere_are_replaced_in_place(tmp_path):
    """OUT/checkpoints as a link to scratch storage: another run's files there are replaced
    (they were removed with shutil.rmtree, which refuses a link: an OSError mid-sweep)."""
    out = previous_run(tmp_path / "out")
    scratch = tmp_path / "scratch"
    (out / "checkpoints").rename(scratch)
    (out / "checkpoints").symlink_to(scratch)
    Checkpoints(out / "checkpoints", {"inputs": "these"}).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    assert (out / "checkpoints").is_symlink()
    assert sorted(p.name for p in scratch.iterdir()) == ["chunk-clean_test-00000.json", "fingerprint.json"]


def test_a_failed_run_keeps_the_worker_logs_it_wrote(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyError):
        with OutputFolder(out).locked():
            (out / ".dask" / "worker-logs").mkdir(parents=True)
            (out / ".dask" / "worker-logs" / "job-7.err").write_text("why the job failed\n")
            (out / ".dask" / "empty").mkdir()
            raise KeyError("a failure during the run")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        ".dask", ".dask/worker-logs", ".dask/worker-logs/job-7.err"]


@pytest.mark.parametrize("name, made", [("results.csv", "folder"), ("model_X=2.h5", "folder"),
                                        ("checkpoints", "file"), (".sweep.lock", "folder")])
def test_an_entry_in_the_way_of_an_output_is_refused_before_any_work(tmp_path, name, made):
    """Found only when the outputs are renamed into place, after the whole sweep."""
    out = previous_run(tmp_path / "out")
    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    (out / name).mkdir() if made == "folder" else (out / name).write_text("x")
    with pytest.raises(InputError, match=f"{out / name} is in the way \\(a {made} where"):
        OutputFolder(out, output_names([2.0]))


def test_a_stopped_run_counts_only_checkpoints_of_its_own_inputs(tmp_path):
    out = OutputFolder(previous_run(tmp_path / "out"))
    assert interrupted_line(out) == ("interrupted before any chunk of rows was finished; no "
                                     "results or checkpoints were written")
    out.open_checkpoints({"inputs": "these"})  # not the previous run's: no resuming from them
    assert out.checkpoints.finished() == 0 and interrupted_line(out).startswith("interrupted before")
    out.open_checkpoints({"inputs": "other"})  # the same inputs: the same command resumes
    assert interrupted_line(out, signal.SIGTERM) == (
        f"stopped by SIGTERM; {out.path / 'checkpoints'} holds 1 finished chunks of rows: the "
        "same command resumes from them")


def test_checkpoints_of_other_inputs_are_replaced_only_by_a_result(tmp_path):
    out = previous_run(tmp_path)
    checkpoints = Checkpoints(out / "checkpoints", {"inputs": "these"})
    assert (out / "checkpoints" / "chunk-clean_valid-00000.json").exists()
    checkpoints.save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["chunk-clean_test-00000.json",
                                                                       "fingerprint.json"]
    (out / "checkpoints" / "chunk-clean_test-00001.json").write_text("{half a fi")  # killed mid-write
    assert Checkpoints(out / "checkpoints", {"inputs": "these"}).chunks() == {("clean_test", 0): [Counts(3, 2, 1, 0)]}


def test_eval_checks_both_sets_before_evaluating(lab, tmp_path, capsys):
    import pruning.evaluate as eval_script
    data = data_with(lab, tmp_path, with_pixel(np.nan), "bd/bd_valid.h5")
    status = eval_script.main([str(data / "cl/valid.h5"), str(data / "bd/bd_valid.h5"), str(lab.model)])
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "")
    assert_one_error_line(captured.err, ["bd_valid.h5: NaN or infinite pixels in row 7"])


@pytest.mark.parametrize("argv, says", [
    (["--scale", "nan"], "--scale must be a positive number, got nan"),
    (["--scale", "0"], "--scale must be a positive number, got 0"),
    (["--seed-prefixes", "0"], "--seed-prefixes must be 1 to 30"),
    (["--seed-prefixes", "31"], "--seed-prefixes must be 1 to 30"),
    (["--scale", "abc"], "argument --scale: invalid float value: 'abc'"),
    (["--weights", "/nonexistent/bd_weights.h5"], "weights /nonexistent/bd_weights.h5: no such file"),
])
def test_bench_refuses_bad_flags_in_one_line(argv, says, capsys):
    """Before it writes its 1.5 GB of inputs: they were a ZeroDivisionError, an IndexError
    after the first timings, h5py's traceback, or a usage block."""
    spec = importlib.util.spec_from_file_location("bench_for_bad_input", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as stopped:
        bench.main(argv)
    captured = capsys.readouterr()
    assert (stopped.value.code, captured.out) == (2, "")
    assert_one_error_line(captured.err, [says])


def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    from pruning.report import write_text
    target = tmp_path / "results.csv"
    target.write_text("the previous run's\n")

    def full(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write on a full disk does

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as raised:
        write_text(target, "new\n")
    monkeypatch.undo()
    message, status = explain(raised.value, None)
    assert (message, status) == (f"{target}: No space left on device; check the disk space and "
                                 "permissions there (rerun with --traceback for the details)", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left
    assert target.read_text() == "the previous run's\n"


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_run_stopped_while_writing_its_outputs_leaves_the_earlier_ones(lab, tmp_path, monkeypatch, stop):
    """Ctrl-C (or a full disk) after B' and G were saved, before the CSVs: none of the new
    files replaces an earlier run's, so its results, manifest and models still go together."""
    from jobs.finish import write_outputs
    from jobs.inputs import resolve_inputs
    from jobs.sweep import parse_args
    from pruning.defense import Defense
    out = previous_run(tmp_path / "out")
    before = listing(out)
    args = parse_args([*map(str, model_args(lab)), "--data", str(lab.data), "--out", str(out),
                       "--single-node", "--thresholds", "2", "4"])
    order = pd.DataFrame({"rank": range(12), "channel": range(12), "mean_activation": 0.0})
    correct = [40 - 3 * k for k in range(13)]  # X=2 and X=4 are reached: B' and G saved
    counts = {k: {name: Counts(40, correct[k], correct[k], 0) for name in pruning.data.SET_NAMES}
              for k in range(13)}

    def stopped(*args):
        raise stop

    monkeypatch.setattr(pruning.report, "plot_curve", stopped)
    defense = Defense(resolve_inputs(args), order, counts, tuple(args.thresholds))
    with pytest.raises(type(stop)), OutputFolder(out).locked():  # as jobs.sweep.sweep writes them
        write_outputs(out, defense)
    assert listing(out) == before


def test_a_reader_of_the_old_file_never_sees_the_new_one_being_written(tmp_path):
    """Written to another name and renamed into place: a reader that opened the old file
    reads it whole, not a file truncated and rewritten under it."""
    from pruning.report import write_text
    target = tmp_path / "results.csv"
    old = "channels_pruned,valid_accuracy\n" + "1,97.5\n" * 5000
    target.write_text(old)
    with open(target) as reader:
        reader.read(10)
        write_text(target, "channels_pruned,valid_accuracy\n0,98.0\n")
        assert old[:10] + reader.read() == old
    assert target.read_text() == "channels_pruned,valid_accuracy\n0,98.0\n"


def test_csv_outputs_hold_every_bit_of_each_number(tmp_path):
    """results.csv is read back by other tools (and checked against the lab's np.mean * 100)."""
    from pruning.report import write_csv
    curve = pd.DataFrame({"channels_pruned": [0, 35], "valid_accuracy": [97.03125, 100 * 283 / 300],
                          "valid_asr": [99.41225860621327, 1 / 3]})
    write_csv(tmp_path / "results.csv", curve)
    read = pd.read_csv(tmp_path / "results.csv", float_precision="round_trip")
    assert read.to_dict("list") == curve.to_dict("list")


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    from pruning.report import write_text
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "results.csv", "x\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.csv").stat().st_mode) == 0o640


def test_the_tls_key_file_is_the_owners_alone_whatever_the_umask(tmp_path):
    """It is written as every other file is, whole under a temporary name (pruning.files),
    but that temporary is made 0600 before a byte of the key is in it."""
    from distributed.security import Security
    from jobs.security import write_key_file
    security = Security.temporary()
    previous = os.umask(0)
    try:
        write_key_file(security, tmp_path / "dask" / "tls-7.0.pem")
    finally:
        os.umask(previous)
    assert [p.name for p in (tmp_path / "dask").iterdir()] == ["tls-7.0.pem"]
    assert stat.S_IMODE((tmp_path / "dask" / "tls-7.0.pem").stat().st_mode) == 0o600
    assert (tmp_path / "dask" / "tls-7.0.pem").read_text() == security.tls_scheduler_key + security.tls_scheduler_cert


# ---------------------------------------------------------------- runs, but with a warning

@pytest.mark.parametrize("scale, warned", [(1 / 255, True), (1.0, False)])
def test_pixels_unlike_raw_0_255_are_a_warning(tmp_path, caplog, scale, warned):
    images = np.random.default_rng(0).uniform(0, 255, (20, 55, 47, 3)) * scale
    pruning.data.write_lab_h5(tmp_path / "set.h5", images, np.zeros(20))
    with caplog.at_level(logging.WARNING, logger="pruning.data"):
        open_lab_set(tmp_path / "set.h5", (55, 47, 3), 10)
    said = [r.getMessage() for r in caplog.records if "raw 0-255 pixels" in r.getMessage()]
    assert len(said) == warned
    if warned:
        assert said[0].startswith(f"{tmp_path / 'set.h5'}: pixels range 6.86764e-07..0.999997; ")


def test_swapped_looking_inputs_are_warnings(caplog):
    from pruning.defense import check_baseline
    sets = {name: SimpleNamespace(path=f"/data/{name}.h5") for name in pruning.data.SET_NAMES}
    inputs = SimpleNamespace(sets=sets, hashes={"clean_valid": "a", "clean_test": "a",
                                                "poisoned_valid": "b", "poisoned_test": "c"})
    fine = pd.Series({"valid_accuracy": 96.0, "valid_asr": 99.0, "test_accuracy": 95.0, "test_asr": 98.0})
    with caplog.at_level(logging.INFO, logger="pruning.defense"):
        check_baseline(fine, SimpleNamespace(sets=sets, hashes={name: name for name in sets}))
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert caplog.records[0].getMessage() == ("B: validation accuracy 96.00 %, ASR 99.00 %; test "
                                              "accuracy 95.00 %, ASR 98.00 %")
    caplog.clear()
    odd = pd.Series({"valid_accuracy": 6.9, "valid_asr": 12.0, "test_accuracy": 96.5, "test_asr": 99.0})
    with caplog.at_level(logging.INFO, logger="pruning.defense"):
        check_baseline(odd, inputs)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "B's attack success rate on /data/poisoned_valid.h5 is only 12.0 %: is it the poisoned "
        "set, with the trigger, labelled with the attacker's target?",
        "B's clean accuracy is 6.9 % on /data/clean_valid.h5 but 96.5 % on /data/clean_test.h5: "
        "are both clean sets of B's task, stored alike?"]


def test_copies_of_one_set_are_a_warning_once_hashed(tmp_path, caplog):
    from jobs.inputs import warn_copied_sets
    (tmp_path / "v.h5").write_bytes(b"x")
    (tmp_path / "link.h5").symlink_to(tmp_path / "v.h5")
    paths = {"clean_valid": "v.h5", "clean_test": "copy.h5", "poisoned_valid": "link.h5", "poisoned_test": "b.h5"}
    sets = {name: SimpleNamespace(path=str(tmp_path / path)) for name, path in paths.items()}
    hashes = {"clean_valid": "a", "clean_test": "a", "poisoned_valid": "a", "poisoned_test": "b"}
    with caplog.at_level(logging.WARNING, logger="jobs.inputs"):
        warn_copied_sets(SimpleNamespace(sets=sets, hashes=hashes))
        warn_copied_sets(SimpleNamespace(sets={name: sets[name] for name in ("clean_valid", "poisoned_valid")},
                                         hashes=hashes))  # one file by two paths: said at the check
    assert [r.getMessage() for r in caplog.records] == [
        f"the clean_valid and clean_test and poisoned_valid sets are copies of one file ({tmp_path / 'v.h5'}, "
        f"{tmp_path / 'copy.h5'}, {tmp_path / 'link.h5'})"]


def test_one_file_given_for_two_sets_is_a_warning_at_the_check(lab, tmp_path, caplog):
    sets = pruning.data.lab_paths(lab.data)
    flags = ["--clean-valid", sets["clean_valid"], "--clean-test", sets["clean_valid"],
             "--poisoned-valid", sets["poisoned_valid"], "--poisoned-test", sets["poisoned_test"]]
    with caplog.at_level(logging.WARNING, logger="jobs.inputs"):
        assert main([*map(str, model_args(lab)), *map(str, flags), "--out", str(tmp_path / "out"), "--check"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"the clean_valid and clean_test sets are the same file ({os.path.abspath(sets['clean_valid'])})"]


@pytest.mark.parametrize("flags, says", [
    (["--layer", "conv_4"], "layers after conv_4 also read from before it, so B cannot be cut there"),
    (["--thresholds", "0.02", "0.04"], "--thresholds are points of validation accuracy (2 means 2 "
                                       "points below B's), not fractions: 0.02 0.04 selects"),
])
def test_flags_that_are_likely_mistakes_are_warnings(lab, tmp_path, caplog, flags, says):
    with caplog.at_level(logging.WARNING, logger="jobs.inputs"):
        assert main([*map(str, model_args(lab)), "--data", str(lab.data), "--out", str(tmp_path / "out"),
                     "--check", *flags]) == 0
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(says)], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.inputs"):  # and not without those flags
        assert main([*map(str, model_args(lab)), "--data", str(lab.data), "--out", str(tmp_path / "out"),
                     "--check"]) == 0
    assert not caplog.records, caplog.text


def test_a_killed_runs_half_written_files_are_removed_by_the_next_run(tmp_path):
    """kill -9 while outputs or a checkpoint were written leaves their temporaries (a whole
    B' among them); the next run to hold the lock removes them, and nothing else."""
    out = previous_run(tmp_path / "out")
    leftovers = [".model_X=2.ebab426c.h5", ".goodnet_X=7.5.58c71947.keras", ".results.0a1b2c3d.csv",
                 "checkpoints/.chunk-clean_test-00003.0f0f0f0f.json"]
    kept = [".model_X=2.h5", ".results.notahex.csv", "notes.0a1b2c3d.txt", ".bashrc",
            ".notes.0a1b2c3d.txt",          # a temporary's name, but of no output
            ".results.original.csv",        # eight letters, not hex
            "model_X=2.0a1b2c3d.h5",        # not hidden: a user's copy
            ".results.0a1b2c3d.csv.orig"]   # a temporary's name, and more
    for name in leftovers + kept:
        (out / name).write_text("half")
    with OutputFolder(out, output_names([2.0])).locked():
        assert [name for name in leftovers if (out / name).exists()] == []
    assert all((out / name).exists() for name in kept)


def test_checkpoints_of_another_chunk_size_say_how_to_resume_from_them(tmp_path, caplog):
    """After a worker ran out of memory the error advises a smaller --chunk-rows; the rerun
    with one cannot reuse the finished chunks, and must say so, not 'for other inputs'."""
    fingerprint = {"inputs": {"model": "aa", "clean_valid": "bb"}, "layer": "conv_3", "chunk_rows": 96,
                   "software": {"tensorflow": "2.16.1"}}
    Checkpoints(tmp_path, fingerprint).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    with caplog.at_level(logging.INFO, logger="jobs.checkpoints"):
        Checkpoints(tmp_path, fingerprint | {"chunk_rows": 64})
        Checkpoints(tmp_path, fingerprint | {"inputs": {"model": "aa", "clean_valid": "cc"},
                                             "software": {"tensorflow": "2.17.0"}})
    said = [record.getMessage() for record in caplog.records]
    assert [record.levelname for record in caplog.records] == ["WARNING", "WARNING"]
    assert "made with --chunk-rows 96 (this run: 64)" in said[0]
    assert "the same command with --chunk-rows 96 resumes from them" in said[0]
    assert "made with another clean_valid file, tensorflow 2.16.1 (this run: 2.17.0)" in said[1]


def test_a_full_disk_says_what_the_same_command_resumes_from(tmp_path):
    """Checkpoints of finished chunks outlive a full disk, as they do a stop: the line says so."""
    out = OutputFolder(tmp_path / "out")
    out.open_checkpoints({"inputs": "these"}).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out.path / "checkpoints" / "x.json"))
    message, status = explain(full, None, out)
    assert status == 1 and message.endswith(
        f"; {out.path / 'checkpoints'} holds 1 finished chunks of rows: the same command resumes "
        "from them (rerun with --traceback for the details)")


def test_a_channel_order_checkpoint_cut_short_is_profiled_again(tmp_path):
    """A checkpoint folder copied from another machine by a transfer that broke off: a CSV
    cut at a line still parses (a KeyError later, 'internal error', on every rerun), and one
    cut inside its last line names a wrong channel (11 read as 1, pruned twice)."""
    order = pd.DataFrame({"rank": range(12), "channel": [*range(10, -1, -1), 11][::-1],
                          "mean_activation": [0.5] * 12})
    checkpoints = Checkpoints(tmp_path, {"inputs": "these"})
    checkpoints.save_channel_order(order)
    whole = (tmp_path / "channel_order.csv").read_text()
    assert checkpoints.channel_order(12)["channel"].tolist() == order["channel"].tolist()
    for cut in (whole[:whole.rindex("\n", 0, -1) + 1], whole[:-6], whole[:-1]):
        (tmp_path / "channel_order.csv").write_text(cut)
        assert Checkpoints(tmp_path, {"inputs": "these"}).channel_order(12) is None, cut


def test_a_worker_out_of_memory_says_what_a_smaller_chunk_size_costs(tmp_path):
    """The line advises a smaller --chunk-rows; finished chunks are kept per --chunk-rows, so
    it must say that the same command resumes from them and another --chunk-rows starts over."""
    from distributed.scheduler import KilledWorker
    out = OutputFolder(tmp_path / "out")
    out.open_checkpoints({"inputs": "these"}).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    args = SimpleNamespace(slurm_runner=False, slurm_cluster=None, single_node=True, out=str(out.path))
    died = KilledWorker("evaluate-prefixes-0-61-clean_test-1-ab12cd34",
                        SimpleNamespace(address="tcp://127.0.0.1:4000"), 2)
    message, status = explain(died, args, out)
    assert status == 1 and "try a smaller --chunk-rows or more memory per worker" in message
    assert message.endswith(f"; {out.path / 'checkpoints'} holds 1 finished chunks of rows: the "
                            "same command resumes from them (another --chunk-rows starts over)")


def test_checkpoints_linked_to_a_purged_scratch_folder_are_refused_before_any_work(tmp_path):
    """OUT/checkpoints as a link into scratch storage whose purge removed the folder: the run
    profiled B, then failed with 'checkpoints: File exists; check the disk space'."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(tmp_path / "scratch" / "run1")
    with pytest.raises(InputError, match=f"{out / 'checkpoints'} is a broken symbolic link "
                                         f"\\(to {tmp_path / 'scratch' / 'run1'}\\)"):
        OutputFolder(out)



@contextlib.contextmanager
def full_disk():
    """Writes to files fail as on a full disk (here: EFBIG, past a file size limit of 0)."""
    import resource
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("state", ["previous results", "no folder yet"])
def test_a_lock_that_cannot_be_written_is_one_line_naming_it(tmp_path, state):
    """On a full disk the lock's own line could not be written: 'error: [Errno 28] No space
    left on device', naming no file, and an empty .sweep.lock (and --out) were left behind."""
    out = tmp_path / "out"
    if state == "previous results":
        previous_run(out)
    before = listing(tmp_path)
    with pytest.raises(OSError) as raised, full_disk():
        with OutputFolder(out).locked():
            pass
    assert raised.value.filename == str(out / ".sweep.lock")
    assert listing(tmp_path) == before


def test_a_stopped_run_does_not_count_damaged_checkpoints_as_finished(tmp_path):
    """A chunk file that cannot be read is evaluated again: the stop line's count leaves it
    out until this run has written it anew."""
    out = OutputFolder(tmp_path / "out")
    checkpoints = out.open_checkpoints({"inputs": "these"})
    checkpoints.save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    (checkpoints.folder / "chunk-clean_test-00001.json").write_text('{"set": "clean_te')
    assert list(checkpoints.chunks()) == [("clean_test", 0)] and checkpoints.finished() == 1
    checkpoints.save_chunk("clean_test", 1, [Counts(3, 2, 1, 0)])
    assert checkpoints.finished() == 2


def test_a_chunk_checkpoint_that_parses_but_does_not_fit_is_evaluated_again(tmp_path):
    """A chunk file of the wrong length made every rerun end in 'internal error (KeyError: 61)'.
    One under another chunk's name is not that chunk's either: skipped, as the name says."""
    checkpoints = Checkpoints(tmp_path, {"inputs": "these"})
    checkpoints.save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)] * 5)
    checkpoints.save_chunk("clean_test", 1, [Counts(3, 2, 1, 0)] * 6)  # k = 0..5, not 0..4
    shutil.copy(tmp_path / "chunk-clean_test-00000.json", tmp_path / "chunk-clean_test-00002.json")
    reread = Checkpoints(tmp_path, {"inputs": "these"})
    assert list(reread.chunks(prefixes=5)) == [("clean_test", 0)]
    assert reread.finished() == 1  # what the stop line says the same command resumes from


def test_another_runs_channel_order_is_not_read_and_is_said_to_be_replaced(tmp_path, caplog):
    """A folder that holds only another run's channel order (stopped while profiling): with
    these inputs' own number of channels it would sort B's channels by the wrong means."""
    order = pd.DataFrame({"rank": range(12), "channel": range(11, -1, -1), "mean_activation": 0.5})
    Checkpoints(tmp_path, {"inputs": "other"}).save_channel_order(order)
    with caplog.at_level(logging.WARNING, logger="jobs.checkpoints"):
        assert Checkpoints(tmp_path, {"inputs": "these"}).channel_order(12) is None
    assert "this run replaces them once it has a result of its own" in caplog.text
    assert Checkpoints(tmp_path, {"inputs": "other"}).channel_order(12)["channel"].tolist() == \
        list(range(11, -1, -1))


def test_a_channel_order_listing_a_channel_twice_is_profiled_again(tmp_path):
    checkpoints = Checkpoints(tmp_path, {"inputs": "these"})
    checkpoints.save_channel_order(pd.DataFrame({"rank": range(13), "channel": [*range(12), 11],
                                                 "mean_activation": 0.5}))
    assert Checkpoints(tmp_path, {"inputs": "these"}).channel_order(12) is None


def test_checkpoints_of_an_older_version_are_replaced_with_a_warning(tmp_path, caplog):
    """A fingerprint with other keys (a version of this project before the layer read at
    was part of it) is another run's, said as such; it was a KeyError, an internal error."""
    Checkpoints(tmp_path, {"inputs": "these"}).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    with caplog.at_level(logging.WARNING, logger="jobs.checkpoints"):
        checkpoints = Checkpoints(tmp_path, {"inputs": "these", "read_at": "pool_3"})
    assert checkpoints.chunks() == {}
    assert "made with other inputs or another version of this project" in caplog.text


def test_a_damaged_checkpoint_is_warned_about_once(tmp_path, caplog):
    """The sweep reads the folder twice (for a rerun of a finished sweep, then for the run)."""
    checkpoints = Checkpoints(tmp_path, {"inputs": "these"})
    checkpoints.save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    (tmp_path / "chunk-clean_test-00001.json").write_text('{"set": "clean_te')
    with caplog.at_level(logging.WARNING, logger="jobs.checkpoints"):
        assert list(checkpoints.chunks()) == list(checkpoints.chunks()) == [("clean_test", 0)]
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [
        f"ignoring {tmp_path / 'chunk-clean_test-00001.json'}"]


def test_replacing_another_runs_checkpoints_removes_only_what_a_run_writes(tmp_path):
    """(jobs.outdir refuses such a folder before the run; a file put there since is kept.)"""
    Checkpoints(tmp_path, {"inputs": "other"}).save_chunk("clean_test", 0, [Counts(3, 2, 1, 0)])
    (tmp_path / "notes.txt").write_text("mine\n")
    Checkpoints(tmp_path, {"inputs": "these"}).save_chunk("clean_test", 1, [Counts(3, 2, 1, 0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk-clean_test-00001.json",
                                                          "fingerprint.json", "notes.txt"]


def test_a_folder_may_hold_every_chunk_only_with_a_channel_order_and_each_chunk(tmp_path):
    chunks = [("clean_valid", 0), ("clean_test", 0), ("clean_test", 1)]
    for chunk in chunks:
        (tmp_path / chunk_file(*chunk)).write_text("{}")
    assert not may_hold_every_chunk(tmp_path, chunks)  # no channel order
    (tmp_path / "channel_order.csv").write_text("rank,channel,mean_activation\n")
    assert may_hold_every_chunk(tmp_path, chunks)
    (tmp_path / chunk_file("clean_test", 1)).unlink()
    assert not may_hold_every_chunk(tmp_path, chunks)
