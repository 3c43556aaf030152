"""The fast sweep gives exactly the literally pruned model's predictions.

Literal: zero the conv layer's kernel and bias for the first k channels of the order, then run
the whole model again. Fast: run the base once, then the head on changed rows only.
"""
import keras
import numpy as np
import pytest

import tiny
from pruning.data import InputError
from pruning.layers import choose_layer
from pruning.profile import channel_order
from pruning.prune import compute_chunk, predict_classes, prefix_predictions, prune_conv_channels, split_model

IMAGES = tiny.random_images(150, seed=11)
MODELS = {
    "deepid": lambda: tiny.tiny_deepid(),
    "deepid-ties-dead": lambda: tiny.with_ties_and_dead_channels(tiny.tiny_deepid(seed=5)),
    "deepid-sparse": lambda: tiny.with_sparse_channels(tiny.tiny_deepid(seed=6), IMAGES),
    "deepid-tiny-activations": lambda: tiny.with_tiny_channels(tiny.tiny_deepid(seed=8)),
    "batchnorm-sigmoid-avgpool": tiny.tiny_batchnorm_sigmoid,
    "skip-connection": tiny.tiny_skip,
    "sequential": tiny.tiny_sequential,
    "global-average-pooling": tiny.tiny_global_pooling,
    "channels-first-pooling": tiny.tiny_channels_first_pooling,
    "shared-activation": tiny.tiny_shared_activation,
    "op-branch": tiny.tiny_op_branch,
    "own-activation": tiny.tiny_own_activation,
    "lora-conv": tiny.tiny_lora,
    "pooled-logits": tiny.tiny_pooled_logits,
}
LAYERS = {"channels-first-pooling": "last_conv", "shared-activation": "conv_a"}  # the rest: the default
LITERAL = {"skip-connection"}  # models that cannot be cut after the layer: the literal fallback


def chunks_of(split, images, labels, rows):
    return [compute_chunk(split, "s", start, start + rows, images[start:start + rows],
                          labels[start:start + rows]) for start in range(0, len(images), rows)]


@pytest.mark.parametrize("name", MODELS)
def test_every_prefix_matches_the_literally_pruned_model(name, monkeypatch):
    model = MODELS[name]()
    conv, read = choose_layer(model, LAYERS.get(name))
    split = split_model(model, conv, read)
    assert (split.head is None) == (name in LITERAL)  # the literal fallback is tested too
    images = IMAGES
    labels = np.zeros(len(images), dtype=np.int64)
    chunks = chunks_of(split, images, labels, rows=64)  # several chunks, a short last one
    sums = sum(chunk.channel_sums for chunk in chunks)
    order = channel_order(sums, sum(c.values_per_channel for c in chunks))["channel"].tolist()
    assert sorted(order) == list(range(split.channels))
    b_predictions = np.concatenate([chunk.b_predictions for chunk in chunks])
    if name == "deepid-sparse":  # channels active on some rows only: the incremental rule matters
        share = np.concatenate([chunk.changes for chunk in chunks]).mean(axis=0)
        assert ((share > 0.05) & (share < 0.95)).sum() >= split.channels // 2, share
    if name == "deepid-tiny-activations":  # active, but by amounts a tolerance would call 0
        active = np.concatenate([chunk.activations for chunk in chunks])[..., 0:12:3]
        assert 0 < active.max() < 1e-20 and active.min() == 0, active.max()
    # every prefix in one block, and in blocks that start part-way (their first prefix is
    # re-run on every row any of its pruned channels touches, the rest incrementally)
    prefixes = split.channels + 1
    blocks = {"one block": [(0, prefixes)], "blocks": [(0, 1), (1, 4), (4, 9), (9, prefixes)]}
    swept = {how: [dict(prefix_predictions(split, chunk, order, first, stop))
                   for chunk in chunks for first, stop in parts] for how, parts in blocks.items()}
    # head batches that end part-way through a prefix's rows
    monkeypatch.setattr("pruning.prune.HEAD_BATCH_ROWS", 50)
    swept["small head batches"] = [dict(prefix_predictions(split, chunk, order, 0, prefixes))
                                   for chunk in chunks]
    changed = 0
    for k in range(prefixes):
        literal = predict_classes(prune_conv_channels(model, conv, order[:k]), images)
        for how, per_chunk in swept.items():
            fast = np.concatenate([found[k] for found in per_chunk if k in found])
            assert np.array_equal(fast, literal), f"{name}: prefix k={k} differs ({how})"
        changed += int((literal != b_predictions).sum())
    # the comparison means something only if pruning moves some predictions along the way
    assert changed > 0


def test_k0_is_b_and_split_reproduces_b():
    model = tiny.tiny_deepid()
    split = split_model(model, *choose_layer(model))
    images = tiny.random_images(70, seed=3)
    chunk = compute_chunk(split, "s", 0, 70, images, np.zeros(70, dtype=np.int64))
    assert np.array_equal(chunk.b_predictions, predict_classes(model, images))
    k0 = next(prefix_predictions(split, chunk, range(split.channels), 0, 1))
    assert k0[0] == 0 and np.array_equal(k0[1], chunk.b_predictions)


def test_ties_are_broken_by_channel_index_and_dead_channels_come_first():
    model = tiny.with_ties_and_dead_channels(tiny.tiny_deepid(seed=5))
    split = split_model(model, *choose_layer(model))
    chunk = compute_chunk(split, "s", 0, 80, tiny.random_images(80), np.zeros(80, dtype=np.int64))
    order = channel_order(chunk.channel_sums, chunk.values_per_channel)
    channels = order["channel"].tolist()
    assert channels[:2] == [0, 7] and (order["mean_activation"].iloc[:2] == 0).all()
    assert channels.index(1) < channels.index(2) < channels.index(5)  # equal means, index order
    assert not chunk.changes[:, [0, 7]].any()  # dead channels never need the head re-run


def test_pruned_map_is_the_literal_value_of_a_pruned_channel():
    model = tiny.tiny_batchnorm_sigmoid()
    conv, read = choose_layer(model)
    assert (conv, read) == ("target", "avg")
    split = split_model(model, conv, read)
    # sigmoid(0) = 0.5, then batch norm and tanh: a constant, not zero
    assert np.ptp(split.pruned_map[..., 3]) == 0 and split.pruned_map[0, 0, 3] != 0


def test_the_default_layer_is_the_last_conv_before_global_pooling():
    """Read at the pooled vector (one value per channel), not at an earlier conv that happens
    to feed a MaxPooling2D."""
    model = tiny.tiny_global_pooling()
    assert choose_layer(model) == ("block3_conv", "gap")
    split = split_model(model, "block3_conv", "gap")
    assert split.head is not None and split.pruned_map.shape == (10,)


def test_a_conv_read_by_two_per_channel_layers_is_read_at_itself():
    """Two branches after the conv: the cut is at the conv, where both start (the fast sweep);
    after one branch's layer, the other would read from before the cut (the literal loop)."""
    keras.utils.set_random_seed(2)
    x = inputs = keras.Input(tiny.SHAPE)
    conv = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="conv")(x)
    x = keras.layers.Concatenate()([keras.layers.GlobalMaxPooling2D(name="max")(conv),
                                    keras.layers.GlobalAveragePooling2D(name="mean")(conv)])
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    assert choose_layer(model) == ("conv", "conv")
    assert split_model(model, "conv", "conv").head is not None


def test_a_pooling_layer_that_mixes_channels_ends_the_chain():
    model = tiny.tiny_channels_first_pooling()
    assert choose_layer(model, "last_conv") == ("last_conv", "last_conv")
    assert choose_layer(model) == ("first_conv", "first_pool")  # the last conv pooled per channel


@pytest.mark.parametrize("activation", ["glu", "sparsemax", "log_softmax"])
def test_an_activation_that_mixes_channels_ends_the_chain(activation):
    def model(conv_activation=None, after="linear"):
        inputs = keras.Input(tiny.SHAPE)
        x = keras.layers.Conv2D(8, 3, activation=conv_activation, name="conv")(inputs)
        x = keras.layers.MaxPooling2D(name="pool")(keras.layers.Activation(after)(x))
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))

    assert choose_layer(model()) == ("conv", "pool")
    assert choose_layer(model(after=activation)) == ("conv", "conv")
    with pytest.raises(InputError, match=f"conv ends in a {activation} over its channels"):
        choose_layer(model(conv_activation=activation))


def test_a_conv_whose_activation_is_not_one_of_keras_own_is_refused():
    """An activation of one's own may combine channels (this one does): a pruned channel need
    not be a constant map, so the sweep cannot prune that conv layer."""
    model = tiny.tiny_own_activation(conv_activation=tiny.channel_shares)
    with pytest.raises(InputError, match="--layer conv ends in the activation channel_shares, "
                                         "not one of Keras' activations that act on each value"):
        choose_layer(model, "conv")


def test_a_shared_conv_layer_is_refused_and_not_the_default():
    """Pruning a conv layer called twice changes both calls; the sweep reads one of them."""
    model = tiny.tiny_shared_conv()
    with pytest.raises(InputError, match="--layer shared_conv is called 2 times on B's way to its output"):
        choose_layer(model, "shared_conv")
    assert choose_layer(model) == ("last_conv", "pool")


@pytest.mark.parametrize("after_conv", ["lambda", "own function"])
def test_a_model_keras_cannot_copy_is_refused_in_one_line(after_conv):
    """Pruning copies B (``keras.models.clone_model``), which rebuilds each layer from its
    config: a Lambda's Python code, or a function of one's own that is not registered, cannot
    be rebuilt."""
    def double(x):
        return x * 2.0

    inputs = keras.Input(tiny.SHAPE)
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0)(x) if after_conv == "lambda" else keras.layers.Activation(double)(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalMaxPooling2D()(x)))
    with pytest.raises(InputError, match="B cannot be copied to prune it") as error:
        split_model(model, *choose_layer(model))
    assert "\n" not in str(error.value)


def test_the_literal_fallback_copies_b_once_per_block_not_once_per_prefix(monkeypatch):
    """Each copy of B is a clone and a new traced predict function (0.4 s for a small ResNet,
    ten times its prediction on 200 rows): one per prefix and chunk made the literal sweep of a
    512-channel layer spend most of its time copying."""
    import pruning.prune
    model = tiny.tiny_skip()
    split = split_model(model, *choose_layer(model))
    assert split.head is None
    chunk = compute_chunk(split, "s", 0, 40, IMAGES[:40], np.zeros(40, dtype=np.int64))
    copies, copy_model = [], pruning.prune.copy_model
    monkeypatch.setattr(pruning.prune, "copy_model", lambda m: copies.append(m) or copy_model(m))
    found = dict(prefix_predictions(split, chunk, list(range(split.channels)), 0, split.channels + 1))
    assert sorted(found) == list(range(split.channels + 1)) and len(copies) == 1


def test_head_batches_of_wide_rows_stay_within_128_mib(monkeypatch):
    """A read layer of 4 x 4 x 2048 floats holds 128 KB a row: 4096-row head batches took a
    worker's task thread 1 GB over its chunk (the rows gathered, then masked). Here 82 KB rows."""
    import pruning.prune
    keras.utils.set_random_seed(12)
    inputs = keras.Input(tiny.SHAPE)
    x = keras.layers.Conv2D(8, 1, activation="relu", bias_initializer="ones", name="wide")(inputs)
    x = keras.layers.MaxPooling2D(1, name="pool")(x)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    split = split_model(model, *choose_layer(model))
    images = tiny.random_images(600, seed=2)
    chunk = compute_chunk(split, "s", 0, 600, images, np.zeros(600, dtype=np.int64))
    batches, predict = [], pruning.prune.predict_classes
    monkeypatch.setattr(pruning.prune, "predict_classes",
                        lambda m, x, *a: batches.append(x.nbytes) or predict(m, x, *a))
    found = dict(prefix_predictions(split, chunk, list(range(8)), 0, 9))
    assert len(batches) > 1 and max(batches) <= 128 << 20, batches
    for k in (1, 5, 8):
        literal = predict(prune_conv_channels(model, "wide", list(range(k))), images)
        assert np.array_equal(found[k], literal)


def test_pruning_never_touches_b():
    model = tiny.tiny_deepid()
    kernel, bias = model.get_layer("conv_3").get_weights()
    model.get_layer("conv_3").set_weights([kernel, np.linspace(0.1, 1.2, len(bias), dtype=bias.dtype)])
    before = [w.copy() for w in model.get_weights()]
    pruned = prune_conv_channels(model, "conv_3", [0, 4, 9])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    kernel, bias = pruned.get_layer("conv_3").get_weights()
    _, bias_before = model.get_layer("conv_3").get_weights()
    assert not kernel[..., [0, 4, 9]].any() and not bias[[0, 4, 9]].any()
    kept = [c for c in range(len(bias)) if c not in (0, 4, 9)]
    assert np.array_equal(kernel[..., kept], before[4][..., kept])
    assert np.array_equal(bias[kept], bias_before[kept]) and bias[kept].all()


def test_a_pruned_channel_of_a_lora_conv_is_zero():
    """LoRA adds ``lora_kernel_a @ lora_kernel_b`` to the kernel: pruning zeroes its part too."""
    model = tiny.tiny_lora()
    pruned = prune_conv_channels(model, "last_conv", [0, 4])
    conv = pruned.get_layer("last_conv")
    values = keras.Model(pruned.inputs, conv.output).predict(IMAGES[:20], verbose=0)
    assert not values[..., [0, 4]].any() and values[..., 1].any()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_sequential_model_loaded_from_a_file_is_cut_after_its_layer(suffix, tmp_path):
    """A loaded Sequential model has called each layer once per build, and ``layer.output`` is
    the first call's: the head must be cut at the call B's output comes from, or every prefix
    runs the whole model (the seeds' loop's speed) behind a warning about skip connections."""
    import keras
    tiny.tiny_sequential().save(tmp_path / f"b{suffix}")
    model = keras.models.load_model(tmp_path / f"b{suffix}", compile=False)
    conv, read = choose_layer(model)
    split = split_model(model, conv, read)
    assert split.head is not None
    images = IMAGES[:60]
    chunk = compute_chunk(split, "s", 0, 60, images, np.zeros(60, dtype=np.int64))
    assert np.array_equal(chunk.b_predictions, predict_classes(model, images))
    order = list(range(split.channels))
    for k, fast in prefix_predictions(split, chunk, order, 0, split.channels + 1):
        literal = predict_classes(prune_conv_channels(model, conv, order[:k]), images)
        assert np.array_equal(fast, literal), k


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_channel_sums_are_exact_over_any_split(dtype):
    """The profile's sums are the exact sums (as fractions), and a set cut anywhere into chunks
    adds up to the same integers: the channel order cannot depend on the chunking."""
    from fractions import Fraction
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    from pruning.profile import UNIT_BITS, exact_channel_sums

    values = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=False, allow_infinity=False)

    @settings(max_examples=60, deadline=None)
    @given(arrays(dtype, st.tuples(st.integers(1, 12), st.just(3), st.just(4)), elements=values),
           st.integers(0, 12))
    def check(activations, cut):
        sums = exact_channel_sums(activations)
        for channel in range(4):
            exact = sum(Fraction(float(v)) for v in activations[..., channel].ravel())
            assert Fraction(int(sums[channel]), 1 << UNIT_BITS) == exact
        cut = min(cut, len(activations) - 1)
        if cut:
            assert list(exact_channel_sums(activations[:cut]) + exact_channel_sums(activations[cut:])) == list(sums)
        order = channel_order(sums, activations[..., 0].size)
        means = [float(sum(Fraction(float(v)) for v in activations[..., c].ravel()) / activations[..., c].size)
                 for c in order["channel"]]
        assert order["mean_activation"].tolist() == means  # the exact mean, rounded once

    check()


def test_activations_that_overflow_stop_the_chunk_with_one_line():
    model = tiny.tiny_deepid()
    model.set_weights([np.abs(w) for w in model.get_weights()])  # inf stays inf through relus
    split = split_model(model, *choose_layer(model))
    images = np.full((3, *IMAGES.shape[1:]), 3e38, dtype=np.float32)  # conv_1 overflows
    with pytest.raises(InputError, match=r"^clean_valid rows 10-12: B's \w+ activations are not all "
                                         r"finite \(inf or NaN\); B overflows on these images$"):
        compute_chunk(split, "clean_valid", 10, 13, images, np.zeros(3, np.int64))
