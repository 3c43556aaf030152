"""A run's checkpoints: the channel order and, per finished chunk of rows, every prefix's tallies.

They are kept as ``OUT/checkpoints/chunk-<set>-<i>.json``, tagged with the inputs' fingerprint
(``fingerprint.json``): a rerun with the same inputs reuses them, a rerun with other inputs
replaces them once it has a result of its own.
"""
from __future__ import annotations

import fnmatch
import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from pruning.counts import Counts
from pruning.data import first_line
from pruning.files import temporary_for
from pruning.report import write_csv, write_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"      # the folder, in --out
CHUNK_FILES = "chunk-*.json"     # one per finished chunk of rows, in CHECKPOINTS
CHANNEL_ORDER = "channel_order.csv"
FINE_TUNE_FOLDERS = "finetune-*"  # one per fine-tuning (pruning.sweep.run_fine_tuning), its training state


def chunk_file(set_name: str, index: int) -> str:
    return f"chunk-{set_name}-{index:05d}.json"


def foreign_files(folder: Path) -> list[str]:
    """The entries of a checkpoints ``folder`` that no run writes: a folder of that common name
    from another tool (its training checkpoints, say), which a run would delete in replacing
    it. Ours: the fingerprint, the channel order, chunk files and a killed write's temporary."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if not (entry.is_file() and _written_by_a_run(entry.name)
                          or entry.is_dir() and not entry.is_symlink()
                          and fnmatch.fnmatch(entry.name, FINE_TUNE_FOLDERS)))


def _written_by_a_run(name: str) -> bool:
    """A checkpoint file's name, or the temporary of one (a write that never finished)."""
    name = temporary_for(name) or name
    return name in ("fingerprint.json", CHANNEL_ORDER) or fnmatch.fnmatch(name, CHUNK_FILES)


def leftover_temporaries(folder: Path) -> list[Path]:
    """The temporaries in a checkpoints ``folder`` of writes that never finished: the run
    writing them was killed (kill -9, a lost node), as no live run can be while one holds
    the lock."""
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir()
                  if entry.is_file() and temporary_for(entry.name) and _written_by_a_run(entry.name))


def may_hold_every_chunk(folder: Path, chunks) -> bool:
    """Whether ``folder`` has a channel order and a file for each of ``chunks`` (``(set,
    index)`` pairs): a look at the names only, before the inputs are hashed. Whether they are
    these inputs' and can be read is for :class:`Checkpoints` to say."""
    return (folder / CHANNEL_ORDER).is_file() and all(
        (folder / chunk_file(*chunk)).is_file() for chunk in chunks)


class Checkpoints:
    """The channel order and, per chunk of rows, the tallies of every prefix, of a run.

    Checkpoints of other inputs (another fingerprint) are left alone until this run saves
    its first result, so a run that fails early takes nothing from the folder. A checkpoint
    file that cannot be read is skipped (its chunk is evaluated again), not an error.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        self.fingerprint = fingerprint
        self.ignored: set[Path] = set()  # damaged files, already warned about
        earlier = _read_json(folder / "fingerprint.json") if folder.is_dir() else None
        self.ours = earlier == fingerprint
        if not self.ours and self._holds_results():
            # hours of finished chunks are at stake: say what differs, so that a flag given
            # otherwise by mistake (--chunk-rows, --layer) can be put back before they go
            log.warning("checkpoints in %s were made with %s; this run replaces them once it "
                        "has a result of its own%s", folder, describe_change(earlier, fingerprint),
                        _resume_hint(earlier, fingerprint))

    def _holds_results(self) -> bool:
        return (self.folder / CHANNEL_ORDER).is_file() or any(self.folder.glob(CHUNK_FILES))

    def finished(self) -> int:
        """How many finished chunks of these inputs the folder holds (0 if it holds another
        run's), damaged files left out: what the same command would resume from."""
        if not self.ours:
            return 0
        return sum(path not in self.ignored for path in self.folder.glob(CHUNK_FILES))

    def _claim(self) -> None:
        if self.ours:
            return
        if self.folder.is_dir():
            # file by file, not rmtree: the folder may be a link to scratch storage, and what a
            # run did not write is not ours to remove (jobs.outdir refuses such a folder)
            for entry in self.folder.iterdir():
                if entry.is_file() and _written_by_a_run(entry.name):
                    entry.unlink()
                elif entry.is_dir() and fnmatch.fnmatch(entry.name, FINE_TUNE_FOLDERS):
                    shutil.rmtree(entry)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "fingerprint.json", self.fingerprint)
        self.ours = True

    def channel_order(self, channels: int | None = None) -> pd.DataFrame | None:
        """The checkpointed order of B's ``channels`` channels, or None if there is none whole."""
        path = self.folder / CHANNEL_ORDER
        if not (self.ours and path.exists()):
            return None
        try:
            order = _read_order(path, channels)
        except Exception as error:  # a damaged checkpoint: profile again
            self._ignore(path, error, "the channel order is computed again")
            return None
        return order

    def save_channel_order(self, order: pd.DataFrame) -> pd.DataFrame:
        self._claim()
        write_csv(self.folder / CHANNEL_ORDER, order)
        return order

    def chunks(self, prefixes: int | None = None) -> dict[tuple[str, int], list[Counts]]:
        """Finished chunks: ``(set, index) -> [Counts for k = 0..C]`` (``prefixes`` = C + 1)."""
        done = {}
        if not self.ours:
            return done
        for path in sorted(self.folder.glob(CHUNK_FILES)):
            try:
                key, counts = _read_chunk(path, prefixes)
                done[key] = counts
            except Exception as error:  # a damaged checkpoint: evaluate that chunk again
                self._ignore(path, error, "that chunk is evaluated again")
        return done

    def _ignore(self, path: Path, error: Exception, then: str) -> None:
        if path not in self.ignored:  # said once, however often the folder is read
            self.ignored.add(path)
            log.warning("ignoring %s (%s); %s", path, f"{error.__class__.__name__}: {first_line(error)}", then)

    def save_chunk(self, set_name: str, index: int, prefixes: list[Counts]) -> list[Counts]:
        """Keep one chunk's tallies for every prefix k = 0..C (a list indexed by k)."""
        self._claim()
        path = self.folder / chunk_file(set_name, index)
        write_json(path, {"set": set_name, "chunk": index, "prefixes": [asdict(c) for c in prefixes]})
        self.ignored.discard(path)  # damaged no more
        return prefixes


def describe_change(earlier, fingerprint: dict) -> str:
    """What made the checkpoints' ``earlier`` fingerprint differ from this run's, in words."""
    if not isinstance(earlier, dict) or earlier.keys() != fingerprint.keys():
        return "other inputs or another version of this project"
    changes = []
    for key, value in fingerprint.items():
        before = earlier[key]
        if before == value:
            continue
        if key in ("inputs", "software") and isinstance(before, dict):
            changes += [f"another {name} file" if key == "inputs" else
                        f"{name} {before.get(name)} (this run: {value[name]})"
                        for name in value if before.get(name) != value[name]]
        else:
            flag = {"chunk_rows": "--chunk-rows", "layer": "--layer", "read_at": "the layer read at",
                    "format": "checkpoint format"}.get(key, key)
            changes.append(f"{flag} {before} (this run: {value})")
    return ", ".join(changes) or "other inputs"


def _resume_hint(earlier, fingerprint: dict) -> str:
    """How to resume from checkpoints that differ from this run's only in --chunk-rows."""
    if isinstance(earlier, dict) and "chunk_rows" in earlier and \
            earlier | {"chunk_rows": fingerprint.get("chunk_rows")} == fingerprint:
        return f"; the same command with --chunk-rows {earlier['chunk_rows']} resumes from them"
    return ""


def _read_order(path: Path, channels: int | None) -> pd.DataFrame:
    """A channel order as written by ``save_channel_order``. A copy cut short still parses
    as CSV (with rows missing, or a channel's number cut): it must end its last line and
    list every channel once."""
    text = path.read_text()
    if not text.endswith("\n"):
        raise ValueError("its last line is cut short")
    order = pd.read_csv(io.StringIO(text))
    listed = sorted(order["channel"].astype(int))
    if channels is not None and listed != list(range(channels)):
        raise ValueError(f"it does not list each of B's {channels} channels once")
    return order


def _read_chunk(path: Path, prefixes: int | None) -> tuple[tuple[str, int], list[Counts]]:
    """A chunk file as written by ``save_chunk``: its own chunk's (by its name), every prefix."""
    data = json.loads(path.read_text())
    key = data["set"], int(data["chunk"])
    counts = [Counts(**c) for c in data["prefixes"]]
    if path.name != chunk_file(*key):
        raise ValueError(f"it holds chunk {key[1]} of the {key[0]} set, a copy under another name")
    if prefixes is not None and len(counts) != prefixes:
        raise ValueError(f"it holds {len(counts)} prefixes, not B's {prefixes}")
    return key, counts


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
