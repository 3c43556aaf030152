"""The output folder: one live run at a time, and checkpoints a rerun reads back.

A run holds an exclusive lock on ``OUT/.sweep.lock`` (released by the kernel when the process
dies, so a killed or preempted job never leaves a stale lock). Finished prefixes are kept as
``OUT/checkpoints/prefix-<k>.json``, tagged with the inputs' fingerprint: a rerun with the same
inputs reuses them, a rerun with other inputs starts over.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from pruning.data import InputError
from pruning.prune import Counts
from pruning.report import write_csv, write_json

log = logging.getLogger(__name__)


class OutputFolder:
    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_dir():
            raise InputError(f"--out {path} is a file; give a folder")
        parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"--out {path}: {parent} is not writable; choose another folder")

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock for the duration of a run; refuse if a live run holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".sweep.lock"
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.readline().strip() or "another process"
                raise InputError(f"--out {self.path} is in use by a running sweep ({holder}); "
                                 "wait for it to finish or choose another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"host {socket.gethostname()} pid {os.getpid()}"
                         f" job {os.environ.get('SLURM_JOB_ID', '-')} since {time.ctime()}\n")
            handle.flush()
            yield self


class Checkpoints:
    """Per-prefix tallies and the channel order of an unfinished (or finished) run."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        stamp = folder / "fingerprint.json"
        if folder.exists():
            previous = json.loads(stamp.read_text()) if stamp.exists() else None
            if previous != fingerprint:
                log.info("checkpoints in %s are for other inputs; starting over", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            write_json(stamp, fingerprint)

    def channel_order(self) -> pd.DataFrame | None:
        path = self.folder / "channel_order.csv"
        return pd.read_csv(path) if path.exists() else None

    def save_channel_order(self, order: pd.DataFrame) -> pd.DataFrame:
        write_csv(self.folder / "channel_order.csv", order)
        return order

    def prefixes(self) -> dict[int, dict[str, Counts]]:
        done = {}
        for path in sorted(self.folder.glob("prefix-*.json")):
            data = json.loads(path.read_text())
            done[int(data["channels_pruned"])] = {name: Counts(**c) for name, c in data["sets"].items()}
        return done

    def save_prefix(self, k: int, tallies: dict[str, Counts]) -> dict[str, Counts]:
        write_json(self.folder / f"prefix-{k:05d}.json",
                   {"channels_pruned": k, "sets": {name: asdict(c) for name, c in tallies.items()}})
        return tallies
