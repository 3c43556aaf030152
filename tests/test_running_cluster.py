"""Joining a running Dask cluster (--scheduler-address, --scheduler-file): real schedulers and
workers, started here the way a user starts them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from distributed.security import Security

from conftest import DEMO_CHUNKS_AT_256, REPO, assert_same_outputs
from in_process import sweep_in_process
from jobs.security import write_key_file
from jobs.settings import load_config
from jobs.sweep import main

pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).parent / "dask")


def sweep(*argv, cwd=REPO, stderr=subprocess.PIPE, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.sweep", *map(str, argv)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env=os.environ | env)


def test_two_sweeps_sharing_a_cluster_keep_their_own_results(demo, demo_run, tmp_path, capsys, caplog, monkeypatch):
    """One sweep is a process of its own, the other runs in this process (``jobs.sweep.main``,
    its log as its stderr) once the first one's tasks are on the scheduler: both at once, on
    one cluster, and no second process importing TensorFlow."""
    data = Path(demo.data_dir)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            open(tmp_path / "swapped.log", "w") as log:
        with Client(cluster) as client:
            plugins_before = client.run_on_scheduler(worker_plugins)
            # The same model with validation and test swapped: other results, same task names.
            swapped = sweep("--model", demo.model, "--clean-valid", data / "cl/test.h5",
                            "--clean-test", data / "cl/valid.h5", "--poisoned-valid", data / "bd/bd_test.h5",
                            "--poisoned-test", data / "bd/bd_valid.h5", "--out", tmp_path / "swapped",
                            "--scheduler-address", cluster.scheduler_address, "--allow-tcp",
                            stderr=log)
            while swapped.poll() is None and not client.run_on_scheduler(tasks):
                time.sleep(0.05)
            assert swapped.poll() is None, (tmp_path / "swapped.log").read_text()[-3000:]  # still sweeping
        # Relative paths, from another folder than the workers' (they run in this one).
        with monkeypatch.context() as here:
            here.chdir(Path(demo.model).parent)
            mine = sweep_in_process("--model", Path(demo.model).name, "--data", ".", "--out", tmp_path / "mine",
                                    "--scheduler-address", cluster.scheduler_address, "--allow-tcp",
                                    capsys=capsys, caplog=caplog)
        swapped.wait(timeout=300)
        for returncode, err in ((mine.returncode, mine.stderr),
                                (swapped.returncode, (tmp_path / "swapped.log").read_text())):
            assert returncode == 0, err[-3000:]
            assert (f"WARNING jobs.cluster: joining the Dask scheduler at {cluster.scheduler_address} over "
                    "plain TCP (--allow-tcp): anyone who can reach its port") in err, err[-3000:]
        with Client(cluster) as client:  # the user's cluster is left as it was
            assert client.run_on_scheduler(worker_plugins) == plugins_before
    assert_same_outputs(tmp_path / "mine", demo_run)
    ours, theirs = (json.loads((tmp_path / name / "manifest.json").read_text())
                    for name in ("mine", "swapped"))
    assert (tmp_path / "swapped" / "results.csv").read_bytes() != (demo_run / "results.csv").read_bytes()
    assert theirs["inputs"]["clean_valid"]["path"].endswith("cl/test.h5")
    # made absolute for the workers (the manifest resolves links: the cache may be one)
    assert ours["inputs"]["model"]["path"] == str(Path(demo.model).resolve())


@pytest.mark.parametrize("flag", ["--scheduler-address", "--scheduler-file"])
def test_a_plain_tcp_scheduler_is_refused_unless_the_user_says_so(flag, capsys, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text('{"address": "tcp://127.0.0.1:8786"}')
    where = "tcp://127.0.0.1:8786" if flag == "--scheduler-address" else str(scheduler_file)
    assert main([flag, where, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the Dask scheduler at tcp://127.0.0.1:8786 takes plain TCP: anyone who "
                          "can reach its port") and err.endswith("add --allow-tcp"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def tasks(dask_scheduler) -> int:
    """How many tasks the scheduler holds (for the clients that submitted them)."""
    return len(dask_scheduler.tasks)


def worker_plugins(dask_scheduler) -> list[str]:
    """The plugins a scheduler installs on every worker that joins it."""
    return sorted(dask_scheduler.worker_plugins)


@pytest.mark.parametrize("address, says", [
    ("http://127.0.0.1:8787/status", "not a Dask protocol"),   # the dashboard's URL
    ("tcp://127.0.0.1:8786x", "invalid literal"),
])
def test_a_malformed_scheduler_address_is_bad_input(address, says, capsys, tmp_path):
    assert main(["--scheduler-address", address, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --scheduler-address {address}: ") and says in err, err
    assert "tcp://HOST:PORT" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_unreachable_scheduler_is_one_line(demo, tmp_path, capsys, caplog):
    """In this process (``jobs.sweep.main``; its log, tracebacks included, as its stderr)."""
    import dask
    load_config()  # (once per process, it refreshes Dask's config: before the setting)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT
        run = sweep_in_process("--model", demo.model, "--data", demo.data_dir, "--out", tmp_path / "out",
                               "--scheduler-address", "tcp://127.0.0.1:1", "--allow-tcp", capsys=capsys, caplog=caplog)
    err = run.stderr
    assert run.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        "error: could not reach the Dask scheduler at tcp://127.0.0.1:1: "), err[-3000:]
    assert "Traceback" not in err


def test_waits_for_a_worker_and_a_lost_scheduler_is_one_line_that_says_how_to_resume(demo, tmp_path):
    """The user's cluster uses TLS; the sweep joins it with the user's own Dask config."""
    scheduler_file = tmp_path / "scheduler.json"
    log = tmp_path / "sweep.log"
    pem = tmp_path / "tls" / "cluster.pem"
    write_key_file(Security.temporary(), pem)
    tls = ["--tls-ca-file", str(pem), "--tls-cert", str(pem), "--tls-key", str(pem)]
    config = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(pem), "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(pem),
              "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(pem)}
    scheduler = subprocess.Popen([DASK, "scheduler", "--scheduler-file", str(scheduler_file), "--protocol", "tls",
                                  "--port", "0", "--dashboard-address", ":0", *tls],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        with open(log, "w") as stderr:
            run = sweep("--model", demo.model, "--data", demo.data_dir, "--out", tmp_path / "out",
                        "--chunk-rows", "256", "--scheduler-file", scheduler_file, stderr=stderr, **config)
            wait_for(lambda: "waiting for a worker to join the scheduler at tls://" in log.read_text(), run)
            worker = subprocess.Popen([DASK, "worker", "--scheduler-file", str(scheduler_file),
                                       "--nthreads", "1", *tls], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            checkpoints = tmp_path / "out" / "checkpoints"
            wait_for(lambda: len(list(checkpoints.glob("chunk-*.json"))) >= 3, run)
            # The scheduler unpickled the sweep's tasks (pruning.sweep, B's ModelSpec in
            # pruning.models) and imported no TensorFlow for them.
            security = Security(tls_ca_file=str(pem), tls_client_cert=str(pem), tls_client_key=str(pem),
                                require_encryption=True)
            with Client(scheduler_file=str(scheduler_file), security=security, timeout=60) as client:
                loaded = client.run_on_scheduler(lambda: [m for m in ("keras", "tensorflow", "pruning.models",
                                                                      "pruning.sweep") if m in sys.modules])
            assert loaded == ["pruning.models", "pruning.sweep"]
            scheduler.send_signal(signal.SIGKILL)
            run.wait(timeout=120)
        last = log.read_text().strip().splitlines()[-1]
        assert run.returncode == 1, last
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # distributed's, closing
        kept = len(list(checkpoints.glob("chunk-*.json")))
        assert 3 <= kept < DEMO_CHUNKS_AT_256, kept  # the scheduler was lost mid-sweep
        assert last.startswith("error: lost the connection to the Dask scheduler (") and last.endswith(
            f"{checkpoints} holds {kept} finished chunks of rows: the same command resumes from "
            "them once the cluster is back"), last
    finally:
        for process in (scheduler, worker):
            if process is not None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("without_project", ["scheduler", "worker"])
def test_a_cluster_that_cannot_import_the_project_is_one_line(demo, tmp_path, without_project, capsys, caplog):
    """A real scheduler and workers, each a `dask` command; the sweep that joins them runs in
    this process (``jobs.sweep.main``): its exit status and last line are what it says."""
    import dask
    scheduler_file = tmp_path / "scheduler.json"
    hide = {role: ["--preload", str(REPO / "tests" / "no_project.py")] if role == without_project
            else [] for role in ("scheduler", "worker")}
    started = [subprocess.Popen([DASK, "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
                                 "--dashboard-address", ":0", *hide["scheduler"]], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)]
    try:
        for extra in ([], hide["worker"]):  # one good worker, and one that may not be
            started.append(subprocess.Popen([DASK, "worker", "--scheduler-file", str(scheduler_file),
                                             "--nthreads", "1", *extra], cwd=tmp_path,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        # plain TCP allowed by the setting (what DASK_FINE_PRUNING__ALLOW_TCP=true sets), not --allow-tcp
        load_config()  # (once per process, it refreshes Dask's config: before the setting)
        with dask.config.set({"fine-pruning.allow-tcp": True}):
            run = sweep_in_process("--model", demo.model, "--data", demo.data_dir, "--out", tmp_path / "out",
                                   "--scheduler-file", scheduler_file, capsys=capsys, caplog=caplog)
        err = run.stderr
    finally:
        for process in started:
            process.kill()
            process.wait()
    last = err.strip().splitlines()[-1]
    assert run.returncode == 1, err[-3000:]
    says = {"scheduler": "error: the Dask scheduler at tcp://",
            "worker": "error: 1 of the 2 Dask workers cannot import this project (tcp://"}
    # the scheduler is checked with what unpickling the task graph imports, a worker with the tasks' runner
    missing = {"scheduler": "pruning", "worker": "jobs"}[without_project]
    assert last.startswith(says[without_project]), last
    assert last.endswith(f"No module named '{missing}'); start the scheduler and workers from this "
                         "project's environment, at the same version (docs/dask-cluster.md)"), last
    assert not (tmp_path / "out").exists()


def wait_for(condition, run: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, "the sweep ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
