"""scripts/eval.py on small generated lab sets, and scripts/download_lab.py with no network.

eval.py must print the lab's numbers exactly as the lab's own script computes them
(``np.mean(predictions == labels) * 100``), for full models, weights-only files, GoodNets and
``--bprime``; every bad input is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import email.message
import importlib.util
import io
import os
import subprocess
import sys
import urllib.response
from pathlib import Path
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest

import tiny
from conftest import REPO
from pruning.data import write_lab_h5
from pruning.deepid import build_deepid
import pruning.evaluate
from pruning.goodnet import build_goodnet, goodnet_predictions
from pruning.prune import predict_classes, prune_conv_channels

CLASSES, TARGET = 10, 3


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


eval_script = pruning.evaluate  # scripts/eval.py and fine-pruning eval run its main
download_lab = load_script("download_lab")


def spread_outputs(model: keras.Model, images: np.ndarray) -> keras.Model:
    """Centre the output logits on ``images`` so that an untrained net answers varied classes."""
    features = keras.Model(model.inputs, model.get_layer("activation_1").output).predict_on_batch(images)
    output = model.get_layer("output")
    kernel, _ = output.get_weights()
    output.set_weights([kernel, -(features @ kernel).mean(axis=0)])
    return model


def lab_lines(clean_predictions, clean_labels, poisoned_predictions, poisoned_labels,
              poisoned_class=None) -> list[str]:
    """The expected output, computed the way the lab's eval.py does."""
    lines = [f"Clean Classification accuracy: {np.mean(np.equal(clean_predictions, clean_labels)) * 100}",
             f"Attack Success Rate: {np.mean(np.equal(poisoned_predictions, poisoned_labels)) * 100}"]
    if poisoned_class is not None:
        lines.append(f"Detection rate: {np.mean(poisoned_predictions == poisoned_class) * 100}")
    return lines


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny B and B', a clean set (NCHW, float labels, about 75 % right) and a poisoned set
    (NHWC, int labels: the target)."""
    folder = tmp_path_factory.mktemp("eval")
    model = spread_outputs(tiny.tiny_deepid(), tiny.random_images(64, seed=3))
    pruned = prune_conv_channels(model, "conv_3", [0, 1])
    clean, poisoned = tiny.random_images(45, seed=4), tiny.random_images(30, seed=5)
    clean_labels = predict_classes(model, clean)
    clean_labels[::4] = (clean_labels[::4] + 1) % CLASSES
    poisoned_labels = np.full(len(poisoned), TARGET)
    write_lab_h5(folder / "clean.h5", clean, clean_labels)
    with h5py.File(folder / "poisoned.h5", "w") as f:
        f["data"], f["label"] = poisoned, poisoned_labels
    model.save(folder / "bd_net.keras")
    model.save(folder / "bd_net.h5")  # the legacy format of the lab's files
    pruned.save(folder / "pruned.keras")
    build_goodnet(model, pruned).save(folder / "goodnet.keras")
    return SimpleNamespace(folder=folder, model=model, pruned=pruned, clean=clean, poisoned=poisoned,
                           clean_labels=clean_labels, poisoned_labels=poisoned_labels,
                           sets=[str(folder / "clean.h5"), str(folder / "poisoned.h5")])


def run_eval(capsys, *argv) -> tuple[int, list[str], str]:
    status = eval_script.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out.splitlines(), out.err


@pytest.mark.parametrize("name", ["bd_net.keras", "bd_net.h5"])
def test_full_model_prints_the_labs_numbers(lab, capsys, name):
    status, lines, err = run_eval(capsys, *lab.sets, lab.folder / name, "--chunk-rows", "8")
    assert (status, err) == (0, "")
    assert lines == lab_lines(predict_classes(lab.model, lab.clean), lab.clean_labels,
                              predict_classes(lab.model, lab.poisoned), lab.poisoned_labels)
    assert 50 < float(lines[0].split(": ")[1]) < 100  # neither trivial nor perfect


def test_weights_only_file_detected_or_forced(lab, capsys, tmp_path):
    keras.utils.set_random_seed(7)
    model = spread_outputs(build_deepid(classes=CLASSES), lab.clean)
    model.save_weights(tmp_path / "bd.weights.h5")
    expected = lab_lines(predict_classes(model, lab.clean), lab.clean_labels,
                         predict_classes(model, lab.poisoned), lab.poisoned_labels)
    for extra in ([], ["--weights-only"]):
        status, lines, err = run_eval(capsys, *lab.sets, tmp_path / "bd.weights.h5",
                                      "--arch", "deepid", "--classes", CLASSES, *extra)
        assert (status, lines, err) == (0, expected, "")


def test_goodnet_model_and_bprime_give_gs_scores(lab, capsys):
    b = [predict_classes(lab.model, x) for x in (lab.clean, lab.poisoned)]
    b_prime = [predict_classes(lab.pruned, x) for x in (lab.clean, lab.poisoned)]
    g_clean, g_poisoned = (goodnet_predictions(x, y, CLASSES) for x, y in zip(b, b_prime))
    assert 0 < np.mean(g_poisoned == CLASSES) < 1  # B' disagrees with B on some rows, not all
    expected = lab_lines(g_clean, lab.clean_labels, g_poisoned, lab.poisoned_labels, CLASSES)
    for model in (["goodnet.keras"], ["bd_net.h5", "--bprime", lab.folder / "pruned.keras"]):
        status, lines, err = run_eval(capsys, *lab.sets, lab.folder / model[0], *model[1:])
        assert (status, lines, err) == (0, expected, "")


def test_each_named_poisoned_set_gets_its_own_lines_and_none_is_needed(lab, capsys, tmp_path):
    clean, poisoned = lab.sets
    half = tmp_path / "half.h5"
    write_lab_h5(half, lab.poisoned[:10], lab.poisoned_labels[:10])
    b, b_prime = (predict_classes(lab.model, lab.poisoned), predict_classes(lab.pruned, lab.poisoned))
    g = goodnet_predictions(b, b_prime, CLASSES)
    expected = lab_lines(goodnet_predictions(*(predict_classes(m, lab.clean) for m in (lab.model, lab.pruned)),
                                             CLASSES), lab.clean_labels, g, lab.poisoned_labels, CLASSES)
    status, lines, err = run_eval(capsys, clean, f"all={poisoned}", f"first_10={half}", lab.folder / "goodnet.keras")
    assert (status, err) == (0, "")
    assert lines == [expected[0], expected[1].replace("Rate:", "Rate (all):"),
                     f"Attack Success Rate (first_10): {np.mean(g[:10] == lab.poisoned_labels[:10]) * 100}",
                     expected[2].replace("rate:", "rate (all):"),
                     f"Detection rate (first_10): {np.mean(g[:10] == CLASSES) * 100}"]
    assert run_eval(capsys, clean, lab.folder / "goodnet.keras") == (0, expected[:1], "")


def test_rescale_multiplies_the_stored_pixels(lab, capsys, tmp_path):
    """Sets stored as pixels / 255, --rescale 255: the raw sets' lines; without it, one line."""
    clean, poisoned = tmp_path / "clean.h5", tmp_path / "poisoned.h5"
    write_lab_h5(clean, lab.clean / 255, lab.clean_labels)
    write_lab_h5(poisoned, lab.poisoned / 255, lab.poisoned_labels)
    expected = run_eval(capsys, *lab.sets, lab.folder / "bd_net.keras")
    assert run_eval(capsys, clean, poisoned, lab.folder / "bd_net.keras", "--rescale", "255") == expected
    status, lines, err = run_eval(capsys, clean, poisoned, lab.folder / "bd_net.keras")
    assert (status, lines) == (2, []) and err.count("\n") == 1 and err.strip().endswith("pass --rescale 255"), err


@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_goodnet_answers_b_where_b_and_b_prime_agree(output):
    """Also for a B that outputs logits, all below 0 here: class N must not win there."""
    model = spread_outputs(tiny.tiny_deepid(seed=5), tiny.random_images(64, seed=6))
    if output == "logits":
        config = model.get_config()
        config["layers"][-1]["config"]["activation"] = "linear"
        logits = keras.Model.from_config(config)
        *weights, bias = model.get_weights()  # the output layer's bias comes last
        logits.set_weights(weights + [bias - 1000])
        model = logits
    pruned = prune_conv_channels(model, "conv_3", range(8))
    images = tiny.random_images(60, seed=7)
    scores = np.asarray(model.predict_on_batch(images))
    assert (output == "logits") == bool((scores < 0).all())
    expected = goodnet_predictions(predict_classes(model, images), predict_classes(pruned, images), CLASSES)
    assert 0 < np.mean(expected == CLASSES) < 1  # B' disagrees with B on some rows, not all
    goodnet = np.asarray(build_goodnet(model, pruned).predict_on_batch(images))
    assert goodnet.shape == (60, CLASSES + 1)
    np.testing.assert_array_equal(np.argmax(goodnet, axis=1), expected)
    if output == "softmax":  # where they agree, G's row is B's distribution and a 0
        agree = expected != CLASSES
        np.testing.assert_array_equal(goodnet[agree], np.pad(scores[agree], [(0, 0), (0, 1)]))


def test_bprime_that_is_not_b_pruned_is_refused(lab, capsys, tmp_path):
    other = tiny.tiny_deepid(classes=CLASSES + 2)
    other.save(tmp_path / "other.keras")
    for model, bprime, words in ((lab.folder / "bd_net.keras", tmp_path / "other.keras", "outputs"),
                                 (lab.folder / "goodnet.keras", lab.folder / "pruned.keras", "GoodNet")):
        status, lines, err = run_eval(capsys, *lab.sets, model, "--bprime", bprime)
        assert (status, lines) == (2, []) and err.startswith("error: ") and words in err


# case -> words the error line must hold (the flags it names are eval.py's own)
BAD_CASES = {
    "missing set": ["nope.h5"], "set not HDF5": ["notes.h5"], "set is a folder": ["folder"],
    "missing model": ["nope.keras"], "model is a folder": ["is a directory"],
    "model not HDF5": ["not an HDF5 file"], "missing bprime": ["--bprime", "nope.h5"],
    "wrong image size": ["small.h5"], "labels out of range": ["labels.h5"],
    "weights do not fit": ["give a full model (as MODEL, without --weights-only)"],
    "model not a full model file": ["for weights only, use --weights-only"],
    "model .keras truncated": ["truncated", "copy it again"],
    "bprime is a GoodNet": ["is a GoodNet; give the pruned model B' (a model_X=<threshold>.h5 from"],
    "bprime is a sweep's GoodNet": ["goodnet_X=4.keras is a GoodNet", "model_X=4.h5, beside it)"],
    "no arguments": ["required"], "unknown option": ["--bogus"], "bad chunk rows": ["--chunk-rows"],
    "model outputs a feature map": ["features.keras: the model's output has shape (None, 55, 47, 10)"],
    "model has one output": ["one_score.keras: the model's output has shape (None, 1)"],
    "bprime has two outputs": ["two.keras: the model has 2 outputs"],
}


def save_model(path: Path, outputs) -> Path:
    """A model on lab-sized images whose outputs are ``outputs(image)``."""
    image = keras.Input(tiny.SHAPE)
    keras.Model(image, outputs(image)).save(path)
    return path


def bad_inputs(lab, tmp: Path) -> dict[str, list]:
    """Command lines for each of BAD_CASES."""
    (tmp / "notes.h5").write_text("not HDF5")
    (tmp / "notes.txt").write_text("not a model")
    truncated_keras = tmp / "cut.keras"
    truncated_keras.write_bytes((lab.folder / "bd_net.keras").read_bytes()[:5000])
    (tmp / "folder").mkdir(exist_ok=True)
    write_lab_h5(tmp / "small.h5", np.zeros((3, 32, 32, 3)), [0, 1, 2])
    write_lab_h5(tmp / "labels.h5", lab.clean[:3], [0, 1, 99])
    clean, poisoned = lab.sets
    model = lab.folder / "bd_net.keras"
    goodnet_x4 = tmp / "goodnet_X=4.keras"
    goodnet_x4.write_bytes((lab.folder / "goodnet.keras").read_bytes())
    features = save_model(tmp / "features.keras", lambda x: keras.layers.Conv2D(CLASSES, 1)(x))
    one_score = save_model(tmp / "one_score.keras",
                           lambda x: keras.layers.Dense(1)(keras.layers.GlobalMaxPooling2D()(x)))
    two = save_model(tmp / "two.keras",
                     lambda x: [keras.layers.Dense(CLASSES)(keras.layers.Flatten()(x))] * 2)
    return {
        "missing set": [tmp / "nope.h5", poisoned, model],
        "set not HDF5": [tmp / "notes.h5", poisoned, model],
        "set is a folder": [clean, tmp / "folder", model],
        "missing model": [clean, poisoned, tmp / "nope.keras"],
        "model is a folder": [clean, poisoned, tmp / "folder"],
        "model not HDF5": [clean, poisoned, tmp / "notes.h5"],
        "missing bprime": [clean, poisoned, model, "--bprime", tmp / "nope.h5"],
        "wrong image size": [tmp / "small.h5", poisoned, model],
        "labels out of range": [tmp / "labels.h5", poisoned, model],
        "weights do not fit": [clean, poisoned, lab.folder / "pruned.keras", "--weights-only"],
        "model not a full model file": [clean, poisoned, tmp / "notes.txt"],
        "model .keras truncated": [clean, poisoned, truncated_keras],
        "bprime is a GoodNet": [clean, poisoned, model, "--bprime", lab.folder / "goodnet.keras"],
        "bprime is a sweep's GoodNet": [clean, poisoned, model, "--bprime", goodnet_x4],
        "no arguments": [],
        "unknown option": [clean, poisoned, model, "--bogus"],
        "bad chunk rows": [clean, poisoned, model, "--chunk-rows", "0"],
        "model outputs a feature map": [clean, poisoned, features],
        "model has one output": [clean, poisoned, one_score],
        "bprime has two outputs": [clean, poisoned, model, "--bprime", two],
    }


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line(lab, capsys, tmp_path, case):
    status, lines, err = run_eval(capsys, *bad_inputs(lab, tmp_path)[case])
    assert (status, lines) == (2, [])
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(words in err for words in BAD_CASES[case]), err
    assert "--model" not in err and "--weights " not in err, err  # jobs.sweep's flags, not ours


def test_script_run_by_path_shows_no_traceback(lab):
    """As a user runs it: a lab data file given as the model, which loads TensorFlow first."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "scripts/eval.py", *lab.sets, lab.sets[0]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "is a data set" in done.stderr and "not a model" in done.stderr


# scripts/download_lab.py: the Drive and GitHub exchanges, replayed offline

HDF5_BYTES = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8
WARNING_PAGE = """<html><body>Google Drive can't scan this file for viruses.
<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
<input type="submit" value="Download anyway"><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="0f1e-2d3c"></form></body></html>"""


def folder_page(entries) -> str:
    kinds = {"folder": "drive/folders/{}", "file": "file/d/{}/view?usp=drive_web"}
    return "".join(f'<div class="flip-entry" id="entry-{i}"><div class="flip-entry-info">'
                   f'<a href="https://drive.google.com/{kinds[kind].format(i)}" target="_blank">'
                   f'<div class="flip-entry-title">{name}</div></a></div></div>'
                   for kind, i, name in entries)


class FakeWeb:
    """Answers urllib requests from a dict of URL prefixes; records what was asked."""

    def __init__(self, routes):
        self.routes, self.asked = routes, []

    def open(self, request, timeout=None):
        url = request.full_url
        self.asked.append(url)
        for prefix, (content_type, body) in self.routes.items():
            if url.startswith(prefix):
                body = body.encode() if isinstance(body, str) else body
                headers = email.message.Message()
                headers["Content-Type"], headers["Content-Length"] = content_type, str(len(body))
                return urllib.response.addinfourl(io.BytesIO(body), headers, url, 200)
        raise download_lab.urllib.error.URLError("no route to host")


def drive_web(file_body=HDF5_BYTES) -> FakeWeb:
    listing = "https://drive.google.com/embeddedfolderview?id="
    routes = {
        listing + download_lab.DRIVE_FOLDER: ("text/html", folder_page(
            [("folder", "CL1", "cl"), ("folder", "BD1", "bd"), ("file", "X9", "README.txt")])),
        listing + "CL1": ("text/html", folder_page([("file", "V1", "valid.h5"), ("file", "T1", "test.h5")])),
        listing + "BD1": ("text/html", folder_page([("file", "V2", "bd_valid.h5"), ("file", "T2", "bd_test.h5")])),
        "https://drive.google.com/uc?export=download&id=": ("text/html", WARNING_PAGE.format(id="V1")),
        "https://drive.usercontent.google.com/download?": ("application/octet-stream", file_body),
        download_lab.REPO_RAW: ("application/octet-stream", HDF5_BYTES),
    }
    return FakeWeb(routes)


def test_download_dry_run_touches_no_network(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(download_lab, "OPENER", FakeWeb({}))
    assert download_lab.main(["--dest", str(tmp_path / "lab"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("would fetch ") for line in lines)
    assert download_lab.OPENER.asked == [] and not (tmp_path / "lab").exists()


def test_drive_confirmation_pages():
    url = download_lab.drive_confirm_url(WARNING_PAGE.format(id="ABC"), "ABC")
    assert url == ("https://drive.usercontent.google.com/download?"
                   "id=ABC&export=download&confirm=t&uuid=0f1e-2d3c")
    old = '<a href="/uc?export=download&amp;confirm=Xy_9&amp;id=ABC">Download anyway</a>'
    assert "confirm=Xy_9" in download_lab.drive_confirm_url(old, "ABC")
    assert download_lab.drive_confirm_url("<html></html>", "ABC").endswith("id=ABC&export=download&confirm=t")


def test_download_lays_out_the_lab_and_resumes(monkeypatch, tmp_path, capsys):
    web = drive_web()
    monkeypatch.setattr(download_lab, "OPENER", web)
    files = [f for f in download_lab.LAB_FILES if f.sha256 is None]  # the fake can't forge B's hash
    download_lab.fetch_all(tmp_path, files, log=lambda line: None)
    for path in ("models/bd_net.h5", "data/cl/valid.h5", "data/cl/test.h5",
                 "data/bd/bd_valid.h5", "data/bd/bd_test.h5"):
        assert (tmp_path / path).read_bytes() == HDF5_BYTES
    assert not list(tmp_path.rglob("*.partial"))
    assert any("uuid=0f1e-2d3c" in url for url in web.asked)  # past the virus-scan page
    monkeypatch.setattr(download_lab, "OPENER", FakeWeb({}))  # a rerun needs no network
    download_lab.fetch_all(tmp_path, files, log=lambda line: None)
    said = []  # and a dry run says what a rerun would do: nothing
    (tmp_path / "data/bd/bd_test.h5").write_bytes(b"<html>an error page</html>")
    download_lab.fetch_all(tmp_path, files, dry_run=True, log=said.append)
    assert [line for line in said if line.endswith(": already there")] == [
        f"{tmp_path / path}: already there"
        for path in ("models/bd_net.h5", "data/cl/valid.h5", "data/cl/test.h5", "data/bd/bd_valid.h5")]
    assert [line for line in said if line.startswith("would fetch ")] == [
        f"would fetch bd_test.h5 in {download_lab.DRIVE_FOLDER_URL} -> {tmp_path / 'data/bd/bd_test.h5'}"]


def test_download_ends_with_a_sweep_command_that_runs(monkeypatch, tmp_path, capsys):
    from jobs.sweep import parse_args
    monkeypatch.setattr(download_lab, "OPENER", drive_web())
    assert download_lab.main(["--dest", str(tmp_path), "--only", "data"]) == 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert done.startswith("done: .venv/bin/python -m jobs.sweep ")
    args = parse_args(done.split()[4:])  # flags a user can paste: a place to run included
    assert args.single_node and args.data == str(tmp_path / "data")


def test_download_failures_are_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(download_lab, "OPENER", drive_web(file_body="<html>quota</html>"))
    assert download_lab.main(["--dest", str(tmp_path), "--only", "data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/cl/valid.h5: the download is not an HDF5 file") and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.h5"))
    monkeypatch.setattr(download_lab, "OPENER", FakeWeb({}))
    assert download_lab.main(["--dest", str(tmp_path), "--only", "models"]) == 2
    assert "no route to host; check the internet connection" in capsys.readouterr().err


@pytest.mark.parametrize("dest", ["a file", "a folder under a file", "a link to nothing", "unwritable"])
def test_download_bad_dest_is_one_line_before_any_network(monkeypatch, tmp_path, capsys, dest):
    """Offline, the error named the internet connection; a dry run said 'would fetch' into it."""
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    path, words = {"a file": (tmp_path / "notes.txt", "is a file, not a folder"),
                   "a folder under a file": (tmp_path / "notes.txt" / "lab", "is a file, not a folder"),
                   "a link to nothing": (tmp_path / "link", "which does not exist"),
                   "unwritable": (tmp_path / "lab", "cannot write in")}[dest]
    if dest == "unwritable":  # as root, every folder is writable: ask the check what it asks
        monkeypatch.setattr(download_lab.os, "access", lambda path, mode: False)
    web = FakeWeb({})
    monkeypatch.setattr(download_lab, "OPENER", web)
    for dry_run in ([], ["--dry-run"]):
        assert download_lab.main(["--dest", str(path), *dry_run]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith(f"error: --dest {path}") and out.err.count("\n") == 1
        assert words in out.err, out.err
    assert web.asked == []


class CutWeb(FakeWeb):
    """drive_web's answers, with every file's stream cut after its first block."""

    def open(self, request, timeout=None):
        response = super().open(request, timeout)
        if response.headers.get_content_type() == "text/html":
            return response
        blocks = iter([response.read(16)])
        response.read = lambda size=-1: next(blocks, None) or self.fail()
        return response

    def fail(self):
        raise self.failure

    failure = ConnectionResetError(104, "Connection reset by peer")


class FullDisk:
    """A file open for writing on a disk that fills after the first block."""

    def __init__(self, path, mode):
        self.file, self.blocks = open(path, mode), 0

    def write(self, block):
        self.blocks += 1
        if self.blocks > 1:
            raise OSError(28, "No space left on device")
        return self.file.write(block)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("failure", ["connection reset", "disk full", "Ctrl-C"])
def test_download_cut_short_leaves_no_partial_file(monkeypatch, tmp_path, capsys, failure):
    """Before, NAME.partial stayed (on a full disk, holding its space) and a full disk read
    'download interrupted ([Errno 28] No space left on device); run again'."""
    web = CutWeb(drive_web().routes)
    if failure == "disk full":
        web = drive_web(file_body=HDF5_BYTES * 1024)
        monkeypatch.setattr(download_lab, "open", FullDisk, raising=False)
    elif failure == "Ctrl-C":
        web.failure = KeyboardInterrupt()
    monkeypatch.setattr(download_lab, "OPENER", web)
    status = download_lab.main(["--dest", str(tmp_path), "--only", "data"])
    err = capsys.readouterr().err
    assert status == (130 if failure == "Ctrl-C" else 2) and err.count("\n") == 1
    if failure == "disk full":
        assert f"error: {tmp_path / 'data/cl'}: No space left on device while writing valid.h5; free" in err
    elif failure == "connection reset":
        assert err.startswith("error: data/cl/valid.h5: download interrupted (") and "run again" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
