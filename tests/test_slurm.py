"""slurm/sweep.sh on a real one-node SLURM (scripts/slurm_local.sh; root, installs it the first time)."""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from slurm_fixtures import slurm_cluster, submit_and_wait  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# The node has at least 4 CPUs and 2 stand-in GPUs; sweep.sh's own requests are for a real GPU node.
SMALL = ["--cpus-per-task=1", "--mem-per-cpu=1G"]
OUTPUTS = ["results.csv", "goodnet.csv", "channel_order.csv", "manifest.json", "results.png"]


def test_gpu_job(slurm_cluster, tmp_path):
    _, log = submit_and_wait(["--gres=gpu:1", f"--output={tmp_path}/%j.out",
                              "--wrap", "echo GPUS=$CUDA_VISIBLE_DEVICES"], timeout=60)
    assert re.search(r"^GPUS=[01]$", log, re.M), log


def test_sweep_sh(slurm_cluster, demo, tmp_path):
    cache = Path(demo.model).parent.parent     # the demo the job's sweep will find: built once, here
    out = tmp_path / "out"
    answered = []

    def check_dashboard(log: str) -> None:
        match = re.search(r"Dask dashboard: (http://\S+)", log)
        if match and not answered:
            with urllib.request.urlopen(match.group(1), timeout=10) as response:
                answered.append((match.group(1), response.status))

    _, log = submit_and_wait([*SMALL, f"--export=ALL,FINE_PRUNING_CACHE={cache}",
                              f"--output={tmp_path}/%x-%j.out", "slurm/sweep.sh", "--out", str(out)],
                             timeout=480, while_running=check_dashboard)
    for name in OUTPUTS:
        assert (out / name).is_file(), f"no {name} in {out}; log tail:\n{log[-3000:]}"
    assert answered and answered[0][1] == 200, f"dashboard not seen answering; log tail:\n{log[-3000:]}"
    assert re.search(r"ssh -L 8787:\S+:\d+ \S+@\S+", log), "no ssh tunnel hint in the log"
    # One GPU per worker rank, none for the scheduler and the client.
    for rank, gpu in [(0, "none"), (1, "none"), (2, "0"), (3, "1")]:
        assert re.search(rf"SLURM rank {rank} on \S+: \w+, GPU {gpu}$", log, re.M), (rank, gpu)
    assert "srun exited with status 0" in log
