"""The sweep on the embedded demo as a user runs it, and surviving a lost worker (LocalCluster)."""
import json
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from conftest import REPO, assert_same_outputs

pytestmark = pytest.mark.slow


def test_demo_sweep_finds_the_backdoor(demo_run):
    curve = pd.read_csv(demo_run / "results.csv")
    assert len(curve) == 61 and curve["channels_pruned"].tolist() == list(range(61))
    b = curve.iloc[0]
    assert b.valid_accuracy >= 90 and b.valid_asr >= 90 and b.test_accuracy >= 90 and b.test_asr >= 90
    goodnet = pd.read_csv(demo_run / "goodnet.csv")
    assert goodnet["channels_pruned"].notna().all()
    # k is the first prefix at least 10 points below B, and on a BadNet whose backdoor sits in
    # dormant channels the attack is mostly gone there (the point of the defense).
    k = int(goodnet[goodnet.threshold == 10].iloc[0].channels_pruned)
    assert curve.iloc[k].valid_accuracy <= b.valid_accuracy - 10 < curve.iloc[k - 1].valid_accuracy
    assert curve.iloc[k].valid_asr < 50
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert manifest["layer"] == "conv_3" and manifest["read_at"] == "pool_3" and manifest["channels"] == 60


def test_make_run_command_prints_where_outputs_are(demo, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "jobs.sweep", "--single-node", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "FINE_PRUNING_CACHE": str(REPO / ".cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"outputs in {out.resolve()}:" in done.stdout
    assert "Dask dashboard: http://" in done.stderr and "prefixes" in done.stderr  # link, tqdm bar


def test_a_worker_killed_mid_sweep_changes_nothing(demo, demo_run, tmp_path):
    out = tmp_path / "out"
    # Small chunks: many short tasks, so there is time to kill a worker in the middle.
    sweep = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--model", demo.model, "--data",
                              demo.data_dir, "--out", str(out), "--single-node", "--workers", "2",
                              "--chunk-rows", "96"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 300
    while len(list(checkpoints.glob("chunk-*.json"))) < 3:
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
        time.sleep(0.05)
    # The two workers are forked by the sweep's forkserver (a child of the sweep, as is
    # multiprocessing's resource tracker): its only grandchildren. (The forkserver itself holds
    # TensorFlow too, and may be larger than a worker.)
    descendants = psutil.Process(sweep.pid).children(recursive=True)
    workers = [p for p in descendants if p.ppid() != sweep.pid]
    assert len(workers) == 2, [(p.pid, p.ppid()) for p in descendants]
    worker = max(workers, key=lambda p: p.memory_info().rss)
    worker.kill()
    killed_at = len(list(checkpoints.glob("chunk-*.json")))
    log, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, log[-3000:]
    assert killed_at < len(list(checkpoints.glob("chunk-*.json"))), "the kill came after the last chunk"
    assert_same_outputs(out, demo_run)
