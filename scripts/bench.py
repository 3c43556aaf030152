"""Benchmark: the seeds' loop against our sweep, side by side, at the lab's real sizes.

    python scripts/bench.py                       # DeepID with random weights (worst case)
    python scripts/bench.py --weights bd_weights.h5   # the lab's B: dormant channels skip work
    python scripts/bench.py --scale 0.1 --skip-4x      # a quick look

Inputs are random 0-255 pixels in lab-format HDF5 files (11,547 + 11,547 validation and
12,830 + 12,830 test images at --scale 1). The seeds' loop zeroes one more conv_3 channel,
then runs ``model.predict`` over all four sets; it costs the same at every prefix, so we time
--seed-prefixes of them before and after our core (this machine's speed drifts) and scale
to all 61. Our sweep is ``python -m jobs.sweep --single-node`` as a user runs it (1 and 2
workers; its wall time, and the profile + prefixes time from its manifest), and its pure core
in one process. Peak memory is the largest summed RSS of the sweep's process tree, at 1x and
4x the data.

The inputs are written to a temporary folder (under $TMPDIR, removed at the end): 1.5 GB at
--scale 1, and 6 GB more for the 4x run (--skip-4x leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import psutil

from pruning.data import LAB_LAYOUT, InputError, lab_paths, open_lab_set, write_lab_h5
from pruning.models import ModelSpec, load_model
from pruning.report import save_model, write_text

LAB_ROWS = {"clean_valid": 11547, "poisoned_valid": 11547, "clean_test": 12830, "poisoned_test": 12830}


def make_inputs(folder: Path, scale: float, weights: str | None) -> Path:
    from pruning.deepid import build_deepid  # Keras: imported once the flags and --doc are checked
    model = load_model(ModelSpec(weights, weights_only=True)) if weights else build_deepid()
    save_model(model, folder / "bd_net.h5")  # quiet: the lab's format is legacy .h5 on purpose
    rng = np.random.default_rng(0)
    for name, rel in LAB_LAYOUT.items():
        rows = max(1, int(LAB_ROWS[name] * scale))
        images = rng.uniform(0, 255, (rows, 55, 47, 3)).astype(np.float32)
        write_lab_h5(folder / "data" / rel, images, rng.integers(0, 1283, rows))
    return folder / "bd_net.h5"


def seeds_loop(model_path: Path, data: Path, prefixes: int, first: int = 0) -> float:
    """Seconds per prefix of the seeds' loop: zero one more channel (``first``, ``first`` + 1,
    ...), re-run every set."""
    from pruning.backend import keras
    model = keras.models.load_model(model_path, compile=False)
    sets = [open_lab_set(p, (55, 47, 3)).read() for p in lab_paths(data).values()]
    layer = model.get_layer("conv_3")
    model.predict(sets[0][0][:64], verbose=0)  # warm-up outside the timing
    started = time.perf_counter()
    for channel in range(first, first + prefixes):
        kernel, bias = layer.get_weights()
        kernel[..., channel], bias[channel] = 0, 0
        layer.set_weights([kernel, bias])
        for images, labels in sets:
            np.mean(np.argmax(model.predict(images, verbose=0), axis=1) == labels)
    return (time.perf_counter() - started) / prefixes


def core_sweep(model_path: Path, data: Path) -> float:
    """Our algorithm in one process, no Dask (``pruning.defend``): the inputs checked, base once,
    then every prefix on every set, and the selection."""
    import pruning

    started = time.perf_counter()
    pruning.defend(str(model_path), **lab_paths(data))
    return time.perf_counter() - started


def job_sweep(model_path: Path, data: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """Wall seconds, peak summed RSS (GB) and the sweep's own seconds (profile + prefixes, from
    its manifest) of ``python -m jobs.sweep --single-node``."""
    command = [sys.executable, "-m", "jobs.sweep", "--model", str(model_path), "--data", str(data),
               "--out", str(out), "--single-node", "--workers", str(workers)]
    started = time.perf_counter()
    log = out.with_name(out.name + ".log")  # the sweep's stderr, for its error line if it fails
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    peak = [0]

    def watch():
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if process.wait() != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise SystemExit(f"error: the sweep failed (exit status {process.returncode}): "
                         f"{' '.join(command)}: {lines[-1]}")
    watcher.join()
    timings = json.loads((out / "manifest.json").read_text())["timings_s"]
    return time.perf_counter() - started, peak[0] / 1e9, timings["profile_s"] + timings["prefixes_s"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the sweep's
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_args(parser: Parser, args: argparse.Namespace) -> None:
    """Refuse bad flags before the inputs are written (1.5 GB) and the first timings run."""
    if not (math.isfinite(args.scale) and args.scale > 0):
        parser.error(f"--scale must be a positive number, got {args.scale:g}")
    # before and after our core, each times that many more of conv_3's 60 channels
    if not 1 <= args.seed_prefixes <= 30:
        parser.error(f"--seed-prefixes must be 1 to 30, got {args.seed_prefixes}")
    if args.weights:
        try:
            load_model(ModelSpec(args.weights, weights_only=True))
        except InputError as error:
            parser.exit(2, f"error: {error}\n")


def main(argv: list[str] | None = None) -> None:
    summary, details = __doc__.split("\n\n", 1)
    parser = Parser(prog="python scripts/bench.py", description=summary, epilog=details,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="weights for DeepID (default: random initialisation)")
    parser.add_argument("--scale", type=float, default=1.0, help="data size relative to the lab's (default: 1, the lab's sizes)")
    parser.add_argument("--seed-prefixes", type=int, default=1,
                        help="seeds' loop prefixes to time, before and after our core each (default: 1)")
    parser.add_argument("--skip-4x", action="store_true", help="skip the 4x-data memory run")
    parser.add_argument("--doc", metavar="MD", help="also write the figures into this Markdown file, between "
                        f"its lines {DOC_BEGIN!r} and {DOC_END!r} (make bench: docs/benchmark.md)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.doc:
        doc_section(args.doc, [])  # a file without its markers is refused before the long run
    said = []

    def say(line: str) -> None:  # every figure is also kept for --doc
        print(line, flush=True)
        said.append(line)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        model_path = make_inputs(tmp, args.scale, args.weights)
        rows = sum(open_lab_set(p, (55, 47, 3)).rows for p in lab_paths(tmp / "data").values())
        say(f"DeepID ({'weights ' + args.weights if args.weights else 'random weights'}), "
              f"{rows} images in four sets, 61 prefixes, {os.cpu_count()} cores")
        # the seeds' loop is timed before and after our core: this machine's speed drifts
        before = seeds_loop(model_path, tmp / "data", args.seed_prefixes)
        core = core_sweep(model_path, tmp / "data")
        after = seeds_loop(model_path, tmp / "data", args.seed_prefixes, first=args.seed_prefixes)
        seeds = (before + after) / 2 * 61
        say(f"seeds' loop: {before:.1f} s per prefix before our core, {after:.1f} s after "
              f"-> {seeds:.0f} s for 61 prefixes")
        say(f"our sweep, core in one process: {core:.1f} s  ({seeds / core:.0f}x faster)")
        wall_1, peak_1, inside_1 = job_sweep(model_path, tmp / "data", tmp / "out1", workers=1)
        say(f"our sweep, jobs.sweep --single-node, 1 worker: {wall_1:.1f} s wall "
              f"({seeds / wall_1:.0f}x faster), of which profile + prefixes {inside_1:.1f} s "
              f"({seeds / inside_1:.0f}x); peak memory {peak_1:.2f} GB")
        wall_2, peak_2, inside_2 = job_sweep(model_path, tmp / "data", tmp / "out2", workers=2)
        if (tmp / "out1" / "results.csv").read_bytes() != (tmp / "out2" / "results.csv").read_bytes():
            raise SystemExit("the 1- and 2-worker sweeps disagree: results.csv differs")
        say(f"our sweep, 2 workers: {wall_2:.1f} s wall, of which profile + prefixes "
              f"{inside_2:.1f} s (speed-up over 1 worker: {wall_1 / wall_2:.2f}x wall, "
              f"{inside_1 / inside_2:.2f}x profile + prefixes); peak memory {peak_2:.2f} GB")
        if not args.skip_4x:
            big = tmp / "big"
            big.mkdir()
            make_inputs(big, 4 * args.scale, args.weights)
            wall_4, peak_4, _ = job_sweep(model_path, big / "data", tmp / "out4", workers=1)
            say(f"4x the data, 1 worker: {wall_4:.1f} s wall, peak memory {peak_4:.2f} GB "
                  f"({peak_4 / peak_1:.2f}x the 1x peak)")
    if args.doc:
        command = " ".join(["python scripts/bench.py", *(argv if argv is not None else sys.argv[1:])])
        write_text(args.doc, doc_section(args.doc, [
            f"Written by `{command}` on {time.strftime('%Y-%m-%d')}, {cpu_name()}, "
            f"{os.cpu_count()} cores:", "", "```", *said, "```"]))


DOC_BEGIN, DOC_END = "<!-- make bench: its latest figures, below -->", "<!-- make bench: end -->"


def doc_section(path: str, lines: list[str]) -> str:
    """The text of ``path`` with ``lines`` between its two markers (exit 2 if it lacks them)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        fail(f"--doc {path}: {error.strerror}")
    head, begin, rest = text.partition(DOC_BEGIN + "\n")
    _, end, tail = rest.partition(DOC_END + "\n")
    if not (begin and end):
        fail(f"--doc {path} has no lines {DOC_BEGIN!r} and {DOC_END!r} to write between")
    return head + begin + "".join(line + "\n" for line in lines) + end + tail


def fail(problem: str) -> None:
    """Bad input: one line, exit status 2."""
    print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(2)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
