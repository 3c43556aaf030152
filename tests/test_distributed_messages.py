"""Our filters on distributed's log lines and warnings, against the distributed installed.

The filters (jobs.tasks.QuietWorkerLogs, jobs.stopping, jobs.slurm) recognise lines that
distributed writes; an upgrade that rewords one would silently undo its filter. So each test
here makes a real worker, scheduler or dashboard say the line and asserts what our filter made
of it; where no test can bring the situation about (a heartbeat lost as a worker closes, a
scheduler writing to a client that left), it finds the line in distributed's source and runs the
filter on that very text. (jobs.stopping.InterruptedSyncFilter's case is reproduced for real by
tests/test_demo_run.py::test_a_stop_before_a_client_call_starts_logs_no_traceback.)
"""
from __future__ import annotations

import ast
import inspect
import logging
import socket
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
from distributed import Client, LocalCluster

from jobs.tasks import ClosingWorkerLogFilter, InputErrorLogFilter, QuietWorkerLogs
from pruning.data import InputError

WORKER_LOGGERS = ("distributed.worker", "distributed.worker.state_machine")


@pytest.fixture
def quiet_worker():
    """A Client on one in-process worker with the sweep's QuietWorkerLogs, its loggers at INFO
    (the filters install on the process's loggers: removed again after the test)."""
    loggers = [logging.getLogger(name) for name in WORKER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    try:
        with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            client.register_plugin(QuietWorkerLogs())
            yield client, cluster
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.filters = [f for f in logger.filters
                              if not isinstance(f, (InputErrorLogFilter, ClosingWorkerLogFilter))]


def stop_on_nan():
    raise InputError("clean_test.h5 rows 200-299: NaN pixels")


def sleep_a_while():
    time.sleep(5)


def test_a_task_stopped_by_bad_input_is_one_warning_not_compute_failed(quiet_worker, caplog):
    client, _ = quiet_worker
    with caplog.at_level(logging.INFO), pytest.raises(InputError, match="NaN pixels"):
        client.submit(stop_on_nan, key="stop-on-nan").result()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "distributed.worker"
            and r.levelno >= logging.WARNING]
    assert said == [("WARNING", "task stop-on-nan stopped on an input problem (the client reports "
                                "it): InputError('clean_test.h5 rows 200-299: NaN pixels')")], said


def test_a_task_cut_short_by_its_worker_closing_is_an_info_line(quiet_worker, caplog):
    client, cluster = quiet_worker
    worker = next(iter(cluster.workers.values()))
    with caplog.at_level(logging.INFO):
        client.submit(sleep_a_while, key="sleep-a-while")
        deadline = time.monotonic() + 10
        while not worker.state.executing and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.state.executing, "the task never started"
        client.sync(worker.close)
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "distributed.worker.state_machine"]
    assert [level for level, message in said if "sleep-a-while" in message] == ["INFO"], said
    assert all(level == "INFO" for level, _ in said), said


def logging_calls(function, text: str) -> list[ast.Call]:
    """The logging calls in ``function``'s source whose message starts with ``text``."""
    calls = []
    for node in ast.walk(ast.parse(inspect.cleandoc("\n" + inspect.getsource(function)))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "logger"
                and node.args and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith(text)):
            calls.append(node)
    return calls


def test_a_heartbeat_lost_as_the_worker_closes_is_still_the_line_we_soften():
    """Seen after Ctrl-C in a SLURM job: retire_workers lets a worker go while its heartbeat is
    on the way. The line, as distributed.worker logs it (with its traceback), through our filter."""
    import distributed.worker
    from distributed.core import Status

    assert distributed.worker.logger.name == "distributed.worker"
    calls = logging_calls(distributed.worker.Worker.heartbeat, "Failed to communicate with scheduler")
    assert [call.func.attr for call in calls] == ["exception"], "distributed changed the line"
    try:
        raise OSError("Stream is closed")
    except OSError:
        failure = sys.exc_info()
    record = distributed.worker.logger.makeRecord("distributed.worker", logging.ERROR, __file__, 1,
                                                  calls[0].args[0].value, (), failure)
    ClosingWorkerLogFilter(SimpleNamespace(status=Status.closing_gracefully)).filter(record)
    assert (record.levelname, record.getMessage(), record.exc_info) == (
        "INFO", "heartbeat not answered as this worker closes: Stream is closed", None)


def test_the_scheduler_logs_a_closed_client_stream_where_our_filter_is():
    """jobs.slurm puts jobs.stopping.ClosedStreamFilter on distributed.batched, which logs the
    CommClosedError of a write to a client that left with its traceback (exc_info)."""
    import distributed.batched
    from distributed.comm.core import CommClosedError

    source = inspect.getsource(distributed.batched.BatchedSend)
    assert distributed.batched.logger.name == "distributed.batched"
    assert "except CommClosedError:" in source
    calls = logging_calls(distributed.batched.BatchedSend, "Batched Comm Closed")
    assert [(call.func.attr, [k.arg for k in call.keywords]) for call in calls] == [("info", ["exc_info"])]
    assert CommClosedError.__module__.split(".")[0] == "distributed"


def test_the_dashboard_port_warning_is_the_one_we_ignore():
    """A second dashboard on a taken port (another job's, on a shared node): distributed warns
    over three lines; jobs.slurm.quiet_dashboard_port_warning drops that warning alone."""
    from jobs.slurm import quiet_dashboard_port_warning

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def warned(quiet: bool) -> list[str]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if quiet:
                    quiet_dashboard_port_warning()
                with LocalCluster(n_workers=0, processes=False, dashboard_address=f"127.0.0.1:{port}"):
                    pass
            return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

        assert any(f"Port {port} is already in use" in message for message in warned(quiet=False))
        assert not any("already in use" in message for message in warned(quiet=True))
