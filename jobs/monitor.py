"""What the sweep tells about its cluster while it runs: where the Dask dashboard is (and the
ssh tunnel that reaches it from your machine), and when every worker is lost or one joins again.

When every Dask worker is lost mid-sweep, Dask itself waits for a new one and reruns the lost
tasks on it, silently: :func:`say_when_no_worker_is_left` says so in the log.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
from typing import Iterator, Mapping
from urllib.parse import urlsplit

from distributed import Client, Future

from jobs.errors import NO_WORKERS_LEFT

log = logging.getLogger(__name__)


def dashboard_hint(client, env: Mapping[str, str] = os.environ, login_host: str | None = None,
                   listens_on: str | None = None) -> str:
    """The dashboard's URL and, on a cluster, the ssh tunnel that reaches it from your machine.

    ``listens_on``: the host the dashboard was bound to, when the sweep chose it (a loopback
    address: only this node itself reaches it). The login host is ``login_host`` or, inside a
    SLURM job, ``$SLURM_SUBMIT_HOST``; without either the hint is the URL alone. A dashboard on a
    compute node's loopback is reached through the login node (``ssh -J``) to the node itself.
    """
    link = client.dashboard_link
    if not link:
        return "no Dask dashboard (bokeh is not installed)"
    url = urlsplit(link)
    node, port = url.hostname, url.port or 80
    if listens_on:  # Dask's link names the scheduler's address, which the dashboard may not be on
        node = listens_on
        link = url._replace(netloc=f"{node}:{port}").geturl()
    login_host = login_host or env.get("SLURM_SUBMIT_HOST")
    if not login_host:
        return f"Dask dashboard: {link}"
    user = env.get("USER") or getpass.getuser()
    tunnel = f"ssh -L 8787:{node}:{port} {user}@{login_host}"
    if node in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        tunnel = f"ssh -L 8787:localhost:{port} {user}@{login_host}"
        if "SLURMD_NODENAME" in env:  # this compute node's own loopback
            tunnel = f"ssh -J {user}@{login_host} -L 8787:localhost:{port} {user}@{env['SLURMD_NODENAME']}"
    return f"Dask dashboard: {link}  (from your machine: {tunnel} then open http://localhost:8787{url.path})"


def replacement(args: argparse.Namespace, scheduler: str) -> str:
    """What brings a worker when none is left mid-sweep, in the words of the line that says so."""
    if args.single_node:
        return "the LocalCluster to start its worker again"
    if args.slurm_cluster is not None:
        return ("a SLURM worker job's worker to join: its nanny restarts one that died, a requeued "
                "job's joins once SLURM runs it again (squeue shows them)")
    return f"a worker to join the scheduler at {scheduler} (dask worker {scheduler})"


@contextlib.contextmanager
def say_when_no_worker_is_left(client: Client, args: argparse.Namespace) -> Iterator[None]:
    """Meanwhile, say once when the last worker leaves (it died, was preempted, its job ended)
    and what the sweep waits for, and once when a worker joins again: Dask then reruns the lost
    tasks on it, without a word in this log.

    Inside one batch job (``--slurm-runner``) nothing starts a worker rank again: the sweep
    stops instead (:data:`~jobs.errors.NO_WORKERS_LEFT`, one line, checkpoints kept) rather
    than hold the job's nodes until its time limit.
    """
    waiting = False

    async def stop_the_sweep(last: str) -> None:
        await client.cancel([Future(key, client) for key in list(client.futures)], asynchronous=True, reason=NO_WORKERS_LEFT, msg=(
            f"every worker rank of this job is gone mid-sweep ({last} was the last: killed, out "
            "of memory? see the lines above) and nothing in the job starts one again"))

    async def on_event(event) -> None:  # the scheduler's "all" topic, in the client's loop
        nonlocal waiting
        message = event[1] if isinstance(event[1], dict) else {}
        action = message.get("action")
        if action == "remove-worker" and not waiting:
            with contextlib.suppress(Exception):  # the scheduler may be going too
                waiting = (await client.scheduler.identity(n_workers=0))["n_workers"] == 0
                if waiting and args.slurm_runner:
                    await stop_the_sweep(message.get("worker"))
                elif waiting:
                    log.info("no Dask worker is left (%s was the last); waiting for %s",
                             message.get("worker"), replacement(args, client.scheduler.address))
        elif action == "add-worker" and waiting:
            waiting = False
            log.info("Dask worker %s joined; the sweep goes on", message.get("worker"))

    client.subscribe_topic("all", on_event)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic("all")
