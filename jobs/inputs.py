"""Resolve and check the sweep's inputs before any work starts.

Every problem becomes one :class:`InputError` line naming the bad value and the fix.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pruning.data import LAB_LAYOUT, InputError, LabSet, lab_paths, open_h5, poisoned_set
from pruning.inputs import SweepInputs, check_thresholds, inspect_inputs, versions
from pruning.models import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # raise it when the checkpoint files change meaning
COMPUTING = ("python", "tensorflow", "keras", "jax", "numpy", "fine-pruning")  # they make the numbers


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


def resolve_inputs(args, before_the_model: Callable[[], None] = lambda: None) -> SweepInputs:
    """Check model, layer, data and thresholds; the demo is used when none of them are given.

    Cheap checks come first (flags, then that every set file opens as HDF5) so that a typo
    fails in a moment, before TensorFlow is imported to load the model. ``before_the_model``
    is called once they pass (the sweep starts its workers' fork server there, to import
    TensorFlow while this process loads the model).
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
    before_the_model()
    # Workers of a cluster joined with --scheduler-* may run in another folder: absolute paths
    # (the model's before it is loaded once, and cached, under that name and stamp).
    inputs = inspect_inputs(spec.stamped(), paths, args.layer, args.rescale,
                            demo=(args.demo or "standard") if demo else False)
    if not args.relative and all(0 < t < 1 for t in args.thresholds):
        log.warning("--thresholds are points of validation accuracy (2 means 2 points below B's), "
                    "not fractions: %s selects drops of under one point",
                    " ".join(f"{t:g}" for t in args.thresholds))
    sets = inputs.sets = {name: replace(s, path=os.path.abspath(s.path)) for name, s in inputs.sets.items()}
    for names in sets_sharing(sets, lambda name: os.path.realpath(sets[name].path)):
        log.warning("the %s sets are the same file (%s)", " and ".join(names), sets[names[0]].path)
    return inputs


def fingerprint(inputs: SweepInputs) -> dict:
    """What a checkpoint depends on: the exact files, the layer, and the software that
    computes the predictions (another TensorFlow may round a near-tie the other way)."""
    from pruning.backend import keras
    rescale = {} if inputs.rescale == 1 else {"rescale": str(inputs.rescale)}  # (1: as before it was a flag)
    spec = inputs.spec
    return rescale | {"format": CHECKPOINT_FORMAT, "inputs": inputs.hashes, "layer": inputs.conv,
                      "read_at": inputs.read, "weights_only": spec.weights_only, "arch": spec.arch,
                      "classes": spec.classes if spec.weights_only else inputs.classes,
                      "software": {"keras_backend": keras.backend.backend()}
                      | {name: version for name, version in versions().items() if name in COMPUTING}}


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
