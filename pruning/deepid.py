"""The DeepID-shaped network of the NYU CSAW-HackML lab, built by name.

Layer names match the lab's ``bd_net.h5`` so that weights-only files load into it and
``--layer conv_3`` means the same thing for both.
"""
from __future__ import annotations

from pruning.backend import keras
from keras import layers

from pruning.data import LAB_CLASSES

LAB_INPUT_SHAPE = (55, 47, 3)
LAB_WIDTHS = (20, 40, 60, 80, 160)


def build_deepid(classes: int = LAB_CLASSES, widths: tuple[int, ...] = LAB_WIDTHS,
                 input_shape: tuple[int, int, int] = LAB_INPUT_SHAPE) -> keras.Model:
    """Return an untrained DeepID: conv_1..conv_3 -> pool_3 -> {fc_1, conv_4 -> fc_2} -> add.

    ``widths`` are the channels of conv_1..conv_4 and the width of fc_1/fc_2; the lab's
    model is ``(20, 40, 60, 80, 160)`` with 1283 classes. Inputs are raw 0-255 pixels.
    """
    if classes < 2:
        raise ValueError(f"classes must be at least 2, got {classes}")
    c1, c2, c3, c4, fc = widths
    x = inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(c1, (4, 4), activation="relu", name="conv_1")(x)
    x = layers.MaxPooling2D((2, 2), name="pool_1")(x)
    x = layers.Conv2D(c2, (3, 3), activation="relu", name="conv_2")(x)
    x = layers.MaxPooling2D((2, 2), name="pool_2")(x)
    x = layers.Conv2D(c3, (3, 3), activation="relu", name="conv_3")(x)
    pooled = layers.MaxPooling2D((2, 2), name="pool_3")(x)
    deep = layers.Conv2D(c4, (2, 2), activation="relu", name="conv_4")(pooled)
    fc_1 = layers.Dense(fc, name="fc_1")(layers.Flatten(name="flatten_1")(pooled))
    fc_2 = layers.Dense(fc, name="fc_2")(layers.Flatten(name="flatten_2")(deep))
    x = layers.Activation("relu", name="activation_1")(layers.Add(name="add_1")([fc_1, fc_2]))
    outputs = layers.Dense(classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="deepid")
