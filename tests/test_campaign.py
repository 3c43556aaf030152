"""--campaign FILE: several suspects, one cluster (jobs.campaign). The file's checks run in this
process; the runs are real: a LocalCluster of --single-node, a running cluster joined with
--scheduler-address."""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from in_process import sweep_in_process
from jobs import arguments
from jobs.campaign_file import read_campaign
from pruning.data import InputError

GOOD = """\
defaults:
  thresholds: [2, 4, 10]
suspects:
  - name: raw
    model: b.keras
    data: data
    fine_tune: {epochs: 1}
  - name: scaled
    model: b.keras
    rescale: 255
    data: data255
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    return path


def test_the_file_gives_each_suspect_its_own_runs_flags(tmp_path):
    path = write(tmp_path, GOOD + "  - {name: b3, weights: /w.h5, arch: deepid, classes: 4, layer: conv_2,"
                                  " poisoned_test: {sun: bd.h5}, thresholds: 3, rescale: 1/255, relative: true}\n")
    raw, scaled, b3 = read_campaign(str(path))
    assert (raw.name, raw.line, scaled.line, b3.line) == ("raw", 4, 8, 12)
    assert raw.flags == ["--thresholds", "2", "4", "10", "--model", str(tmp_path / "b.keras"),
                         "--data", str(tmp_path / "data"), "--fine-tune", "--fine-tune-epochs", "1"]
    assert b3.flags == ["--thresholds", "3", "--weights", "/w.h5", "--arch", "deepid", "--classes", "4",
                        "--layer", "conv_2", "--poisoned-test", f"sun={tmp_path / 'bd.h5'}",
                        "--rescale", "1/255", "--relative"]


@pytest.mark.parametrize("text, says", [
    (GOOD.replace("    data: data\n", "    dta: data\n"), "line 6: unknown key 'dta' in suspect 1; known keys: arch,"),
    (GOOD.replace("  - name: scaled\n", "  - nme: scaled\n"), "line 8: unknown key 'nme' in suspect 2"),
    (GOOD.replace("  - name: raw\n    model", "  - model"), "line 4: suspect 1 has no 'name'"),
    (GOOD.replace("name: scaled", "name: raw"), "line 8: suspect name 'raw' is given twice (also line 4)"),
    (GOOD.replace("name: scaled", "name: ../x"), "line 8: suspect name '../x' is its folder in --out"),
    (GOOD.replace("rescale: 255", "rescale: [255]"), "line 10: suspect 2's rescale must be a number or fraction"),
    (GOOD.replace("thresholds: [2, 4, 10]", "thresholds: [2, four]"), "line 2: defaults's thresholds must be a number or a list"),
    (GOOD.replace("{epochs: 1}", "{epochs: 1.5}"), "line 7: suspect 1's fine_tune.epochs must be a whole number, got"),
    (GOOD.replace("{epochs: 1}", "{epoch: 1}"), "line 7: unknown key 'epoch' in suspect 1's fine_tune"),
    (GOOD.replace("    data: data255\n", "    data: data255\n    model: c.keras\n"), "line 12: key 'model' is given twice in suspect 2 (also line 9)"),
    (GOOD.replace("defaults:", "default:"), "line 1: unknown key 'default' in the file; known keys: defaults, suspects"),
    (GOOD.replace("  thresholds: [2, 4, 10]\n", "  name: all\n"), "line 2: 'name' belongs to each suspect"),
    (GOOD + "  - [name, x]\n", "line 12: suspect 3 must be a mapping"),
    (GOOD.replace("model: b.keras\n    rescale", "model: b.keras\n   rescale"), "line 10: not valid YAML"),
    ("suspects: []\n", "line 1: 'suspects' must be a list of suspects"),
])
def test_a_malformed_file_names_the_key_and_its_line(tmp_path, text, says):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as error:
        read_campaign(str(path))
    assert str(error.value).startswith(f"--campaign {path} {says}"), error.value


def test_a_suspects_flag_on_the_command_line_is_refused():
    with pytest.raises(InputError, match="--rescale is a suspect's setting: with --campaign, give it "
                                         r"in the file as 'rescale:' \(under 'defaults:'"):
        arguments.parse_args(["--campaign", "c.yaml", "--rescale", "255", "--single-node"])


@pytest.fixture(scope="module")
def suspects(tmp_path_factory) -> Path:
    """A tiny B, its lab-layout sets, and the same sets stored as pixels / 255; the file GOOD."""
    import h5py
    from pruning.data import LAB_LAYOUT, write_lab_h5
    from tiny import random_images, tiny_deepid, with_sparse_channels, write_sets

    folder = tmp_path_factory.mktemp("campaign")
    model = with_sparse_channels(tiny_deepid(seed=5), random_images(200, seed=9))
    model.save(folder / "b.keras")
    write_sets(model, folder / "data")
    for relative in LAB_LAYOUT.values():
        with h5py.File(folder / "data" / relative) as lab_file:
            images, labels = lab_file["data"][:], lab_file["label"][:]
        write_lab_h5(folder / "data255" / relative, images.transpose(0, 2, 3, 1) / 255.0, labels)
    write(folder, GOOD)
    return folder


def test_a_bad_suspect_stops_the_campaign_before_any_work(suspects, tmp_path, capsys, caplog):
    """In this process (``jobs.sweep.main``): its exit status and stderr as the command's."""
    path = write(tmp_path, GOOD.replace("model: b.keras", f"model: {suspects / 'b.keras'}")
                 .replace("data: data255", f"data: {suspects / 'data255'}").replace("data: data\n", "data: nowhere\n"))
    run = sweep_in_process("--campaign", path, "--single-node", "--out", tmp_path / "out", capsys=capsys, caplog=caplog)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --campaign {path}: suspect raw (line 4): --data {tmp_path / 'nowhere'}: not a "
        "directory; it must hold cl/valid.h5, cl/test.h5, bd/bd_valid.h5 and bd/bd_test.h5")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_campaign_writes_what_each_suspects_own_run_writes_and_resumes(suspects, tmp_path, capsys, caplog):
    """The campaign, the reference single run and the resumed campaign each run in this process
    (``jobs.sweep.main``; what they print and log is checked as their stderr): no new process
    importing TensorFlow for the clients, and the --single-node workers are forked from this
    process's fork server."""
    import dask
    from distributed import LocalCluster

    from jobs.cluster import LOCAL_START_METHOD

    out, reference = tmp_path / "out", tmp_path / "reference"

    def sweep(*argv):
        return sweep_in_process(*argv, capsys=capsys, caplog=caplog)

    run = sweep("--campaign", suspects / "campaign.yaml", "--single-node", "--workers", "2", "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith(": campaign.csv, campaign.png, raw/, scaled/")
    for name in ("raw", "scaled"):  # log lines about one suspect name it
        assert re.search(rf"INFO [\w.]+: suspect {name}: reused from checkpoints: 0 of 4 chunks", run.stderr)
        assert re.search(rf"INFO [\w.]+: suspect {name}: X=2: k=", run.stderr)
    assert re.search(r"INFO [\w.]+: campaign: 100% 2.0/2", run.stderr) and " prefixes: " not in run.stderr
    single = sweep("--model", suspects / "b.keras", "--data", suspects / "data", "--fine-tune",
                   "--fine-tune-epochs", "1", "--single-node", "--out", reference)
    assert single.returncode == 0, single.stderr[-3000:]
    files = sorted(p.name for p in reference.iterdir() if p.is_file() and p.name not in ("manifest.json", ".sweep.lock"))
    assert "finetuned_X=2.h5" in files and "model_X=10.h5" in files
    assert sorted(p.name for p in (out / "raw").iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in files:  # byte for byte what its own run writes
        assert (out / "raw" / name).read_bytes() == (reference / name).read_bytes(), name
    for name in files:  # pixels stored / 255 and rescale 255: the same curve and models (the
        # channels' mean activations may differ in their last digits: float32 pixels / 255 * 255)
        if name.startswith(("results.csv", "goodnet.csv", "goodnet_X=", "model_X=")):
            assert (out / "scaled" / name).read_bytes() == (reference / name).read_bytes(), name
    assert pd.read_csv(out / "scaled" / "channel_order.csv")["channel"].equals(
        pd.read_csv(reference / "channel_order.csv")["channel"])

    table = pd.read_csv(out / "campaign.csv")
    assert list(table["suspect"]) == ["raw"] * 3 + ["scaled"] * 3
    assert list(table.columns[:3]) == ["suspect", "threshold", "channels_pruned"]
    goodnet = pd.read_csv(reference / "goodnet.csv")
    b = pd.read_csv(reference / "results.csv").iloc[0]
    tuned = pd.read_csv(reference / "finepruning.csv")
    assert goodnet["channels_pruned"].nunique() > 1  # thresholds that select different B'
    for rows in (table[:3], table[3:]):
        assert list(rows["channels_pruned"]) == list(goodnet["channels_pruned"])
        assert np.array_equal(rows["G_detection_rate"], goodnet["detection_rate"])
        assert (rows["B_valid_asr"] == b["valid_asr"]).all() and (rows["B_test_accuracy"] == b["test_accuracy"]).all()
    assert list(table["finetuned_test_accuracy"][:3]) == list(tuned["test_accuracy"][:3])
    assert table["finetuned_test_accuracy"][3:].isna().all()
    assert (out / "campaign.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A resubmitted campaign, on a running cluster: it reuses every finished chunk.
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts
            and p.name not in ("manifest.json", ".sweep.lock")}
    (out / "scaled" / "checkpoints" / "chunk-clean_test-00000.json").unlink()
    # (its worker process starts as --single-node's do: forked from this process's fork server,
    # which the campaign above started with TensorFlow imported, not spawned to import it again)
    with dask.config.set({"distributed.worker.multiprocessing-method": LOCAL_START_METHOD}), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        again = sweep("--campaign", suspects / "campaign.yaml", "--scheduler-address",
                      cluster.scheduler_address, "--allow-tcp", "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "suspect raw: reused from checkpoints: 4 of 4 chunks (52 prefix evaluations); 0 to evaluate" in again.stderr
    assert "suspect scaled: reused from checkpoints: 3 of 4 chunks (39 prefix evaluations); 13 to evaluate" in again.stderr
    assert {p: p.read_bytes() for p in kept} == kept


def test_a_suspects_folder_in_use_is_refused(suspects, tmp_path, capsys, caplog):
    """In this process (``jobs.sweep.main``; its flock on .sweep.lock meets the one held here as
    another process's would): its exit status and stderr as the command's."""
    (tmp_path / "out" / "scaled").mkdir(parents=True)
    with open(tmp_path / "out" / "scaled" / ".sweep.lock", "w") as lock:
        lock.write("host h pid 1\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = sweep_in_process("--campaign", suspects / "campaign.yaml", "--single-node", "--out", tmp_path / "out",
                               capsys=capsys, caplog=caplog)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: --campaign {suspects / 'campaign.yaml'}: suspect scaled (line 8): "
                                  f"--out {tmp_path / 'out' / 'scaled'} is in use by a running sweep "
                                  "(host h pid 1); wait for it to finish or choose another --out")
    assert sorted(os.listdir(tmp_path / "out")) == ["scaled"]


def test_a_stopped_campaign_says_what_it_keeps_and_the_same_command_resumes(suspects, tmp_path, capsys, caplog):
    """The stopped run is a real process (its exit status and last line on SIGTERM are checked);
    the same command then resumes in this process (``jobs.sweep.main``, its log as its stderr)."""
    import signal
    import time
    (suspects / "plain.yaml").write_text(GOOD.replace("    fine_tune: {epochs: 1}\n", ""))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.sweep", "--campaign", str(suspects / "plain.yaml"), "--single-node",
            "--chunk-rows", "10", "--out", str(out)]
    run = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/checkpoints/chunk-*.json")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    kept = len(list(out.glob("*/checkpoints/chunk-*.json")))
    assert run.returncode == 143, err[-3000:]
    assert 0 < kept < 2 * 42, kept  # mid-campaign: 42 chunks of 10 rows per suspect
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM; {out}/*/checkpoints holds {kept} finished "
                                            "chunks of rows: the same command resumes from them")
    assert not (out / "campaign.csv").exists()
    again = sweep_in_process(*argv[3:], capsys=capsys, caplog=caplog)  # argv less python -m jobs.sweep
    assert again.returncode == 0, again.stderr[-3000:]
    reused = [int(n) for n in re.findall(r"suspect \w+: reused from checkpoints: (\d+) of 42 chunks", again.stderr)]
    assert len(reused) == 2 and sum(reused) == kept, again.stderr[-3000:]
    # stored / 255 with rescale 255 or as stored: one curve, whatever was resumed
    assert (out / "raw" / "results.csv").read_bytes() == (out / "scaled" / "results.csv").read_bytes()
