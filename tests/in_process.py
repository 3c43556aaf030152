"""``python -m jobs.sweep ARGV`` run in this process (``jobs.sweep.main``): the same exit status,
stdout and stderr lines, without a new Python process that imports TensorFlow (and, with
--single-node, its own fork server). For the tests where the process itself (its signals, its
exit on a stop) is not what is checked."""
from __future__ import annotations

import logging
from types import SimpleNamespace


def log_lines(records) -> str:
    """Log records as the command writes them to stderr, less their time: 'LEVEL name: message'
    (and a record's traceback, if it has one)."""
    form = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return "".join(form.format(record) + "\n" for record in records)


def sweep_in_process(*argv, capsys, caplog) -> SimpleNamespace:
    """``returncode``, ``stdout`` and ``stderr`` (its INFO and higher log lines, then what it
    printed there, e.g. its one ``error:`` line) of ``jobs.sweep.main(argv)``."""
    from jobs.sweep import main

    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=out, stderr=log_lines(caplog.records) + err)
