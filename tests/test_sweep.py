"""End to end: ``python -m jobs.sweep --single-node`` on a tiny BadNet-shaped model (real
LocalCluster, real worker processes), checked against naive literal pruning. Reruns on a copy
of its output folder run their few tasks in this process, and the outputs are also written
from hand-made tallies (no cluster)."""
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import psutil
import pytest

import jobs.cluster
import tiny
from conftest import REPO
from jobs.sweep import main
from pruning.data import LAB_LAYOUT, lab_paths, open_lab_set
from pruning.prune import predict_classes, prune_conv_channels
from pruning.report import CURVE_COLUMNS, GOODNET_COLUMNS

THRESHOLDS = ["2", "4", "99"]  # 99 points below B's accuracy is never reached


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    model = tiny.with_ties_and_dead_channels(tiny.tiny_deepid(seed=7))
    model.save(folder / "bd_net.keras")
    tiny.write_sets(model, folder / "data")
    out = folder / "out"
    argv = ["--model", str(folder / "bd_net.keras"), "--data", str(folder / "data"), "--out", str(out),
            "--single-node", "--workers", "2", "--chunk-rows", "48", "--prefixes-per-task", "5",
            "--thresholds", *THRESHOLDS]
    assert main(argv) == 0
    return folder, out, argv


def literal_scores(model, folder, channels):
    """Accuracy of the literally pruned model on each set, the naive way; and on the test sets,
    G's accuracy and share of class N (G: B's class where B and B' agree, else N = 10)."""
    pruned = prune_conv_channels(model, "conv_3", channels)
    scores = {}
    for name, path in lab_paths(folder / "data").items():
        images, labels = open_lab_set(path, (55, 47, 3), 10).read()
        b_prime = predict_classes(pruned, images)
        scores[name] = 100.0 * np.mean(b_prime == labels)
        if name.endswith("_test"):
            g = np.where(predict_classes(model, images) == b_prime, b_prime, 10)
            scores["goodnet_" + name] = (100.0 * np.mean(g == labels), 100.0 * np.mean(g == 10))
    return scores


def test_every_output_is_written(run):
    _, out, _ = run
    names = {p.name for p in out.iterdir()}
    assert {"results.csv", "channel_order.csv", "goodnet.csv", "results.png", "manifest.json",
            "model_X=2.h5", "model_X=4.h5", "goodnet_X=2.keras", "goodnet_X=4.keras"} <= names
    assert "model_X=99.h5" not in names  # never reached: reported, not a crash
    goodnet = pd.read_csv(out / "goodnet.csv")
    assert list(goodnet.columns) == GOODNET_COLUMNS
    assert goodnet.loc[goodnet.threshold == 99, "channels_pruned"].isna().all()


def test_curve_equals_naive_literal_pruning_for_every_k(run):
    folder, out, _ = run
    model = keras.models.load_model(folder / "bd_net.keras")
    curve = pd.read_csv(out / "results.csv")
    order = pd.read_csv(out / "channel_order.csv")["channel"].tolist()
    assert list(curve.columns[:6]) == CURVE_COLUMNS
    assert curve["channels_pruned"].tolist() == list(range(13))
    assert sorted(order) == list(range(12))
    assert curve["fraction_pruned"].tolist() == [k / 12 for k in range(13)]
    assert curve["channel"].tolist() == [-1] + order  # the one pruned at k
    for k in range(13):
        naive = literal_scores(model, folder, order[:k])
        row = curve.iloc[k]
        assert (row.valid_accuracy, row.valid_asr, row.test_accuracy, row.test_asr) == (
            naive["clean_valid"], naive["poisoned_valid"], naive["clean_test"], naive["poisoned_test"]), k
        # G's test scores at every k: accuracy and false alarms on clean, ASR and detection on poisoned
        assert (row.goodnet_test_accuracy, row.goodnet_false_alarm_rate) == naive["goodnet_clean_test"], k
        assert (row.goodnet_test_asr, row.goodnet_detection_rate) == naive["goodnet_poisoned_test"], k


def test_output_columns_are_the_readmes(run):
    """Other tools read these files by position too: the order README.md documents."""
    _, out, _ = run
    assert list(pd.read_csv(out / "results.csv").columns) == [
        "channels_pruned", "fraction_pruned", "valid_accuracy", "valid_asr", "test_accuracy",
        "test_asr", "channel", "goodnet_test_accuracy", "goodnet_test_asr",
        "goodnet_detection_rate", "goodnet_false_alarm_rate"]
    assert list(pd.read_csv(out / "goodnet.csv").columns) == [
        "threshold", "channels_pruned", "test_accuracy", "test_asr", "detection_rate",
        "false_alarm_rate"]
    assert list(pd.read_csv(out / "channel_order.csv").columns) == ["rank", "channel", "mean_activation"]


def test_channel_order_is_by_mean_activation_over_every_clean_validation_row(run):
    """Profiled at pool_3 over the whole clean validation set (120 rows in chunks of 48, 48
    and 24: a mean of the chunks' means would differ), ties in channel index order."""
    folder, out, _ = run
    model = keras.models.load_model(folder / "bd_net.keras")
    images, _ = open_lab_set(lab_paths(folder / "data")["clean_valid"], (55, 47, 3), 10).read()
    pooled = keras.Model(model.inputs, model.get_layer("pool_3").output).predict(images, verbose=0)
    means = np.asarray(pooled, dtype=np.float64).mean(axis=(0, 1, 2))
    order = pd.read_csv(out / "channel_order.csv")
    assert order["rank"].tolist() == list(range(12))
    assert order["channel"].tolist() == np.argsort(means, kind="stable").tolist()
    np.testing.assert_allclose(order["mean_activation"], means[order["channel"]], rtol=1e-6)
    assert len(set(means)) < 12  # the model's tied and dead channels are there to be ordered


def test_saved_b_prime_is_b_with_exactly_the_first_k_channels_zeroed(run):
    folder, out, _ = run
    b = keras.models.load_model(folder / "bd_net.keras")
    order = pd.read_csv(out / "channel_order.csv")["channel"].tolist()
    goodnet = pd.read_csv(out / "goodnet.csv").dropna()
    for _, row in goodnet.iterrows():
        k = int(row.channels_pruned)
        pruned = keras.models.load_model(out / f"model_X={int(row.threshold)}.h5", compile=False)
        for layer in b.layers:
            for w_b, w_p in zip(layer.get_weights(), pruned.get_layer(layer.name).get_weights()):
                if layer.name != "conv_3":
                    assert np.array_equal(w_b, w_p), layer.name
        kernel, bias = pruned.get_layer("conv_3").get_weights()
        kernel_b, bias_b = b.get_layer("conv_3").get_weights()
        zeroed = [c for c in range(12) if not kernel[..., c].any() and bias[c] == 0]
        assert set(order[:k]) <= set(zeroed)
        kept = [c for c in range(12) if c not in order[:k]]
        assert np.array_equal(kernel[..., kept], kernel_b[..., kept])
        assert np.array_equal(bias[kept], bias_b[kept])


def test_goodnet_file_scores_match_goodnet_csv(run):
    folder, out, _ = run
    row = pd.read_csv(out / "goodnet.csv").iloc[0]
    goodnet = keras.models.load_model(out / "goodnet_X=2.keras")
    assert goodnet.outputs[0].shape[-1] == 11  # N + 1
    clean = open_lab_set(folder / "data" / LAB_LAYOUT["clean_test"], (55, 47, 3), 10).read()
    poisoned = open_lab_set(folder / "data" / LAB_LAYOUT["poisoned_test"], (55, 47, 3), 10).read()
    g_clean, g_poisoned = predict_classes(goodnet, clean[0]), predict_classes(goodnet, poisoned[0])
    assert row.test_accuracy == 100.0 * np.mean(g_clean == clean[1])
    assert row.test_asr == 100.0 * np.mean(g_poisoned == poisoned[1])
    assert row.detection_rate == 100.0 * np.mean(g_poisoned == 10)
    assert row.false_alarm_rate == 100.0 * np.mean(g_clean == 10)


def test_k0_reproduces_b_exactly(run):
    folder, out, _ = run
    curve = pd.read_csv(out / "results.csv")
    naive = literal_scores(keras.models.load_model(folder / "bd_net.keras"), folder, [])
    assert curve.iloc[0].valid_accuracy == naive["clean_valid"]
    assert curve.iloc[0].test_asr == naive["poisoned_test"]
    assert curve.iloc[0].goodnet_detection_rate == 0.0


def test_manifest_records_inputs_and_layer(run):
    folder, out, _ = run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layer"] == "conv_3" and manifest["read_at"] == "pool_3"
    assert manifest["channels"] == 12 and manifest["thresholds"] == [2.0, 4.0, 99.0]
    assert set(manifest["inputs"]) == {"model", "clean_valid", "poisoned_valid", "clean_test", "poisoned_test"}
    for name, entry in manifest["inputs"].items():  # of the files' bytes
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest(), name
    assert manifest["versions"]["keras"] == keras.__version__
    chunks = sum(-(-rows // 48) for rows in manifest["rows"].values())  # --chunk-rows 48
    assert manifest["checkpoints"] == {"chunks": chunks, "chunks_reused": 0, "channel_order_reused": False}


def test_rerun_reuses_every_prefix_and_writes_identical_files(run, caplog):
    _, out, argv = run
    before = {name: (out / name).read_bytes() for name in
              ["results.csv", "channel_order.csv", "goodnet.csv", "model_X=2.h5", "goodnet_X=4.keras"]}
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert re.search(r"reused from checkpoints: (\d+) of \1 chunks \(\d+ prefix evaluations\); 0 to evaluate",
                     caplog.text), caplog.text
    assert all((out / name).read_bytes() == data for name, data in before.items())
    reused = json.loads((out / "manifest.json").read_text())["checkpoints"]
    assert reused["chunks_reused"] == reused["chunks"] > 0 and reused["channel_order_reused"]


@pytest.mark.parametrize("place", [["--single-node", "--workers", "2"],
                                   # nothing listens there: joining it would fail
                                   ["--scheduler-address", "tls://127.0.0.1:1"]])
def test_a_rerun_of_a_finished_sweep_starts_no_process_and_joins_no_cluster(run, tmp_path, place):
    """Every chunk is checkpointed: the outputs are written again here, byte for byte, with no
    cluster (no worker, no fork server) and no scheduler to reach."""
    _, out, argv = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    at = argv.index("--single-node")
    argv = argv[:at] + place + argv[at + 3:]  # in place of --single-node --workers 2
    argv[argv.index("--out") + 1] = str(copy)
    sweep = subprocess.Popen([sys.executable, "-m", "jobs.sweep", *argv], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=os.environ | {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    started = set()
    while sweep.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            started.update(" ".join(child.cmdline()) for child in psutil.Process(sweep.pid).children(recursive=True))
        time.sleep(0.05)
    _, err = sweep.communicate()
    assert sweep.returncode == 0, err[-3000:]
    # no fork server, resource tracker or worker (a library's short command is not one: h5py's
    # import runs `uname -p`, which a busy machine lets psutil see)
    assert not {command for command in started if "multiprocessing" in command}, started
    assert "0 to evaluate, so no Dask cluster is needed" in err, err[-3000:]
    for name in ("results.csv", "channel_order.csv", "goodnet.csv", "model_X=2.h5", "model_X=4.h5",
                 "goodnet_X=2.keras", "goodnet_X=4.keras", "results.png"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    assert not (copy / ".dask").exists()


def test_a_sweep_that_lost_its_last_worker_says_once_what_it_waits_for(run, tmp_path, capsys, caplog):
    """The only worker dies mid-sweep (SIGKILL); the LocalCluster starts it again. The log says
    so in one line, and in one more when the new worker joined; the results are unchanged. The
    sweep runs in this process (``jobs.sweep.main``, its workers forked from this process's fork
    server); a thread here kills the worker once the first chunk is checkpointed."""
    import threading

    from in_process import sweep_in_process

    _, out, argv = run
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    argv[argv.index("--workers") + 1] = "1"
    argv[argv.index("--chunk-rows") + 1] = "8"  # 54 chunks: the sweep is still running when it dies
    checkpoints = tmp_path / "out" / "checkpoints"
    killed, sweeping = [], threading.Event()

    def kill_the_worker():
        try:
            while not list(checkpoints.glob("chunk-*.json")):
                assert not sweeping.wait(0.02), "the sweep ended before its first chunk was checkpointed"
            [forkserver] = [child for child in psutil.Process().children()
                            if "forkserver" in " ".join(child.cmdline())]
            # (this process's fork server outlives the sweeps before: none of their workers is left)
            [worker] = [child for child in forkserver.children() if child.status() != psutil.STATUS_ZOMBIE]
            worker.kill()
            killed.append(worker.pid)
        except BaseException as error:  # said after the sweep
            killed.append(error)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    try:
        done = sweep_in_process(*argv, capsys=capsys, caplog=caplog)
    finally:
        sweeping.set()
        killer.join()
    assert len(killed) == 1 and isinstance(killed[0], int), killed
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    waiting = [i for i, line in enumerate(lines) if "no Dask worker is left" in line]
    joined = [i for i, line in enumerate(lines) if "joined; the sweep goes on" in line]
    assert len(waiting) == 1 and len(joined) == 1 and waiting[0] < joined[0], "\n".join(lines[-40:])
    assert lines[waiting[0]].endswith("was the last); waiting for the LocalCluster to start its worker again")
    assert len(list(checkpoints.glob("chunk-*.json"))) == 54
    assert (tmp_path / "out" / "results.csv").read_bytes() == (out / "results.csv").read_bytes()


def test_a_second_run_on_a_held_output_folder_is_refused(run, capsys):
    _, out, argv = run
    import fcntl
    with open(out / ".sweep.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("host test pid 1\n")
        handle.flush()
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "in use by a running sweep" in err and len(err.strip().splitlines()) == 1


def test_a_rerun_with_other_thresholds_leaves_only_its_own_models(run, tmp_path):
    _, out, argv = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")  # not ours: kept
    (copy / "model_X=7.h5").write_text("a model of the user's own")  # no run of ours wrote it: kept
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(copy)
    argv = argv[:argv.index("--thresholds")] + ["--thresholds", "4", "99"]  # they come last
    assert main(argv) == 0
    models = {p.name for p in copy.iterdir() if p.name.startswith(("model_X=", "goodnet_X="))}
    assert models == {"model_X=4.h5", "goodnet_X=4.keras", "model_X=7.h5"}  # X=2's are gone, X=99 is unreached
    assert (copy / "model_X=4.h5").read_bytes() == (out / "model_X=4.h5").read_bytes()
    assert (copy / "notes.txt").read_text() == "mine"
    assert (copy / "model_X=7.h5").read_text() == "a model of the user's own"
    assert json.loads((copy / "manifest.json").read_text())["selected"].keys() == {"4", "99"}


def test_a_worker_loads_a_replaced_model_file_again(tmp_path):
    """A worker of a cluster that outlives a sweep caches B by path and stamp: a file replaced
    at the same path (another B for the next sweep) is loaded again, not served from the cache."""
    from pruning.sweep import split_for
    from pruning.models import ModelSpec
    images = tiny.random_images(40, seed=9)
    path = tmp_path / "bd_net.keras"
    answers = []
    for seed in (1, 2):
        model = tiny.tiny_deepid(seed=seed)
        model.save(path)
        split = split_for(ModelSpec(str(path)).stamped(), "conv_3", "pool_3")
        answers.append((predict_classes(split.model, images), predict_classes(model, images)))
    assert [list(cached) == list(saved) for cached, saved in answers] == [True, True]
    assert list(answers[0][1]) != list(answers[1][1])  # the two B differ on these images


def test_checkpoints_are_keyed_on_everything_that_makes_the_numbers(run, tmp_path, monkeypatch):
    """Another model file, layer, read point or software version must not reuse checkpoints."""
    import jobs.inputs
    from jobs.sweep import parse_args
    folder, _, argv = run

    def fingerprint(*extra) -> dict:
        return jobs.inputs.fingerprint(jobs.inputs.resolve_inputs(parse_args(argv + list(extra))))

    base = fingerprint()
    assert base["layer"] == "conv_3" and base["read_at"] == "pool_3" and base["format"] >= 1
    assert base["software"]["keras"] == keras.__version__ and base["software"]["keras_backend"]
    assert fingerprint("--layer", "conv_2")["layer"] == "conv_2"
    other = tmp_path / "other.keras"
    tiny.tiny_deepid(seed=8).save(other)
    assert fingerprint("--model", str(other))["inputs"]["model"] != base["inputs"]["model"]
    replaced = fingerprint("--model", str(other))
    tiny.tiny_deepid(seed=9).save(other)  # another B at the same path
    assert fingerprint("--model", str(other))["inputs"]["model"] != replaced["inputs"]["model"]
    assert fingerprint()["inputs"] == base["inputs"]  # the same files: the same hashes
    for package in ("python", "tensorflow", "keras", "numpy", "fine-pruning"):  # they make the numbers
        monkeypatch.setattr(jobs.inputs, "versions", lambda: {package: "0.0"})
        assert fingerprint()["software"][package] == "0.0", package


def test_input_paths_are_absolute_for_workers_in_another_folder(run, monkeypatch):
    """Workers of a cluster joined with --scheduler-file may run elsewhere: a relative path
    would name another file there, or none."""
    import jobs.inputs
    from jobs.sweep import parse_args
    folder, _, _ = run
    monkeypatch.chdir(folder)
    inputs = jobs.inputs.resolve_inputs(parse_args(["--model", "bd_net.keras", "--data", "data", "--check"]))
    assert inputs.paths == {"model": str(folder / "bd_net.keras")} | {
        name: str(folder / "data" / path) for name, path in LAB_LAYOUT.items()}


def test_a_model_name_of_a_threshold_the_earlier_run_never_reached_is_left_alone(tmp_path):
    """The earlier run's manifest lists X=99 as unreached: it wrote no model_X=99.h5, so one
    there is the user's own and stays; its X=2 models, not written again, go."""
    from jobs.finish import models_listed, remove_stale_models
    (tmp_path / "manifest.json").write_text(json.dumps({"selected": {"2": 5, "4": 7, "99": None}}))
    for name in ("model_X=2.h5", "goodnet_X=2.keras", "model_X=4.h5", "goodnet_X=4.keras", "model_X=99.h5"):
        (tmp_path / name).write_text(name)
    removed = remove_stale_models(tmp_path, ["model_X=4.h5", "goodnet_X=4.keras"], models_listed(tmp_path))
    assert removed == ["goodnet_X=2.keras", "model_X=2.h5"]  # X=4's: written again by this run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["goodnet_X=4.keras", "manifest.json",
                                                          "model_X=4.h5", "model_X=99.h5"]


def test_relative_thresholds_select_from_a_share_of_bs_accuracy(run, tmp_path):
    """--relative X: the first k whose validation accuracy is at most (100 - X) % of B's. From
    hand-made tallies: B at 50 %, so X = 10 selects the first k at 45 % or below (k = 3, where
    10 points, 40 %, would be k = 5); X = 70 (15 %) is never reached."""
    from jobs.finish import write_outputs
    from jobs.inputs import resolve_inputs
    from jobs.sweep import parse_args
    from pruning.counts import Counts
    from pruning.defense import Defense
    _, out, argv = run
    new = tmp_path / "relative"
    new.mkdir()
    argv = argv[:argv.index("--thresholds")] + ["--thresholds", "10", "70", "--relative"]
    argv[argv.index("--out") + 1] = str(new)
    args = parse_args(argv)
    valid = [50, 50, 46, 44, 41, 39, 30, 30, 30, 30, 30, 30, 30]  # correct of 100, k = 0..12
    prefixes = {k: {"clean_valid": Counts(100, valid[k], valid[k], 0),
                    "poisoned_valid": Counts(100, 90, 90, 0),
                    "clean_test": Counts(200, 150, 140, 20),      # G: 70 % right, 10 % alarms
                    "poisoned_test": Counts(200, 100, 60, 80)}    # G: 30 % ASR, 40 % detected
                for k in range(13)}
    order = pd.read_csv(out / "channel_order.csv")
    write_outputs(new, Defense(resolve_inputs(args), order, prefixes, tuple(args.thresholds), args.relative))
    goodnet = pd.read_csv(new / "goodnet.csv").set_index("threshold")
    assert goodnet.loc[10.0, "channels_pruned"] == 3 and pd.isna(goodnet.loc[70.0, "channels_pruned"])
    assert goodnet.loc[10.0, ["test_accuracy", "test_asr", "detection_rate", "false_alarm_rate"]].tolist() \
        == pytest.approx([70.0, 30.0, 40.0, 10.0])
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["relative"] is True and manifest["selected"] == {"10": 3, "70": None}
    assert pd.read_csv(new / "results.csv")["valid_accuracy"].tolist() == pytest.approx(valid)
    kernel, bias = keras.models.load_model(new / "model_X=10.h5", compile=False).get_layer("conv_3").get_weights()
    zeroed = {c for c in range(12) if not kernel[..., c].any() and bias[c] == 0}
    assert zeroed == set(order["channel"].tolist()[:3])  # B'_3 (B's dead channels come first)
    assert not (new / "model_X=70.h5").exists()


@pytest.fixture
def rerun(monkeypatch):
    """Run the sweep (with --out's lock, checkpoints and outputs) on a cluster in this process:
    a rerun reads most of its work back from checkpoints, no worker processes need starting."""
    from distributed import Client, LocalCluster
    from jobs.inputs import resolve_inputs
    from jobs.outdir import OutputFolder
    from jobs.finish import output_names
    from jobs.sweep import parse_args, sweep

    @contextlib.contextmanager
    def open_client(args):
        with LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client

    monkeypatch.setattr(jobs.cluster, "open_client", open_client)

    def run_on(argv, out: Path, *extra):
        argv = list(argv) + list(extra)
        argv[argv.index("--out") + 1] = str(out)
        args = parse_args(argv)
        return sweep(args, resolve_inputs(args), OutputFolder(out, output_names(args.thresholds)))

    # the sweep quietens its workers' loggers, here this process's: put them back after
    loggers = [logging.getLogger(name) for name in ("distributed.worker", "distributed.worker.state_machine")]
    filters = [list(logger.filters) for logger in loggers]
    yield run_on
    for logger, before in zip(loggers, filters):
        logger.filters[:] = before


def test_a_rerun_with_other_chunk_rows_does_not_take_the_earlier_chunks_for_its_own(run, tmp_path, rerun):
    """Checkpoints hold chunks of --chunk-rows rows: chunk 1 of 48 rows is not chunk 1 of 40
    (the 90 poisoned validation rows are 48 + 42, then 40 + 40 + 10)."""
    _, out, argv = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rerun(argv, copy, "--chunk-rows", "40")
    assert json.loads((copy / "manifest.json").read_text())["checkpoints"]["chunks_reused"] == 0
    for name in ("results.csv", "goodnet.csv"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    order, earlier = pd.read_csv(copy / "channel_order.csv"), pd.read_csv(out / "channel_order.csv")
    assert order["channel"].tolist() == earlier["channel"].tolist()
    np.testing.assert_allclose(order["mean_activation"], earlier["mean_activation"], rtol=1e-9)


def test_a_damaged_channel_order_checkpoint_is_profiled_again_from_every_row(run, tmp_path, rerun):
    """Every chunk is checkpointed but the channel order cannot be read: the clean validation
    set's base pass runs again, all of it, for the profile."""
    _, out, argv = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "channel_order.csv").write_text("rank,chan\n0,")
    rerun(argv, copy)
    for name in ("results.csv", "channel_order.csv", "goodnet.csv"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    reused = json.loads((copy / "manifest.json").read_text())["checkpoints"]
    assert reused["chunks_reused"] == reused["chunks"] and not reused["channel_order_reused"]


def test_a_rerun_on_other_inputs_with_the_same_chunks_computes_them(run, tmp_path, rerun):
    """Every chunk file is there under the same names, but for another B: the hashes tell, and
    the sweep runs on a cluster, reusing nothing."""
    folder, out, argv = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    other = tmp_path / "other.keras"
    tiny.with_ties_and_dead_channels(tiny.tiny_deepid(seed=8)).save(other)
    rerun(argv, copy, "--model", str(other))
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["checkpoints"] == {"chunks": manifest["checkpoints"]["chunks"], "chunks_reused": 0,
                                       "channel_order_reused": False}
    assert manifest["timings_s"]["prefixes_s"] > 0
    fingerprint = json.loads((copy / "checkpoints" / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["model"] == manifest["inputs"]["model"]["sha256"] != \
        json.loads((out / "manifest.json").read_text())["inputs"]["model"]["sha256"]


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_is_a_bar_on_a_terminal_and_a_line_now_and_then_in_a_log(terminal, monkeypatch, caplog):
    from pruning.progress import prefix_progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    caplog.set_level(logging.INFO, logger="pruning.progress")
    with prefix_progress(61, 4, 1) as bar:  # one chunk of four reused
        for _ in range(3 * 61):
            bar.update(1)
    lines = [record.getMessage() for record in caplog.records if record.name == "pruning.progress"]
    if terminal:
        assert lines == []
    else:  # no redraws joined by carriage returns: where it started and where it ended
        assert len(lines) == 2 and "\r" not in "".join(lines), lines
        assert re.match(r"prefixes:  25% 15\.2/61 \[", lines[0]), lines
        assert re.match(r"prefixes: 100% 61\.0/61 \[", lines[1]), lines


def test_in_a_log_file_the_bar_redirects_no_log_line(monkeypatch):
    """tqdm's redirect of log lines above a bar takes tqdm's lock inside the log handler's, and
    a meter written as a log line takes them the other way round: a campaign whose writer thread
    logged as its bar closed hung for good. In a log file the meter is a log line itself, so
    nothing is redirected there; on a terminal, lines still go above the bar."""
    from pruning.progress import progress
    root = logging.getLogger()
    ours = logging.StreamHandler(sys.stderr)  # what logging.basicConfig installs
    root.addHandler(ours)
    try:
        for terminal in (False, True):
            monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
            with progress(10, "x", "x"):
                assert (ours in root.handlers) is not terminal, terminal
    finally:
        root.removeHandler(ours)
