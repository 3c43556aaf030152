"""TLS for the sweep's own Dask clusters, and the private folder that carries their key.

Anyone who can reach a plain-TCP Dask scheduler (or worker, or nanny) can connect a Client and
run any Python as the cluster's owner. So every cluster the sweep starts uses TLS with a key and
a self-signed certificate made for that run alone (distributed's ``Security.temporary()``), and
``require_encryption``: every connection is encrypted and both ends must hold that certificate.

- ``--single-node``: the key stays in memory (the nanny hands it to its worker process).
- ``--slurm-cluster``: the sweep writes it (:func:`write_key_file`) to ``OUT/.dask`` (a
  :func:`private_folder`: 0700, the file 0600), which dask_jobqueue names in the worker jobs'
  ``dask worker --tls-*`` options; removed when the cluster closes.
- ``sbatch slurm/sweep.sh``: the scheduler rank (0) writes it to ``OUT/.dask/tls-JOB.RESTART.pem``
  (jobs.slurm.runner_key_file); the other ranks, on this node or others, read it from there.

Joining a running cluster (``--scheduler-*``) uses the security of the user's own Dask config;
a ``tcp://`` scheduler only with ``--allow-tcp`` or ``fine-pruning.allow-tcp`` (:func:`plain_tcp_problem`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import dask
from distributed.security import Security

from pruning.files import atomic_path

PRIVATE = 0o700    # OUT/.dask and what is under it: the owner only
SECRET = 0o600

PLAIN_TCP_RISK = ("anyone who can reach its port (or a worker's) can connect a Dask client and "
                  "run any Python as the cluster's owner, and read what the sweep sends")


def private_folder(path: Path) -> Path:
    """``path`` made (with its parents, which keep the user's umask) and set to mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE)
    return path


def new_security() -> Security:
    """A fresh key and self-signed certificate for one cluster, held in memory; every role
    (scheduler, worker, client) must present it, and plain TCP is refused."""
    return Security.temporary()  # (require_encryption=True)


def write_key_file(security: Security, path: Path) -> None:
    """The key and certificate of ``security`` in one PEM file only the owner can read, written
    under a temporary name and renamed: a rank that sees the file sees all of it."""
    private_folder(path.parent)
    with atomic_path(path, mode=SECRET) as temporary:
        temporary.write_text(security.tls_scheduler_key + security.tls_scheduler_cert)


def read_key_file(path: Path, wait_s: float) -> Security | None:
    """The Security of :func:`write_key_file`'s file, once it exists (None after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    pem = str(path)  # the certificate is also its own CA, and every role's
    return Security(require_encryption=True, tls_ca_file=pem,
                    **{f"tls_{role}_{part}": pem for role in ("client", "scheduler", "worker")
                       for part in ("cert", "key")})


def plain_tcp_problem(address: str, allowed: bool) -> str | None:
    """Why the sweep will not join the scheduler at ``address``, or None: a ``tcp://`` one is
    refused unless allowed (``--allow-tcp``, or dask config ``fine-pruning.allow-tcp``)."""
    if not address.startswith("tcp://") or allowed or dask.config.get("fine-pruning.allow-tcp", False):
        return None
    return (f"the Dask scheduler at {address} takes plain TCP: {PLAIN_TCP_RISK}; start it with "
            "TLS (dask scheduler --tls-ca-file/--tls-cert/--tls-key, and the same in your Dask "
            "config: distributed.comm.tls) or, to join it anyway, add --allow-tcp")
