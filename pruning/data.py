"""Lab-format HDF5 sets: ``data`` (N x C x H x W or N x H x W x C pixels at the model's input
size, the lab's N x 3 x 55 x 47) and ``label`` (N).

Sets are read in row chunks so that memory does not grow with the file. A poisoned set's labels
are the attacker's target, so "accuracy" on it is the attack success rate (ASR).

Every problem with a file, from a wrong path to a damaged byte, is one :class:`InputError`
line naming the file and the fix: whatever h5py raises while a set is opened or read
(``OSError``, ``KeyError``, ``RuntimeError``, ... for a damaged file) is turned into one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pruning.files import atomic_path

# The four sets of a sweep, in the lab's folder layout (``--data DIR``).
SET_NAMES = ("clean_valid", "poisoned_valid", "clean_test", "poisoned_test")
LAB_LAYOUT = {
    "clean_valid": "cl/valid.h5",
    "poisoned_valid": "bd/bd_valid.h5",
    "clean_test": "cl/test.h5",
    "poisoned_test": "bd/bd_test.h5",
}
LAB_CLASSES = 1283       # the lab's classes (its B's outputs): a weights-only B's default
SET_NAME = re.compile(r"[A-Za-z0-9_]+")  # a named poisoned set's NAME: it ends column names
CHUNK_ROWS = 4096        # images per task of the sweep
PREFIXES_PER_TASK = 64  # prefixes per task: the lab's 61 in one task per chunk; 2,048 channels in 33
# Pixels read when a set is opened, to find NaN/inf pixels and unreadable rows before any work:
# all of a small set, spread-out blocks of a big one (a few percent of the lab's sets, well under
# a second). The rest is checked chunk by chunk as the sweep reads it.
SCAN_BYTES = 32 << 20
SCAN_BLOCKS = 16
_LABEL_LIMIT = 2 ** 62  # float labels beyond this cannot be class numbers (and overflow int64)

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A user-facing problem with an input; the message names it and the fix (one line)."""


INVOKED_AS: str | None = None  # set by the fine-pruning command (jobs/__main__.py): "fine-pruning sweep"


def program(module_command: str) -> str:
    """How the user ran a program, for its help and errors: ``fine-pruning sweep`` when the
    ``fine-pruning`` command runs it, else ``module_command`` (``python -m jobs.sweep``)."""
    return INVOKED_AS or module_command


@contextlib.contextmanager
def damaged(path: str, what: str) -> Iterator[None]:
    """Turn whatever h5py raises on a damaged file into one :class:`InputError` line."""
    try:
        yield
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: {what} does not fit in memory; is the file damaged "
                         "(its sizes are implausible)?") from None
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError, ValueError, ...
        raise InputError(f"{path}: {what} cannot be read ({error.__class__.__name__}: "
                         f"{first_line(error)}); the file is damaged, copy it again") from None


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's message cut to one line of at most ``limit`` characters, for an error line."""
    lines = str(error).strip().splitlines()
    return " ".join(lines[0].split())[:limit] if lines else error.__class__.__name__


@dataclass(frozen=True)
class LabSet:
    """One HDF5 set, checked against the model's input: path, row count, pixel layout, and
    the factor its pixels are multiplied by as they are read (``--rescale``)."""

    path: str
    rows: int
    channels_first: bool  # True for the lab's N x 3 x H x W files
    scale: Fraction = Fraction(1)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` covering the set."""
        return [(start, min(start + chunk_rows, self.rows))
                for start in range(0, self.rows, chunk_rows)]

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` as (NHWC float32 images times ``scale``, int64 labels)."""
        stop = self.rows if stop is None else stop
        with open_h5(self.path) as f, damaged(self.path, f"rows {start}-{stop}"):
            images = read_pixels(f["data"], start, stop, self.path)
            labels = np.asarray(f["label"][start:stop])
        labels = as_int_labels(labels, self.path)
        if len(images) != stop - start or len(labels) != len(images):
            raise InputError(f"{self.path}: rows {start}-{stop} hold {len(images)} images and "
                             f"{len(labels)} labels; the file changed since it was checked, "
                             "copy it again")
        if self.channels_first:
            images = images.transpose(0, 2, 3, 1)
        if self.scale != 1:
            from pruning.scaling import scale_pixels
            images = scale_pixels(images, self.scale)
        return np.ascontiguousarray(images), labels

    def part(self, start: int, stop: int) -> LabSet:
        """What a task reading rows ``[start, stop)`` is sent: the file's name, the same set."""
        return self

    def iter_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, stop in self.chunks(chunk_rows):
            yield self.read(start, stop)


def read_pixels(data: h5py.Dataset, start: int, stop: int, path: str) -> np.ndarray:
    """Rows ``[start, stop)`` of ``data`` as float32, refusing NaN and infinite pixels."""
    with np.errstate(all="ignore"):  # values beyond float32 become inf: reported just below
        images = np.asarray(data[start:stop], dtype=np.float32)
    if not np.isfinite(images).all():
        bad = start + int(np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1))[0])
        raise InputError(f"{path}: NaN or infinite pixels in row {bad} (counting from 0); "
                         "pixels must be finite numbers")
    return images


def check_file(path: str | os.PathLike, what: str = "", kind: str = "the .h5 file") -> Path:
    """``path`` as a Path if it is a regular file; else one :class:`InputError` saying what it is."""
    path = Path(path)
    name = f"{what} {path}".strip()
    if not path.exists():
        raise InputError(f"{name}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{name} is a directory; give {kind} inside it")
    if not path.is_file():
        raise InputError(f"{name} is not a regular file; give {kind}")
    return path


def open_h5(path: str | os.PathLike, what: str = "") -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into one clear :class:`InputError`
    (``what`` names the file's role, e.g. ``--model``)."""
    path = check_file(path, what)
    name = f"{what} {path}".strip()
    if not h5py.is_hdf5(path):
        raise InputError(f"{name} is not an HDF5 file; is it truncated or another format?")
    try:
        return h5py.File(path, "r")
    except Exception as error:  # OSError, mostly; any failure here means the same
        text = first_line(error)
        if "truncated file" in text:
            raise InputError(f"{name} is truncated ({text}): it was not completely copied or "
                             "written; copy it again") from None
        raise InputError(f"{name} is not a readable HDF5 file ({error.__class__.__name__}: "
                         f"{text[:120]}); is it damaged? copy it again") from None


def as_int_labels(labels: np.ndarray, path: str) -> np.ndarray:
    """Labels as int64; the lab stores them as floats, so whole-number floats are accepted."""
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind in "iu":
        if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise InputError(f"{path}: 'label' holds values up to {labels.max()}; they must be "
                             "class numbers")
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        raise InputError(f"{path}: 'label' must hold whole class numbers, found "
                         f"{labels.dtype} values like {_sample(labels)}")
    with np.errstate(all="ignore"):
        whole = np.isfinite(labels) & (labels == np.round(labels)) & (np.abs(labels) < _LABEL_LIMIT)
    if not whole.all():
        raise InputError(f"{path}: 'label' must hold whole class numbers, found "
                         f"{labels.dtype} values like {_sample(labels[~whole])}")
    return labels.astype(np.int64)


def _sample(values: np.ndarray) -> str:
    return str([v.decode(errors="replace") if isinstance(v, bytes) else v
                for v in values[:3].tolist()])[:80]


def describe_layout(shape: tuple, input_shape: tuple[int, int, int]) -> str:
    """Why images of ``shape`` (without N) do not fit the model's ``(H, W, C)``, and the fix."""
    height, width, depth = input_shape
    wanted = (f"expected N x {depth} x {height} x {width} (NCHW, the lab's) or "
              f"N x {height} x {width} x {depth} (NHWC)")
    if shape in ((depth, width, height), (width, height, depth)) and height != width:
        return (f"images are {'x'.join(map(str, shape))}: height and width look swapped "
                f"(the model takes {height} high, {width} wide); {wanted}")
    if len(shape) == 3 and sorted(shape) == sorted(input_shape):
        return (f"images are {'x'.join(map(str, shape))}: the model's {height}x{width}x{depth} "
                f"in an order that is neither NCHW nor NHWC; {wanted}")
    if shape == (height, width) and depth == 1:
        return f"images are {height}x{width} with no channel axis; {wanted}"
    if shape == (height * width * depth,):
        return f"images are flattened to {shape[0]} values each; {wanted}"
    return f"images have shape {shape}, but the model takes {height}x{width}x{depth}; {wanted}"


def scan_ranges(rows: int, row_bytes: int, budget: int | None = None,
                blocks: int = SCAN_BLOCKS) -> list[tuple[int, int]]:
    """Row ranges checked when a set is opened: every row of a set up to ``budget`` bytes
    (default :data:`SCAN_BYTES`), else ``blocks`` spread-out blocks (the first and last rows
    included) of ``budget`` bytes in all."""
    budget = SCAN_BYTES if budget is None else budget
    row_bytes = max(1, row_bytes)
    limit = budget // row_bytes
    if rows <= limit:
        step = max(1, (8 << 20) // row_bytes)  # a few MB at a time
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]
    if limit < 1:
        return []
    size = max(1, limit // blocks)
    starts = sorted({int(s) for s in np.linspace(0, rows - size, blocks)})
    return [(start, start + size) for start in starts]


def check_stored(dataset: h5py.Dataset, name: str, path: str) -> None:
    """Refuse a dataset whose declared size is not stored in the file (half written)."""
    plist = dataset.id.get_create_plist()
    if dataset.is_virtual or plist.get_external_count():
        return  # its pixels live in other files: those are read (and checked) as it is read
    logical = math.prod(dataset.shape) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    filtered = plist.get_nfilters() > 0
    if logical and (stored == 0 or (not filtered and stored < logical)):
        raise InputError(f"{path}: only {stored} of the {logical} bytes of {name!r} are stored; "
                         "the file was not completely written, write or copy it again")
    if dataset.chunks:  # a compressed one's size says nothing; a chunk never written reads as zeros
        needed = math.prod(math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks))
        written = dataset.id.get_num_chunks()
        if written < needed:
            raise InputError(f"{path}: only {written} of the {needed} chunks of {name!r} are "
                             "stored; the file was not completely written, write or copy it again")


def open_lab_set(path: str | os.PathLike, input_shape: tuple[int, int, int],
                 classes: int | None = None, scale: Fraction = Fraction(1)) -> LabSet:
    """Check a set's structure against the model input ``(H, W, C)`` and return a :class:`LabSet`.

    Checks the datasets, shapes, pixel layout (NCHW or NHWC), row counts, the labels (whole
    numbers in the model's range) and the pixels of all of a small set, or spread-out blocks of
    a big one (:func:`scan_ranges`), for NaN/inf; the rest of the pixels are checked chunk by
    chunk as they are read. Pixels are multiplied by ``scale`` as they are read.
    """
    path = str(path)
    height, width, depth = input_shape
    with open_h5(path) as f, damaged(path, "the file's structure"):
        names = sorted(str(name) for name in f.keys())
        missing = [name for name in ("data", "label") if name not in names]
        if missing:
            raise InputError(f"{path}: no {' or '.join(repr(m) for m in missing)} dataset "
                             f"(found {names[:10]}); lab files hold 'data' and 'label'")
        data, label = f["data"], f["label"]
        if not isinstance(data, h5py.Dataset) or not isinstance(label, h5py.Dataset):
            raise InputError(f"{path}: 'data' and 'label' must be datasets, not groups")
        if data.shape is None or len(data.shape) == 0:
            raise InputError(f"{path}: 'data' is a single value, not N images")
        channels_first, rows = check_images(tuple(int(n) for n in data.shape), data.dtype, input_shape, path)
        if label.shape is None or len(label.shape) == 0:
            raise InputError(f"{path}: 'label' is a single value, not one label per image")
        check_label_shape(tuple(int(n) for n in label.shape), rows, path)
        check_stored(label, "label", path)
        check_stored(data, "data", path)
        check_labels(as_int_labels(label[()], path), rows, classes, path)
        scan_pixels(data, path, warn=scale == 1)
    return LabSet(path=path, rows=rows, channels_first=channels_first, scale=scale)


def check_images(shape: tuple, dtype: np.dtype, input_shape: tuple[int, int, int], path: str) -> tuple[bool, int]:
    """Whether images of ``shape`` (N first) are NCHW (else NHWC) for the model's ``(H, W, C)``,
    and N; an :class:`InputError` for any other layout, non-numbers or no image."""
    height, width, depth = input_shape
    layouts = [shape[1:] == (depth, height, width), shape[1:] == (height, width, depth)]
    if all(layouts):
        raise InputError(f"{path}: images are {'x'.join(map(str, shape[1:]))} and the model "
                         f"takes {height}x{width}x{depth}: with height, width and channels "
                         "all equal, NCHW and NHWC cannot be told apart; the sweep needs a "
                         "model whose input height, width and channels are not all equal")
    if not any(layouts):
        raise InputError(f"{path}: {describe_layout(shape[1:], input_shape)}")
    if dtype.kind not in "fiu":
        raise InputError(f"{path}: 'data' holds {dtype}, not numbers")
    if shape[0] == 0:
        raise InputError(f"{path}: the set is empty (0 images); give a set with images")
    return layouts[0], shape[0]


def check_label_shape(label_shape: tuple, rows: int, path: str) -> None:
    if len(label_shape) == 2 and label_shape[0] == rows and label_shape[1] > 1:
        raise InputError(f"{path}: 'label' is {rows} x {label_shape[1]} (one-hot?); store "
                         "one class number per image")
    if not label_shape or label_shape[0] != rows or math.prod(label_shape) != rows:
        raise InputError(f"{path}: {math.prod(label_shape)} labels for {rows} images; "
                         "they must match")


def check_labels(labels: np.ndarray, rows: int, classes: int | None, path: str) -> None:
    if len(labels) != rows:
        raise InputError(f"{path}: {len(labels)} labels for {rows} images; they must match")
    if labels.min() < 0 or (classes is not None and labels.max() >= classes):
        top = "from 0" if classes is None else f"0..{classes - 1}"
        raise InputError(f"{path}: labels range {labels.min()}..{labels.max()}, but the "
                         f"model has classes {top}; is this the model's data?")


@dataclass(frozen=True, eq=False)
class ArraySet:
    """A set given as arrays (:func:`pruning.defend`), read as a :class:`LabSet` reads its file:
    float32 pixels (NCHW turned to NHWC) times ``scale``, int64 labels. ``path`` names it in
    messages; ``offset``: the row of the whole set its first row is (a part, for one task)."""

    images: np.ndarray
    labels: np.ndarray
    channels_first: bool
    scale: Fraction = Fraction(1)
    path: str = "(arrays)"
    offset: int = 0

    @property
    def rows(self) -> int:
        return self.offset + len(self.images)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> list[tuple[int, int]]:
        return LabSet.chunks(self, chunk_rows)

    def part(self, start: int, stop: int) -> ArraySet:
        """Rows ``[start, stop)`` alone, so that a task is sent its own rows only."""
        return replace(self, images=self.images[start - self.offset:stop - self.offset],
                       labels=self.labels[start - self.offset:stop - self.offset], offset=start)

    def read(self, start: int | None = None, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        start = self.offset if start is None else start
        stop = self.rows if stop is None else stop
        with np.errstate(all="ignore"):
            images = np.asarray(self.images[start - self.offset:stop - self.offset], dtype=np.float32)
        if not np.isfinite(images).all():
            bad = start + int(np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1))[0])
            raise InputError(f"{self.path}: NaN or infinite pixels in row {bad} (counting from 0); "
                             "pixels must be finite numbers")
        if self.channels_first:
            images = images.transpose(0, 2, 3, 1)
        if self.scale != 1:
            from pruning.scaling import scale_pixels
            images = scale_pixels(images, self.scale)
        return np.ascontiguousarray(images), self.labels[start - self.offset:stop - self.offset]

    def sha256(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()


def open_array_set(source, name: str, input_shape: tuple[int, int, int], classes: int | None = None,
                   scale: Fraction = Fraction(1)) -> ArraySet:
    """Check ``(images, labels)`` as :func:`open_lab_set` checks a file; return an :class:`ArraySet`."""
    where = f"{name} (arrays)"
    if len(source) != 2:
        raise InputError(f"{where}: give (images, labels), two arrays")
    images, labels = (np.asarray(part) for part in source)
    channels_first, rows = check_images(images.shape, images.dtype, input_shape, where)
    check_label_shape(labels.shape, rows, where)
    labels = as_int_labels(labels, where)
    check_labels(labels, rows, classes, where)
    with np.errstate(all="ignore"):
        low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)):
        ArraySet(images, labels, channels_first, path=where).read()  # says which row
    if scale == 1 and (high <= 1 or low < 0 or high > 255):
        log.warning("%s: pixels range %g..%g; the lab's models take raw 0-255 pixels (not "
                    "scaled to 0-1 or centred): if B does, this set was transformed", where, low, high)
    return ArraySet(images, labels, channels_first, scale, where)


def scan_pixels(data: h5py.Dataset, path: str, warn: bool = True) -> None:
    """Read all of a small set's pixels, or spread-out blocks of a big one: NaN or infinite
    ones are an :class:`InputError`; a range unlike raw 0-255 pixels is a warning (unless not
    ``warn``: with --rescale, the scale check runs B on them instead)."""
    rows = int(data.shape[0])
    low, high = math.inf, -math.inf
    for start, stop in scan_ranges(rows, math.prod(data.shape[1:]) * data.dtype.itemsize):
        with damaged(path, f"rows {start}-{stop}"):
            images = read_pixels(data, start, stop, path)
        low, high = min(low, float(images.min())), max(high, float(images.max()))
    if warn and low <= high and (high <= 1 or low < 0 or high > 255):  # (nothing scanned: low > high)
        # Not an error: a model of your own may take other pixels. The lab's take raw 0-255.
        log.warning("%s: pixels range %g..%g; the lab's models take raw 0-255 pixels (not "
                    "scaled to 0-1 or centred): if B does, this set was transformed", path, low, high)


def write_lab_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Write NHWC ``images`` and ``labels`` as a lab file (``data`` NCHW float32, ``label``)."""
    images = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as f:
        f.create_dataset("data", data=images, chunks=(min(256, len(images)),) + images.shape[1:])
        f.create_dataset("label", data=np.asarray(labels, dtype=np.float32))


def named_sets(values, flag: str) -> dict[str, str]:
    """``NAME -> PATH`` from ``NAME=PATH`` values (a bare PATH, or one that exists with a ``=``
    in it, is named ""): the poisoned sets of ``--poisoned-valid`` / ``--poisoned-test``."""
    sets: dict[str, str] = {}
    for value in values or ():
        name, named, path = value.partition("=")
        if not named or os.path.exists(value):
            name, path = "", value
        elif not (name and path):
            raise InputError(f"{flag} {value}: give NAME=PATH, such as {flag} sunglasses=bd_valid.h5, "
                             "or a bare PATH")
        elif not SET_NAME.fullmatch(name):
            raise InputError(f"{flag} {value}: the name {name!r} ends column names (valid_asr_NAME): "
                             "use letters, digits and _ only")
        if name in sets:
            raise InputError(f"{flag} {'named ' + name if name else 'without a name'} is given twice "
                             f"({sets[name]}, {path}); give each poisoned set once, named apart")
        sets[name] = path
    return sets


def poisoned_set(split: str, name: str = "") -> str:
    """The sweep's name of a poisoned set: ``poisoned_valid`` (bare), ``poisoned_valid_NAME``."""
    return f"poisoned_{split}" + (f"_{name}" if name else "")


def poisoned_suffixes(sets, split: str) -> list[str]:
    """The column suffixes ("" and ``_NAME``) of the poisoned ``split`` sets among ``sets``."""
    base = poisoned_set(split)
    return [name[len(base):] for name in sets if name == base or name.startswith(base + "_")]


def lab_paths(data_dir: str | os.PathLike) -> dict[str, str]:
    """The four set paths of a lab-layout folder (``cl/valid.h5``, ``bd/bd_valid.h5``, ...)."""
    return {name: str(Path(data_dir) / rel) for name, rel in LAB_LAYOUT.items()}
