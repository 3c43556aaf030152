"""Lab-format HDF5 sets: ``data`` (N x 3 x 55 x 47 or N x 55 x 47 x 3 pixels) and ``label`` (N).

Sets are read in row chunks so that memory does not grow with the file. A poisoned set's labels
are the attacker's target, so "accuracy" on it is the attack success rate (ASR).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

# The four sets of a sweep, in the lab's folder layout (``--data DIR``).
SET_NAMES = ("clean_valid", "poisoned_valid", "clean_test", "poisoned_test")
LAB_LAYOUT = {
    "clean_valid": "cl/valid.h5",
    "poisoned_valid": "bd/bd_valid.h5",
    "clean_test": "cl/test.h5",
    "poisoned_test": "bd/bd_test.h5",
}
CHUNK_ROWS = 4096


class InputError(ValueError):
    """A user-facing problem with an input; the message names it and the fix (one line)."""


@dataclass(frozen=True)
class LabSet:
    """One HDF5 set, checked against the model's input: path, row count and pixel layout."""

    path: str
    rows: int
    channels_first: bool  # True for the lab's N x 3 x H x W files

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` covering the set."""
        return [(start, min(start + chunk_rows, self.rows))
                for start in range(0, self.rows, chunk_rows)]

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` as (NHWC float32 images, int64 labels)."""
        stop = self.rows if stop is None else stop
        with open_h5(self.path) as f:
            try:
                images = np.asarray(f["data"][start:stop], dtype=np.float32)
                labels = np.asarray(f["label"][start:stop])
            except (OSError, KeyError, ValueError) as error:
                raise InputError(f"{self.path}: rows {start}-{stop} cannot be read "
                                 f"({error}); the file is damaged, copy it again") from None
        if self.channels_first:
            images = images.transpose(0, 2, 3, 1)
        if not np.isfinite(images).all():
            raise InputError(f"{self.path}: NaN or infinite pixels in rows {start}-{stop}; "
                             "pixels must be finite 0-255 values")
        return np.ascontiguousarray(images), as_int_labels(labels, self.path)

    def iter_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, stop in self.chunks(chunk_rows):
            yield self.read(start, stop)


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into one clear :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the .h5 file inside it")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path} is not a readable HDF5 file ({error.__class__.__name__}: "
                         f"{str(error).splitlines()[0][:120]}); is it truncated or another "
                         "format?") from None


def as_int_labels(labels: np.ndarray, path: str) -> np.ndarray:
    """Labels as int64; the lab stores them as floats, so whole-number floats are accepted."""
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f" or not np.isfinite(labels).all() \
            or not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path}: 'label' must hold whole class numbers, found "
                         f"{labels.dtype} values like {labels[:3].tolist()}")
    return labels.astype(np.int64)


def open_lab_set(path: str | os.PathLike, input_shape: tuple[int, int, int],
                 classes: int | None = None) -> LabSet:
    """Check a set's structure against the model input ``(H, W, C)`` and return a :class:`LabSet`.

    Checks the datasets, shapes, pixel layout (NCHW or NHWC), row counts and the labels'
    range; pixels are checked for NaN/inf chunk by chunk as they are read.
    """
    path = str(path)
    height, width, depth = input_shape
    with open_h5(path) as f:
        missing = [name for name in ("data", "label") if name not in f]
        if missing:
            raise InputError(f"{path}: no {' or '.join(repr(m) for m in missing)} dataset "
                             f"(found {sorted(f.keys())}); lab files hold 'data' and 'label'")
        data, label = f["data"], f["label"]
        if not isinstance(data, h5py.Dataset) or not isinstance(label, h5py.Dataset):
            raise InputError(f"{path}: 'data' and 'label' must be datasets, not groups")
        shape = tuple(data.shape)
        if shape[1:] == (depth, height, width):
            channels_first = True
        elif shape[1:] == (height, width, depth):
            channels_first = False
        else:
            raise InputError(f"{path}: images have shape {shape[1:]}, but the model takes "
                             f"{height}x{width}x{depth}; expected N x {depth} x {height} x "
                             f"{width} (NCHW) or N x {height} x {width} x {depth} (NHWC)")
        if data.dtype.kind not in "fiu":
            raise InputError(f"{path}: 'data' holds {data.dtype}, not numbers")
        rows = shape[0]
        if rows == 0:
            raise InputError(f"{path}: the set is empty (0 images)")
        if label.shape[0] != rows or label.size != rows:
            raise InputError(f"{path}: {label.size} labels for {rows} images; they must match")
        labels = as_int_labels(label[()], path)
    if labels.min() < 0 or (classes is not None and labels.max() >= classes):
        raise InputError(f"{path}: labels range {labels.min()}..{labels.max()}, but the "
                         f"model has classes 0..{classes - 1}; is this the model's data?")
    return LabSet(path=path, rows=rows, channels_first=channels_first)


def write_lab_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Write NHWC ``images`` and ``labels`` as a lab file (``data`` NCHW float32, ``label``)."""
    images = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as f:
        f.create_dataset("data", data=images, chunks=(min(256, len(images)),) + images.shape[1:])
        f.create_dataset("label", data=np.asarray(labels, dtype=np.float32))
    os.replace(partial, path)


def lab_paths(data_dir: str | os.PathLike) -> dict[str, str]:
    """The four set paths of a lab-layout folder (``cl/valid.h5``, ``bd/bd_valid.h5``, ...)."""
    return {name: str(Path(data_dir) / rel) for name, rel in LAB_LAYOUT.items()}
