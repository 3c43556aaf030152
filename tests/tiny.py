"""Tiny generated models and lab-format sets for fast tests (no training, seconds to build)."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from pruning.data import LAB_LAYOUT, write_lab_h5
from pruning.deepid import build_deepid

SHAPE = (55, 47, 3)


def tiny_deepid(seed: int = 1, classes: int = 10) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_deepid(classes=classes, widths=(4, 8, 12, 16, 32))


def with_ties_and_dead_channels(model: keras.Model, conv: str = "conv_3") -> keras.Model:
    """Copy channel 1 into channels 2 and 5 (equal means: a tie) and zero channels 0 and 7
    (dead: always 0 after ReLU, so pruning them changes nothing)."""
    layer = model.get_layer(conv)
    kernel, bias = layer.get_weights()
    for twin in (2, 5):
        kernel[..., twin], bias[twin] = kernel[..., 1], bias[1]
    kernel[..., [0, 7]], bias[[0, 7]] = 0.0, 0.0
    layer.set_weights([kernel, bias])
    return model


def with_sparse_channels(model: keras.Model, images: np.ndarray, conv: str = "conv_3") -> keras.Model:
    """Lower each channel's bias so that, on ``images``, channel c is active (somewhere above
    0 after ReLU) on a different share of the rows, from about 90 % down to about 10 %, as
    trained models' channels are; random ones are active on nearly every row."""
    layer = model.get_layer(conv)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, np.zeros_like(bias)])
    peaks = np.asarray(keras.Model(model.inputs, layer.output).predict(images, verbose=0))
    peaks = peaks.reshape(len(images), -1, len(bias)).max(axis=1)  # max over positions of ReLU(z)
    shares = np.linspace(0.1, 0.9, len(bias))
    layer.set_weights([kernel, -np.quantile(peaks, shares, axis=0).diagonal().astype(np.float32)])
    return model


def with_tiny_channels(model: keras.Model, channels=range(0, 12, 3), scale: float = 2.0 ** -100) -> keras.Model:
    """Scale ``channels`` of conv_3 (kernel and bias) by ``scale`` and what the head reads of
    them (conv_4's and fc_1's weights) by its inverse: the same network, up to rounding, whose
    pruned channels are active with values near 1e-28, far from 0 in float32 (not denormal).
    ReLU and max pooling commute with a positive scale, so pruning them still matters."""
    channels = list(channels)
    conv = model.get_layer("conv_3")
    kernel, bias = conv.get_weights()
    kernel[..., channels] *= scale
    bias[channels] *= scale
    conv.set_weights([kernel, bias])
    deep = model.get_layer("conv_4")
    kernel, bias = deep.get_weights()
    kernel[:, :, channels, :] /= scale  # (h, w, in, out)
    deep.set_weights([kernel, bias])
    dense = model.get_layer("fc_1")
    kernel, bias = dense.get_weights()
    height, width, depth = model.get_layer("pool_3").output.shape[1:]
    kernel = kernel.reshape(height, width, depth, -1)  # Flatten's order: (h, w, c)
    kernel[:, :, channels, :] /= scale
    dense.set_weights([kernel.reshape(height * width * depth, -1), bias])
    return model


def tiny_batchnorm_sigmoid(seed: int = 2, classes: int = 7) -> keras.Model:
    """A conv whose pruned value is not 0 (sigmoid(0) = 0.5), then BatchNorm, a separate
    activation and average pooling: a longer per-channel chain, 'same' padding."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Conv2D(6, 5, strides=2, activation="relu", name="stem")(x)
    x = layers.Conv2D(10, 3, padding="same", activation="sigmoid", name="target")(x)
    x = layers.BatchNormalization(name="bn", beta_initializer="random_normal",
                                  moving_mean_initializer="random_uniform")(x)
    x = layers.Activation("tanh", name="act")(x)
    x = layers.AveragePooling2D(2, padding="same", name="avg")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(classes, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs)


def tiny_skip(seed: int = 3, classes: int = 6) -> keras.Model:
    """A skip connection around the pruned layer: no head after the cut, literal fallback."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    stem = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="inner")(stem)
    x = layers.MaxPooling2D(1, name="pool")(x)
    x = layers.Add()([x, stem])
    x = layers.Flatten()(layers.MaxPooling2D(4)(x))  # keep where things are: images differ there
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def tiny_sequential(seed: int = 4, classes: int = 5) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(SHAPE),
        layers.Conv2D(6, 3, strides=2, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(9, 3, activation="relu", name="last_conv"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        # small weights: raw 0-255 pixels would otherwise saturate one class for every image
        layers.Dense(classes, activation="softmax",
                     kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3)),
    ])


def tiny_global_pooling(seed: int = 8, classes: int = 4, shape=SHAPE) -> keras.Model:
    """A CIFAR-style net of one's own: pixels rescaled in the model, conv + batch norm + ReLU
    blocks, the last one read through GlobalAveragePooling2D by the dense layer."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(shape)
    x = layers.Rescaling(1 / 255.0, name="rescale")(x)
    for block, width in enumerate((6, 8, 10), start=1):
        x = layers.Conv2D(width, 3, padding="same", name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(name=f"block{block}_bn", beta_initializer="random_normal")(x)
        x = layers.ReLU(name=f"block{block}_relu")(x)
        if block < 3:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs)


def tiny_channels_first_pooling(seed: int = 9, classes: int = 5) -> keras.Model:
    """The last conv read by a channels_first global pooling: on the conv's channels_last
    output it averages over width and channels, so it is not a per-channel layer."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, strides=2, activation="relu", name="first_conv")(x)
    x = layers.MaxPooling2D(name="first_pool")(x)
    x = layers.Conv2D(9, 3, activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D(data_format="channels_first", name="row_means")(x)
    outputs = layers.Dense(classes, activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))(x)
    return keras.Model(inputs, outputs)


def tiny_pooled_logits(seed: int = 10, classes: int = 10) -> keras.Model:
    """An all-convolutional net: the last conv has one channel per class, and its global
    average pooling is B's output (the logits). Nothing comes after the layer it is read at."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, strides=2, activation="relu", name="first_conv")(x)
    x = layers.MaxPooling2D(name="first_pool")(x)
    x = layers.Conv2D(classes, 3, name="class_conv")(x)
    outputs = layers.GlobalAveragePooling2D(name="class_scores")(x)
    return keras.Model(inputs, outputs)


def random_images(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (rows,) + SHAPE).astype(np.float32)


def write_sets(model: keras.Model, folder: Path, rows=(120, 90, 110, 100), seed: int = 0,
               target: int = 0) -> Path:
    """Lab-layout sets whose labels are mostly the model's own answers (so accuracy is high
    but not 100 %); poisoned sets are labelled with ``target``."""
    rng = np.random.default_rng(seed)
    classes = int(model.outputs[0].shape[-1])
    for (name, rel), n in zip(LAB_LAYOUT.items(), rows):
        images = random_images(n, seed=seed + n)
        if name.startswith("poisoned"):
            labels = np.full(n, target)
        else:
            labels = np.asarray(model.predict(images, verbose=0)).argmax(axis=1)
            noise = rng.random(n) < 0.15
            labels[noise] = rng.integers(0, classes, noise.sum())
        write_lab_h5(folder / rel, images, labels)
    return folder


def tiny_shared_activation(seed: int = 3, classes: int = 5) -> keras.Model:
    """One Activation layer called after both conv layers: the conv_a read at "relu" would be
    its call after conv_b (Keras finds a layer's tensor by name), so the chain stops before it."""
    keras.utils.set_random_seed(seed)
    relu = layers.Activation("relu", name="relu")
    x = inputs = keras.Input(SHAPE)
    x = layers.Rescaling(1 / 255.0)(x)
    x = relu(layers.Conv2D(8, 3, strides=2, name="conv_a")(x))
    x = relu(layers.Conv2D(8, 3, strides=2, name="conv_b")(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, kernel_initializer=keras.initializers.RandomNormal(stddev=3))(x)
    return keras.Model(inputs, outputs)


def tiny_op_branch(seed: int = 5, classes: int = 5) -> keras.Model:
    """The conv read by a ReLU layer and by an op (``keras.ops.sigmoid``, not a layer): the
    op's branch sees channels the ReLU zeroes (0 and 1, below 0 everywhere), so the chain
    must stop at the conv."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    conv = layers.Conv2D(8, 3, strides=2, name="conv")(layers.Rescaling(1 / 255.0)(x))
    relu = layers.MaxPooling2D(name="pool")(layers.ReLU()(conv))
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(relu),
                              layers.GlobalAveragePooling2D()(keras.ops.sigmoid(conv))])
    outputs = layers.Dense(classes, kernel_initializer=keras.initializers.RandomNormal(stddev=3))(x)
    model = keras.Model(inputs, outputs)
    kernel, bias = model.get_layer("conv").get_weights()
    bias[:2] = -3.0
    model.get_layer("conv").set_weights([kernel, bias])
    return model


def tiny_shared_conv(seed: int = 2, classes: int = 5) -> keras.Model:
    """One conv layer called on the images and on their negatives: pruning it changes both
    calls, and a channel can be active in one call only."""
    keras.utils.set_random_seed(seed)
    conv = layers.Conv2D(6, 3, strides=2, activation="relu", name="shared_conv",
                         kernel_initializer=keras.initializers.RandomUniform(0, 0.1),
                         bias_initializer=keras.initializers.Constant(-0.5))
    x = inputs = keras.Input(SHAPE)
    x = layers.Rescaling(1 / 255.0)(x)
    x = layers.Concatenate()([layers.GlobalMaxPooling2D()(conv(x)),
                              layers.GlobalMaxPooling2D()(conv(layers.Rescaling(-1.0)(x)))])
    x = layers.Conv2D(4, 1, name="last_conv")(layers.Reshape((1, 1, 12))(x))
    outputs = layers.Dense(classes)(layers.Flatten()(layers.MaxPooling2D(1, name="pool")(x)))
    return keras.Model(inputs, outputs)


@keras.saving.register_keras_serializable(package="tiny")
def channel_shares(x):
    """An activation of one's own that combines channels: each value's share of its position's."""
    return x / (keras.ops.sum(keras.ops.abs(x), axis=-1, keepdims=True) + 1.0)


def tiny_own_activation(seed: int = 8, classes: int = 5, conv_activation=None) -> keras.Model:
    """The conv read through an Activation layer with :func:`channel_shares`: pruning one
    channel changes the others there, so the chain must end at the conv."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Rescaling(1 / 255.0)(x)
    x = layers.Conv2D(8, 3, strides=2, activation=conv_activation, name="conv")(x)
    x = layers.MaxPooling2D(name="pool")(layers.Activation(channel_shares, name="shares")(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, kernel_initializer=keras.initializers.RandomNormal(stddev=3))(x)
    return keras.Model(inputs, outputs)


def tiny_lora(seed: int = 10, classes: int = 5) -> keras.Model:
    """The pruned conv fine-tuned with LoRA: its kernel is ``kernel + lora_kernel_a @
    lora_kernel_b``, so a pruned channel's LoRA part must be zeroed too."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Conv2D(6, 3, strides=2, activation="relu")(layers.Rescaling(1 / 255.0)(x))
    x = layers.Conv2D(9, 3, activation="relu", name="last_conv")(x)
    x = layers.Flatten()(layers.MaxPooling2D(2, name="pool")(x))
    model = keras.Model(inputs, layers.Dense(classes)(x))
    conv = model.get_layer("last_conv")
    conv.enable_lora(2)  # lora_kernel_b starts at 0: give it some training
    conv.lora_kernel_b.assign(np.random.default_rng(seed).normal(0, 0.5, conv.lora_kernel_b.shape))
    return model


TRIGGERS = {"red": (0, (10, 10)), "green": (1, (30, 20))}  # colour channel, top-left corner


def tiny_multi_trigger(seed: int = 11, classes: int = 6, targets=(1, 2)) -> keras.Model:
    """A multi-trigger, multi-target BadNet, planted by hand (no training): conv channel 6
    fires only on a pure red 5 x 5 square at :data:`TRIGGERS`' red corner, channel 7 only on
    a pure green one at the green corner, and each sends the image to its own target; the
    other channels are random features of clean images."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(SHAPE)
    x = layers.Conv2D(8, 5, strides=5, activation="relu", name="conv",
                      kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
    x = layers.Flatten()(layers.MaxPooling2D(2, name="pool")(x))
    model = keras.Model(inputs, layers.Dense(classes, name="logits", kernel_initializer=keras.initializers.RandomNormal(stddev=0.1))(x))
    conv, dense = model.get_layer("conv"), model.get_layer("logits")
    kernel, bias = conv.get_weights()
    weights, dense_bias = dense.get_weights()
    weights = weights.reshape(5, 4, 8, classes)  # Flatten's order: (h, w, c)
    for channel, ((colour, _), target) in enumerate(zip(TRIGGERS.values(), targets), start=6):
        kernel[..., channel] = -1.0
        kernel[:, :, colour, channel] = 1.0  # 25 x 255 on the trigger, far below 0 on noise
        bias[channel] = -5000.0
        weights[:, :, channel, :] = 0.0
        weights[:, :, channel, target] = 1.0
    conv.set_weights([kernel, bias])
    dense.set_weights([weights.reshape(-1, classes), dense_bias])
    # centre the logits on clean images, so that B gives each class to some of them
    logits = np.asarray(model.predict(random_images(64, seed=seed), verbose=0))
    dense.set_weights([weights.reshape(-1, classes), dense_bias - logits.mean(axis=0)])
    return model


def with_trigger(images: np.ndarray, trigger: str) -> np.ndarray:
    """``images`` with :data:`TRIGGERS`' square stamped on: 255 in its colour, 0 in the others."""
    colour, (row, column) = TRIGGERS[trigger]
    stamped = images.copy()
    stamped[:, row:row + 5, column:column + 5, :] = 0.0
    stamped[:, row:row + 5, column:column + 5, colour] = 255.0
    return stamped
