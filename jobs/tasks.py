"""What the sweep's Dask workers need beyond the tasks themselves (:mod:`pruning.sweep`): quiet
logs. It imports no TensorFlow, so that the worker ranks of a job whose client refused its inputs
take the plugin without importing it. A --single-node fork server preloads this module and
:mod:`pruning.prune` (TensorFlow); a joined cluster's workers are checked to import both. (The
scheduler needs only :mod:`pruning.sweep`, which imports no TensorFlow either.)"""
from __future__ import annotations

import logging

from distributed.diagnostics.plugin import WorkerPlugin

import pruning.sweep  # noqa: F401  (the tasks)
from pruning.data import InputError


class QuietWorkerLogs(WorkerPlugin):
    """A Dask worker plugin for workers the sweep started, so that what the client reports in
    one line is not also a block in the workers' logs:

    - a task that stops on an :class:`InputError` (say NaN pixels in a chunk, found only when a
      worker reads it) is one WARNING line, not distributed's "Compute Failed" block with a
      traceback;
    - a task cut short because its worker closes (a stopped run), and a heartbeat that the
      scheduler drops as it lets a closing worker go, are INFO lines, not a WARNING and an
      ERROR traceback.

    Register with ``client.register_plugin(QuietWorkerLogs())``. The filters recognise
    distributed's own wording: tests/test_distributed_messages.py fails when it changes.
    """

    name = "quiet-worker-logs"

    def setup(self, worker=None):
        # One worker per process (the sweep's workers are processes), so each filter knows its worker.
        for name, log_filter in (("distributed.worker", InputErrorLogFilter()),
                                 ("distributed.worker", ClosingWorkerLogFilter(worker)),
                                 ("distributed.worker.state_machine", ClosingWorkerLogFilter(worker))):
            logger = logging.getLogger(name)
            if not any(type(f) is type(log_filter) for f in logger.filters):
                logger.addFilter(log_filter)


class InputErrorLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if (isinstance(record.msg, str) and record.msg.startswith("Compute Failed")
                and len(args) >= 4 and str(args[3]).startswith(InputError.__name__ + "(")):
            record.msg = "task %s stopped on an input problem (the client reports it): %s"
            record.args = (args[0], args[3])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ClosingWorkerLogFilter(logging.Filter):
    def __init__(self, worker=None):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
            pass  # a worker closing mid-task
        elif message.startswith("Failed to communicate with scheduler during heartbeat") and self.closing():
            # retire_workers removed this worker while its heartbeat was on the way
            record.msg, record.args = "heartbeat not answered as this worker closes: %s", (
                record.exc_info[1] if record.exc_info else "",)
            record.exc_info = record.exc_text = None
        else:
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)

    def closing(self) -> bool:
        from distributed.core import Status
        return self.worker is not None and self.worker.status in (
            Status.closing_gracefully, Status.closing, Status.closed)
