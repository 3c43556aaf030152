"""What a sweep reads, checked: B and the sets, however they were given (files, a keras.Model,
arrays), with the conv layer to prune and where its channels are read. The command line
resolves its flags to these (:mod:`jobs.inputs`), :func:`pruning.defend` its arguments.
"""
from __future__ import annotations

import hashlib
import logging
import platform
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata

from pruning.data import InputError, open_array_set, open_lab_set
from pruning.select import is_valid_threshold

log = logging.getLogger(__name__)

PACKAGES = ("tensorflow", "keras", "jax", "numpy", "h5py", "pandas", "dask", "distributed",
            "dask-jobqueue", "fine-pruning")


@dataclass
class SweepInputs:
    """Everything a sweep reads, checked: B (``spec``), the sets by name (``clean_valid``, and
    any of ``clean_test`` and the poisoned sets of :func:`pruning.data.poisoned_set`), the conv
    layer to prune (``conv``: ``--layer``, ``layer`` in manifest.json) and the layer its
    channels are read at (``read``: ``read_at``), B's channel and class counts, the factor
    B's pixels are multiplied by (``rescale``), and the demo's attack if B is the demo's."""

    spec: object  # pruning.models.ModelSpec, or InMemoryModel
    sets: dict
    conv: str
    read: str
    channels: int
    classes: int
    demo: str | bool = False
    rescale: Fraction = Fraction(1)

    @property
    def paths(self) -> dict[str, str]:
        """Every input by name: ``model`` and the sets."""
        return {"model": self.spec.path} | {name: s.path for name, s in self.sets.items()}

    @property
    def hashes(self) -> dict[str, str]:
        """sha256 of every input (a file's bytes, an array's), computed once."""
        if "_hashes" not in self.__dict__:
            self._hashes = {name: source.sha256() if hasattr(source, "sha256") else sha256(source.path)
                            for name, source in {"model": self.spec, **self.sets}.items()}
        return self._hashes


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror or error}); check the file") from None
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Python's and the installed packages' versions (None: not installed)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


@dataclass(frozen=True, eq=False)
class InMemoryModel:
    """B given as a keras.Model: what a task loads (a Dask client pickles it, Keras' way)."""

    model: object
    path: str = "(a keras.Model in memory)"
    weights_only: bool = False
    arch: str | None = None

    def load(self):
        return self.model

    def stamped(self) -> InMemoryModel:
        return self

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for weight in self.model.get_weights():
            digest.update(weight.tobytes())
        return digest.hexdigest()


def check_thresholds(thresholds, relative: bool = False) -> None:
    bad = [t for t in thresholds if not is_valid_threshold(t)]
    if bad:
        unit = "percent of B's validation accuracy" if relative else "points"
        raise InputError(f"--thresholds {' '.join(f'{t:g}' for t in bad)}: each must be a "
                         f"number of {unit} from 0 to below 100, e.g. --thresholds 2 4 10")


def inspect_inputs(spec, sources: dict, layer: str | None = None, rescale: Fraction = Fraction(1),
                   demo: str | bool = False) -> SweepInputs:
    """Load B, choose the layer, open each set (a lab HDF5 path or an ``(images, labels)``
    pair) against B's input and check its pixels' scale: every problem one :class:`InputError`."""
    from pruning.layers import choose_layer
    from pruning.models import image_input_shape, output_tensor
    from pruning.prune import cut_head, where_b_can_be_cut
    from pruning.scaling import check_scale

    model = spec.load()
    input_shape = image_input_shape(model)
    conv, read = choose_layer(model, layer)
    classes = int(output_tensor(model).shape[-1])
    sets = {name: open_array_set(source, name, input_shape, classes, rescale)
            if isinstance(source, (tuple, list)) else open_lab_set(source, input_shape, classes, rescale)
            for name, source in sources.items()}
    check_scale(model, sets["clean_valid"])  # before any work: B's pixels, raw or /255
    channels = int(model.get_layer(conv).filters)
    log.info("B: %s (%d classes); pruning %s (%d channels), read at %s", spec.path, classes,
             conv, channels, read)
    if cut_head(model, read) is None:
        log.warning("layers after %s also read from before it, so B cannot be cut there: every "
                    "prefix runs the whole pruned model, as slowly as the seeds' loop; %s", read,
                    where_b_can_be_cut(model))
    return SweepInputs(spec, sets, conv, read, channels, classes, demo, rescale)
