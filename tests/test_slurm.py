"""slurm/sweep.sh on a real one-node SLURM (scripts/slurm_local.sh; root, installs it the first time)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from attack import SUBMITTED, attack, attacker, listening
from conftest import DEMO_CHUNKS_AT_256, REPO, assert_same_outputs
from slurm_fixtures import slurm_cluster, submit_and_wait  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# The node has at least 4 CPUs and 2 stand-in GPUs; sweep.sh's own requests are for a real GPU node.
SMALL = ["--cpus-per-task=1", "--mem-per-cpu=1G"]
OUTPUTS = ["results.csv", "goodnet.csv", "channel_order.csv", "manifest.json", "results.png"]


def test_gpu_job(slurm_cluster, tmp_path):
    _, log = submit_and_wait(["--gres=gpu:1", f"--output={tmp_path}/%j.out",
                              "--wrap", "echo GPUS=$CUDA_VISIBLE_DEVICES"], timeout=60)
    assert re.search(r"^GPUS=[01]$", log, re.M), log


def modes(folder: Path) -> dict[str, int]:
    """The permission bits of ``folder`` and everything under it, by path relative to it."""
    return {str(path.relative_to(folder)): path.stat().st_mode & 0o777 for path in [folder, *folder.rglob("*")]}


def sweep_job(demo, tmp_path, out, *extra):
    cache = Path(demo.model).parent.parent
    return [*SMALL, f"--export=ALL,FINE_PRUNING_CACHE={cache}", f"--output={tmp_path}/%x-%j.out",
            "slurm/sweep.sh", "--out", str(out), "--chunk-rows", "256", *extra]


def with_export_none(job: list[str]) -> list[str]:
    """``job`` submitted with --export=NONE, as many sites advise: none of this shell's environment
    (PATH, venv), and srun passes that on to the job's steps unless told otherwise. sweep.sh then
    finds the submit folder's .venv (this checkout's, which must have one)."""
    return [option.replace("--export=ALL,", "--export=NONE,") if option.startswith("--export=") else option
            for option in job]


def assert_gpus(log: str, workers: int) -> None:
    """One GPU per worker rank (the node's two stand-ins, in rank order), none for the scheduler
    (rank 0) and the client (rank 1), as the job's log says."""
    for rank, gpu in [(0, "none"), (1, "none"), *((2 + i, str(i)) for i in range(workers))]:
        assert re.search(rf"SLURM rank {rank} on \S+: \w+, GPU {gpu}$", log, re.M), (rank, gpu)


def chunks_done(out: Path) -> int:
    """Checkpointed chunks of rows (each with every prefix); the demo at --chunk-rows 256 (every
    sweep job here) has ``DEMO_CHUNKS_AT_256``."""
    return len(list((out / "checkpoints").glob("chunk-*.json")))


@pytest.fixture(scope="module")
def cancelled_then_resubmitted(slurm_cluster, demo, tmp_path_factory):
    """One sweep job scancelled mid-sweep, then the same sweep resubmitted, which SLURM's time
    limit warning reaches mid-sweep. The resubmitted job is also the job test_sweep_sh checks
    (how a user submits, its dashboard, USR1 to its steps, port 8787 taken): the three tests
    below share one full run; test_sweep_sh no longer runs one of its own."""
    tmp_path = tmp_path_factory.mktemp("cancelled-then-resubmitted")
    out = tmp_path / "out"
    cache = Path(demo.model).parent.parent     # the demo the jobs' sweep will find: built once, here
    cancelled, scheduler_files = [], []

    def cancel_once_started(log: str) -> None:
        if not cancelled and chunks_done(out) >= 3:
            job = re.search(r"job (\d+) ", log).group(1)
            # scancel signals the ranks one at a time: let the scheduler rank's come first.
            for process in runner_ranks(out, rank=0):
                scheduler_files.extend(mapped.path for mapped in process.memory_maps())  # its libraries
                process.terminate()
            subprocess.run(["scancel", job], check=True)
            cancelled.append(chunks_done(out))

    # --export=NONE (as is test_a_worker_rank_killed_mid_sweep_changes_nothing's job, which runs to
    # the end). One worker rank: a second would only import TensorFlow and load the model for the
    # few chunks before the cancel.
    job = ["--ntasks=3", *with_export_none(sweep_job(demo, tmp_path, out))]
    _, cancelled_log = submit_and_wait(job, timeout=480, expect="CANCELLED", while_running=cancel_once_started)
    done = chunks_done(out)
    results_after_cancel = (out / "results.csv").exists()
    signalled, answered, bound = [], [], set()

    def check_dashboard(log: str) -> None:
        match = re.search(r"Dask dashboard: (http://\S+)", log)
        if match and not answered:
            with urllib.request.urlopen(match.group(1), timeout=10) as response:
                answered.append((match.group(1), response.status))
            # USR1 to the job's steps, as a --signal=USR1@600 without B: sends it: no rank dies of it
            job = re.search(r"job (\d+) ", log).group(1)
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            bound.update(listening([process for rank in range(3) for process in runner_ranks(out, rank, job)]))

    def time_limit_near(log: str) -> None:  # what SLURM's --signal=B:USR1@300 sends
        if not signalled and chunks_done(out) > done:  # mid-sweep: this job finished a chunk
            job = re.search(r"job (\d+) ", log).group(1)
            subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
            signalled.append(chunks_done(out))

    def while_resubmitted(log: str) -> None:
        check_dashboard(log)
        time_limit_near(log)

    # Resubmitted as a user submits (test_sweep_sh): from the scratch folder by the script's path,
    # --out relative to it, the job's log by the script's default name, with port 8787 taken.
    # One worker rank here too: test_a_worker_rank_killed_mid_sweep_changes_nothing runs
    # sweep.sh's default of four tasks (two worker ranks, a GPU each).
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):   # if something else holds it, it is taken all the same
            held.enter_context(socket.create_server(("", 8787)))
        job_id, resubmitted_log = submit_and_wait(
            ["--ntasks=3", *SMALL, f"--export=ALL,FINE_PRUNING_CACHE={cache},MAX_REQUEUES=0",
             str(REPO / "slurm" / "sweep.sh"),
             "--out", "./out", "--chunk-rows", "256"],
            timeout=480, while_running=while_resubmitted, cwd=tmp_path)
    return SimpleNamespace(folder=tmp_path, out=out, cancelled=cancelled, done=done, cancelled_log=cancelled_log,
                           scheduler_files=scheduler_files,
                           results_after_cancel=results_after_cancel, signalled=signalled,
                           job_id=job_id, resubmitted_log=resubmitted_log, answered=answered, bound=bound)


def test_sweep_sh(cancelled_then_resubmitted, demo_run):
    """The fixture's resubmitted job, submitted as a user submits: from another folder (a scratch
    folder) by the script's path, from a shell with this environment activated. The relative
    --out and the job's log (the script's default name) are that folder's; the slash in an
    argument is on purpose: SLURM's record of the command puts the arguments after the path.
    While it runs: its dashboard is opened, USR1 goes to its steps (as a --signal=USR1@600
    without B: sends it: no rank dies of it), and port 8787 is taken on the node (another job's
    dashboard): the dashboard moves, without distributed's 'Perhaps you already have a cluster
    running?' in the log."""
    run = cancelled_then_resubmitted
    log, out, job_id, answered, bound = run.resubmitted_log, run.out, run.job_id, run.answered, run.bound
    assert "already in use" not in log and "Perhaps" not in log, log[:3000]
    assert (run.folder / f"fine-pruning-{job_id}.out").is_file()
    assert f"python: {Path(sys.executable).parent}/python\n" in log, log[:2000]  # the submitting shell's
    for name in OUTPUTS:
        assert (out / name).is_file(), f"no {name} in {out}; log tail:\n{log[-3000:]}"
    assert answered and answered[0][1] == 200, f"dashboard not seen answering; log tail:\n{log[-3000:]}"
    # on the node's loopback only, through the login node to the node: ssh -J login -L ... node
    tunnel = re.search(r"ssh -J \S+@\S+ -L 8787:localhost:(?!8787 )(\d+) \S+@\S+", log)
    assert tunnel, "no ssh tunnel hint to the port taken instead"
    assert answered[0][0] == f"http://127.0.0.1:{tunnel.group(1)}/status"
    assert [host for host, port in bound if port == int(tunnel.group(1))] == ["127.0.0.1"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "results.csv").stat().st_mode & 0o777 == 0o666 & ~umask  # outputs: the user's umask
    assert_gpus(log, workers=1)  # (two worker ranks: test_a_worker_rank_killed_mid_sweep_changes_nothing)
    assert "srun exited with status 0" in log and "User defined signal" not in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]  # workers retire before the scheduler goes
    # distributed's warnings only (jobs/jobqueue.yaml): no line for every connection
    assert not re.search(r" - distributed\.\S+ - INFO - ", log), log[-5000:]
    assert len(re.findall(r" INFO pruning\.inputs: B: \S+ \(\d+ classes\)", log)) == 1, log[:3000]  # not again from --check
    assert_same_outputs(out, demo_run)  # byte for byte what --single-node wrote


def test_scancel_mid_sweep_then_resubmit_resumes(cancelled_then_resubmitted, demo_run):
    run = cancelled_then_resubmitted
    done, log, chunks = run.done, run.cancelled_log, DEMO_CHUNKS_AT_256
    assert run.cancelled and done < chunks, f"cancelled after {done} of {chunks} chunks: not mid-sweep"
    assert not run.results_after_cancel
    # The client rank still stops in order and says what the same command resumes from,
    # before SLURM's SIGKILL (KillWait later).
    line = re.search(r"^stopped by SIGTERM; (\S+) holds (\d+) finished chunks of rows: the same "
                     r"command resumes from them$", log, re.M)
    assert line and int(line.group(2)) == done, log[-3000:]
    assert "Killed" not in log and "Traceback" not in log, log[-3000:]
    # The scheduler rank had unpickled the tasks of 3 finished chunks, and loaded no TensorFlow for them.
    assert run.scheduler_files and not [path for path in run.scheduler_files if "tensorflow" in path]
    log = run.resubmitted_log
    reused = re.search(rf"reused from checkpoints: (\d+) of {chunks} chunks \((\d+) prefix evaluations\)", log)
    assert reused and int(reused.group(1)) >= done > 0 and int(reused.group(2)) == 61 * int(reused.group(1)), log[-3000:]
    assert_same_outputs(run.out, demo_run)


def test_time_limit_signal_past_max_requeues_lets_the_job_finish(cancelled_then_resubmitted, demo_run):
    """The resubmitted job of the fixture above gets SLURM's time limit warning mid-sweep."""
    run = cancelled_then_resubmitted
    log = run.resubmitted_log
    assert run.signalled and run.signalled[0] < DEMO_CHUNKS_AT_256, run.signalled  # before its last chunk
    assert "already requeued 0 times (MAX_REQUEUES=0): not requeueing again" in log, log[-3000:]
    assert "srun exited with status 0" in log
    assert_same_outputs(run.out, demo_run)


def runner_ranks(out: Path, rank: int, job: str | None = None) -> list[psutil.Process]:
    """The ``python -m jobs.sweep --slurm-runner`` processes of SLURM rank ``rank`` writing to
    ``out`` (or of ``job``, whatever its --out)."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        cmdline, environ = process.info["cmdline"] or [], process.info["environ"] or {}
        # cmdline[1:3]: not the srun that started them, whose SLURM_PROCID (the batch step's) is 0
        if (cmdline[1:3] == ["-m", "jobs.sweep"] and "--slurm-runner" in cmdline
                and (environ.get("SLURM_JOB_ID") == job if job else str(out) in cmdline)
                and environ.get("SLURM_PROCID") == str(rank)):
            found.append(process)
    return found


def signal_rank_mid_sweep(out: Path, rank: int, signum: int = signal.SIGKILL):
    """A ``while_running`` callback that, once 3 chunks are checkpointed, sends ``signum`` to
    SLURM rank ``rank``'s processes, once; and the list of chunks done when it did."""
    sent = []

    def send(log: str) -> None:
        if sent or chunks_done(out) < 3:
            return
        for process in runner_ranks(out, rank):
            process.send_signal(signum)
            sent.append(chunks_done(out))

    return send, sent


def test_a_worker_rank_killed_mid_sweep_changes_nothing(slurm_cluster, demo, demo_run, tmp_path):
    """Also: before that, another user of the node attacks every port of the job's ranks, and
    OUT/.dask is the owner's alone. Submitted with --export=NONE: the job's steps still get the
    environment sweep.sh found, and the sweep ends with the reference outputs."""
    out = tmp_path / "out"
    kill_a_worker, killed = signal_rank_mid_sweep(out, rank=2)
    ready, attacked = attacker(wait_s=12), {}  # a worker rank importing TensorFlow answers slowly

    def attack_then_kill_a_worker(log: str) -> None:
        if not attacked and "Dask dashboard: " in log:  # the client rank's: every rank is up
            job = re.search(r"job (\d+) ", log).group(1)
            ranks = [process for rank in range(4) for process in runner_ranks(out, rank, job)]
            ports = listening(ranks)
            attacked.update(ranks=len(ranks), ports=ports, modes=modes(out / ".dask"))
            # The attack waits up to 12 s for slow ranks while the sweep goes on: it runs beside
            # this callback, and the ports are sampled 0.5 s into it, before any kill.
            attacked["threads"] = [
                threading.Thread(target=lambda: attacked.update(tried=attack(ready, ports))),
                threading.Timer(0.5, lambda: attacked.update(still_listening=listening(ranks)))]
            for thread in attacked["threads"]:
                thread.start()
        if "still_listening" in attacked:
            kill_a_worker(log)

    _, log = submit_and_wait(with_export_none(sweep_job(demo, tmp_path, out)), timeout=480, expect=None,
                             while_running=attack_then_kill_a_worker)
    for thread in attacked.get("threads", []):
        thread.join()
    assert killed and killed[0] < DEMO_CHUNKS_AT_256, "no worker rank was killed mid-sweep"
    assert "outputs in" in log, log[-3000:]
    assert_same_outputs(out, demo_run)
    assert_gpus(log, workers=2)  # sweep.sh's default four tasks
    # No one without the job's certificate can use a port of its ranks (scheduler, workers)
    assert attacked["ranks"] == 4 and len(attacked["ports"]) >= 4, attacked
    assert attacked["ports"] <= attacked["still_listening"], attacked  # the attack met the live job
    tried = "\n".join(f"{name}: {what}" for name, what in attacked["tried"].items())
    assert SUBMITTED not in tried, tried
    # The scheduler refused the stranger's certificate. (Worker ranks busy importing TensorFlow may
    # not finish a TLS handshake in the time given, so they are not counted on to answer.)
    assert "TLS certificate does not match" in tried, tried
    # OUT/.dask and what is in it (the job's key, its scheduler file): the owner's alone
    assert set(attacked["modes"].values()) == {0o700, 0o600}, attacked["modes"]
    assert any(name.startswith("tls-") for name in attacked["modes"]), attacked["modes"]
    assert not list((out / ".dask").glob("tls-*")) and set(modes(out / ".dask").values()) <= {0o700, 0o600}


def test_the_last_worker_rank_killed_mid_sweep_ends_the_job_with_one_line(slurm_cluster, demo, tmp_path):
    """Nothing in a batch job starts a worker rank again: with none left, the sweep stops at
    once (its checkpoints kept) instead of holding the nodes until the job's time limit."""
    out = tmp_path / "out"
    kill_the_worker, killed = signal_rank_mid_sweep(out, rank=2)
    _, log = submit_and_wait(["--ntasks=3", *sweep_job(demo, tmp_path, out)], timeout=300,
                             expect="FAILED", while_running=kill_the_worker)  # one worker rank
    assert killed and killed[0] < DEMO_CHUNKS_AT_256, "the worker rank was not killed mid-sweep"
    line = re.search(r"^error: every worker rank of this job is gone mid-sweep \(\S+ was the last: "
                     r"killed, out of memory\? see the lines above\) and nothing in the job starts "
                     r"one again; (\S+) holds (\d+) finished chunks of rows: the same command "
                     r"resumes from them$", log, re.M)
    assert line and line.group(1) == str(out / "checkpoints"), log[-3000:]
    assert int(line.group(2)) == chunks_done(out) < DEMO_CHUNKS_AT_256
    assert "Traceback" not in log, log[-3000:]


def test_ctrl_c_on_the_client_rank_stops_the_run_and_the_job(slurm_cluster, demo, tmp_path):
    """SIGINT to the client rank (a Ctrl-C under an interactive srun) stops the run as Ctrl-C
    does anywhere; the worker retires and the scheduler closes, which ends the job. (One worker
    rank: a second would only import TensorFlow and load the model for the few chunks before
    the stop.)"""
    out = tmp_path / "out"
    interrupt_the_client, interrupted = signal_rank_mid_sweep(out, rank=1, signum=signal.SIGINT)
    _, log = submit_and_wait(["--ntasks=3", *sweep_job(demo, tmp_path, out)], timeout=480, expect="FAILED",
                             while_running=interrupt_the_client)
    assert interrupted
    line = re.search(r"^interrupted; (\S+) holds (\d+) finished chunks of rows: the same command "
                     r"resumes from them$", log, re.M)
    assert line and line.group(1) == str(out / "checkpoints"), log[-3000:]
    assert int(line.group(2)) == chunks_done(out) < DEMO_CHUNKS_AT_256
    assert not (out / "results.csv").exists()
    assert "srun exited with status 130" in log and "Traceback" not in log, log[-3000:]


def test_a_client_rank_refused_after_the_check_ends_the_job(slurm_cluster, demo, tmp_path):
    """--out taken between sweep.sh's --check and the client rank's own (a second job on the
    same --out): the client rank's one line ends the whole job, not the scheduler's idle
    timeout (15 minutes) later."""
    out = tmp_path / "out"
    out.mkdir()
    held = []
    # The client rank (SLURM rank 1 of the srun step) waits 5 s before it starts, so the lock is
    # surely taken by then (this is polled every 0.2 s): Python reads sitecustomize at start-up.
    slow = tmp_path / "slow_client"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, sys, time\nif os.environ.get('SLURM_PROCID') == '1' and 'SLURM_STEP_ID' in os.environ:\n"
        "    print('client rank: waiting 5 s', file=sys.stderr)\n    time.sleep(5)\n")
    job = [option + f",PYTHONPATH={slow}" if option.startswith("--export=") else option
           for option in sweep_job(demo, tmp_path, out)]

    def take_out_after_the_check(log: str) -> None:
        if not held and "inputs OK" in log:
            lock = open(out / ".sweep.lock", "a+b")
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.write(b"host test pid 1\n")
            lock.flush()
            held.append(lock)

    try:
        _, log = submit_and_wait(job, timeout=300, expect="FAILED", while_running=take_out_after_the_check)
    finally:
        for lock in held:
            lock.close()
    assert "client rank: waiting 5 s" in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by a running sweep (host test pid 1)" in errors[0], log[-3000:]
    assert "srun exited with status 2" in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("options, flags, says", [
    (["--ntasks=2"], [], "the job has 2 tasks; it needs at least 3"),
    ([], ["--single-node"], "--single-node: this script chooses where the sweep runs"),
    ([], ["--workers", "4"], "--workers: this script's workers are its SLURM tasks after the first two"),
    ([], ["--threads-per-worker", "0"], "--workers and --threads-per-worker must be at least 1"),
])
def test_bad_job_options_fail_once_before_srun(slurm_cluster, tmp_path, options, flags, says):
    out = tmp_path / "out"
    _, log = submit_and_wait([*SMALL, *options, f"--output={tmp_path}/%x-%j.out", "slurm/sweep.sh",
                              "--out", str(out), *flags], timeout=120, expect="FAILED")
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and says in errors[0], log
    assert "srun" not in log.replace("--slurm-runner", "") and "Traceback" not in log, log
    assert not out.exists()


def test_a_time_limit_within_the_warning_turns_requeueing_off(slurm_cluster, tmp_path):
    """--time=6: SLURM's 5-minute warning would come a minute in, and each requeue would
    restart the job with nothing done. (A bad flag then ends the job in seconds.)"""
    _, log = submit_and_wait([*SMALL, "--time=6", f"--output={tmp_path}/%x-%j.out", "slurm/sweep.sh",
                              "--out", str(tmp_path / "out"), "--threads-per-worker", "0"],
                             timeout=120, expect="FAILED")
    assert ("sweep.sh: time limit 00:06:00 is within a minute of the 5-minute warning: the job "
            "will not requeue itself") in log, log
