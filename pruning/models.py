"""Loading the backdoored model B (which conv layer to prune: :mod:`pruning.layers`).

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
from typing import TYPE_CHECKING

import h5py
import numpy as np

from pruning.data import LAB_CLASSES, InputError, check_file, first_line, open_h5

# A ModelSpec travels in the sweep's tasks, which a Dask scheduler unpickles: Keras (and so
# TensorFlow) is imported where a model is loaded, not with this module.
if TYPE_CHECKING:
    import keras

ARCHITECTURES = ("deepid",)  # --arch: the built-in architectures (pruning.deepid)

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
    from pruning.backend import keras
    model = _read_model(spec, flags)
    for weight in model.weights:  # a few MB: cheap, and garbage in would be garbage out
        if not np.isfinite(keras.ops.convert_to_numpy(weight.value)).all():
            raise InputError(f"{spec.path}: the weight {weight.path} holds NaN or infinite "
                             "values; the file is damaged or the model diverged in training")
    return model


def _read_model(spec: ModelSpec, flags: ModelFlags) -> keras.Model:
    from pruning.backend import keras
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
        from pruning.deepid import build_deepid
        model = build_deepid(classes=spec.classes)
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
    check_classifier_output(model)
    return tuple(int(n) for n in shape)


def check_classifier_output(model: keras.Model) -> None:
    """A one-line :class:`InputError` unless the model gives one score per class."""
    output = output_tensor(model)
    if len(output.shape) != 2 or output.shape[-1] is None or output.shape[-1] < 2:
        raise InputError(f"the model's output has shape {tuple(output.shape)}; a classifier "
                         "gives one score per class (N x classes, at least 2)")
