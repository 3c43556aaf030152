"""After the sweep: the output folder's files, by name, and writing them all or none.

A run writes the reports (:data:`REPORT_NAMES`) and, per threshold X reached, B' and G
(:meth:`pruning.defense.Defense.write`). A rerun with other thresholds removes the models the
earlier run wrote for those it does not reach, so the folder holds the models goodnet.csv and
manifest.json describe.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

from pruning.report import (FINE_TUNE_REPORTS, FINETUNED_NAME, GOODNET_FINETUNED_NAME,
                            GOODNET_NAME, MODEL_NAME, REPORT_NAMES)

log = logging.getLogger(__name__)


def write_outputs(out: Path, defense) -> list[str]:
    """Write every output file of ``defense`` (:class:`pruning.defense.Defense`) into ``out``
    and return their names: all of them, or none if the run fails or is stopped on the way
    (the earlier run's outputs then stay as they were)."""
    from jobs.stopping import interrupt_held
    from pruning.files import staged

    earlier = models_listed(out, defense.tuned is not None)  # before this run's manifest replaces the earlier run's
    with staged() as replace_all:
        written = defense.write(out)
        # The renames take a moment; a stop in it would leave some new files among the
        # earlier run's. It is held, and dropped: the run is done.
        with interrupt_held():
            replace_all()
            remove_stale_models(out, written, earlier)
    return written


def output_names(thresholds, fine_tune: bool = False) -> tuple[str, ...]:
    """The files a run writes into the output folder for these thresholds."""
    from pruning.select import is_valid_threshold, threshold_label
    labels = [threshold_label(t) for t in thresholds if is_valid_threshold(t)]
    tuned = [f"X={label}" for label in labels] + ["B"] if fine_tune else []
    return (*REPORT_NAMES, *(MODEL_NAME.format(label) for label in labels),
            *(GOODNET_NAME.format(label) for label in labels),
            *(FINE_TUNE_REPORTS if fine_tune else ()),
            *(name.format(run) for run in tuned for name in (FINETUNED_NAME, GOODNET_FINETUNED_NAME)))


def is_output(name: str) -> bool:
    """Whether a run writes a file of this name into the output folder (for any thresholds)."""
    return name in REPORT_NAMES + FINE_TUNE_REPORTS or any(
        fnmatch.fnmatch(name, pattern.format("*"))
        for pattern in (MODEL_NAME, GOODNET_NAME, FINETUNED_NAME, GOODNET_FINETUNED_NAME))


def models_listed(folder: Path, fine_tune: bool = False) -> set[str]:
    """The B' and G files that ``folder``'s manifest.json says its run wrote (none without a
    readable manifest); with ``fine_tune``, also its fine-tuned models and their G (a run
    without --fine-tune leaves those as they are)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        labels = [label for label, k in manifest["selected"].items() if k is not None]
        tuned = list(manifest.get("fine_tune", {}).get("runs", {})) if fine_tune else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {name.format(label) for label in labels for name in (MODEL_NAME, GOODNET_NAME)} | {
        name.format(run) for run in tuned for name in (FINETUNED_NAME, GOODNET_FINETUNED_NAME)}


def remove_stale_models(folder: Path, written, earlier: set[str]) -> list[str]:
    """Remove the B' and G files that the earlier run in ``folder`` wrote (``earlier``, from
    its manifest) and this run did not: they were for other thresholds, or for one this run
    did not reach. The folder then holds the models goodnet.csv and manifest.json describe;
    files of those names that no run of ours wrote are never touched. Returns the names removed."""
    stale = sorted(name for name in earlier - set(written) if (folder / name).is_file())
    for name in stale:
        (folder / name).unlink(missing_ok=True)
    if stale:
        log.info("removed %s: an earlier run's models, for thresholds this run did not select",
                 ", ".join(stale))
    return stale
