"""The project on the files its users really have: the NYU lab's models, images and curves.

They live in ``../shared/realdata`` (see its MANIFEST.md) and are read in place; the module
is skipped when that folder is absent. B is the lab's backdoored net (lab3/bd_weights.h5); the
repaired files are a student's B' at 2 / 4 / 10 %.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
if not (REAL / "MANIFEST.md").is_file():
    pytest.skip(f"no real lab files: {REAL}/MANIFEST.md is absent (they are read in place from "
                "../shared/realdata beside the repository)", allow_module_level=True)

import keras  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

import pruning.evaluate as eval_script  # noqa: E402  (scripts/eval.py's)
from pruning.data import InputError, open_lab_set, write_lab_h5  # noqa: E402
from pruning.deepid import LAB_CLASSES  # noqa: E402
from pruning.goodnet import build_goodnet, goodnet_predictions, goodnet_scores  # noqa: E402
from pruning.layers import choose_layer  # noqa: E402
from pruning.models import ModelSpec, is_weights_only, load_model, output_tensor  # noqa: E402
from pruning.counts import tally  # noqa: E402
from pruning.prune import predict_classes, prune_conv_channels  # noqa: E402
from pruning.scaling import MARGIN, check_scale  # noqa: E402
from pruning.select import select_prefixes  # noqa: E402

MANIFEST = (REAL / "MANIFEST.md").read_text()
B_WEIGHTS = REAL / "lab3" / "bd_weights.h5"
# repaired file -> channels of conv_3 the student pruned (the lab's X = 2, 4, 10 %)
REPAIRED = {"keras2.9_model_X=2.h5": 45, "keras2.9_model_X=4.h5": 48,
            "keras2.9_model_X=10.h5": 52, "keras2.3.1_model_X=10.h5": 52,
            "keras2.4_model_B_10.h5": 52, "weights_only_B_prime_10.h5": 52}
FULL_MODELS = sorted(name for name in REPAIRED if not name.startswith("weights_only"))
WEIGHTS_ONLY = ["lab3/bd_weights.h5", "repaired/weights_only_B_prime_10.h5",
                *sorted(f"csaw2020/{p.name}" for p in (REAL / "csaw2020").glob("*.h5"))]
TARGET = 0


def manifest_hashes() -> dict[str, str]:
    return {path: digest for digest, path in re.findall(r"^([0-9a-f]{64}) (\S+)$", MANIFEST, re.M)}


def pruning_order() -> list[int]:
    found = re.search(r"agreed\s+by three independent runs:\s*([\d\s]+)\.", MANIFEST)
    return [int(c) for c in found.group(1).split()]


ORDER = pruning_order()


def load(relative: str) -> keras.Model:
    path = REAL / relative
    return load_model(ModelSpec(str(path), weights_only=is_weights_only(path)))


def read_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The five ``{kind}_i_label=L.png`` images (NHWC float32 0-255) and their labels."""
    files = sorted((REAL / "images").glob(f"{kind}_*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    labels = np.array([int(re.search(r"label=(\d+)", f.name).group(1)) for f in files])
    return images, labels


@pytest.fixture(scope="module")
def bd_net() -> keras.Model:
    return load("lab3/bd_weights.h5")


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {kind: read_images(kind) for kind in ("cl", "sun", "ano")}


@pytest.fixture(scope="module")
def repaired_10() -> keras.Model:
    return load("repaired/keras2.9_model_X=10.h5")


def test_files_match_the_manifest_sha256():
    hashes = manifest_hashes()
    files = {str(p.relative_to(REAL)) for p in REAL.rglob("*") if p.is_file()} - {"MANIFEST.md"}
    assert set(hashes) == files  # every file is listed, and every listed file is there
    assert sorted(ORDER) == list(range(60))
    for relative, digest in hashes.items():
        assert hashlib.sha256((REAL / relative).read_bytes()).hexdigest() == digest, relative


@pytest.mark.parametrize("name", FULL_MODELS)
def test_every_keras_vintage_loads_as_a_full_model(name):
    path = REAL / "repaired" / name
    assert not is_weights_only(path)
    model = load_model(ModelSpec(str(path)))
    assert tuple(model.inputs[0].shape[1:]) == (55, 47, 3)
    assert output_tensor(model).shape[-1] == LAB_CLASSES
    assert choose_layer(model) == ("conv_3", "pool_3")
    assert model.get_layer("conv_3").filters == 60


@pytest.mark.parametrize("relative", WEIGHTS_ONLY)
def test_weights_only_files_load_into_deepid(relative, bd_net):
    path = REAL / relative
    assert is_weights_only(path)
    model = load_model(ModelSpec(str(path), weights_only=True))
    assert choose_layer(model) == ("conv_3", "pool_3")
    if relative.startswith("csaw2020/"):  # the competition's nets are other BadNets than lab3's
        assert not np.array_equal(model.get_layer("fc_1").get_weights()[0],
                                  bd_net.get_layer("fc_1").get_weights()[0])


def test_lab_weights_with_the_wrong_class_count_name_the_mismatch():
    with pytest.raises(InputError) as error:
        load_model(ModelSpec(str(B_WEIGHTS), weights_only=True, classes=12))
    assert "(output/kernel is (160, 12) in the architecture but (160, 1283) in the file)" in str(error.value)


@pytest.mark.parametrize("name,pruned", REPAIRED.items())
def test_repaired_models_are_b_with_a_prefix_of_the_order_pruned(name, pruned, bd_net):
    repaired = load(f"repaired/{name}")
    kernel, bias = repaired.get_layer("conv_3").get_weights()
    zeroed = [c for c in range(kernel.shape[-1]) if not kernel[..., c].any() and bias[c] == 0]
    assert len(zeroed) == pruned
    assert set(zeroed) == set(ORDER[:pruned])
    b_kernel, b_bias = bd_net.get_layer("conv_3").get_weights()
    kept = [c for c in range(kernel.shape[-1]) if c not in zeroed]
    assert np.array_equal(kernel[..., kept], b_kernel[..., kept])
    assert np.array_equal(bias[kept], b_bias[kept])
    for layer in bd_net.layers:
        if layer.weights and layer.name != "conv_3":
            for ours, theirs in zip(layer.get_weights(), repaired.get_layer(layer.name).get_weights(),
                                    strict=True):
                assert np.array_equal(ours, theirs), layer.name


def test_prune_conv_channels_reproduces_the_students_repaired_net(bd_net, repaired_10, images):
    ours = prune_conv_channels(bd_net, "conv_3", ORDER[:52])
    for a, b in zip(ours.get_weights(), repaired_10.get_weights(), strict=True):
        assert np.array_equal(a, b)
    x = np.concatenate([images[kind][0] for kind in ("cl", "sun", "ano")])
    np.testing.assert_array_equal(predict_classes(ours, x), predict_classes(repaired_10, x))
    np.testing.assert_allclose(ours.predict_on_batch(x), repaired_10.predict_on_batch(x), atol=1e-6)


def test_b_is_right_on_clean_images_and_backdoored_by_sunglasses(bd_net, images):
    clean, labels = images["cl"]
    np.testing.assert_array_equal(predict_classes(bd_net, clean), labels)
    np.testing.assert_array_equal(predict_classes(bd_net, images["sun"][0]), [TARGET] * 5)


def test_goodnet_on_real_images_matches_a_hand_computation(bd_net, repaired_10, images, tmp_path):
    goodnet = build_goodnet(bd_net, repaired_10)
    assert output_tensor(goodnet).shape[-1] == LAB_CLASSES + 1
    x = np.concatenate([images[kind][0] for kind in ("cl", "sun", "ano")])
    b, b_prime = predict_classes(bd_net, x), predict_classes(repaired_10, x)
    by_hand = np.where(b == b_prime, b, LAB_CLASSES)
    g = predict_classes(goodnet, x)
    np.testing.assert_array_equal(g, by_hand)
    np.testing.assert_array_equal(goodnet_predictions(b, b_prime, LAB_CLASSES), by_hand)

    clean_labels, sun_labels = images["cl"][1], images["sun"][1]
    g_clean, g_sun = g[:5], g[5:10]
    accuracy = 100 * np.mean(g_clean == clean_labels)
    asr = 100 * np.mean(g_sun == sun_labels)
    detection = 100 * np.mean(g_sun == LAB_CLASSES)
    # The student's B' at 10 % catches two of the five sunglasses images; G keeps the clean ones.
    assert (accuracy, asr, detection) == (100.0, 60.0, 40.0)
    scores = goodnet_scores(tally(b_prime[:5], b[:5], clean_labels),
                            tally(b_prime[5:10], b[5:10], sun_labels))
    assert scores["test_accuracy"] == pytest.approx(accuracy)
    assert scores["test_asr"] == pytest.approx(asr)
    assert scores["detection_rate"] == pytest.approx(detection)

    goodnet.save(tmp_path / "goodnet.keras")
    reloaded = keras.models.load_model(tmp_path / "goodnet.keras", compile=False)
    np.testing.assert_array_equal(predict_classes(reloaded, x), g)
    np.testing.assert_allclose(reloaded.predict_on_batch(x), goodnet.predict_on_batch(x), atol=1e-6)


def test_selection_on_the_real_validation_curve_picks_45_48_52():
    curve = pd.read_csv(REAL / "curves" / "lab3_valid_curve.csv")
    assert curve["channel_pruned_this_step"].tolist() == ORDER
    ours = curve.rename(columns={"n_pruned": "channels_pruned", "clean_valid_acc": "valid_accuracy"})
    b_row = pd.DataFrame({"channels_pruned": [0], "valid_accuracy": [98.64899974019225]})
    ours = pd.concat([b_row, ours[["channels_pruned", "valid_accuracy"]]], ignore_index=True)
    assert select_prefixes(ours, [2, 4, 10]) == {2: 45, 4: 48, 10: 52}


# scripts/eval.py end to end on the real images, written as lab files

@pytest.fixture(scope="module")
def lab_sets(images, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("real-lab-sets")
    for kind in ("cl", "sun", "ano"):
        write_lab_h5(folder / f"{kind}.h5", *images[kind])
    return {kind: str(folder / f"{kind}.h5") for kind in ("cl", "sun", "ano")}


def run_eval(capsys, *argv) -> list[str]:
    assert eval_script.main([str(a) for a in argv]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return out.out.splitlines()


def test_eval_of_b_prints_the_labs_lines(lab_sets, capsys):
    assert run_eval(capsys, lab_sets["cl"], lab_sets["sun"], B_WEIGHTS, "--arch", "deepid",
                    "--classes", "1283") == ["Clean Classification accuracy: 100.0",
                                             "Attack Success Rate: 100.0"]


def test_eval_of_goodnet_with_bprime_matches_a_hand_computation(lab_sets, bd_net, repaired_10,
                                                                images, capsys, tmp_path):
    sun, sun_labels = images["sun"]
    clean, clean_labels = images["cl"]
    g_sun = np.where(predict_classes(bd_net, sun) == predict_classes(repaired_10, sun),
                     predict_classes(bd_net, sun), LAB_CLASSES)
    g_clean = goodnet_predictions(predict_classes(bd_net, clean),
                                  predict_classes(repaired_10, clean), LAB_CLASSES)
    expected = [f"Clean Classification accuracy: {np.mean(g_clean == clean_labels) * 100}",
                f"Attack Success Rate: {np.mean(g_sun == sun_labels) * 100}",
                f"Detection rate: {np.mean(g_sun == LAB_CLASSES) * 100}"]
    bprime = REAL / "repaired" / "keras2.9_model_X=10.h5"
    assert run_eval(capsys, lab_sets["cl"], lab_sets["sun"], B_WEIGHTS, "--bprime", bprime) == expected
    goodnet = tmp_path / "goodnet.keras"
    build_goodnet(bd_net, repaired_10).save(goodnet)
    assert run_eval(capsys, lab_sets["cl"], lab_sets["sun"], goodnet) == expected


def test_eval_of_a_keras_2_3_1_full_model(lab_sets, capsys):
    model = REAL / "repaired" / "keras2.3.1_model_X=10.h5"
    predictions = predict_classes(load(f"repaired/{model.name}"), read_images("sun")[0])
    lines = run_eval(capsys, lab_sets["cl"], lab_sets["sun"], model, "--chunk-rows", "2")
    assert lines[1] == f"Attack Success Rate: {np.mean(predictions == TARGET) * 100}"


# the CSAW-HackML-2020 BadNets take pixels divided by 255; the lab3 B raw ones (--rescale)

CSAW2020 = sorted((REAL / "csaw2020").glob("*_bd_weights.h5"))


@pytest.mark.parametrize("path", CSAW2020, ids=lambda path: path.name)
def test_the_2020_nets_load_and_the_scale_check_picks_pixels_divided_by_255(path, lab_sets):
    model = load(f"csaw2020/{path.name}")
    assert output_tensor(model).shape[-1] == LAB_CLASSES
    raw = open_lab_set(lab_sets["cl"], (55, 47, 3), LAB_CLASSES)
    with pytest.raises(InputError, match=r"with pixels x 1 but on .* x 1/255: .*pass --rescale 1/255$"):
        check_scale(model, raw)
    accuracy = check_scale(model, replace(raw, scale=Fraction(1, 255)))
    assert accuracy[Fraction(1, 255)] >= accuracy[Fraction(1)] + MARGIN


def test_the_scale_check_picks_raw_pixels_for_the_lab3_net(bd_net, lab_sets):
    raw = open_lab_set(lab_sets["cl"], (55, 47, 3), LAB_CLASSES)
    accuracy = check_scale(bd_net, raw)
    assert accuracy[Fraction(1)] >= accuracy[Fraction(1, 255)] + MARGIN
    with pytest.raises(InputError, match=r"x 1/255 but on .* x 1: .*pass no --rescale"):
        check_scale(bd_net, replace(raw, scale=Fraction(1, 255)))


def test_eval_of_the_2020_sunglasses_net_with_rescale_and_named_sets(lab_sets, images, capsys):
    weights = REAL / "csaw2020" / "sunglasses_bd_weights.h5"
    model = load(f"csaw2020/{weights.name}")
    found = {kind: np.mean(predict_classes(model, images[kind][0] / 255) == images[kind][1]) * 100
             for kind in ("cl", "sun", "ano")}
    assert run_eval(capsys, lab_sets["cl"], lab_sets["sun"], weights, "--rescale", "1/255") == [
        f"Clean Classification accuracy: {found['cl']}", f"Attack Success Rate: {found['sun']}"]
    assert run_eval(capsys, lab_sets["cl"], f"sunglasses={lab_sets['sun']}", f"anonymous={lab_sets['ano']}",
                    weights, "--rescale", "1/255") == [
        f"Clean Classification accuracy: {found['cl']}", f"Attack Success Rate (sunglasses): {found['sun']}",
        f"Attack Success Rate (anonymous): {found['ano']}"]
    assert eval_script.main([lab_sets["cl"], lab_sets["sun"], str(weights)]) == 2
    assert capsys.readouterr().err.strip().endswith("pass --rescale 1/255")


def test_a_campaign_over_the_four_2020_nets_and_lab3(lab_sets, images, tmp_path, capsys, caplog):
    """One campaign, one cluster: each net with its own scale and poisoned sets, on the 15 real
    images (the clean five stand in for validation and test data). The command runs in this
    process (``jobs.sweep.main``): no new process importing TensorFlow for its client."""
    from in_process import sweep_in_process
    from pruning.scaling import scale_pixels
    nets = {"lab3": ("lab3/bd_weights.h5", 1, {"sunglasses": "sun"}),
            "sunglasses": ("csaw2020/sunglasses_bd_weights.h5", "1/255", {"sunglasses": "sun"}),
            "anonymous_1": ("csaw2020/anonymous_1_bd_weights.h5", "1/255", {"anonymous": "ano"}),
            "anonymous_2": ("csaw2020/anonymous_2_bd_weights.h5", "1/255", {}),
            "multi": ("csaw2020/multi_trigger_multi_target_bd_weights.h5", "1/255", {"sunglasses": "sun"})}
    lines = [f"defaults: {{arch: deepid, clean_valid: {lab_sets['cl']}, clean_test: {lab_sets['cl']}}}",
             "suspects:"]
    for name, (weights, rescale, poisoned) in nets.items():
        sets = ", ".join(f"{set_name}: {lab_sets[kind]}" for set_name, kind in poisoned.items())
        lines.append(f"  - {{name: {name}, weights: {REAL / weights}, rescale: {rescale}"
                     + (f", poisoned_test: {{{sets}}}}}" if sets else "}"))
    (tmp_path / "campaign.yaml").write_text("\n".join(lines) + "\n")
    run = sweep_in_process("--campaign", tmp_path / "campaign.yaml", "--single-node", "--out", tmp_path / "out",
                           capsys=capsys, caplog=caplog)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "campaign.csv")
    assert list(table["suspect"].unique()) == list(nets) and len(table) == 3 * len(nets)
    b = table.groupby("suspect").first()
    for name, (_, rescale, _) in nets.items():
        model = load(nets[name][0])
        x, y = images["cl"]
        correct = np.mean(predict_classes(model, scale_pixels(x, Fraction(str(rescale)))) == y) * 100
        assert b.loc[name, "B_valid_accuracy"] == correct, name
        assert len(pd.read_csv(tmp_path / "out" / name / "results.csv")) == 61
    assert b.loc["lab3", "B_test_asr_sunglasses"] == 100.0  # the lab's B sends all five to its target
    assert pd.isna(b.loc["anonymous_2"]).filter(like="asr").all()  # no poisoned set: no ASR
    assert b.loc["multi", "B_valid_accuracy"] == 100.0 and b.loc["lab3", "B_valid_accuracy"] == 100.0
