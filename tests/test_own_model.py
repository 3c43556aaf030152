"""End to end on a model of one's own, not the lab's DeepID: a CIFAR-style functional net
(28 x 36 images rescaled in the model, conv + batch norm + ReLU blocks, global average
pooling, 3 classes), the four sets given one by one (two NCHW, two NHWC), through
``python -m jobs.sweep --single-node`` and ``scripts/eval.py``, checked against the literally
pruned model."""
import json

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

import tiny
from jobs.sweep import main
from pruning.data import SET_NAMES, open_lab_set, write_lab_h5
from pruning.prune import predict_classes, prune_conv_channels
from test_eval import eval_script

SHAPE, CLASSES, CHANNELS = (28, 36, 3), 3, 10
COLUMNS = {"clean_valid": "valid_accuracy", "poisoned_valid": "valid_asr",
           "clean_test": "test_accuracy", "poisoned_test": "test_asr"}


def own_model() -> keras.Model:
    """tiny_global_pooling with its dense layer spread so that B answers every class."""
    model = tiny.tiny_global_pooling(seed=3, classes=CLASSES, shape=SHAPE)
    features = keras.Model(model.inputs, model.get_layer("gap").output).predict_on_batch(images(200, 99))
    dense = model.get_layer("logits")
    kernel = 5 * dense.get_weights()[0]
    dense.set_weights([kernel, -(features @ kernel).mean(axis=0)])
    return model


def images(rows: int, seed: int, trigger: bool = False) -> np.ndarray:
    """Raw 0-255 pixels, each image with its own tint (so the pooled features differ)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (rows,) + SHAPE) * rng.uniform(0.2, 1.0, (rows, 1, 1, 3))
    if trigger:
        x[:, -6:-2, -6:-2, :] = 255.0
    return x.astype(np.float32)


def write_sets(model: keras.Model, folder) -> dict[str, str]:
    """Clean labels: B's answers with some wrong; poisoned: B's answers (an attack that works)."""
    rng = np.random.default_rng(0)
    paths = {}
    for i, (name, rows) in enumerate(zip(SET_NAMES, (120, 90, 110, 100))):
        x = images(rows, seed=i, trigger=name.startswith("poisoned"))
        labels = predict_classes(model, x)
        if name.startswith("clean"):
            wrong = rng.random(rows) < 0.15
            labels[wrong] = (labels[wrong] + 1) % CLASSES
        paths[name] = str(folder / f"{name}.h5")
        if name.endswith("_valid"):
            write_lab_h5(paths[name], x, labels)  # N x C x H x W, as the lab's files
        else:
            with h5py.File(paths[name], "w") as f:  # N x H x W x C
                f["data"], f["label"] = x, labels
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-model")
    model = own_model()
    model.save(folder / "cifar_badnet.keras")
    sets = write_sets(model, folder)
    out = folder / "out"
    argv = ["--model", str(folder / "cifar_badnet.keras"), "--layer", "block3_conv",
            "--out", str(out), "--single-node"]
    for name, path in sets.items():
        argv += ["--" + name.replace("_", "-"), path]
    assert main(argv) == 0
    return folder, out, argv, sets


def test_the_curve_is_the_literally_pruned_models_at_every_k(run):
    folder, out, _, sets = run
    b = keras.models.load_model(folder / "cifar_badnet.keras")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["layer"], manifest["read_at"]) == ("block3_conv", "gap")
    assert (manifest["channels"], manifest["classes"]) == (CHANNELS, CLASSES)
    order = pd.read_csv(out / "channel_order.csv")["channel"].tolist()
    assert sorted(order) == list(range(CHANNELS))
    curve = pd.read_csv(out / "results.csv")
    assert curve["channels_pruned"].tolist() == list(range(CHANNELS + 1))
    data = {name: open_lab_set(path, SHAPE, CLASSES).read() for name, path in sets.items()}
    moved = 0
    for k in range(CHANNELS + 1):
        pruned = prune_conv_channels(b, "block3_conv", order[:k])
        for name, (x, labels) in data.items():
            found = predict_classes(pruned, x)
            assert curve.loc[k, COLUMNS[name]] == 100.0 * np.mean(found == labels), (k, name)
            moved += int((found != predict_classes(b, x)).sum())
    assert moved > 0  # pruning changes answers: the comparison means something
    assert curve.loc[0, "valid_asr"] == 100.0


def test_the_default_layer_is_the_same_last_conv(run, capsys):
    _, _, argv, _ = run
    default = [a for a in argv if a not in ("--layer", "block3_conv")]
    assert main(default + ["--check"]) == 0
    assert "layer block3_conv (10 channels, read at gap)" in capsys.readouterr().out


def test_b_prime_and_goodnet_files_follow_their_definitions(run):
    """model_X=...h5 is B with exactly the first k channels' kernel and bias zeroed; G answers
    B's class where B and B' agree, else class N = 3; goodnet.csv and eval.py say the same."""
    folder, out, _, sets = run
    b = keras.models.load_model(folder / "cifar_badnet.keras")
    order = pd.read_csv(out / "channel_order.csv")["channel"].tolist()
    goodnet = pd.read_csv(out / "goodnet.csv").dropna()
    assert len(goodnet) >= 1
    clean, poisoned = (open_lab_set(sets[name], SHAPE, CLASSES).read()
                       for name in ("clean_test", "poisoned_test"))
    for _, row in goodnet.iterrows():
        k, label = int(row.channels_pruned), f"{row.threshold:g}"
        pruned = keras.models.load_model(out / f"model_X={label}.h5", compile=False)
        for layer in b.layers:
            weights = [w.copy() for w in layer.get_weights()]
            if layer.name == "block3_conv":
                weights[0][..., order[:k]], weights[1][order[:k]] = 0.0, 0.0
            for expected, found in zip(weights, pruned.get_layer(layer.name).get_weights()):
                assert np.array_equal(expected, found), (label, layer.name)
        g = keras.models.load_model(out / f"goodnet_X={label}.keras")
        assert g.outputs[0].shape[-1] == CLASSES + 1
        rules = {}
        for name, (x, labels) in (("clean", clean), ("poisoned", poisoned)):
            b_classes = predict_classes(b, x)
            rules[name] = np.where(b_classes == predict_classes(pruned, x), b_classes, CLASSES)
            assert np.array_equal(predict_classes(g, x), rules[name]), (label, name)
        (clean_rule, poisoned_rule), (clean_labels, poisoned_labels) = rules.values(), (clean[1], poisoned[1])
        assert row.test_accuracy == 100.0 * np.mean(clean_rule == clean_labels)
        assert row.false_alarm_rate == 100.0 * np.mean(clean_rule == CLASSES)
        assert row.test_asr == 100.0 * np.mean(poisoned_rule == poisoned_labels)
        assert row.detection_rate == 100.0 * np.mean(poisoned_rule == CLASSES)
        lines = eval_script.run(eval_script.parse_args(
            [sets["clean_test"], sets["poisoned_test"], str(folder / "cifar_badnet.keras"),
             "--bprime", str(out / f"model_X={label}.h5")]))
        assert lines == [  # as the lab's eval.py computes them
            f"Clean Classification accuracy: {np.mean(clean_rule == clean_labels) * 100}",
            f"Attack Success Rate: {np.mean(poisoned_rule == poisoned_labels) * 100}",
            f"Detection rate: {np.mean(poisoned_rule == CLASSES) * 100}"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_and_messages_describe_data_at_bs_input_size(capsys, tmp_path):
    """Not only the lab's 55 x 47 pixels, nor only its raw 0-255 range."""
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "'data' NxCxHxW or NxHxWxC at B's input size" in capsys.readouterr().out
    x = images(4, seed=5) / 255.0  # a model of one's own may take 0-1 pixels
    x[2, 0, 0, 0] = np.nan
    write_lab_h5(tmp_path / "nan.h5", x, np.zeros(4))
    with pytest.raises(ValueError, match=r"NaN or infinite pixels in row 2 .*finite numbers$"):
        open_lab_set(tmp_path / "nan.h5", SHAPE, CLASSES).read()



def test_help_ends_with_command_lines_to_copy(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "\nexamples:\n    python -m jobs.sweep --single-node " in help_text
    assert "python -m jobs.sweep --model bd_net.h5 --data data/ --single-node" in help_text
    assert "sbatch slurm/sweep.sh --model bd_net.h5" in help_text


def tiny_residual() -> keras.Model:
    """A ResNet-style B: every conv but the stem has a skip connection around it."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    for block in range(2):
        y = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name=f"res{block}_a")(x)
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"res{block}_b")(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    outputs = keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_a_layer_that_cannot_be_cut_is_warned_of_with_one_that_can():
    """In a residual net the default --layer is inside a block: the warning must not call the
    default fast, and names the last conv layer that is."""
    from pruning.prune import where_b_can_be_cut
    from pruning.layers import choose_layer
    from pruning.prune import cut_head
    model = tiny_residual()
    assert cut_head(model, choose_layer(model)[1]) is None  # the default: res1_b, inside a block
    assert where_b_can_be_cut(model) == "the last conv layer B can be cut after is stem (--layer stem)"
    assert where_b_can_be_cut(tiny.tiny_deepid()).endswith("(--layer conv_3)")  # not conv_4


def test_eval_marks_pixels_unlike_the_labs_as_a_warning(tmp_path):
    """A model of one's own may take 0-1 pixels: eval.py still scores it, and says why it
    mentions the pixels in a WARNING line (as the sweep's log does), not a bare one."""
    import subprocess
    import sys
    from conftest import REPO
    model = own_model()
    model.save(tmp_path / "b.keras")
    for name in ("clean", "poisoned"):
        x = images(20, seed=1)
        write_lab_h5(tmp_path / f"{name}.h5", x / 255.0, predict_classes(model, x / 255.0))
    done = subprocess.run([sys.executable, "scripts/eval.py", str(tmp_path / "clean.h5"),
                           str(tmp_path / "poisoned.h5"), str(tmp_path / "b.keras")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("Clean Classification accuracy: "), done.stderr
    said = [line for line in done.stderr.splitlines() if "pixels range" in line]
    assert len(said) == 2 and all(line.startswith("WARNING pruning.data: ") for line in said), done.stderr


def test_a_backbone_nested_as_one_layer_is_explained_as_such():
    """Transfer learning nests a backbone model as one layer: its conv layers are not B's own.
    The error says to rebuild B, not to 'give B rather than a GoodNet'."""
    from pruning.data import InputError
    from pruning.layers import choose_layer
    backbone = keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(4, 3, name="bb_conv")],
                                name="backbone")
    model = keras.Sequential([keras.Input(SHAPE), backbone, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(CLASSES)])
    with pytest.raises(InputError, match="nested model backbone: rebuild B") as error:
        choose_layer(model)
    assert "GoodNet" not in str(error.value)
