"""Joining a Dask cluster someone already runs (``--scheduler-address``/``--scheduler-file``).

Such a cluster outlives the sweep and may serve others: the sweep checks that it can run our
tasks, says what it waits for, and leaves nothing installed on it.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Iterator

import dask
from dask.utils import parse_timedelta
from distributed import Client
from distributed.utils import json_load_robust

from jobs.cluster import ClusterError, dashboard_hint
from jobs.security import PLAIN_TCP_RISK, plain_tcp_problem
from pruning.data import InputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def running_cluster_client(args: argparse.Namespace) -> Iterator[Client]:
    """A Client on a running scheduler (``--scheduler-address``/``--scheduler-file``) that has
    a worker, saying what it waits for."""
    where = args.scheduler_address or f"the one in {args.scheduler_file}"
    if args.scheduler_file and not Path(args.scheduler_file).exists():
        log.info("waiting for %s to appear: a Dask scheduler writes it as it starts", args.scheduler_file)
    try:
        # (Client(scheduler_file=...) would read the file the same way, but only to connect)
        address = args.scheduler_address or json_load_robust(
            args.scheduler_file, timeout=parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))["address"]
        problem = plain_tcp_problem(address, args.allow_tcp)
        if problem:
            raise InputError(problem)
        if address.startswith("tcp://"):
            log.warning("joining the Dask scheduler at %s over plain TCP (--allow-tcp): %s", address, PLAIN_TCP_RISK)
        client = Client(address)  # with the security of your own Dask config (distributed.comm.tls)
    except OSError as error:  # timeouts included
        stale = (" (a scheduler file outlives its scheduler: is this one from a scheduler that"
                 " still runs?)" if args.scheduler_file else "")
        raise ClusterError(f"could not reach the Dask scheduler at {where}: "
                           f"{' '.join(str(error).split())}; is it running, and reachable from "
                           f"this machine?{stale}") from None
    with client:
        log.info("%s", dashboard_hint(client))
        if not client.scheduler_info()["workers"]:
            log.info("waiting for a worker to join the scheduler at %s (dask worker %s)",
                     client.scheduler.address, client.scheduler.address)
        client.wait_for_workers(1)
        check_project_imports(client)
        yield client


PROJECT_IMPORT = "import jobs.tasks"  # what unpickling our tasks imports


def check_project_imports(client: Client) -> None:
    """Stop with a :class:`ClusterError` if the scheduler or a worker of a cluster we did not
    start cannot import this project: the scheduler would refuse the task graph, and such a
    worker would die on its first task, leaving the sweep waiting for ever."""
    advice = ("start the scheduler and workers from this project's environment and checkout "
              "(README: On a Dask cluster you already run)")
    try:
        client.run_on_scheduler(exec, PROJECT_IMPORT)  # a builtin: unpickled anywhere
    except ImportError as error:
        raise ClusterError(f"the Dask scheduler at {client.scheduler.address} cannot import this "
                           f"project ({error}); {advice}") from None
    results = client.run(exec, PROJECT_IMPORT, on_error="return")
    failed = {worker: error for worker, error in results.items() if error is not None}
    if failed:
        worker, error = next(iter(failed.items()))
        raise ClusterError(f"{len(failed)} of the {len(results)} Dask workers cannot import this "
                           f"project ({worker}: {error}); {advice}")
