"""Files written whole or not at all, and a lock for one writer at a time: the one place for
both, used by the outputs and checkpoints (:mod:`pruning.report`, ``jobs/``), the demo's
cache and the lab files it writes, and the sweep's TLS key.

A file is written to a hidden temporary beside it and renamed into place (:func:`atomic_path`),
a set of files all at once (:func:`staged`), a folder likewise (:func:`atomic_folder`). A reader
sees the old file or the whole new one; a run killed half-way leaves only a temporary, which
:func:`temporary_for` recognises.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


# Inside staged(): the (temporary, path) pairs of the files written, not yet renamed.
_staging: contextvars.ContextVar[list[tuple[Path, Path]] | None] = \
    contextvars.ContextVar("staging", default=None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an empty file, ``mode`` less the umask); on
    success it replaces ``path`` in one rename (inside :func:`staged`, when that renames all
    its files). A failure in the block removes it and leaves ``path`` as it was.

    An ``OSError`` without a file name (a full disk, met while writing) gets ``path``'s.
    """
    path = Path(path)
    temporary = _new_file(path, mode)
    staging, kept = _staging.get(), False
    try:
        yield temporary
        with open(temporary, "rb") as handle:  # on shared storage, data before the rename
            os.fsync(handle.fileno())
        if staging is None:
            os.replace(temporary, path)
        else:
            staging.append((temporary, path))
            kept = True
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        if not kept:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staged() -> Iterator[Callable[[], None]]:
    """Write a set of files all or none. Inside, each file written is kept under its
    temporary name; the function yielded renames them all into place, in a moment where
    writing them took seconds. Left without calling it (a failure, a stop), no file is
    replaced and the temporaries are removed: an interrupted run leaves the earlier run's
    outputs as they were, not some of its own among them."""
    pending: list[tuple[Path, Path]] = []
    token = _staging.set(pending)

    def replace_all() -> None:
        for temporary, path in pending:
            os.replace(temporary, path)
        pending.clear()

    try:
        yield replace_all
    finally:
        _staging.reset(token)
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)


def _new_file(path: Path, mode: int) -> Path:
    """Create an empty, hidden file beside ``path``, with ``mode`` less the umask (by default
    what the umask gives new files: outputs are for the group; ``tempfile.mkstemp`` would make
    it 0600)."""
    while True:
        temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
            return temporary
        except FileExistsError:
            continue


# _new_file's names: ".results.0a1b2c3d.csv" for results.csv
_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{8}(?P<suffix>\.[^.]+)")


def temporary_for(name: str) -> str | None:
    """The file whose temporary (see :func:`_new_file`) ``name`` could be, or None."""
    match = _TEMPORARY.fullmatch(name)
    return match["stem"] + match["suffix"] if match else None


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty folder beside ``path``; on success it replaces ``path`` in one
    rename (a folder there is removed first). Leftovers of a build that was killed (hidden
    siblings ``.NAME.*``) are removed first: call it with :func:`exclusive_lock` held."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield temporary
        temporary.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) meanwhile, waiting
    while another process holds it. The kernel releases it when the file closes, also when
    the process dies: a crash leaves no stale lock."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
