"""A real one-node SLURM for tests (scripts/slurm_local.sh) and a helper to run batch jobs on it.

    from slurm_fixtures import slurm_cluster, submit_and_wait   # noqa: F401 (fixture)

    def test_something(slurm_cluster, tmp_path):
        job_id, log = submit_and_wait(["--wrap", "hostname"], timeout=60)

The session fixture starts SLURM (installing it with apt-get the first time) and stops it at the
end unless it was already running. It skips only where it cannot work: not root, or SLURM not
installed and no apt-get; a failing start is a test error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from conftest import REPO

SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: scripts/slurm_local.sh installs and starts SLURM (run the tests as root)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def _slurm_local(command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM_LOCAL), command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM running on this machine: one node, partition `debug`, Gres=gpu:2 (stand-ins)."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    was_running = shutil.which("sinfo") is not None and _slurm_local("status").returncode == 0
    started = time.monotonic()
    result = _slurm_local("start")
    if result.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh start failed:\n{result.stdout}{result.stderr}")
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    yield SimpleNamespace(node=node, partition="debug", gpus=2,
                          start_output=result.stdout, start_s=time.monotonic() - started)
    if not was_running:
        result = _slurm_local("stop", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs are kept an hour by slurm_local.sh)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def _read(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except FileNotFoundError:
        return ""


def submit_and_wait(args: list[str], timeout: float, *, cwd: Path = REPO,
                    expect: str | None = "COMPLETED",
                    while_running: Callable[[str], None] | None = None) -> tuple[str, str]:
    """`sbatch ARGS` from ``cwd``; wait until the job ends; return (job id, its log).

    ``while_running(log_so_far)`` is called about five times a second while the job runs. The job's
    final state must be ``expect`` (None: any); past ``timeout`` seconds it is cancelled. Either
    failure shows the log's tail.
    """
    # from a shell with this environment activated, as a user submits (sbatch passes it to the job)
    activated = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    submitted = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                               env=activated)
    assert submitted.returncode == 0, f"sbatch {' '.join(args)}: {submitted.stderr.strip()}"
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in FINISHED:
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {state} after {timeout:.0f} s; log tail:\n"
                        + _read(info.get("StdOut"))[-4000:])
        if state == "RUNNING" and while_running is not None:
            while_running(_read(info.get("StdOut")))
        time.sleep(0.2)  # a job's end is seen within 0.2 s (scontrol answers in milliseconds)
    log = _read(info.get("StdOut"))
    if expect is not None and state != expect:
        pytest.fail(f"job {job_id} ended {state} (exit {info.get('ExitCode')}), expected {expect}; "
                    f"log tail:\n{log[-4000:]}")
    return job_id, log
