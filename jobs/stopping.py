"""How a stop ends a run: Ctrl-C, ``kill`` (SIGTERM, also what scancel sends) and a closed
terminal or ssh session (SIGHUP).

Each becomes an exception in the client (:class:`Stopped`, a KeyboardInterrupt), so that every
context closes in order: the LocalCluster, the SLURM worker jobs (cancelled), the lock on --out.
While a stopped run's cluster closes, what distributed logs about it is kept out of the log
(:func:`quiet_distributed`): the run's one line on stderr says what happened and what was kept.

Every signal handler the sweep sets is set here: the client's (:func:`stop_on_signals`,
:func:`interrupt_held`), the SLURM scheduler and worker ranks' (:func:`serve_until_told`), the
local workers' fork server's (:func:`terminal_signals_ignored`) and the one dask_jobqueue sets
as it is imported (:func:`sigint_kept`).
"""
from __future__ import annotations

import _thread
import contextlib
import functools
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

# What a terminal sends to every process of its group: Ctrl-C, and SIGHUP when it (or the ssh
# session) closes. What stops a run: those, and `kill` (SIGTERM, also what scancel sends).
TERMINAL_SIGNALS = (signal.SIGINT,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
STOP_SIGNALS = TERMINAL_SIGNALS + (signal.SIGTERM,)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C's KeyboardInterrupt is; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


# How long a stop that a finalizer swallowed waits before it is sent again (seconds): the main
# thread is then back in the code the finalizer interrupted, where the stop is raised as usual.
RESEND_AFTER = 0.1


def _send_again(unraisable, previous_hook) -> None:
    """``sys.unraisablehook`` of the client. A stop raised while Python runs a finalizer (a
    distributed Future's ``__del__``, say) cannot leave it: Python prints "Exception ignored"
    with a traceback and goes on, and the run would end as if never stopped. So the stop is not
    printed but sent again to the main thread, a moment later; ``previous_hook`` gets the
    other exceptions."""
    stop = unraisable.exc_value
    if not isinstance(stop, KeyboardInterrupt):
        previous_hook(unraisable)
        return
    signum = getattr(stop, "signum", signal.SIGINT)
    if hasattr(signal, "pthread_kill"):  # a signal wakes a main thread that waits on a lock
        send = functools.partial(signal.pthread_kill, threading.main_thread().ident, signum)
    else:
        send = functools.partial(_thread.interrupt_main, signum)
    timer = threading.Timer(RESEND_AFTER, send)
    timer.daemon = True
    with contextlib.suppress(RuntimeError):  # Python is exiting: no thread starts, nothing to stop
        timer.start()


def stop_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The stop (Ctrl-C, SIGTERM, SIGHUP) that ``error`` was raised while handling, if any:
    closing a cluster after a stop can fail inside distributed (a cancelled call), and such a
    failure is the stop's, not another error to report."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__context__
    return None


def heeded_stop_signals() -> list[int]:
    """The stop signals this process was not told to ignore: ``nohup`` ignores SIGHUP, and a
    shell without job control ignores SIGINT in the commands it runs with ``&``."""
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP stop this process as Ctrl-C does (raise :class:`Stopped`),
    unless they are ignored; send again a stop that a finalizer swallowed (:func:`_send_again`);
    and keep a stop's known distributed traceback out of the log (:class:`InterruptedSyncFilter`)."""
    for signum in heeded_stop_signals():
        if signum != signal.SIGINT:
            signal.signal(signum, _raise_stopped)
    if getattr(sys.unraisablehook, "func", None) is not _send_again:
        sys.unraisablehook = functools.partial(_send_again, previous_hook=sys.unraisablehook)
    tornado_log = logging.getLogger("tornado.application")
    if not any(isinstance(f, InterruptedSyncFilter) for f in tornado_log.filters):
        tornado_log.addFilter(InterruptedSyncFilter())


@contextlib.contextmanager
def interrupt_held() -> Iterator[list]:
    """Hold Ctrl-C (and the other stop signals) while a LocalCluster starts: interrupted
    half-way, it cannot be closed, and Dask's clean-up at exit prints tracebacks. The list it
    yields gets the signals that came; the caller raises :class:`Stopped` once the cluster is up."""
    received, previous = [], {}
    try:
        for signum in heeded_stop_signals():
            previous[signum] = signal.signal(signum, lambda signum, _: received.append(signum))
    except ValueError:  # not the main thread, where signals are not delivered anyway
        pass
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def terminal_signals_ignored() -> Iterator[None]:
    """Ignore a terminal's signals meanwhile: a process started then (the fork server of the
    local workers) keeps ignoring them, as an ignored signal survives exec. Only this process
    acts on them, closing the cluster in order with one line on stderr."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in TERMINAL_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def sigint_kept() -> Iterator[None]:
    """Put SIGINT's handler back after the block: importing dask_jobqueue sets its own (for
    SLURMRunner)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if handler is not None:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was changed
                signal.signal(signal.SIGINT, handler)


def serve_until_told() -> None:
    """Signals of a SLURM scheduler or worker rank (``--slurm-runner``), which serve until the
    client rank is done. The runner ends them with SIGINT: that becomes ``sys.exit()`` (on the
    client rank SIGINT stays Ctrl-C: a stopped run says so). scancel, a requeue and the time
    limit send SIGTERM to every rank at once; a scheduler that died of it would leave the client
    rank retrying it (connect timeouts) until SLURM kills it, KillWait later, without its last
    line. So they ignore SIGTERM, and the client rank stops them in order; SLURM's SIGKILL
    remains for ranks whose client is gone."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class InterruptedSyncFilter(logging.Filter):
    """Drops one log record that a stop can cause in the client, a distributed bug: when a
    stop lands in a Client call before that call's coroutine has started, distributed.utils.sync
    schedules a cancel() of a future it never set, which fails with a NameError that tornado
    logs with a traceback. Nothing was left running; the stop goes on as usual."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, NameError):
            last = traceback.extract_tb(error.__traceback__)[-1:]
            if last and last[0].name == "cancel" and Path(last[0].filename).parts[-2:] == ("distributed", "utils.py"):
                return False
        return True


@contextlib.contextmanager
def quiet_distributed() -> Iterator[None]:
    """Drop what distributed logs in this process meanwhile: used while a stopped or failed run's
    cluster closes. Tasks still finishing then make a LocalCluster's (or SLURMCluster's) scheduler,
    which runs here, log tracebacks about the client that is leaving (``Closed comm ... while
    trying to write``, a cancelled ``update_graph``), and a client that lost its scheduler logs
    its cancelled reconnect; the run's one line says what happened and what was kept."""
    drop = DistributedRecords()
    handlers = set(logging.getLogger().handlers)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "distributed" or name.startswith("distributed.")):
            handlers.update(logger.handlers)
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


class DistributedRecords(logging.Filter):
    """Drops the records of distributed's loggers (see :func:`quiet_distributed`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "distributed" or record.name.startswith("distributed."):
            return False
        # asyncio's "Task exception was never retrieved" for one of distributed's own tasks: a
        # stop in result() while a lost chunk is recomputed leaves its gather's waits behind,
        # and the run's cancelled tasks end them with distributed.client.AllExit.
        error = record.exc_info[1] if record.exc_info else None
        return not (record.name == "asyncio" and type(error).__module__.split(".")[0] == "distributed")


class ClosedStreamFilter(logging.Filter):
    """Drops distributed's traceback for a write to a stream the other side has closed: a
    scheduler still reporting to a client that left (a stopped run's cancelled tasks) logs it
    at INFO. Nothing is lost by it; the run's own line says what happened. (Where distributed
    logs it is pinned by tests/test_distributed_messages.py.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (type(error).__name__ == "CommClosedError"
                    and type(error).__module__.split(".")[0] == "distributed")
