"""Benchmark: a campaign of 4 demo-sized suspects against the same 4 runs back to back, side by side.

    python scripts/bench_campaign.py                     # 3 alternated repetitions, 2 workers
    python scripts/bench_campaign.py --repeats 5 --workers 2
    python scripts/bench_campaign.py --task-costs [--weights ../shared/realdata/lab3/bd_weights.h5]

The suspects are 4 copies of the embedded demo BadNet (4 files, so 4 models to load, hash and
cache) on the demo's sets. A: ``python -m jobs.sweep --campaign FILE --single-node --workers W``.
B: ``python -m jobs.sweep --model sK.keras --data DEMO --single-node --workers W`` for K = 1..4,
one after the other. A and B alternate (ABBA...), each into a fresh --out, so that the
machine's drift hits both; the ratio is B's wall time over A's, per repetition. Each suspect's
results.csv must equal its single run's, or the benchmark stops.

``--task-costs`` times, in this process, the tasks of one lab-sized model (DeepID, 60 channels,
1283 classes) on one chunk of 4,096 random images: loading and splitting B, the base pass
(``activations_task``) and the 61 prefixes (``evaluate_prefixes_task``), and prints the cost model
of docs/benchmark.md for 50 such models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "jobs.sweep", *argv], cwd=REPO,
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def campaign_against_runs(repeats: int, workers: int, suspects: int) -> None:
    from pruning.demo import ensure_demo

    demo = ensure_demo(os.environ.get("FINE_PRUNING_CACHE") or REPO / ".cache")
    where = ["--single-node", "--workers", str(workers)]
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        tmp = Path(tmp)
        names = [f"s{k}" for k in range(1, suspects + 1)]
        for name in names:
            shutil.copy(demo.model, tmp / f"{name}.keras")
        lines = ["suspects:"] + [f"  - {{name: {name}, model: {name}.keras, data: {demo.data_dir}}}" for name in names]
        (tmp / "campaign.yaml").write_text("\n".join(lines) + "\n")
        walls = {"campaign": [], "runs": []}
        for repeat in range(repeats):
            order = ["campaign", "runs"] if repeat % 2 == 0 else ["runs", "campaign"]
            for kind in order:
                out = tmp / f"{kind}-{repeat}"
                load = os.getloadavg()[0]
                if kind == "campaign":
                    wall = timed(["--campaign", str(tmp / "campaign.yaml"), *where, "--out", str(out)])
                else:
                    wall = sum(timed(["--model", str(tmp / f"{name}.keras"), "--data", demo.data_dir,
                                      *where, "--out", str(out / name)]) for name in names)
                walls[kind].append(wall)
                print(f"repeat {repeat + 1} {kind}: {wall:.1f} s (load average {load:.1f} at its start)", flush=True)
            for name in names:
                ours, theirs = (tmp / f"{kind}-{repeat}" / name / "results.csv" for kind in ("campaign", "runs"))
                if ours.read_bytes() != theirs.read_bytes():
                    sys.exit(f"{ours} differs from {theirs}")
            shutil.rmtree(tmp / f"campaign-{repeat}")
            manifests = [json.loads((tmp / f"runs-{repeat}" / name / "manifest.json").read_text())["timings_s"]
                         for name in names]
            print("  single runs' sweep (profile + prefixes) s: "
                  + ", ".join(f"{m['profile_s'] + m['prefixes_s']:.1f}" for m in manifests))
            shutil.rmtree(tmp / f"runs-{repeat}")
        ratios = [runs / campaign for campaign, runs in zip(walls["campaign"], walls["runs"])]
        print(f"{suspects} suspects, {workers} workers, {repeats} repetitions: campaign "
              f"{', '.join(f'{w:.1f}' for w in walls['campaign'])} s; runs back to back "
              f"{', '.join(f'{w:.1f}' for w in walls['runs'])} s; ratio runs / campaign "
              f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")


def task_costs(weights: str | None, repeats: int) -> None:
    import numpy as np
    from pruning.backend import keras
    from pruning.data import open_lab_set, write_lab_h5
    from pruning.deepid import build_deepid
    from pruning.models import ModelSpec
    from pruning import sweep as tasks

    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        tmp = Path(tmp)
        if weights:
            spec = ModelSpec(os.path.abspath(weights), weights_only=True, arch="deepid", classes=1283)
        else:
            keras.utils.set_random_seed(0)
            build_deepid().save(tmp / "b.keras")
            spec = ModelSpec(str(tmp / "b.keras"))
        spec = spec.stamped()
        rows = 4096
        images = np.random.default_rng(0).uniform(0, 255, (rows, 55, 47, 3)).astype(np.float32)
        write_lab_h5(tmp / "set.h5", images, np.zeros(rows))
        lab_set = open_lab_set(str(tmp / "set.h5"), (55, 47, 3), 1283)
        started = time.perf_counter()
        tasks.split_for(spec, "conv_3", "pool_3")
        load_s = time.perf_counter() - started
        base, heads, chunk = [], [], None
        for _ in range(repeats):
            started = time.perf_counter()
            chunk = tasks.activations_task(spec, "conv_3", "pool_3", "clean_valid", lab_set, 0, rows)
            base.append(time.perf_counter() - started)
            started = time.perf_counter()
            tasks.evaluate_prefixes_task(spec, "conv_3", "pool_3", chunk, tuple(range(60)), 0, 61)
            heads.append(time.perf_counter() - started)
    act, pre = min(base), min(heads)
    print(f"lab-sized B, one chunk of {rows} images, best of {repeats}: load + split {load_s:.2f} s, "
          f"base pass {act:.2f} s ({', '.join(f'{t:.2f}' for t in base)}), 61 prefixes "
          f"{pre:.2f} s ({', '.join(f'{t:.2f}' for t in heads)})")
    # The lab's sets: 11,547 + 11,547 validation and 12,830 + 12,830 test images, in chunks of 4,096.
    chunks = 2 * math.ceil(11547 / rows) + 2 * math.ceil(12830 / rows)
    per_model = 2 * (11547 + 12830) / rows * (act + pre) + load_s  # task time goes with the rows
    print(f"per lab model: {chunks} chunks, about {per_model:.0f} s of task time on one worker")
    for models, workers in ((50, 8),):
        print(f"{models} models on {workers} workers: {models * per_model / workers:.0f} s of task "
              "time per worker, plus one start-up (campaign)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--suspects", type=int, default=4)
    parser.add_argument("--task-costs", action="store_true")
    parser.add_argument("--weights", help="with --task-costs: a lab weights file (default: random DeepID)")
    args = parser.parse_args()
    if args.task_costs:
        task_costs(args.weights, args.repeats)
    else:
        campaign_against_runs(args.repeats, args.workers, args.suspects)


if __name__ == "__main__":
    main()
