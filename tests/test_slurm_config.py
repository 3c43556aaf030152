"""SLURM settings without a cluster: the yaml in dask.config, the job scripts, the batch script."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import dask
import pytest

from conftest import REPO, cluster_args
from jobs import cluster, monitor, settings

SWEEP_SH = REPO / "slurm" / "sweep.sh"


@pytest.fixture
def slurm_config(monkeypatch):
    """Our yaml loaded; dask.config rebuilt from files + environment after the test."""
    settings.load_config()
    yield
    monkeypatch.undo()
    dask.config.refresh()


def worker_job_script() -> list[str]:
    """The worker job script that ``--slurm-cluster`` submits (``--out`` /tmp/out)."""
    from dask_jobqueue import SLURMCluster
    from jobs.settings import worker_job_options
    options = worker_job_options(SimpleNamespace(out="/tmp/out"))
    with SLURMCluster(scheduler_options={"dashboard_address": ":0"}, **options) as slurm:
        return slurm.job_script().splitlines()


def directives(lines: list[str]) -> list[str]:
    return [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]


def test_worker_job_script_from_yaml(slurm_config):
    with dask.config.set({"jobqueue.slurm.queue": "gpu", "jobqueue.slurm.account": "proj42"}):
        lines = worker_job_script()
    found = directives(lines)
    for expected in ["-J fine-pruning-worker", "-p gpu", "-A proj42", "-t 04:00:00", "--mem=16G",
                     "--cpus-per-task=4", "--gres=gpu:1"]:
        assert expected in found, (expected, lines)
    assert "export TF_FORCE_GPU_ALLOW_GROWTH=true" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "--nthreads 2" in worker and "--death-timeout 120" in worker


def test_a_site_prologue_keeps_the_workers_environment(slurm_config):
    """A site's prologue (its modules, its environment) replaces the yaml's list; the worker
    still gets TensorFlow's allow-growth and no memory pause (it would never resume), after it."""
    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load cuda"]}):
        lines = worker_job_script()
    worker = next(i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line)
    assert lines[worker - 3:worker] == ["module load cuda", "export TF_FORCE_GPU_ALLOW_GROWTH=true",
                                        "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False"]
    assert "-e /tmp/out/.dask/worker-logs/fine-pruning-worker-%J.err" in directives(lines)


def test_worker_jobs_get_the_distributed_settings_here_before_a_site_prologue(slurm_config):
    """jobs/jobqueue.yaml's distributed: section (ours, or the site's value where it sets one)
    is exported to the worker job, before the site's prologue, which may change it."""
    from jobs.settings import distributed_settings
    with dask.config.set({"distributed.comm.timeouts.connect": "90s",
                          "jobqueue.slurm.job-script-prologue": ["module load cuda"]}):
        lines = worker_job_script()
        settings = dask.config.get("distributed")
    exported = [line for line in lines if line.startswith("export DASK_DISTRIBUTED__")]
    assert "export DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=90s" in exported
    assert "export DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP=120s" in exported
    assert lines.index(exported[0]) < lines.index("module load cuda")
    from_environment = dask.config.collect_env(dict(
        line.removeprefix("export ").split("=", 1) for line in distributed_settings()))["distributed"]
    assert from_environment["comm"]["timeouts"] == {"connect": "60s", "tcp": "120s"}  # yaml's, outside the set()
    assert from_environment["scheduler"]["allowed_failures"] == settings["scheduler"]["allowed-failures"] == 3


def test_workers_of_both_slurm_paths_never_pause_on_memory():
    """The worker jobs' exported variable and the runner workers' dask.config setting are the
    same setting, and a real worker under it has no pause threshold at any memory limit."""
    from distributed import Client, LocalCluster
    from jobs.settings import NO_MEMORY_PAUSE, WORKER_ENVIRONMENT
    exported = dict(line.removeprefix("export ").split("=", 1) for line in WORKER_ENVIRONMENT)
    from_environment = dask.config.collect_env({k: v for k, v in exported.items() if k.startswith("DASK_")})
    [(key, value)] = NO_MEMORY_PAUSE.items()
    assert dask.config.get(key, config=from_environment) is value is False
    with dask.config.set(NO_MEMORY_PAUSE), LocalCluster(n_workers=1, processes=False, memory_limit="1GiB",
                                                        dashboard_address=None) as local, Client(local) as client:
        [worker] = local.workers.values()
        assert worker.memory_manager.memory_limit == 2 ** 30
        assert worker.memory_manager.memory_pause_fraction is False
        assert client.run(lambda: 1)


def test_a_log_directory_in_home_is_expanded(slurm_config, monkeypatch, tmp_path):
    """#SBATCH -e/-o are not expanded by any shell, and dask_jobqueue creates the folder as
    given: "~/fp-logs" would be a folder named "~" under the login node's current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with dask.config.set({"jobqueue.slurm.log-directory": "~/fp-logs"}):
        lines = worker_job_script()
    assert f"-e {tmp_path}/fp-logs/fine-pruning-worker-%J.err" in directives(lines)
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("setting, named", [({"jobqueue.slurm.memory": "lots"}, "'lots'"),
                                            ({"jobqueue.slurm.interface": "ib9"}, "'ib9'"),
                                            ({"jobqueue.slurm.cores": "two"}, "cores"),
                                            ({"jobqueue.slurm.job-cpu": "four"}, "job-cpu")])
def test_a_site_value_dask_cannot_use_is_bad_input(slurm_config, tmp_path, monkeypatch, setting, named):
    from jobs.slurm import slurm_cluster_client
    from pruning.data import InputError

    monkeypatch.delenv("SLURM_UMASK", raising=False)
    args = SimpleNamespace(out=str(tmp_path / "out"), slurm_cluster=1)
    with dask.config.set(setting), pytest.raises(InputError) as bad:
        with slurm_cluster_client(args):
            pass
    assert str(bad.value).startswith("jobqueue.slurm in dask.config: ") and named in str(bad.value)
    assert "DASK_JOBQUEUE__SLURM__" in str(bad.value)
    # the worker jobs' umask (0077) was this client's business alone: a job this process
    # submits later (sbatch slurm/sweep.sh) writes its outputs with the user's umask
    assert "SLURM_UMASK" not in os.environ


def test_only_the_batch_jobs_scheduler_stops_when_idle(slurm_config):
    """--slurm-cluster's scheduler waits, taskless, for as long as its worker jobs are queued;
    the one inside sbatch slurm/sweep.sh ends the job when its client rank is gone."""
    from dask_jobqueue import SLURMCluster
    from jobs.slurm import runner_options
    with SLURMCluster(scheduler_options={"dashboard_address": ":0"}) as slurm:
        assert slurm.scheduler.idle_timeout is None
    scheduler_options, _ = runner_options(SimpleNamespace(threads_per_worker=None, single_node=False))
    assert scheduler_options["idle_timeout"] == "15 minutes"


def test_no_partition_or_account_by_default(slurm_config):
    found = directives(worker_job_script())
    assert not any(d.startswith(("-p ", "-A ")) for d in found), found


def test_environment_overrides_yaml(slurm_config, monkeypatch):
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__QUEUE", "gpu-long")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES", "[]")   # a CPU-only partition
    dask.config.refresh()
    found = directives(worker_job_script())
    assert "-p gpu-long" in found
    assert not any("gres" in d for d in found), found
    assert "-t 04:00:00" in found                     # the yaml still beats dask_jobqueue's 00:30:00


def test_a_batch_jobs_log_gets_distributeds_warnings_unless_you_ask_for_more(slurm_config, monkeypatch):
    from jobs.slurm import distributed_log_level
    assert distributed_log_level() == "WARNING"        # over distributed's own default, info
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "info")
    dask.config.refresh()
    assert distributed_log_level() == "INFO"


def test_site_file_overrides_yaml(slurm_config, tmp_path):
    (tmp_path / "site.yaml").write_text("jobqueue:\n  slurm:\n    walltime: '12:00:00'\n    memory: 32GiB\n")
    dask.config.refresh(paths=[*dask.config.paths, str(tmp_path)])
    found = directives(worker_job_script())
    assert "-t 12:00:00" in found and "--mem=32G" in found
    assert dask.config.get("distributed.comm.timeouts.connect") == "60s"


def test_site_settings_equal_to_dask_jobqueues_defaults_win_at_first_load(tmp_path):
    """The first load_config() in a process (each run's): a site's value that happens to equal
    dask_jobqueue's or distributed's own default is still the site's, not our yaml's."""
    (tmp_path / "site.yaml").write_text("jobqueue:\n  slurm:\n    job-extra-directives: []\n")
    probe = ("import dask; from jobs import settings; settings.load_config(); print(*(dask.config.get(k) "
             "for k in ('jobqueue.slurm.job-extra-directives', 'jobqueue.slurm.walltime', "
             "'distributed.comm.timeouts.connect', 'jobqueue.slurm.memory')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                            check=True, env=env | {"DASK_CONFIG": str(tmp_path),
                                                   "DASK_JOBQUEUE__SLURM__WALLTIME": "00:30:00",
                                                   "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "30s"})
    assert result.stdout.split() == ["[]", "00:30:00", "30s", "16GiB"]   # the yaml's memory stays


def test_load_config_keeps_sigint_handler():
    before = signal.getsignal(signal.SIGINT)
    settings.load_config()
    assert signal.getsignal(signal.SIGINT) is before


def sbatch_options() -> dict[str, str]:
    """The #SBATCH block as sbatch reads it: comments up to the first command."""
    options = {}
    for line in SWEEP_SH.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):]):
                name, _, value = word.partition("=")
                options[name] = value
    return options


def test_sweep_sh_requests():
    options = sbatch_options()
    assert options["--job-name"] == "fine-pruning"
    assert int(options["--ntasks"]) >= 3                  # scheduler + client + workers
    assert options["--nodes"] == "1"
    gpus = int(options["--gres"].rsplit(":", 1)[1])
    assert gpus == int(options["--ntasks"]) - 2           # one GPU per worker rank
    assert re.fullmatch(r"\d+:\d\d:\d\d", options["--time"])
    assert int(options["--cpus-per-task"]) >= 1
    assert "--mem" in options or "--mem-per-cpu" in options
    assert "--requeue" in options and options["--open-mode"] == "append"
    assert options["--output"] == "%x-%j.out"
    assert options["--signal"].startswith("B:USR1@")


def test_sweep_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(SWEEP_SH)], check=True)


def bind_gpu(procid: int, localid: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES as sweep.sh's per-task prelude leaves it ('unset' if unset)."""
    snippet = re.search(r"^bind_gpu='(.*?)'$", SWEEP_SH.read_text(), re.S | re.M).group(1)
    env = {"PATH": os.environ["PATH"], "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid)}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = subprocess.run(["bash", "-c", snippet, "bind-gpu", "bash", "-c",
                             'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
                            env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("procid, localid, visible, expected", [
    (0, 0, "0,1", ""), (1, 1, "0,1", ""),               # scheduler, client: no GPU
    (2, 2, "0,1", "0"), (3, 3, "0,1", "1"),             # workers on the first node
    (4, 0, "0,1", "0"), (5, 1, "0,1", "1"),             # workers on a second node
    (4, 4, "0,1", "0"),                                 # more workers than GPUs: round robin
    (2, 2, "3,5", "3"), (3, 3, "3,5", "5"),             # SLURM's own device ids
    (2, 2, None, "unset"), (0, 0, None, "unset"),       # CPU only: left alone
])
def test_sweep_sh_binds_one_gpu_per_worker(procid, localid, visible, expected):
    assert bind_gpu(procid, localid, visible) == expected


def hint(link: str | None, **env: str) -> str:
    return monitor.dashboard_hint(SimpleNamespace(dashboard_link=link), env=env)


def test_dashboard_hint_in_a_slurm_job():
    text = hint("http://10.1.2.3:8787/status", SLURM_SUBMIT_HOST="login1", USER="alice")
    assert "http://10.1.2.3:8787/status" in text
    assert "ssh -L 8787:10.1.2.3:8787 alice@login1" in text
    assert "http://localhost:8787/status" in text


def test_dashboard_hint_other_port_and_loopback():
    text = hint("http://127.0.0.1:40123/status", SLURM_SUBMIT_HOST="login1", USER="bob",
                SLURMD_NODENAME="gpu07")
    assert "ssh -J bob@login1 -L 8787:localhost:40123 bob@gpu07" in text  # the node's own loopback


def test_dashboard_hint_where_the_sweep_bound_it():
    """Dask's link names the scheduler's address; the dashboard listens on loopback only."""
    text = monitor.dashboard_hint(SimpleNamespace(dashboard_link="http://10.1.2.3:8787/status"),
                                  env={"SLURM_SUBMIT_HOST": "login1", "USER": "al"}, listens_on="127.0.0.1")
    assert text.startswith("Dask dashboard: http://127.0.0.1:8787/status ")
    assert "ssh -L 8787:localhost:8787 al@login1" in text  # --slurm-cluster: the login node's own


def test_dashboard_hint_outside_slurm():
    assert hint("http://127.0.0.1:8787/status") == "Dask dashboard: http://127.0.0.1:8787/status"
    assert "bokeh" in hint(None)


def test_slurm_runner_needs_a_job_step():
    args = cluster_args(["--slurm-runner"])
    assert "sbatch slurm/sweep.sh" in cluster.check_cluster_arguments(args, env={})
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert "at least 3" in cluster.check_cluster_arguments(args, env=step)
    assert cluster.check_cluster_arguments(args, env={**step, "SLURM_NTASKS": "4"}) is None


def test_slurm_cluster_flag():
    assert "at least 1" in cluster.check_cluster_arguments(cluster_args(["--slurm-cluster", "0"]))
    with pytest.raises(SystemExit):
        cluster_args(["--slurm-cluster", "2", "--single-node"])    # one place to run
    assert "--slurm-cluster" in cluster.check_cluster_arguments(cluster_args([]))


def test_check_needs_no_place_to_run_but_checks_the_flags_given():
    from jobs.sweep import parse_args
    from pruning.data import InputError

    assert parse_args(["--check"]).check                   # slurm/sweep.sh's first step
    with pytest.raises(InputError, match="--threads-per-worker must be at least 1"):
        parse_args(["--check", "--threads-per-worker", "0"])
    with pytest.raises(InputError, match="--workers and"):
        parse_args(["--check", "--workers", "0"])


@pytest.mark.parametrize("flags, says", [
    (["--slurm-cluster", "2", "--workers", "4"], "--workers sets --single-node's worker processes"),
    (["--scheduler-file", "s.json", "--workers", "1"], "--workers sets --single-node's worker processes"),
    (["--slurm-cluster", "2", "--threads-per-worker", "4"], "set jobqueue.slurm.cores in dask.config"),
    (["--scheduler-address", "tcp://h:8786", "--threads-per-worker", "4"], "your workers' own --nthreads"),
])
def test_worker_flags_where_the_cluster_decides_are_refused(flags, says):
    assert says in cluster.check_cluster_arguments(cluster_args(flags))


def test_worker_flags_where_they_apply_are_taken():
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
    for flags in (["--single-node", "--workers", "2", "--threads-per-worker", "1"],
                  ["--slurm-runner", "--threads-per-worker", "1"]):
        assert cluster.check_cluster_arguments(cluster_args(flags), env=step) is None, flags
    from jobs.sweep import parse_args
    assert parse_args(["--check", "--workers", "2"]).workers == 2  # checked, no place to run


def test_task_threads_fit_the_cores():
    # two per worker, unless local workers would then outnumber the cores; a flag wins
    assert settings.task_threads(cluster_args(["--single-node"]), cores=2) == 2
    assert settings.task_threads(cluster_args(["--single-node", "--workers", "2"]), cores=2) == 1
    assert settings.task_threads(cluster_args(["--single-node", "--workers", "4"]), cores=2) == 1
    assert settings.task_threads(cluster_args(["--single-node", "--workers", "2"]), cores=16) == 2
    assert settings.task_threads(cluster_args(["--slurm-runner"]), cores=1) == 2   # a node of its own
    assert settings.task_threads(cluster_args(["--single-node", "--threads-per-worker", "3"]), cores=2) == 3
    assert "at least 1" in cluster.check_cluster_arguments(
        cluster_args(["--single-node", "--threads-per-worker", "0"]))


def test_tasks_stop_with_one_line_when_every_worker_job_ended(monkeypatch, tmp_path):
    """--slurm-cluster mid-sweep: every worker job left the queue (time limit, scancel) and no
    worker is left; SLURMCluster submits no new ones, so the run stops instead of waiting."""
    from distributed import Client, LocalCluster
    from distributed.client import FutureCancelledError
    from jobs import slurm
    from jobs.arguments import explain

    queue = {"41": "PENDING (Priority)"}                 # requeued, say: a worker may still come
    monkeypatch.setattr(slurm, "QUEUE_POLL_S", 0.05)
    monkeypatch.setattr(slurm, "_queue_states", lambda jobs: dict(queue))
    jobs = SimpleNamespace(workers={"SLURMCluster-0": SimpleNamespace(job_id="41")},
                           scheduler_info={"workers": {}})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as local, \
            Client(local) as client, slurm._stop_when_worker_jobs_end(client, jobs):
        task = client.submit(sum, [1, 2])
        time.sleep(0.5)
        assert task.status == "pending"
        queue.clear()                                    # squeue: none of them left
        with pytest.raises(FutureCancelledError) as cancelled:
            task.result(timeout=10)
    args = cluster_args(["--slurm-cluster", "1"])
    line, status = explain(cancelled.value, args)
    assert status == 1
    assert line.startswith("every SLURM worker job (41) ended mid-sweep") and "no chunk of rows" in line


def test_a_scheduler_rank_drops_only_the_closed_stream_traceback_of_a_leaving_client():
    import logging
    import sys

    from distributed.comm.core import CommClosedError
    from jobs.stopping import ClosedStreamFilter

    def record(error):
        try:
            raise error
        except Exception:
            return logging.LogRecord("distributed.batched", logging.INFO, __file__, 1,
                                     "Batched Comm Closed %r", ("comm",), sys.exc_info())

    drop = ClosedStreamFilter()
    assert not drop.filter(record(CommClosedError()))
    assert drop.filter(record(OSError("disk full")))
    assert drop.filter(logging.LogRecord("distributed.batched", logging.INFO, __file__, 1, "x", (), None))



def fake_project(tmp_path):
    """A copy of slurm/sweep.sh in a project of stand-ins: its .venv puts stand-ins for
    scontrol, python and srun first on PATH, each printing what it was asked and where (the
    python answers sweep.sh's question whether it can import this project: yes)."""
    project = tmp_path / "project"
    (project / "slurm").mkdir(parents=True)
    (project / "slurm" / "sweep.sh").write_text(SWEEP_SH.read_text())
    stubs = project / ".venv" / "bin"
    stubs.mkdir(parents=True)
    (stubs / "activate").write_text(f'PATH="{stubs}:$PATH"\n')
    scripts = {"scontrol": 'if [[ $1 == show ]]; then '
                           'echo "   RunTime=00:00:01 TimeLimit=${FAKE_LIMIT:-04:00:00}"; '
                           'else echo "scontrol $*"; fi',
               "python": 'if [[ $1 == -c ]]; then exit 0; fi; echo "python in $PWD: $*"',
               "srun": 'echo "srun in $PWD: $*"',
               "conda": ":"}
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    return project


def batch_run(project, args: list[str], *, submit_dir, work_dir=None, path=None,
              **env: str) -> subprocess.CompletedProcess:
    """sweep.sh as slurmd starts it: a copy in the spool folder (so $0 says nothing), in the
    job's working folder, with SLURM's variables and the submitting shell's environment: by
    default one whose PATH starts with the project's (stand-in) .venv, as if activated."""
    spool = project.parent / "spool"
    spool.mkdir(exist_ok=True)
    copy = spool / "slurm_script"
    copy.write_text((project / "slurm" / "sweep.sh").read_text())
    environ = {"PATH": path or f"{project}/.venv/bin:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
               "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "vm", "SLURM_SUBMIT_DIR": str(submit_dir), **env}
    return subprocess.run(["bash", str(copy), *args], cwd=work_dir or submit_dir, env=environ,
                          capture_output=True, text=True, timeout=30)


def test_sweep_sh_runs_the_python_of_the_submitting_shell_from_any_folder(tmp_path):
    """No checkout to find: the job has the environment sbatch was run in (a link to the
    script, in a scratch folder, changes nothing)."""
    project = fake_project(tmp_path)
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    (elsewhere / "sweep.sh").symlink_to(project / "slurm" / "sweep.sh")
    result = batch_run(project, ["--data", "data/"], submit_dir=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"python: {project}/.venv/bin/python\n" in result.stdout
    assert f"python in {elsewhere}: -m jobs.sweep --check --data data/ --out results\n" in result.stdout


def test_sweep_sh_finds_its_python_without_an_activated_environment(tmp_path):
    """Submitted from a checkout with make setup's .venv, not activated: that .venv. From a
    folder without one: one line saying what to do. FINE_PRUNING_PYTHON names one outright."""
    project = fake_project(tmp_path)
    bare = "/usr/bin:/bin"  # a python there (if any) has no fine-pruning installed
    result = batch_run(project, [], submit_dir=project, path=bare)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"python: {project}/.venv/bin/python\n" in result.stdout
    result = batch_run(project, [], submit_dir=tmp_path, path=bare)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("sweep.sh: error: no Python here can import this project: activate its "
                             "environment before sbatch (source .venv/bin/activate, or conda activate "
                             "fine-pruning), or FINE_PRUNING_PYTHON=PATH/TO/python sbatch slurm/sweep.sh ...\n")
    chosen = tmp_path / "other-env" / "python"  # before the python on PATH
    chosen.parent.mkdir()
    chosen.write_text((project / ".venv" / "bin" / "python").read_text())
    chosen.chmod(0o755)
    result = batch_run(project, [], submit_dir=tmp_path, FINE_PRUNING_PYTHON=str(chosen))
    assert result.returncode == 0 and f"python: {chosen}\n" in result.stdout, result.stderr
    result = batch_run(project, [], submit_dir=tmp_path, FINE_PRUNING_PYTHON="/bin/false")
    assert (result.returncode, result.stderr) == (2, "sweep.sh: error: FINE_PRUNING_PYTHON=/bin/false "
                                                     "cannot import this project: give the python of "
                                                     "an environment it is installed in\n")


def test_sweep_sh_runs_in_the_folder_sbatch_chdir_gives(tmp_path):
    """sbatch -D DIR slurm/sweep.sh: the script's path is the submit folder's, but the job
    runs in DIR (its log is there): relative sweep args and the default --out are DIR's."""
    project = fake_project(tmp_path)
    run_dir = tmp_path / "run1"
    run_dir.mkdir()
    result = batch_run(project, [], submit_dir=project, work_dir=run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"python in {run_dir}: -m jobs.sweep --check --out results\n" in result.stdout
    assert f"srun in {run_dir}: " in result.stdout


def test_sweep_sh_logs_the_sweeps_command_as_it_can_be_pasted_back(tmp_path):
    """A path with a space read as two arguments in the job log's line ('--data my data/')."""
    project = fake_project(tmp_path)
    result = batch_run(project, ["--data", "my data/"],
                       submit_dir=project)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("sweep.sh: python -m"))
    assert shlex.split(line.removeprefix("sweep.sh: ")) == [
        "python", "-m", "jobs.sweep", "--slurm-runner", "--data", "my data/", "--out", "results"]


@pytest.mark.parametrize("value", ["abc", "2.5", "-1", "3 "])
def test_sweep_sh_refuses_a_max_requeues_that_is_not_a_count_before_any_work(tmp_path, value):
    """Read only at the time-limit warning, MAX_REQUEUES=abc ended the batch script there ('abc:
    unbound variable'), and with it the job, 5 minutes early and not requeued."""
    project = fake_project(tmp_path)
    result = batch_run(project, [], submit_dir=project, MAX_REQUEUES=value)
    assert result.returncode == 2 and "python in" not in result.stdout
    assert result.stderr == (f"sweep.sh: error: MAX_REQUEUES={value}: give a whole number of requeues, "
                             "e.g. MAX_REQUEUES=5 sbatch slurm/sweep.sh ...\n")


def test_sweep_sh_counts_max_requeues_in_decimal(tmp_path):
    """MAX_REQUEUES=08 is eight: bash's arithmetic would read an octal number and fail."""
    project = fake_project(tmp_path)
    (project / ".venv" / "bin" / "srun").write_text(  # the time limit's warning comes while it runs
        "#!/usr/bin/env bash\nkill -USR1 $PPID\nsleep 0.2\n")
    result = batch_run(project, [], submit_dir=project, MAX_REQUEUES="08",
                       SLURM_RESTART_COUNT="7")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "sweep.sh: time limit near: requeueing job 7; the rerun resumes" in result.stdout


def test_sweep_sh_help_is_the_sweeps_help_once(tmp_path):
    """sbatch slurm/sweep.sh --help: the job's log had the help four times (the check's and
    each rank's) and started the srun step for it."""
    project = fake_project(tmp_path)
    result = batch_run(project, ["--help"], submit_dir=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"python in {project}: -m jobs.sweep --help\n"


@pytest.mark.parametrize("flags", [["--ou", "/scratch/run1"], ["--single"], ["--worker", "2"]])
def test_abbreviated_flags_are_refused_by_the_check(flags):
    """slurm/sweep.sh knows the flags by their full names: `--ou /scratch/run1` got its default
    --out added after it (outputs in results/), `--single` and `--worker` passed its checks and
    failed on every rank of the srun step instead."""
    from jobs.sweep import parse_args
    from pruning.data import InputError

    with pytest.raises(InputError, match=f"unrecognized arguments: {flags[0]}"):
        parse_args(["--check", *flags, "--out", "results"])


def test_a_home_in_a_path_flag_is_expanded(monkeypatch, tmp_path):
    """No shell expands the ~ of `--out=~/run1`: a folder named ~ was made in the job's folder."""
    from jobs.sweep import parse_args
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(["--check", "--out=~/run1", "--model=~/bd_net.h5", "--data=~/data"])
    assert (args.out, args.model, args.data) == (f"{tmp_path}/run1", f"{tmp_path}/bd_net.h5", f"{tmp_path}/data")


def test_sweep_sh_runs_when_scontrol_does_not_answer(tmp_path):
    """scontrol only tells the time limit (whether a requeue can help): without it the job runs."""
    project = fake_project(tmp_path)
    (project / ".venv" / "bin" / "scontrol").write_text("#!/usr/bin/env bash\nexit 1\n")
    result = batch_run(project, [], submit_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"srun in {tmp_path}: " in result.stdout and "time limit" not in result.stdout


def test_sweep_sh_in_an_array_task_asks_about_its_own_task(tmp_path):
    """sbatch --array=0-1: one task's SLURM_JOB_ID is the array's id, which scontrol takes for
    every task (here the whole array's limit is too short to requeue, the task's is not), and
    a requeue would have requeued the array's other running tasks with it."""
    project = fake_project(tmp_path)
    (project / ".venv" / "bin" / "srun").write_text("#!/usr/bin/env bash\nkill -USR1 $PPID\nsleep 0.2\n")
    (project / ".venv" / "bin" / "scontrol").write_text(
        "#!/usr/bin/env bash\nif [[ $1 == show ]]; then [[ $3 == 7_1 ]] && echo ' TimeLimit=04:00:00' "
        "|| echo ' TimeLimit=00:05:00'; else echo \"scontrol $*\"; fi\n")
    result = batch_run(project, ["--out", "run"], submit_dir=tmp_path,
                       SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="1")
    assert result.returncode == 0, result.stderr
    assert "sweep.sh: time limit near: requeueing job 7_1;" in result.stdout
    assert "scontrol requeue 7_1\n" in result.stdout
