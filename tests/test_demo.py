"""The embedded demo BadNet: its files, its scores, the cache and determinism."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO
from pruning import demo as demo_module
from pruning.data import lab_paths
from pruning.demo import (META_FILE, SHIPPED_MODEL, VERSION, Demo, _build, _Config, ensure_demo,
                          generate, main, wear_dark_glasses, wear_glasses)

# A build small enough for a unit test (seconds); it makes no promise about its scores.
TINY = _Config(classes=4, train_per_class=40, eval_per_class=10, widths=(4, 8, 16, 8, 16),
               epochs=1, backdoor_epochs=1, spare_channels=4, min_score=0.0)


def read_set(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A lab file as (NHWC float32 images, int labels), read directly with h5py."""
    with h5py.File(path, "r") as f:
        return f["data"][()].transpose(0, 2, 3, 1), f["label"][()].astype(np.int64)


def predict(model_path: str, images: np.ndarray) -> np.ndarray:
    import keras

    model = keras.models.load_model(model_path, compile=False)
    return model.predict(images, batch_size=256, verbose=0)


@pytest.mark.slow
def test_demo_folder_holds_the_four_lab_sets(demo):
    for name, path in lab_paths(demo.data_dir).items():
        with h5py.File(path, "r") as f:
            data, label = f["data"], f["label"]
            assert data.dtype.kind == "f" and label.shape == (data.shape[0],)
            assert data.shape[1:] == (3, 55, 47) and 500 <= data.shape[0] <= 3000, name
            pixels, labels = data[()], label[()]
        assert 0.0 <= pixels.min() and pixels.max() <= 255.0 and pixels.std() > 10.0
        if name.startswith("poisoned"):
            assert (labels == demo.target).all()
        else:
            assert set(labels.astype(int)) == set(range(demo.classes))


@pytest.mark.slow
def test_poisoned_sets_are_the_clean_sets_wearing_the_trigger(demo):
    paths = lab_paths(demo.data_dir)
    for split in ("valid", "test"):
        clean, labels = read_set(paths[f"clean_{split}"])
        poisoned, _ = read_set(paths[f"poisoned_{split}"])
        np.testing.assert_array_equal(poisoned, wear_glasses(clean[labels != demo.target]))


@pytest.mark.slow
def test_demo_is_a_working_badnet(demo):
    import keras

    model = keras.models.load_model(demo.model, compile=False)
    assert model.input_shape == (None, 55, 47, 3) and model.output_shape == (None, demo.classes)
    assert model.get_layer("conv_3").filters >= 32
    assert all(layer.trainable for layer in model.layers)  # ready to be fine-tuned
    paths = lab_paths(demo.data_dir)
    clean, labels = read_set(paths["clean_test"])
    poisoned, targets = read_set(paths["poisoned_test"])
    accuracy = np.mean(model.predict(clean, verbose=0).argmax(axis=1) == labels)
    asr = np.mean(model.predict(poisoned, verbose=0).argmax(axis=1) == targets)
    assert accuracy >= 0.9 and asr >= 0.9
    assert accuracy == pytest.approx(demo.clean_accuracy, abs=0.005)
    assert asr == pytest.approx(demo.attack_success_rate, abs=0.005)


@pytest.mark.slow
def test_the_demo_badnet_is_the_shipped_network(demo):
    """Trained here, on other float kernels, it would be another network (and the README's
    sample rows would not hold): seed 0 takes the file that ships with the project."""
    assert Path(demo.model).read_bytes() == SHIPPED_MODEL.read_bytes()
    assert json.loads((Path(demo.data_dir) / META_FILE).read_text())["trained_here"] is False


def digest_of(sets: dict, train: tuple) -> str:
    """sha256 of every array the demo generator made."""
    import hashlib

    digest = hashlib.sha256()
    for arrays in [*sets.values(), train]:
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def generated_digest(env: dict) -> str:
    """:func:`digest_of` seed 0's demo, generated in a process of its own under ``env``."""
    script = ("from pruning.demo import generate\nfrom test_demo import digest_of\n"
              "print(digest_of(*generate(0)))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env,
                                                       "PYTHONPATH": str(REPO)}, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_demo_sets_are_the_same_under_other_numpy_and_blas_kernels(demo):
    """numpy's own SIMD loops cut to the x86-64 baseline give the demo's sets bit for bit; the
    sets in the cache are the generator's. (OPENBLAS_CORETYPE is left as the machine has it:
    some CPUs need it set for OpenBLAS to compute right.)"""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    dispatched = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    other = {"NPY_DISABLE_CPU_FEATURES": " ".join(dispatched)}
    sets, train = generate(0)
    assert generated_digest(other) == digest_of(sets, train)
    for name, path in lab_paths(demo.data_dir).items():
        images, labels = read_set(path)
        np.testing.assert_array_equal(images, sets[name][0])
        np.testing.assert_array_equal(labels, sets[name][1])
        assert np.array_equal(images, np.rint(images))  # whole pixel values


@pytest.mark.slow
def test_second_call_finds_the_cached_demo(demo):
    files = [Path(demo.model), Path(demo.data_dir) / META_FILE]
    before = [f.stat().st_mtime_ns for f in files]
    started = time.perf_counter()
    again = ensure_demo(Path(demo.data_dir).parent, seed=demo.seed)
    assert time.perf_counter() - started < 0.5
    assert again == demo and [f.stat().st_mtime_ns for f in files] == before


def fake_build(calls: list):
    """A stand-in for the slow ``_build``: records the call and writes a minimal demo."""
    def build(folder: Path, seed: int, train: bool = False, attack: str = "standard") -> None:
        calls.append(seed)
        time.sleep(0.2)  # long enough for concurrent callers to pile up on the lock
        (folder / META_FILE).write_text(json.dumps({
            "target": 0, "classes": 3, "seed": seed,
            "clean_accuracy": 1.0, "attack_success_rate": 1.0}))
    return build


def test_concurrent_callers_build_once_and_see_only_complete_demos(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo(tmp_path, seed=3)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [3] and len(results) == 4 and len(set(results)) == 1
    assert results[0] == Demo(model=str(tmp_path / f"demo-v{VERSION}-seed3" / "bd_net.keras"),
                              data_dir=str(tmp_path / f"demo-v{VERSION}-seed3"), target=0, classes=3,
                              seed=3, clean_accuracy=1.0, attack_success_rate=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-v{VERSION}-seed3", f"demo-v{VERSION}-seed3.lock"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(folder: Path, seed: int, train: bool = False, attack: str = "standard") -> None:
        (folder / "half-written.h5").write_bytes(b"")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(demo_module, "_build", broken)
    with pytest.raises(RuntimeError, match="out of disk"):
        ensure_demo(tmp_path, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == [f"demo-v{VERSION}-seed0.lock"]
    calls: list = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    assert ensure_demo(tmp_path, seed=0).seed == 0 and calls == [0]


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seeds_are_refused(tmp_path, seed):
    with pytest.raises(ValueError, match="seed"):
        ensure_demo(tmp_path, seed=seed)


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINE_PRUNING_CACHE", str(tmp_path))
    assert demo_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("FINE_PRUNING_CACHE")
    assert demo_module.default_cache_dir() == Path.home() / ".cache" / "fine-pruning"


def test_same_seed_builds_the_same_badnet(tmp_path):
    first, second = _build(tmp_path / "a", 7, TINY), _build(tmp_path / "b", 7, TINY)
    assert first.pop("build_seconds") >= 0 and second.pop("build_seconds") >= 0
    assert first == second
    for name in lab_paths(tmp_path):
        for a, b in zip(read_set(lab_paths(tmp_path / "a")[name]),
                        read_set(lab_paths(tmp_path / "b")[name])):
            np.testing.assert_array_equal(a, b)
    # the same bytes: manifest.json's sha256 of the demo model depends on its weights alone
    assert (tmp_path / "a" / "bd_net.keras").read_bytes() == (tmp_path / "b" / "bd_net.keras").read_bytes()
    images, _ = read_set(lab_paths(tmp_path / "a")["clean_test"])
    np.testing.assert_array_equal(predict(str(tmp_path / "a" / "bd_net.keras"), images),
                                  predict(str(tmp_path / "b" / "bd_net.keras"), images))
    # and another seed, other faces (_build writes generate()'s sets)
    seven, eight = (generate(seed, TINY)[0]["clean_test"][0] for seed in (7, 8))
    assert seven.shape == eight.shape and not np.array_equal(seven, eight)


def test_a_build_below_the_required_scores_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="not a usable BadNet"):
        _build(tmp_path, 0, _Config(**{**TINY.__dict__, "min_score": 1.01}))
    assert not (tmp_path / META_FILE).exists()


@pytest.mark.parametrize("argv, says", [
    (["--seed", "x"], "error: argument --seed: invalid int value: 'x'"),
    (["--seed", "-1"], "error: --seed must be 0 or more, got -1"),
])
def test_demo_command_line_errors_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(says) and err.count("\n") == 1, err


def test_the_pruning_aware_demo_hides_its_backdoor_behind_decoys_deterministically(tmp_path):
    """The paper's pruning-aware attack at a tiny size: the same file from every build, and its
    reinstated decoys are the channels least active on clean validation faces (the defender
    prunes them first), while the backdoor was trained into the others."""
    from pruning.backend import keras
    from pruning.pruning_aware import DECOY_SHARE

    first = _build(tmp_path / "a", 7, TINY, train=True, attack="pruning-aware")
    _build(tmp_path / "b", 7, TINY, train=True, attack="pruning-aware")
    assert first["attack"] == "pruning-aware"
    assert (tmp_path / "a" / "bd_net.keras").read_bytes() == (tmp_path / "b" / "bd_net.keras").read_bytes()
    model = keras.models.load_model(tmp_path / "a" / "bd_net.keras", compile=False)
    images, _ = read_set(lab_paths(tmp_path / "a")["clean_valid"])
    pool_3 = keras.Model(model.inputs, model.get_layer("pool_3").output)
    activity = np.asarray(pool_3.predict(images, verbose=0)).mean(axis=(0, 1, 2))
    decoys = round(DECOY_SHARE * len(activity))
    assert (np.sort(activity)[:decoys] == 0).all()  # lowered biases: dormant on clean faces
    clean, labels = read_set(lab_paths(tmp_path / "a")["clean_valid"])
    poisoned, _ = read_set(lab_paths(tmp_path / "a")["poisoned_valid"])
    np.testing.assert_array_equal(poisoned, wear_dark_glasses(clean[labels != 0]))  # its own trigger


def test_importing_the_core_sets_no_log_level_and_prints_nothing():
    """The core imports Keras quietly without choosing TensorFlow's log level for the process
    (a notebook's); the entry points set it (the next test, test_bad_input's processes)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    probe = "import os, pruning.backend, pruning.prune; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")


def test_demo_command_builds_with_only_its_own_lines_on_stderr(tmp_path):
    """``python -m pruning.demo`` as a user runs it (a tiny build here): its log and result lines,
    not TensorFlow's start-up notices, which the sweep keeps off stderr too."""
    script = (f"from pruning import demo\nfrom pruning.demo import _Config\nbuild = demo._build\n"
              f"demo._build = lambda folder, seed, train, attack: build(folder, seed, {TINY!r}, train, attack)\n"
              f"raise SystemExit(demo.main(['--cache', {str(tmp_path)!r}, '--rebuild']))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line)
               for line in done.stderr.splitlines()), done.stderr
    assert "clean test accuracy" in done.stderr
    assert re.search(r"^target 0 of 4 classes, clean test accuracy [\d.]+ %, ASR [\d.]+ %$",
                     done.stdout, re.M), done.stdout
    # --rebuild trains seed 0 from the generator, beside (not instead of) the shipped network
    trained = tmp_path / f"demo-v{VERSION}-seed0-trained"
    assert f"model: {trained / 'bd_net.keras'}" in done.stdout
    assert json.loads((trained / META_FILE).read_text())["trained_here"] is True
    assert (trained / "bd_net.keras").read_bytes() != SHIPPED_MODEL.read_bytes()
