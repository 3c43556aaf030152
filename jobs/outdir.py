"""The output folder: one live run at a time, its checkpoints, and its models' names.

A run holds an exclusive lock on ``OUT/.sweep.lock`` (released by the kernel when the process
dies, so a killed or preempted job never leaves a stale lock). Finished chunks of rows are kept
in ``OUT/checkpoints`` (:mod:`jobs.checkpoints`).

A run that fails changes, adds or removes no output file: :class:`OutputFolder` checks without
writing anything, outputs are renamed into place only once all are written
(:func:`pruning.files.staged`), and :meth:`OutputFolder.locked` removes on the way out of a
failure the lock file and the folders the run made (folder times are not put back). Only
checkpoints the failed run finished are kept, for a rerun to resume from; what a killed run left
half-written is removed by the next run to hold the lock (:func:`remove_leftovers`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from jobs.checkpoints import (CHECKPOINTS, CHUNK_FILES, Checkpoints, foreign_files,
                              leftover_temporaries)
from pruning.data import InputError
from jobs.finish import is_output, models_listed
from pruning.files import temporary_for

log = logging.getLogger(__name__)

LOCK_NAME = ".sweep.lock"  # in --out: held by the live run

# Pseudo filesystems (/proc, /sys, ...) report no blocks and take no files.
_NO_FILES = "a pseudo filesystem (like /proc or /sys)"


def write_problem(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder``, or None; leaves nothing there.

    ``os.access`` answers for permissions and read-only mounts, but root passes it for any
    folder of a writable mount, /proc included: a temporary file, gone once closed, proves a
    file can be made.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable (permissions or a read-only filesystem)"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return _NO_FILES if os.statvfs(folder).f_blocks == 0 else f"not writable ({error.strerror})"
    return None


class OutputFolder:
    """``--out``, checked when made (nothing is written); :meth:`locked` for the run itself."""

    def __init__(self, path: Path, outputs: tuple[str, ...] = ()):
        self.path = path
        self.outputs = outputs
        self.checkpoints: Checkpoints | None = None  # this run's, once its inputs are hashed
        if path.exists() and not path.is_dir():
            raise InputError(f"--out {path} is a file; give a folder")
        # one that is not there is created, but not through a link to nowhere (mkdir: "File exists")
        broken = next((p for p in [path, *path.parents] if p.is_symlink() and not p.exists()), None)
        if broken is not None:
            raise InputError(f"--out {path}: {broken} is a broken symbolic link (to "
                             f"{os.readlink(broken)}); create what it points to, or choose another --out")
        parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        if not parent.is_dir():
            raise InputError(f"--out {path}: {parent} is a file, not a folder; choose another --out")
        problem = write_problem(parent)
        if problem:
            raise InputError(f"--out {path}: {parent} is {problem}; choose another folder")
        lock = path / LOCK_NAME
        if lock.is_symlink():  # the lock is written in place: into the file the link points to
            raise InputError(f"--out {path}: {lock} is a symbolic link (to {os.readlink(lock)}), "
                             "and the sweep writes its lock there; remove the link")
        checkpoints = path / CHECKPOINTS
        if checkpoints.is_symlink() and not checkpoints.exists():  # into scratch storage, purged
            raise InputError(f"--out {path}: {checkpoints} is a broken symbolic link (to "
                             f"{os.readlink(checkpoints)}), and the sweep keeps its checkpoints "
                             "there; create what it points to, or remove the link")
        kinds = {name: "file" for name in (LOCK_NAME, *outputs)} | {CHECKPOINTS: "folder"}
        foreign = foreign_files(path / CHECKPOINTS)
        if foreign:
            raise InputError(f"--out {path}: {path / CHECKPOINTS} holds files that no sweep writes "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), and "
                             "a run replaces that folder; move them or choose another --out")
        for name, kind in kinds.items():
            entry = path / name
            if entry.exists() and entry.is_dir() != (kind == "folder"):
                raise InputError(f"--out {path}: {entry} is in the way (a "
                                 f"{'folder' if entry.is_dir() else 'file'} where the sweep "
                                 f"writes a {kind}); move it or choose another --out")

    def check_inputs(self, paths: dict[str, str]) -> None:
        """Refuse an input that this run would replace or remove: B' of an earlier run given as
        B with that run's folder as --out (model_X=2.h5 is rewritten, or removed as a model of
        other thresholds), or a file kept in checkpoints/ (replaced with this run's)."""
        folder = Path(os.path.realpath(self.path))
        # (the folder resolved, not the file: a symlink named model_X=2.h5 is replaced, not
        # its target)
        ours = {folder / name for name in (LOCK_NAME, *self.outputs, *models_listed(self.path, fine_tune=True))}
        for name, path in paths.items():
            real = Path(os.path.realpath(path))
            if real in ours or folder / CHECKPOINTS in real.parents:
                what = "model" if name == "model" else f"{name} set"
                raise InputError(f"--out {self.path} holds the {what} {path}, and this run would "
                                 "replace or remove it (the sweep writes its outputs there); copy "
                                 f"the {what} elsewhere or choose another --out")

    def open_checkpoints(self, fingerprint: dict) -> Checkpoints:
        """This run's checkpoints (those of other inputs are not read)."""
        self.checkpoints = Checkpoints(self.path / CHECKPOINTS, fingerprint)
        return self.checkpoints

    def holds_a_finished_sweep(self) -> bool:
        """Whether a run finished here and every chunk of it is checkpointed (as many chunk
        files as its manifest.json counts): a guess from the folder alone, before the inputs
        are read. Whether they are those inputs' is known once they are hashed (jobs.sweep)."""
        try:
            chunks = json.loads((self.path / "manifest.json").read_text())["checkpoints"]["chunks"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return len(list((self.path / CHECKPOINTS).glob(CHUNK_FILES))) == chunks

    def check_lock(self) -> None:
        """Refuse if a live run holds the folder; takes and changes nothing."""
        lock_path = self.path / LOCK_NAME
        if not lock_path.is_file():
            return
        try:
            handle = open(lock_path, "r+b")
        except OSError as error:
            raise InputError(f"--out {self.path}: {lock_path} cannot be opened "
                             f"({error.strerror}); choose another --out") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(handle) from None
            except OSError as error:
                raise self._no_locks(error) from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def _in_use(self, handle) -> InputError:
        handle.seek(0)
        holder = handle.readline().decode(errors="replace").strip() or "another process"
        return InputError(f"--out {self.path} is in use by a running sweep ({holder}); "
                          "wait for it to finish or choose another --out")

    def _no_locks(self, error: OSError) -> InputError:
        return InputError(f"--out {self.path}: cannot lock {self.path / LOCK_NAME} "
                          f"({error.strerror}); the filesystem may not support locks, choose "
                          "another --out")

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock for the duration of a run; refuse if a live run holds it.

        If the run fails, the lock file is removed if this run made it (else it keeps this
        run's line: it is no output), and so are folders this run created (``--out`` itself,
        its parents, and ones inside it such as ``.dask/worker-logs``) while they hold no file.
        """
        created = [p for p in [self.path, *self.path.parents] if not p.exists()]  # deepest first
        held = set(os.listdir(self.path)) if self.path.is_dir() else set()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"--out {self.path} cannot be created ({error.strerror}); "
                             "choose another folder") from None
        lock_path = self.path / LOCK_NAME
        try:
            handle, made = self._lock(lock_path)
            with handle:
                try:
                    _write_lock(handle, lock_path, f"host {socket.gethostname()} pid {os.getpid()}"
                                f" job {os.environ.get('SLURM_JOB_ID', '-')} since {time.ctime()}\n"
                                .encode())
                    remove_leftovers(self.path)
                    yield self
                except BaseException:
                    if made:  # still holding the lock: no other run can see the file in between
                        lock_path.unlink(missing_ok=True)
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                _remove_empty(created, self.path, held)
            raise

    def _lock(self, lock_path: Path):
        """Open and lock ``lock_path``; return the handle and whether this run created it."""
        for _ in range(10):
            existed = lock_path.exists()
            try:  # (not through a link made since the check: ELOOP)
                handle = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND
                                           | os.O_NOFOLLOW, 0o666), "a+b")
            except OSError as error:
                raise InputError(f"--out {self.path}: {lock_path} cannot be created "
                                 f"({error.strerror}); choose another --out") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = self._in_use(handle)
                handle.close()
                raise error from None
            except OSError as error:
                handle.close()
                raise self._no_locks(error) from None
            # A failed run removes the lock file it made: make sure we locked the file that is
            # there now, not one removed between our open and our lock.
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                return handle, not existed
            handle.close()
        raise InputError(f"--out {self.path}: the lock file keeps changing; is another sweep "
                         "starting there?")


def remove_leftovers(out: Path) -> None:
    """Remove what a killed run (kill -9, a lost node) left half-written in ``out`` and its
    checkpoints: temporaries of outputs (a whole B' or G each) and of checkpoint files, which
    no later run would otherwise ever remove. Only the run holding the lock writes them."""
    found = [entry for entry in sorted(out.iterdir())
             if entry.is_file() and is_output(temporary_for(entry.name) or "")]
    found += leftover_temporaries(out / CHECKPOINTS)
    for path in found:
        path.unlink(missing_ok=True)
    if found:
        log.info("removed %s: left half-written by a run that was killed",
                 ", ".join(str(path.relative_to(out)) for path in found))


def _write_lock(handle, lock_path: Path, contents: bytes) -> None:
    """Make ``contents`` the locked file's. Unbuffered: on a full disk the write fails here, in
    reach of the caller's clean-up, not again as the file closes; the error names the file."""
    descriptor = handle.fileno()
    try:
        os.ftruncate(descriptor, 0)
        while contents:  # (O_APPEND: at the end, now the start)
            contents = contents[os.write(descriptor, contents):]
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(lock_path)) from None


def _remove_empty(created: list[Path], out: Path, held: set[str]) -> None:
    """Remove the folders this run created while they hold no file: those made in ``out``
    (which held ``held``) since, then ``created`` (deepest first)."""
    for name in set(os.listdir(out)) - held:
        if (out / name).is_symlink():
            continue
        for folder, _, _ in os.walk(out / name, topdown=False):  # none if ``name`` is a file
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: this run left checkpoints worth keeping
