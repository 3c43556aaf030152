"""Another user of this machine attacks a running sweep: every TCP port its processes listen on
gets a plain ``distributed.Client`` (tcp://) and two tls:// Clients without the run's
credentials (its own self-signed certificate; no certificate and no checks at all), and each
tries to submit a task.

    from attack import attack, attacker, listening
    ready = attacker(wait_s=4)                    # started early: it imports distributed meanwhile
    ports = listening(processes)                  # once the run's cluster is up
    tried = attack(ready, ports)                  # {"tcp://127.0.0.1:4321": "what happened", ...}
    assert ports <= listening(processes)          # still up: the attack met a live run

The attacker is this file run as a script: it reads ``HOST:PORT`` lines on stdin; an attempt on
a port that is not Dask's (a dashboard) may never answer, so each is a daemon thread given
``wait_s`` in all (a busy worker may take seconds to answer), and the script prints one JSON object and exits.
"""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time

import psutil

SUBMITTED = "SUBMITTED"  # the start of what an attempt that ran a task says


def listening(processes: list[psutil.Process]) -> set[tuple[str, int]]:
    """(host, port) of every TCP socket these processes listen on (0.0.0.0/:: as loopback)."""
    found = set()
    for process in processes:
        try:
            connections = process.net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                host = connection.laddr.ip
                found.add(("127.0.0.1" if host in ("0.0.0.0", "::") else host, connection.laddr.port))
    return found


def attacker(wait_s: float) -> subprocess.Popen:
    """The attacker's process, ready for :func:`attack` once it has imported distributed."""
    return subprocess.Popen([sys.executable, __file__, str(wait_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def attack(process: subprocess.Popen, ports: set[tuple[str, int]]) -> dict[str, str]:
    """Every attempt on ``ports`` and what came of it (see the module's docstring)."""
    out, err = process.communicate("".join(f"{host}:{port}\n" for host, port in sorted(ports)), timeout=120)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def _try(address: str, security, tried: dict[str, str], name: str, wait_s: float) -> None:
    from distributed import Client
    try:
        with Client(address, security=security, timeout=wait_s / 2) as client:
            tried[name] = f"{SUBMITTED}: ran in pid {client.submit(os.getpid, pure=False).result(timeout=5)}"
    except BaseException as error:  # noqa: BLE001 (whatever it is, it did not run the task)
        tried[name] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _no_credentials():
    """A tls:// client that presents no certificate and checks none."""
    from distributed.security import Security

    class NoCredentials(Security):
        def get_connection_args(self, role):
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            return {"ssl_context": context, "require_encryption": False, "extra_conn_args": {}}
    return NoCredentials()


def main(wait_s: float) -> None:
    from distributed.security import Security
    addresses = sys.stdin.read().split()
    tried: dict[str, str] = {}
    threads = []
    for address in addresses:
        for name, security in [(f"tcp://{address}", None),
                               (f"tls://{address} own certificate", Security.temporary()),
                               (f"tls://{address} no certificate", _no_credentials())]:
            tried[name] = f"no answer in {wait_s} s"
            threads.append(threading.Thread(target=_try, daemon=True,
                                            args=(name.split()[0], security, tried, name, wait_s)))
    deadline = time.monotonic() + wait_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    print(json.dumps(tried), flush=True)
    os._exit(0)  # hung attempts (daemon threads, their Clients' loops) are left behind


if __name__ == "__main__":
    main(float(sys.argv[1]))
