"""Files in the output folder: each written whole to a temporary name, then renamed into place.

A reader (or a resumed run) never sees a half-written ``results.csv`` or model, and files that
do not depend on when they were written (the curve, B', G) are byte-identical between runs.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import zipfile
from pathlib import Path
from typing import Iterator

import pandas as pd

log = logging.getLogger(__name__)

CURVE_COLUMNS = ["channels_pruned", "fraction_pruned", "valid_accuracy", "valid_asr",
                 "test_accuracy", "test_asr"]
GOODNET_COLUMNS = ["threshold", "channels_pruned", "test_accuracy", "test_asr",
                   "detection_rate", "false_alarm_rate"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    An ``OSError`` without a file name (a full disk, met while writing) gets ``path``'s.
    """
    path = Path(path)
    temporary = _new_file(path)
    try:
        yield temporary
        with open(temporary, "rb") as handle:  # on shared storage, data before the rename
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def _new_file(path: Path) -> Path:
    """Create an empty, hidden file beside ``path``, with the mode the umask gives new files
    (outputs are for the group; ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return temporary
        except FileExistsError:
            continue


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    # repr-exact floats: the curve is a contract other tools read back.
    write_text(path, frame.to_csv(index=False, float_format=None))


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_model(model, path: str | os.PathLike) -> None:
    """Save a Keras model (``.h5`` legacy or ``.keras``) atomically and reproducibly."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with _quiet_legacy_warning():
            model.save(temporary)
        if path.suffix == ".keras":
            _strip_save_date(temporary)


def _strip_save_date(path: Path) -> None:
    """Keras stamps the save time into a .keras zip, and numbers objects that layers share by
    their memory address; drop the one and renumber the other, so equal models give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(buffer, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif item.filename == "config.json" and b"shared_object_id" in data:
                data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
            target.writestr(zipfile.ZipInfo(item.filename, date_time=(1980, 1, 1, 0, 0, 0)),
                            data, compress_type=item.compress_type)
    path.write_bytes(buffer.getvalue())


def _renumber_shared_objects(config, numbers: dict):
    """``config`` with each ``shared_object_id`` replaced by 1, 2, ... in order of first use."""
    if isinstance(config, list):
        return [_renumber_shared_objects(item, numbers) for item in config]
    if not isinstance(config, dict):
        return config
    renumbered = {key: _renumber_shared_objects(value, numbers) for key, value in config.items()}
    if "shared_object_id" in config:
        renumbered["shared_object_id"] = numbers.setdefault(config["shared_object_id"], len(numbers) + 1)
    return renumbered


@contextlib.contextmanager
def _quiet_legacy_warning():
    # The lab's format is .h5 on purpose (model_X=2.h5); Keras warns that it is legacy.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def plot_curve(curve: pd.DataFrame, selected: dict, path: str | os.PathLike) -> None:
    """results.png: accuracy and ASR (valid and test) against the fraction pruned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    x = 100 * curve["fraction_pruned"]
    for column, style, label in [("valid_accuracy", "C0-", "clean accuracy (valid)"),
                                 ("test_accuracy", "C0--", "clean accuracy (test)"),
                                 ("valid_asr", "C3-", "attack success rate (valid)"),
                                 ("test_asr", "C3--", "attack success rate (test)")]:
        ax.plot(x, curve[column], style, label=label)
    channels = int(curve["channels_pruned"].max())
    for threshold, k in selected.items():
        if k is not None:
            ax.axvline(100 * k / channels, color="grey", lw=0.8, ls=":")
            ax.annotate(f"X={threshold:g} (k={k})", (100 * k / channels, 50), rotation=90,
                        fontsize=8, color="grey", ha="right", va="center")
    ax.set_xlabel("channels pruned (%)")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_title("Fine-pruning sweep: clean accuracy and attack success rate")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png")
    plt.close(fig)
