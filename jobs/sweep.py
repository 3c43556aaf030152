"""The pruning-defense sweep as Dask tasks.

    python -m jobs.sweep --single-node                      # the embedded demo, on this machine
    python -m jobs.sweep --model bd_net.h5 --data data/ --single-node --workers 2
    python -m jobs.sweep --weights bd_weights.h5 --arch deepid --classes 1283 \\
        --data data/ --thresholds 2 4 10 --out /scratch/$USER/run1 --scheduler-file sched.json
    sbatch slurm/sweep.sh --model bd_net.h5 --data data/ --out /scratch/$USER/run1

Task graph: ``activations-<set>-<i>`` (the base over one chunk of rows, once) ->
``profile`` (channel order from clean validation) -> ``evaluate-prefix-<k>-<set>-<i>`` for
every prefix k = 0..C and chunk -> selection, GoodNet and reports on the client. Finished
prefixes are checkpointed in ``OUT/checkpoints`` and read back by a rerun with the same ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from distributed import as_completed
from tqdm import tqdm

from jobs import cluster, finish
from jobs.inputs import SweepInputs, resolve_inputs
from jobs.outdir import Checkpoints, OutputFolder
from jobs.tasks import activations_task, evaluate_prefix_task, profile_task
from pruning.data import CHUNK_ROWS, InputError
from pruning.profile import channel_order
from pruning.prune import Counts

log = logging.getLogger("jobs.sweep")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise InputError(f"{message} (see python -m jobs.sweep --help)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="python -m jobs.sweep", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("the backdoored model B (default: the embedded demo)")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", help="full Keras model (.h5 of any Keras 2.3.1+ vintage, or .keras)")
    which.add_argument("--weights", metavar="PATH", help="weights-only file for --arch")
    model.add_argument("--arch", default="deepid", help="architecture for --weights (default: deepid)")
    model.add_argument("--classes", type=int, default=1283, help="outputs of --arch (default: 1283)")
    data = parser.add_argument_group("data (lab HDF5: 'data' Nx3x55x47 or Nx55x47x3, 'label' N)")
    data.add_argument("--data", metavar="DIR", help="lab layout: cl/valid.h5 cl/test.h5 bd/bd_valid.h5 bd/bd_test.h5")
    for name in ("clean-valid", "poisoned-valid", "clean-test", "poisoned-test"):
        data.add_argument(f"--{name}", metavar="H5", help=f"the {name.replace('-', ' ')} set")
    sweep = parser.add_argument_group("the sweep")
    sweep.add_argument("--layer", help="conv layer to prune (default: the last Conv2D feeding a pooling layer)")
    sweep.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 4.0, 10.0], metavar="X",
                       help="accuracy drops that select B', in points of validation accuracy below B's (default: 2 4 10)")
    sweep.add_argument("--relative", action="store_true", help="thresholds are percent of B's accuracy, not points")
    sweep.add_argument("--out", default="results", help="output folder, e.g. on shared storage (default: results/)")
    sweep.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=f"images per task (default: {CHUNK_ROWS})")
    cluster.add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be at least 1, got {args.chunk_rows}")
    problem = cluster.check_cluster_arguments(args)
    if problem:
        raise InputError(problem)
    return args


def run_sweep(inputs: SweepInputs, client, checkpoints: Checkpoints, chunk_rows: int):
    """Submit the task graph; return (channel order, {k: {set: Counts}}, timings)."""
    started = time.perf_counter()
    spec, conv, read = inputs.spec, inputs.conv, inputs.read
    chunks = {}
    for set_name, lab_set in inputs.sets.items():
        for i, (start, stop) in enumerate(lab_set.chunks(chunk_rows)):
            chunks[set_name, i] = client.submit(activations_task, spec, conv, read, set_name, lab_set,
                                                start, stop, key=f"activations-{set_name}-{i}")
    order = checkpoints.channel_order()
    if order is None:
        valid = [future for (set_name, _), future in chunks.items() if set_name == "clean_valid"]
        sums, values = client.submit(profile_task, *valid, key="profile").result()
        order = checkpoints.save_channel_order(channel_order(sums, values))
    else:
        log.info("channel order read back from %s", checkpoints.folder)
    profiled = time.perf_counter()

    channels = order["channel"].tolist()
    done = checkpoints.prefixes()
    todo = [k for k in range(len(channels) + 1) if k not in done]
    log.info("%d prefixes reused from checkpoints, %d to evaluate", len(done), len(todo))
    pending, tallies = {}, {k: {} for k in todo}
    for k in todo:
        for (set_name, i), chunk in chunks.items():
            future = client.submit(evaluate_prefix_task, spec, conv, read, chunk, tuple(channels[:k]),
                                   key=f"evaluate-prefix-{k}-{set_name}-{i}", retries=2)
            pending[future] = (k, set_name)
    remaining = {k: len(chunks) for k in todo}
    with tqdm(total=len(channels) + 1, initial=len(done), desc="prefixes", unit="prefix") as bar:
        for future in as_completed(pending):
            k, set_name = pending.pop(future)
            counts = future.result()
            tallies[k][set_name] = tallies[k].get(set_name, Counts()) + counts
            remaining[k] -= 1
            if remaining[k] == 0:
                done[k] = checkpoints.save_prefix(k, tallies.pop(k))
                bar.update(1)
    timings = {"profile_s": profiled - started, "prefixes_s": time.perf_counter() - profiled}
    return order, done, timings


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        args = parse_args(argv)
        inputs = resolve_inputs(args)          # every input checked before any work
        out = OutputFolder(Path(args.out))
        with out.locked():
            checkpoints = Checkpoints(out.path / "checkpoints", inputs.fingerprint())
            with cluster.open_client(args) as client:
                log.info("Dask dashboard: %s", client.dashboard_link)
                order, prefixes, timings = run_sweep(inputs, client, checkpoints, args.chunk_rows)
            written = finish.write_outputs(inputs, args, out.path, order, prefixes, timings)
        log.info("done: %d files in %s", len(written), out.path.resolve())
        print(f"outputs in {out.path.resolve()}: " + ", ".join(sorted(written)))
        return 0
    except InputError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished prefixes are kept in the output folder's checkpoints/",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
