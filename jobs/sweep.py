"""The pruning-defense sweep as Dask tasks.

    python -m jobs.sweep --single-node                      # the embedded demo, on this machine
    python -m jobs.sweep --model bd_net.h5 --data data/ --single-node --workers 2
    python -m jobs.sweep --single-node --fine-tune          # then fine-tune each B' and B (fine-pruning)
    python -m jobs.sweep --weights bd_weights.h5 --arch deepid --classes 1283 \\
        --data data/ --thresholds 2 4 10 --out /scratch/$USER/run1 --scheduler-file sched.json
    sbatch slurm/sweep.sh --model bd_net.h5 --data data/ --out /scratch/$USER/run1

Task graph: ``activations-<set>-<i>`` (the base over one chunk of rows, once) ->
``channel-sums-<i>`` and ``profile`` (channel order from clean validation) ->
``evaluate-prefixes-<a>-<b>-<set>-<i>`` (B'_k for k = a..b-1 on one chunk; the blocks cover
k = 0..C) -> selection -> with --fine-tune, ``fine-tune-k<K>`` per selected B' and B (one task
each, jobs.fine_pruning) -> GoodNet and reports on the client. Every key ends in the run's own
tag, so that two sweeps sharing one cluster never share a result. Finished chunks (every prefix
of them) are checkpointed in ``OUT/checkpoints`` and read back by a rerun with the same ``--out``;
a rerun that finds every chunk there starts no cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING


def dask_config_file_problem(error: ValueError) -> str:
    """Dask's (multi-line) complaint about a malformed config file of its own, as one line."""
    head, _, detail = str(error).partition(", original error message:")
    detail = f" ({' '.join(detail.split())[:160]})" if detail.strip() else ""
    return (f"{head.strip()}{detail}; fix or remove that file (Dask reads ~/.config/dask, "
            "/etc/dask and $DASK_CONFIG)")


try:  # Dask reads its yaml files as it is imported: a malformed one is bad input, not a traceback
    import dask  # noqa: F401
except ValueError as error:
    if __name__ != "__main__" or "dask config file" not in str(error):
        raise
    print(f"error: {dask_config_file_problem(error)}", file=sys.stderr)
    sys.exit(2)

from distributed import Future, as_completed

from jobs import arguments, cluster
from jobs.arguments import explain, interrupted_line
from jobs.checkpoints import CHECKPOINTS, Checkpoints, may_hold_every_chunk
from jobs.fine_pruning import run_fine_tuning
from jobs.monitor import say_when_no_worker_is_left
from jobs.outdir import OutputFolder
from jobs.outputs import output_names
from jobs.progress import prefix_progress
from jobs.stopping import quiet_distributed, stop_on_signals
from pruning.counts import sum_chunks
from pruning.data import InputError
from pruning.profile import channel_order

# What loads TensorFlow (jobs.inputs, jobs.tasks, jobs.finish) is imported where it is used,
# after the command line is read: --help and a mistyped flag answer at once, the fork server of
# --single-node starts importing it alongside this process, and Ctrl-C during the import is
# handled like any other.
if TYPE_CHECKING:
    from jobs.inputs import SweepInputs

log = logging.getLogger("jobs.sweep")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (:mod:`jobs.arguments`); its help is this module's docstring."""
    return arguments.parse_args(argv, __doc__)


def run_sweep(inputs: SweepInputs, client, checkpoints: Checkpoints, chunk_rows: int,
              prefixes_per_task: int = arguments.PREFIXES_PER_TASK):
    """Submit the task graph; return (channel order, {k: {set: Counts}}, timings, what was
    reused from checkpoints).

    Work is checkpointed per chunk of rows (all prefixes of it): Dask runs a chunk's prefix
    tasks as soon as its activations exist and then frees them, so memory stays flat as the
    data grows (but for the clean validation set's activations, held until the channel order
    is known), and a rerun skips finished chunks entirely, base pass included.
    """
    from jobs.tasks import activations_task, channel_sums_task, evaluate_prefixes_task, profile_task

    started = time.perf_counter()
    spec, conv, read = inputs.spec, inputs.conv, inputs.read
    # Dask gives a key's result to whoever asks for that key: a second sweep on the same cluster
    # with fixed keys would be handed this one's results. (8 hex digits: the dashboard groups
    # tasks by name without them.)
    run = uuid.uuid4().hex[:8]
    ranges = chunk_ranges(inputs, chunk_rows)
    done = checkpoints.chunks(inputs.channels + 1)
    order = checkpoints.channel_order(inputs.channels)
    reused = {"chunks": len(ranges), "chunks_reused": len(done), "channel_order_reused": order is not None}
    needed = [key for key in ranges if key not in done or (order is None and key[0] == "clean_valid")]
    activations = {key: client.submit(activations_task, spec, conv, read, key[0], inputs.sets[key[0]],
                                      *ranges[key], key=f"activations-{key[0]}-{key[1]}-{run}")
                   for key in needed}
    if order is None:
        valid = [client.submit(channel_sums_task, future, key=f"channel-sums-{key[1]}-{run}")
                 for key, future in activations.items() if key[0] == "clean_valid"]
        sums, values = client.submit(profile_task, *valid, key=f"profile-{run}").result()
        order = checkpoints.save_channel_order(channel_order(sums, values))
    else:
        log.info("channel order read back from %s", checkpoints.folder)
    profiled = time.perf_counter()

    channels = order["channel"].tolist()
    prefixes = len(channels) + 1
    todo = [key for key in ranges if key not in done]
    log.info("reused from checkpoints: %d of %d chunks (%d prefix evaluations); %d to evaluate",
             len(done), len(ranges), len(done) * prefixes, len(todo) * prefixes)
    pending, tallies = {}, {key: [None] * prefixes for key in todo}
    for key in todo:  # chunk by chunk, so each chunk's activations are freed as soon as it is done
        for first in range(0, prefixes, prefixes_per_task):
            stop = min(first + prefixes_per_task, prefixes)
            future = client.submit(evaluate_prefixes_task, spec, conv, read, activations[key],
                                   tuple(channels), first, stop, retries=2,
                                   key=f"evaluate-prefixes-{first}-{stop}-{key[0]}-{key[1]}-{run}")
            pending[future] = (key, first)
    activations.clear()  # the scheduler keeps each chunk only while its prefix tasks need it
    with prefix_progress(prefixes, len(ranges), len(done)) as bar:
        for future in as_completed(pending):
            key, first = pending.pop(future)
            block = future.result()
            tallies[key][first:first + len(block)] = block
            bar.update(len(block))
            if all(counts is not None for counts in tallies[key]):
                done[key] = checkpoints.save_chunk(*key, tallies.pop(key))
    timings = {"profile_s": profiled - started, "prefixes_s": time.perf_counter() - profiled}
    return order, sum_chunks(done, prefixes), timings, reused


def chunk_ranges(inputs: SweepInputs, chunk_rows: int) -> dict[tuple[str, int], tuple[int, int]]:
    """``(set, index) -> (start, stop)``: the chunks of rows, as tasks and checkpoints cut them."""
    return {(name, i): bounds for name, lab_set in inputs.sets.items()
            for i, bounds in enumerate(lab_set.chunks(chunk_rows))}


def read_back(inputs: SweepInputs, checkpoints: Checkpoints, chunk_rows: int):
    """What :func:`run_sweep` returns, from checkpoints alone when they hold the channel order
    and every chunk of these inputs; else None (something is left to compute)."""
    ranges = chunk_ranges(inputs, chunk_rows)
    order, done = checkpoints.channel_order(inputs.channels), checkpoints.chunks(inputs.channels + 1)
    if order is None or not set(ranges) <= set(done):
        return None
    prefixes = len(order) + 1
    log.info("reused from checkpoints: %d of %d chunks (%d prefix evaluations); 0 to evaluate, "
             "so no Dask cluster is needed", len(ranges), len(ranges), len(ranges) * prefixes)
    reused = {"chunks": len(ranges), "chunks_reused": len(ranges), "channel_order_reused": True}
    return order, sum_chunks(done, prefixes), {"profile_s": 0.0, "prefixes_s": 0.0}, reused


def sweep(args, inputs: SweepInputs, out: OutputFolder) -> list[str]:
    """Hold --out's lock, run the task graph, write the outputs; return the files written."""
    from jobs import finish
    from jobs.inputs import warn_copied_sets
    from jobs.tasks import QuietWorkerLogs

    with out.locked(), ThreadPoolExecutor(1) as background:
        # sha256 of every input (about a second per GB), here, while the cluster starts
        hashing = background.submit(inputs.fingerprint)

        def open_checkpoints() -> Checkpoints:
            if out.checkpoints is None:
                out.open_checkpoints(hashing.result() | {"chunk_rows": args.chunk_rows})
                warn_copied_sets(inputs)
            return out.checkpoints

        swept = None
        if may_hold_every_chunk(out.path / CHECKPOINTS, chunk_ranges(inputs, args.chunk_rows)):
            # A rerun of a finished sweep (for its outputs again, other --thresholds): wait for
            # the hashes, which every run computes here, to know before starting a cluster.
            # What is left then is selection, B', G and the reports, here as in every run: a
            # model loaded, copied and saved per threshold, G's scores added up from the tallies.
            swept = read_back(inputs, open_checkpoints(), args.chunk_rows)
        tuned = None
        if swept is None or args.fine_tune:  # (fine-tuning always runs on the cluster)
            with contextlib.ExitStack() as stopping, cluster.open_client(args) as client:
                if not (args.scheduler_address or args.scheduler_file):
                    # Only on workers this run started: a plugin stays on a running cluster, and
                    # every worker that later joins it would have to import this project.
                    with contextlib.suppress(Exception):  # only quietens the workers' logs
                        client.register_plugin(QuietWorkerLogs())
                try:
                    with say_when_no_worker_is_left(client, args):
                        if swept is None:
                            swept = run_sweep(inputs, client, open_checkpoints(), args.chunk_rows,
                                              args.prefixes_per_task)
                        if args.fine_tune:
                            started = time.perf_counter()
                            tuned = run_fine_tuning(inputs, args, client, open_checkpoints(), *swept[:2])
                            swept[2]["fine_tune_s"] = time.perf_counter() - started
                except BaseException as error:
                    if isinstance(error, KeyboardInterrupt) or not args.traceback:
                        # a stop or a failure ends in one line: no tracebacks from distributed
                        # while the cluster closes (a lost scheduler's cancelled reconnect,
                        # tasks in flight)
                        stopping.enter_context(quiet_distributed())
                    release_tasks(client)
                    raise
        return finish.write_outputs(inputs, args, out.path, *swept, tuned=tuned)


def release_tasks(client) -> None:
    """Cancel every task this client still holds. A stopped or failed run's traceback keeps
    its futures alive until after the cluster closes: without this, the workers would hold its
    chunks (and a batch job's could not retire)."""
    with contextlib.suppress(Exception):  # the scheduler may be gone
        client.cancel([Future(key, client) for key in list(client.futures)])


def check_line(inputs: SweepInputs, args, out: OutputFolder) -> str:
    """The one line ``--check`` prints when every input is good."""
    rows = "+".join(str(s.rows) for s in inputs.sets.values())
    return (f"inputs OK: model {inputs.spec.path} ({inputs.classes} classes), layer {inputs.conv} "
            f"({inputs.channels} channels, read at {inputs.read}), sets of {rows} images, "
            f"thresholds {' '.join(f'{t:g}' for t in args.thresholds)}, --out {out.path} writable and free")


def main(argv=None) -> int:
    """Run the sweep; every failure ends in one ``error: ...`` line on stderr.

    Exit status 2: a bad input or flag, found before any work (nothing in --out is changed) or,
    for problems only a worker can see (NaN pixels in a chunk), during the sweep: then --out
    keeps its results and gains at most the checkpoints of finished chunks. Exit status 1: the
    run failed for another reason (a worker died, a file could not be written, a bug: one line
    ``error: internal error ...``, with the full traceback under --traceback). 130: interrupted
    (Ctrl-C); 143 and 129: stopped by SIGTERM (kill, scancel) or SIGHUP (a closed terminal).
    """
    args = out = None
    try:
        args = parse_args(argv)
        # --check's one line says what the inputs' INFO lines would (slurm/sweep.sh runs it
        # before the sweep, whose own INFO lines would then come twice in the job's log)
        logging.basicConfig(level=logging.WARNING if args.check else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if cluster.is_service_rank(args):
            # SLURM ranks 0 and 2..: scheduler and workers serve until the client is done, then
            # exit inside open_client; inputs and the lock are the client rank's business.
            with cluster.open_client(args):
                return 0
        stop_on_signals()                      # kill and a closed terminal stop as Ctrl-C does
        out = OutputFolder(Path(args.out), output_names(args.thresholds, args.fine_tune))  # writes nothing
        out.check_lock()
        if not (args.check or (out.holds_a_finished_sweep() and not args.fine_tune)):
            # (a rerun of a finished sweep most likely starts no cluster: no process importing
            # TensorFlow for workers alongside; if it needs some after all, other inputs, they
            # import it themselves, a few seconds later)
            cluster.prepare_local_workers(args)
        from jobs.inputs import resolve_inputs
        inputs = resolve_inputs(args)          # every input checked before any work
        out.check_inputs(inputs.paths)
        if args.check:
            print(check_line(inputs, args, out))
            return 0
        written = sweep(args, inputs, out)
        log.info("done: %d files in %s", len(written), out.path.resolve())
        print(f"outputs in {out.path.resolve()}: " + ", ".join(sorted(written)))
        return 0
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(interrupted_line(out, signum), file=sys.stderr)
        return 128 + signum
    except Exception as error:
        if args is not None and args.traceback and not isinstance(error, InputError):
            raise
        message, status = explain(error, args, out)
        print("error: " + " ".join(message.split()), file=sys.stderr)  # always one line
        return status
    finally:
        if args is not None and args.slurm_runner and not cluster.is_service_rank(args):
            from jobs.slurm import end_unjoined_runner
            end_unjoined_runner(args)  # the job's scheduler and workers end with this rank's run


if __name__ == "__main__":
    sys.exit(main())
