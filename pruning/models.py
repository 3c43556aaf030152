"""Loading the backdoored model B and finding the conv layer to prune.

B comes as a full Keras model (legacy ``.h5`` from Keras 2.3.1 onward, or ``.keras``) or as a
weights-only file for a built-in architecture. Workers load B themselves from a
:class:`ModelSpec` (a few strings), so no model is shipped through the Dask scheduler.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
from pruning.backend import keras

from pruning.data import InputError, check_file, first_line, open_h5
from pruning.deepid import LAB_CLASSES, build_deepid

ARCHITECTURES = {"deepid": build_deepid}

# Layers that act on each channel on its own: a pruned conv channel stays a constant map
# through them, which is what makes the fast sweep exact (see pruning.prune). Global pooling
# ends the map (one value per channel), still the same for every input.
POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
           keras.layers.GlobalMaxPooling2D, keras.layers.GlobalAveragePooling2D)
CHANNELWISE = POOLING + (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                         keras.layers.BatchNormalization, keras.layers.Dropout)


@dataclass(frozen=True)
class ModelSpec:
    """How to load B: a full model file, or a weights file for ``arch`` with ``classes`` outputs."""

    path: str
    weights_only: bool = False
    arch: str = "deepid"
    classes: int = LAB_CLASSES
    # The file's (size, mtime_ns, inode) when the run checked it: part of the key under which a
    # process caches the loaded B, so a long-lived Dask worker loads a replaced file again.
    stamp: tuple[int, int, int] | None = None

    def load(self) -> keras.Model:
        return load_cached(self)

    def stamped(self) -> ModelSpec:
        """This spec with an absolute path and the file's current stamp."""
        path = os.path.abspath(self.path)
        try:
            info = os.stat(path)
        except OSError:  # loading it says what is wrong, in one line
            return replace(self, path=path)
        return replace(self, path=path, stamp=(info.st_size, info.st_mtime_ns, info.st_ino))


@dataclass(frozen=True)
class ModelFlags:
    """How a command line asks for each kind of model file, for its error messages."""

    full_model: str = "--model PATH"
    weights: str = "--weights PATH --arch deepid"


def load_model(spec: ModelSpec, flags: ModelFlags = ModelFlags()) -> keras.Model:
    """Load B from ``spec``, with one-line :class:`InputError` messages for bad files that
    name the command line's ``flags``."""
    with warnings.catch_warnings():  # Keras warns line by line about mismatched files
        warnings.simplefilter("ignore")
        return _load_model(spec, flags)


def _load_model(spec: ModelSpec, flags: ModelFlags) -> keras.Model:
    model = _read_model(spec, flags)
    for weight in model.weights:  # a few MB: cheap, and garbage in would be garbage out
        if not np.isfinite(keras.ops.convert_to_numpy(weight.value)).all():
            raise InputError(f"{spec.path}: the weight {weight.path} holds NaN or infinite "
                             "values; the file is damaged or the model diverged in training")
    return model


def _read_model(spec: ModelSpec, flags: ModelFlags) -> keras.Model:
    path = check_file(spec.path, "weights" if spec.weights_only else "model", "the model file")
    if is_data_set(path):
        raise InputError(f"{path} is a data set ('data' and 'label'), not a model; check the "
                         "order of the arguments")
    if spec.weights_only:
        if spec.arch not in ARCHITECTURES:
            raise InputError(f"--arch {spec.arch} is unknown; choose from {sorted(ARCHITECTURES)}")
        if path.suffix not in (".h5", ".hdf5", ".keras"):
            raise InputError(f"weights {path}: a weights file must be a .h5 (or .weights.h5) "
                             "or .keras file")
        check_file_format(path, "weights")
        model = ARCHITECTURES[spec.arch](classes=spec.classes)
        try:
            model.load_weights(path)
        except Exception as error:  # Keras raises many types for a mismatched file
            raise InputError(f"{path}: these weights do not fit --arch {spec.arch} with "
                             f"--classes {spec.classes} ({weights_mismatch(error)}); check "
                             f"--arch and --classes, or give a full model ({flags.full_model})") from None
        return model
    if path.suffix not in (".h5", ".hdf5", ".keras"):
        raise InputError(f"{path}: a full model must be a .h5 or .keras file "
                         f"(for weights only, use {flags.weights})")
    check_file_format(path, "model")
    if path.suffix != ".keras":
        if not (has_model_config(path) or is_weights_only(path)):
            raise InputError(f"{path} is an HDF5 file but holds no Keras model (no model_config); "
                             "give the model file")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:
        if "Lambda" in str(error) and "safe_mode" in str(error):
            raise InputError(f"{path} holds a Lambda layer with Python code, which Keras does not "
                             "run from a file: code in a model you were handed could do anything. "
                             "Rebuild the model without Lambda layers, or, if you trust the "
                             "file, load it yourself with safe_mode=False and save it as another "
                             "model") from None
        hint = ("; it holds weights only: load it as weights for an architecture "
                f"({flags.weights})" if is_weights_only(path) else "")
        raise InputError(f"{path} cannot be loaded as a Keras model "
                         f"({first_line(error, 200)}){hint}") from None
    if not isinstance(model, keras.Model):
        raise InputError(f"{path} holds a {type(model).__name__}, not a Keras model")
    return model


def check_file_format(path: Path, what: str) -> None:
    """A one-line error for a model or weights file that is not what its suffix says, or is
    truncated or damaged."""
    if path.suffix == ".keras":
        check_keras_zip(path, what)
    else:
        open_h5(path, what).close()


def check_keras_zip(path: Path, what: str) -> None:
    """A ``.keras`` file is a zip archive whose directory is at its end: a cut-off copy loses
    it, and Keras would then say the file is not found."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        started_as_zip = handle.read(4) == b"PK\x03\x04"
    if started_as_zip:
        raise InputError(f"{what} {path} is truncated (a .keras file is a zip archive, and this "
                         "one has no end): it was not completely copied or written; copy it again")
    raise InputError(f"{what} {path} is not a .keras file (a zip archive); is it truncated or "
                     "another format?")


@functools.lru_cache(maxsize=4)
def load_cached(spec: ModelSpec) -> keras.Model:
    """One load per process: each Dask worker keeps B after its first task."""
    return load_model(spec)


def is_weights_only(path: Path) -> bool:
    """Keras weights without a model: ``layer_names`` (Keras 2) or ``layers``/``vars`` (Keras 3)."""
    return _h5_answers(path, lambda f: "model_config" not in f.attrs and "model_weights" not in f
                       and ("layer_names" in f.attrs or "layers" in f or "vars" in f))


def has_model_config(path: Path) -> bool:
    return _h5_answers(path, lambda f: "model_config" in f.attrs)


def is_data_set(path: Path) -> bool:
    return _h5_answers(path, lambda f: {"data", "label"} <= set(f))


def _h5_answers(path: Path, question) -> bool:
    """``question(file)`` on the HDF5 file at ``path``; False for a file that is not HDF5 or is
    damaged: loading it then says which."""
    try:
        with h5py.File(path, "r") as f:
            return bool(question(f))
    except Exception:
        return False


def weights_mismatch(error: BaseException) -> str:
    """The gist of Keras' (long, multi-line) error for weights that do not fit a model."""
    text = str(error)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    if shapes:
        variable = re.search(r"Variable path=([^,\s]+)", text)
        return (f"{variable.group(1) if variable else 'a weight'} is {shapes.group(1)} in the "
                f"architecture but {shapes.group(2)} in the file")
    legacy = re.search(r"for weight (\S+)\. Weight expects shape (\([^)]*\))\. Received saved "
                       r"weight with shape (\([^)]*\))", text)  # a Keras 2 weights file
    if legacy:
        return (f"{legacy.group(1)} is {legacy.group(2)} in the architecture but "
                f"{legacy.group(3)} in the file")
    return " ".join(text.split())[:200] or error.__class__.__name__


def output_tensor(model: keras.Model):
    """The model's single output (legacy files give a one-element list)."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        raise InputError(f"the model has {len(outputs)} outputs; a classifier has one")
    return outputs[0]


def calls_on_the_way(model: keras.Model) -> dict[str, list]:
    """For each operation B's output depends on (layers, and ops such as ``keras.ops.sigmoid``
    that are no layer), its calls (Keras nodes) that the output depends on.

    A layer can have more calls than that: a Sequential model loaded from a file has called
    each layer once per build (three times), and ``layer.output`` is the first call's. Walking
    back from the output finds the calls B uses; a layer shared within B has several of them.
    """
    calls, stack, seen = {}, [output_tensor(model)], set()
    while stack:
        operation, node_index, _ = stack.pop()._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) not in seen:
            seen.add(id(node))
            calls.setdefault(operation.name, []).append(node)
            stack.extend(node.input_tensors)
    return calls


def layer_output(model: keras.Model, name: str):
    """The output of layer ``name``'s one call on the way from B's input to its output."""
    calls = calls_on_the_way(model).get(name)
    if not calls:  # not on the way to the output: Keras says so when it is used
        return model.get_layer(name).output
    if len(calls) > 1:
        raise InputError(f"layer {name} is called {len(calls)} times on B's way to its output; "
                         "the sweep reads a layer that is called once")
    return calls[0].output_tensors[0]


def image_input_shape(model: keras.Model) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model's one image input, or a one-line :class:`InputError`."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise InputError(f"the model has {len(inputs)} inputs; the sweep needs a classifier "
                         "with one image input")
    shape = tuple(inputs[0].shape[1:])
    if len(shape) != 3:
        raise InputError(f"the model takes inputs of shape {shape}; images are H x W x C")
    if None in shape:
        raise InputError(f"the model takes images of unspecified size {shape}; the sweep needs "
                         "a fixed input size, e.g. keras.Input((55, 47, 3))")
    output = output_tensor(model)
    if len(output.shape) != 2 or output.shape[-1] is None or output.shape[-1] < 2:
        raise InputError(f"the model's output has shape {tuple(output.shape)}; a classifier "
                         "gives one score per class (N x classes, at least 2)")
    return tuple(int(n) for n in shape)


# Keras' activations that act on each value alone (hard_swish and swish: older names). Any
# other may combine channels: softmax and sparsemax normalise across them, glu gates one half
# of them by the other, and a function of one's own could do anything.
PER_VALUE_ACTIVATIONS = frozenset((
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6",
    "selu", "sigmoid", "silu", "soft_shrink", "softplus", "softsign", "sparse_plus",
    "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink", "threshold"))


def activation_name(layer: keras.layers.Layer) -> str:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", type(activation).__name__)


def mixes_channels(layer: keras.layers.Layer) -> bool:
    """Whether the layer has an activation that may combine channels (see
    ``PER_VALUE_ACTIVATIONS``)."""
    return (getattr(layer, "activation", None) is not None
            and activation_name(layer) not in PER_VALUE_ACTIVATIONS)


def is_channelwise(layer: keras.layers.Layer) -> bool:
    # a channels_first pooling layer on the conv's channels_last output pools across channels
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    return isinstance(layer, CHANNELWISE) and not mixes_channels(layer) and channels_last


def channelwise_chain(model: keras.Model, conv_name: str) -> list[keras.layers.Layer]:
    """The conv layer and the per-channel layers that follow it with no branching in between,
    or a one-line :class:`InputError` for a conv layer the sweep cannot prune."""
    conv = model.get_layer(conv_name)
    check_channels_last(conv)
    if mixes_channels(conv):
        raise InputError(mixing_refusal(conv))
    calls = calls_on_the_way(model)
    if len(calls.get(conv_name, [])) > 1:
        raise InputError(f"--layer {conv_name} is called {len(calls[conv_name])} times on B's way "
                         "to its output (a shared layer): pruning it changes every call, and the "
                         "sweep follows one; choose another conv layer")
    readers = {}  # id(tensor) -> the calls on the way that read it, ops included
    for nodes in calls.values():
        for node in nodes:
            for tensor in node.input_tensors:
                readers.setdefault(id(tensor), []).append(node)
    chain = [conv]
    tensor = calls[conv_name][0].output_tensors[0] if conv_name in calls else None
    while len(readers.get(id(tensor), [])) == 1:
        layer = readers[id(tensor)][0].operation
        # a layer called twice is read by name at one of its calls: stop before it
        if not is_channelwise(layer) or len(calls[layer.name]) > 1:
            break
        chain.append(layer)
        tensor = calls[layer.name][0].output_tensors[0]
    return chain


def mixing_refusal(conv: keras.layers.Layer) -> str:
    name = activation_name(conv)
    if "softmax" in name or name in ("sparsemax", "glu"):
        return (f"--layer {conv.name} ends in a {name} over its channels; pruning one channel "
                "changes the others, choose another conv layer")
    return (f"--layer {conv.name} ends in the activation {name}, not one of Keras' activations "
            "that act on each value alone: pruning one channel could change the others; choose "
            "another conv layer")


def conv_layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def choose_layer(model: keras.Model, name: str | None = None) -> tuple[str, str]:
    """Return ``(conv layer to prune, layer it is read at)``.

    Default: the last Conv2D that feeds a pooling layer, global pooling included (the lab
    model: ``conv_3`` read at ``pool_3``; a CIFAR-style net: the last conv before its
    ``GlobalAveragePooling2D``). Its channels are read where its per-channel chain ends, so
    that a pruned channel is the same constant map for every input there.
    """
    convs = conv_layer_names(model)
    if not convs:
        nested = [layer.name for layer in model.layers
                  if isinstance(layer, keras.Model) and conv_layer_names(layer)]
        hint = ""
        if {"bd_net", "pruned_net"} <= set(nested):  # pruning.goodnet's names for B and B'
            hint = f" (they are inside its nested model {', '.join(nested)}: give B itself, not a GoodNet)"
        elif nested:  # a backbone used as one layer, as in transfer learning
            hint = (f" (they are inside its nested model {', '.join(nested)}: rebuild B with "
                    "those layers in its own graph, calling them rather than the nested model)")
        raise InputError(f"the model has no Conv2D layer to prune{hint}")
    if name is not None:
        names = [layer.name for layer in model.layers]
        if name not in names:
            raise InputError(f"--layer {name} not found; conv layers are: {', '.join(convs)}")
        if name not in convs:
            raise InputError(f"--layer {name} is a {type(model.get_layer(name)).__name__}, not "
                             f"a Conv2D; conv layers are: {', '.join(convs)}")
        return name, channelwise_chain(model, name)[-1].name
    chains = {}
    for conv in convs:  # the default passes over conv layers the sweep cannot prune
        try:
            chains[conv] = channelwise_chain(model, conv)
        except InputError as error:
            refusal = error
    if not chains:
        raise refusal
    pooled = [conv for conv, chain in chains.items()
              if any(isinstance(layer, POOLING) for layer in chain)]
    conv = (pooled or list(chains))[-1]
    return conv, chains[conv][-1].name


def check_channels_last(layer: keras.layers.Layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise InputError(f"conv layer {layer.name} is {layer.data_format}; the sweep prunes "
                         "channels_last models (Keras' default): convert the model")
