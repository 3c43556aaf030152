"""Loading the backdoored model B and finding the conv layer to prune.

B comes as a full Keras model (legacy ``.h5`` from Keras 2.3.1 onward, or ``.keras``) or as a
weights-only file for a built-in architecture. Workers load B themselves from a
:class:`ModelSpec` (a few strings), so no model is shipped through the Dask scheduler.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
from pruning.backend import keras

from pruning.data import InputError
from pruning.deepid import LAB_CLASSES, build_deepid

ARCHITECTURES = {"deepid": build_deepid}

# Layers that act on each channel on its own: a pruned conv channel stays a constant map
# through them, which is what makes the fast sweep exact (see pruning.prune).
CHANNELWISE = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Activation,
               keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.BatchNormalization,
               keras.layers.Dropout)
POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


@dataclass(frozen=True)
class ModelSpec:
    """How to load B: a full model file, or a weights file for ``arch`` with ``classes`` outputs."""

    path: str
    weights_only: bool = False
    arch: str = "deepid"
    classes: int = LAB_CLASSES

    def load(self) -> keras.Model:
        return load_cached(self)


def check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give the file inside it")
    return path


def load_model(spec: ModelSpec) -> keras.Model:
    """Load B from ``spec``, with one-line :class:`InputError` messages for bad files."""
    path = check_file(spec.path, "weights" if spec.weights_only else "model")
    if is_data_set(path):
        raise InputError(f"{path} is a data set ('data' and 'label'), not a model; check the "
                         "order of the arguments")
    if spec.weights_only:
        if spec.arch not in ARCHITECTURES:
            raise InputError(f"--arch {spec.arch} is unknown; choose from {sorted(ARCHITECTURES)}")
        model = ARCHITECTURES[spec.arch](classes=spec.classes)
        try:
            model.load_weights(path)
        except Exception as error:  # Keras raises many types for a mismatched file
            raise InputError(f"{path}: these weights do not fit --arch {spec.arch} with "
                             f"--classes {spec.classes} ({first_line(error)})") from None
        return model
    if path.suffix not in (".h5", ".hdf5", ".keras"):
        raise InputError(f"{path}: a full model must be a .h5 or .keras file "
                         "(for weights only, use --weights)")
    if path.suffix != ".keras" and not h5py.is_hdf5(path):
        raise InputError(f"{path} is not an HDF5 file; is it truncated or another format?")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:
        hint = ("; it holds weights only: load it as weights for an architecture "
                "(jobs.sweep --weights PATH --arch deepid)" if is_weights_only(path) else "")
        raise InputError(f"{path} cannot be loaded as a Keras model "
                         f"({first_line(error)}){hint}") from None
    return model


@functools.lru_cache(maxsize=4)
def load_cached(spec: ModelSpec) -> keras.Model:
    """One load per process: each Dask worker keeps B after its first task."""
    return load_model(spec)


def is_weights_only(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return ("model_config" not in f.attrs and "model_weights" not in f
                    and not {"data", "label"} <= set(f))
    except OSError:
        return False


def is_data_set(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return {"data", "label"} <= set(f)
    except OSError:
        return False


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else error.__class__.__name__)[:200]


def output_tensor(model: keras.Model):
    """The model's single output (legacy files give a one-element list)."""
    outputs = model.outputs
    if len(outputs) != 1:
        raise InputError(f"the model has {len(outputs)} outputs; a classifier has one")
    return outputs[0]


def consumers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """For each layer name, the layers of ``model`` that read its output."""
    by_name: dict[str, list[keras.layers.Layer]] = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation.name
                if producer in by_name and layer not in by_name[producer]:
                    by_name[producer].append(layer)
    return by_name


def is_channelwise(layer: keras.layers.Layer) -> bool:
    # softmax normalises across channels, so it is the one activation that mixes them
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return isinstance(layer, CHANNELWISE) and "softmax" not in activation


def channelwise_chain(model: keras.Model, conv_name: str) -> list[keras.layers.Layer]:
    """The conv layer and the per-channel layers that follow it with no branching in between."""
    readers = consumers(model)
    chain = [model.get_layer(conv_name)]
    if "softmax" in getattr(chain[0].activation, "__name__", ""):
        raise InputError(f"--layer {conv_name} ends in a softmax over its channels; "
                         "pruning one channel changes all of them, choose another conv layer")
    while len(readers[chain[-1].name]) == 1 and is_channelwise(readers[chain[-1].name][0]):
        chain.append(readers[chain[-1].name][0])
    return chain


def conv_layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def choose_layer(model: keras.Model, name: str | None = None) -> tuple[str, str]:
    """Return ``(conv layer to prune, layer it is read at)``.

    Default: the last Conv2D that feeds a pooling layer (the lab model: ``conv_3`` read at
    ``pool_3``). Its channels are read where its per-channel chain ends, so that a pruned
    channel is the same constant map for every input there.
    """
    convs = conv_layer_names(model)
    if not convs:
        raise InputError("the model has no Conv2D layer to prune")
    if name is not None:
        names = [layer.name for layer in model.layers]
        if name not in names:
            raise InputError(f"--layer {name} not found; conv layers are: {', '.join(convs)}")
        if name not in convs:
            raise InputError(f"--layer {name} is a {type(model.get_layer(name)).__name__}, not "
                             f"a Conv2D; conv layers are: {', '.join(convs)}")
        chain = channelwise_chain(model, name)
        return name, chain[-1].name
    pooled = [conv for conv in convs
              if any(isinstance(layer, POOLING) for layer in channelwise_chain(model, conv))]
    conv = (pooled or convs)[-1]
    return conv, channelwise_chain(model, conv)[-1].name
