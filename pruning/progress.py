"""The sweep's progress: a bar on a terminal or in Jupyter, a log line now and then in a batch
job's log.

A bar redrawn in place is what a terminal shows well; in a file (SLURM's ``fine-pruning-<id>.out``,
``2> log``) each redraw would pile onto one line joined by carriage returns. There, the same
tqdm meter comes as an ordinary log line at most every :data:`LOG_EVERY_S` seconds, and once
at the end. In a Jupyter notebook it is tqdm's notebook bar (``tqdm.auto``).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

with warnings.catch_warnings():  # (its notebook bar says it is experimental)
    warnings.simplefilter("ignore")
    from tqdm.autonotebook import tqdm  # tqdm.auto's choice: the notebook's bar in Jupyter

log = logging.getLogger(__name__)
LOG_EVERY_S = 30


class LogLines:
    """A file for tqdm that logs each meter it writes as one line."""

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        pass


def prefix_progress(prefixes: int, chunks: int, chunks_done: int):
    """Progress over (chunk, prefix) pairs, shown in prefixes: a prefix is done when every chunk
    has it. Meanwhile our log lines (a lost worker's) go above the bar, not into it."""
    return progress(prefixes * chunks, "prefixes", "prefix", initial=prefixes * chunks_done,
                    unit_scale=1 / chunks)


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str, initial: int = 0, unit_scale: float = 1) -> Iterator[tqdm]:
    """A bar of ``total`` ``unit``s (``prefix_progress``'s, or fine-tuning's epochs)."""
    options = dict(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}]")
    # On a terminal, log lines go above the bar (tqdm.write), not into it. In a log file the meter
    # is itself a log line: nothing to redirect, and redirecting would take tqdm's lock and the
    # log handler's in both orders (a deadlock when another thread logs as the bar closes).
    redirect = logging_redirect_tqdm()
    if not (sys.stderr.isatty() or in_notebook()):
        options.update(file=LogLines(), mininterval=LOG_EVERY_S,
                       bar_format="{desc}: {percentage:3.0f}% {n:.1f}/{total:.0f} [{elapsed}<{remaining}]")
        redirect = contextlib.nullcontext()
    with redirect, tqdm(**options) as bar:
        yield bar


def in_notebook() -> bool:
    return tqdm.__module__ == "tqdm.notebook"
