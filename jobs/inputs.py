"""Resolve and check the sweep's inputs before any work starts.

Every problem becomes one :class:`InputError` line naming the bad value and the fix.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from dataclasses import dataclass, replace
from fractions import Fraction
from importlib import metadata
from pathlib import Path

from pruning.backend import keras
from pruning.data import (LAB_LAYOUT, InputError, LabSet, lab_paths, open_h5, open_lab_set,
                          poisoned_set)
from pruning.layers import channelwise_chain, choose_layer, conv_layer_names
from pruning.models import ModelSpec, image_input_shape, output_tensor
from pruning.prune import cut_head
from pruning.scaling import check_scale
from pruning.select import is_valid_threshold

log = logging.getLogger(__name__)


@dataclass
class SweepInputs:
    """Everything a sweep reads, checked: B (``spec``), the sets by name (``clean_valid``, and
    any of ``clean_test`` and the poisoned sets of :func:`pruning.data.poisoned_set`), the conv
    layer to prune (``conv``: ``--layer``, ``layer`` in manifest.json) and the layer its
    channels are read at (``read``: ``read_at``), B's channel and class counts, and the factor
    B's pixels are multiplied by (``rescale``)."""

    spec: ModelSpec
    sets: dict[str, LabSet]
    conv: str
    read: str
    channels: int
    classes: int
    demo: bool = False
    rescale: Fraction = Fraction(1)

    @property
    def paths(self) -> dict[str, str]:
        """Every input file by name: ``model`` and the sets."""
        return {"model": self.spec.path} | {name: s.path for name, s in self.sets.items()}

    @functools.cached_property
    def hashes(self) -> dict[str, str]:
        """sha256 of every input, read once and only when needed (not for ``--check``)."""
        return {name: sha256(path) for name, path in self.paths.items()}

    def fingerprint(self) -> dict:
        """What a checkpoint depends on: the exact files, the layer, and the software that
        computes the predictions (another TensorFlow may round a near-tie the other way)."""
        rescale = {} if self.rescale == 1 else {"rescale": str(self.rescale)}  # (1: as before it was a flag)
        return rescale | {"format": CHECKPOINT_FORMAT, "inputs": self.hashes, "layer": self.conv,
                "read_at": self.read, "weights_only": self.spec.weights_only, "arch": self.spec.arch,
                "classes": self.spec.classes if self.spec.weights_only else self.classes,
                "software": {"keras_backend": keras.backend.backend()}
                | {name: version for name, version in versions().items() if name in COMPUTING}}


CHECKPOINT_FORMAT = 1  # raise it when the checkpoint files change meaning
PACKAGES = ("tensorflow", "keras", "jax", "numpy", "h5py", "pandas", "dask", "distributed",
            "dask-jobqueue", "fine-pruning")
COMPUTING = ("python", "tensorflow", "keras", "jax", "numpy", "fine-pruning")  # they make the numbers


def versions() -> dict[str, str | None]:
    """Python's and the installed packages' versions (None: not installed)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror or error}); check the file") from None
    return digest.hexdigest()


def given_sets(args) -> dict[str, str]:
    """The set files given one by one, by the sweep's names, in its order: clean validation,
    poisoned validation (bare, then named), clean test, poisoned test."""
    given = {}
    for split in ("valid", "test"):
        if getattr(args, f"clean_{split}"):
            given[f"clean_{split}"] = getattr(args, f"clean_{split}")
        given |= {poisoned_set(split, name): path for name, path in getattr(args, f"poisoned_{split}").items()}
    return given


def set_paths(args) -> dict[str, str]:
    given = given_sets(args)
    if args.data:
        if given:
            raise InputError("give either --data DIR or the set files, not both")
        data_dir = Path(args.data)
        if not data_dir.is_dir():
            raise InputError(f"--data {data_dir}: not a directory; it must hold cl/valid.h5, "
                             "cl/test.h5, bd/bd_valid.h5 and bd/bd_test.h5")
        paths = lab_paths(data_dir)
        if not any(os.path.exists(path) for path in paths.values()):
            raise InputError(f"--data {data_dir}: {no_lab_layout(data_dir)}")
        return paths
    if "clean_valid" not in given:
        raise InputError("missing --clean-valid: B' is selected on the clean validation set; give "
                         "it (test and poisoned sets are optional) or --data DIR")
    return given


def no_lab_layout(data_dir: Path) -> str:
    """Why ``data_dir`` is not a lab data folder, and the folder inside it that is, if one is
    (download_lab.py's ``lab/`` holds it in ``lab/data``)."""
    layout = ", ".join(LAB_LAYOUT.values())
    try:
        inside = [folder for folder in sorted(data_dir.iterdir())
                  if folder.is_dir() and all(os.path.isfile(p) for p in lab_paths(folder).values())]
    except OSError:  # an unreadable folder: say only what is missing
        inside = []
    if inside:
        return f"none of {layout} is in it, but {inside[0]} holds them: --data {inside[0]}"
    return f"none of {layout} is in it; give the folder holding cl/ and bd/, or the sets one by one"


def check_thresholds(thresholds, relative: bool = False) -> None:
    bad = [t for t in thresholds if not is_valid_threshold(t)]
    if bad:
        unit = "percent of B's validation accuracy" if relative else "points"
        raise InputError(f"--thresholds {' '.join(f'{t:g}' for t in bad)}: each must be a "
                         f"number of {unit} from 0 to below 100, e.g. --thresholds 2 4 10")


def where_b_can_be_cut(model: keras.Model) -> str:
    """The last conv layer after which B can be cut (the fast sweep), for the warning about one
    that cannot: in a residual net that is not the default --layer, whose block has a skip
    connection around it, and it may be none."""
    for conv in reversed(conv_layer_names(model)):
        try:
            read = channelwise_chain(model, conv)[-1].name
        except InputError:  # softmax over its channels, shared, channels_first: not prunable anyway
            continue
        if cut_head(model, read) is not None:
            return f"the last conv layer B can be cut after is {conv} (--layer {conv})"
    return "B cannot be cut after any of its conv layers (skip connections around them all)"


def resolve_inputs(args) -> SweepInputs:
    """Check model, layer, data and thresholds; the demo is used when none of them are given.

    Cheap checks come first (flags, then that every set file opens as HDF5) so that a typo
    fails in a moment, before the model is loaded.
    """
    check_thresholds(args.thresholds, args.relative)
    demo = not (args.model or args.weights or args.data or given_sets(args))
    if args.demo and not demo:
        raise InputError(f"--demo {args.demo} is the embedded demo's BadNet and data; give "
                         "either --demo or a model and data")
    if demo:
        from pruning.demo import ensure_demo
        built = ensure_demo(attack=args.demo or "standard")
        log.info("no model or data given: using the embedded demo in %s", built.data_dir)
        spec, paths = ModelSpec(built.model), lab_paths(built.data_dir)
    else:
        if not (args.model or args.weights):
            raise InputError("give the backdoored model: --model PATH or --weights PATH --arch deepid")
        if args.classes < 2:
            raise InputError(f"--classes must be at least 2, got {args.classes}")
        spec = ModelSpec(args.model or args.weights, weights_only=bool(args.weights),
                         arch=args.arch, classes=args.classes)
        paths = set_paths(args)
        for path in paths.values():  # missing, a folder, not HDF5, truncated: before the model
            open_h5(path).close()
    # Workers of a cluster joined with --scheduler-* may run in another folder: absolute paths
    # (the model's before it is loaded once, and cached, under that name and stamp).
    spec = spec.stamped()
    model = spec.load()
    input_shape = image_input_shape(model)
    conv, read = choose_layer(model, args.layer)
    classes = int(output_tensor(model).shape[-1])
    sets = {name: open_lab_set(path, input_shape, classes, args.rescale) for name, path in paths.items()}
    check_scale(model, sets["clean_valid"])  # before any work: B's pixels, raw or /255
    channels = int(model.get_layer(conv).filters)
    log.info("B: %s (%d classes); pruning %s (%d channels), read at %s", spec.path, classes,
             conv, channels, read)
    if cut_head(model, read) is None:
        log.warning("layers after %s also read from before it, so B cannot be cut there: every "
                    "prefix runs the whole pruned model, as slowly as the seeds' loop; %s", read,
                    where_b_can_be_cut(model))
    if not args.relative and all(0 < t < 1 for t in args.thresholds):
        log.warning("--thresholds are points of validation accuracy (2 means 2 points below B's), "
                    "not fractions: %s selects drops of under one point",
                    " ".join(f"{t:g}" for t in args.thresholds))
    sets = {name: replace(s, path=os.path.abspath(s.path)) for name, s in sets.items()}
    for names in sets_sharing(sets, lambda name: os.path.realpath(sets[name].path)):
        log.warning("the %s sets are the same file (%s)", " and ".join(names), sets[names[0]].path)
    return SweepInputs(spec, sets, conv, read, channels, classes, demo, args.rescale)


def warn_copied_sets(inputs: SweepInputs) -> None:
    """Warn about sets that are copies of one file under different paths, once their hashes
    are known (one path given twice was said as the inputs were checked)."""
    for names in sets_sharing(inputs.sets, inputs.hashes.get):
        paths = [inputs.sets[name].path for name in names]
        if len({os.path.realpath(path) for path in paths}) > 1:
            log.warning("the %s sets are copies of one file (%s)", " and ".join(names), ", ".join(paths))


def sets_sharing(sets: dict[str, LabSet], key) -> list[list[str]]:
    """The names of each group of two or more sets with the same ``key(name)``."""
    groups = {}
    for name in sets:
        groups.setdefault(key(name), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
