"""The pruning-defense sweep as Dask tasks: the command line around :mod:`pruning.defense`
(``fine-pruning sweep`` runs it too), with a cluster, --out's lock and checkpoints.

    python -m jobs.sweep --single-node                      # the embedded demo, on this machine
    python -m jobs.sweep --model bd_net.h5 --data data/ --single-node --workers 2
    python -m jobs.sweep --single-node --fine-tune          # then fine-tune each B' and B (fine-pruning)
    python -m jobs.sweep --weights bd_weights.h5 --arch deepid --classes 1283 \\
        --data data/ --thresholds 2 4 10 --out /scratch/$USER/run1 --scheduler-file sched.json
    sbatch slurm/sweep.sh --model bd_net.h5 --data data/ --out /scratch/$USER/run1
    python -m jobs.sweep --campaign suspects.yaml --single-node --out results/campaign  # many models

Task graph: ``activations-<set>-<i>`` (the base over one chunk of rows, once) ->
``channel-sums-<i>`` and ``profile`` (channel order from clean validation) ->
``evaluate-prefixes-<a>-<b>-<set>-<i>`` (B'_k for k = a..b-1 on one chunk; the blocks cover
k = 0..C) -> selection -> with --fine-tune, ``fine-tune-k<K>`` per selected B' and B (one task
each) -> GoodNet and reports on the client (:mod:`pruning.sweep`). Every key ends in the run's own
tag, so that two sweeps sharing one cluster never share a result. Finished chunks (every prefix
of them) are checkpointed in ``OUT/checkpoints`` and read back by a rerun with the same ``--out``;
a rerun that finds every chunk there starts no cluster.
"""
from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
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


from jobs import arguments, cluster
from jobs.arguments import explain, interrupted_line
from jobs.checkpoints import CHECKPOINTS, Checkpoints, may_hold_every_chunk
from jobs.finish import output_names
from jobs.outdir import OutputFolder
from jobs.stopping import stop_behind, stop_on_signals
from pruning.data import InputError

# What loads TensorFlow (jobs.inputs, pruning.prune, pruning.defense) is imported where it is
# used, after the command line is read: --help and a mistyped flag answer at once, the fork server of
# --single-node starts importing it alongside this process, and Ctrl-C during the import is
# handled like any other. (pruning.sweep loads none: a Dask scheduler imports it to unpickle
# the tasks, and this process, as the scheduler rank of a SLURM job, never imports TensorFlow.)
if TYPE_CHECKING:
    from pruning.inputs import SweepInputs

log = logging.getLogger("jobs.sweep")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (:mod:`jobs.arguments`); its help is this module's docstring."""
    return arguments.parse_args(argv, __doc__)


def sweep(args, inputs: SweepInputs, out: OutputFolder) -> list[str]:
    """Hold --out's lock, run the defense (:func:`pruning.defense.run_defense`) on a cluster,
    write the outputs; return the files written."""
    from jobs.finish import write_outputs
    from jobs.inputs import fingerprint, warn_copied_sets
    from pruning.defense import run_defense
    from pruning.sweep import chunk_ranges, read_back

    with out.locked(), ThreadPoolExecutor(1) as background:
        # sha256 of every input (about a second per GB), here, while the cluster starts
        hashing = background.submit(fingerprint, inputs)

        def open_checkpoints() -> Checkpoints:
            if out.checkpoints is None:
                out.open_checkpoints(hashing.result() | {"chunk_rows": args.chunk_rows})
                warn_copied_sets(inputs)
            return out.checkpoints

        def defend(client, swept=None):
            return run_defense(inputs, client, open_checkpoints(), args.thresholds, args.relative,
                               args.fine_tune_settings, args.chunk_rows, args.prefixes_per_task, swept)

        swept = None
        if may_hold_every_chunk(out.path / CHECKPOINTS, chunk_ranges(inputs.sets, args.chunk_rows)):
            # A rerun of a finished sweep (for its outputs again, other --thresholds): wait for
            # the hashes, which every run computes here, to know before starting a cluster.
            # What is left then is selection, B', G and the reports, here as in every run: a
            # model loaded, copied and saved per threshold, G's scores added up from the tallies.
            swept = read_back(inputs, open_checkpoints(), args.chunk_rows)
        if swept is not None and not args.fine_tune:  # (fine-tuning always runs on the cluster)
            defense = defend(None, swept)
        else:
            with cluster.working_client(args) as client:
                defense = defend(client, swept)
        return write_outputs(out.path, defense)


def check_line(inputs: SweepInputs, args, out: OutputFolder) -> str:
    """The one line ``--check`` prints when every input is good."""
    rows = "+".join(str(s.rows) for s in inputs.sets.values())
    return (f"inputs OK: model {inputs.spec.path} ({inputs.classes} classes), layer {inputs.conv} "
            f"({inputs.channels} channels, read at {inputs.read}), sets of {rows} images, "
            f"thresholds {' '.join(f'{t:g}' for t in args.thresholds)}, --out {out.path} writable and free")


def done(written: list[str], out: OutputFolder) -> None:
    log.info("done: %d files in %s", len(written), out.path.resolve())
    print(f"outputs in {out.path.resolve()}: " + ", ".join(sorted(written)))


def stopped(stop: KeyboardInterrupt, out: OutputFolder | None) -> int:
    """The stop's one line on stderr; its exit status (128 + the signal)."""
    signum = getattr(stop, "signum", signal.SIGINT)
    print(interrupted_line(out, signum), file=sys.stderr)
    return 128 + signum


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
        if args.campaign:
            from jobs.campaign import Campaign
            campaign = Campaign(args)          # the file and every suspect's flags: writes nothing
            out = campaign.out
            if not args.check:
                cluster.prepare_local_workers(args)
            campaign.resolve()                 # every suspect's inputs checked before any work
            if args.check:
                print(campaign.check_line())
            else:
                done(campaign.run(), out)
            return 0
        out = OutputFolder(Path(args.out), output_names(args.thresholds, args.fine_tune))  # writes nothing
        out.check_lock()
        # Once the cheap checks pass, the workers' fork server imports TensorFlow while this
        # process loads the model (a typo in a path starts nothing). A rerun of a finished sweep
        # most likely starts no cluster: none then; if it needs one after all (other inputs),
        # its workers import TensorFlow themselves, a few seconds later.
        from jobs.inputs import resolve_inputs
        no_workers = args.check or (out.holds_a_finished_sweep() and not args.fine_tune)
        start_workers = (lambda: None) if no_workers else functools.partial(cluster.prepare_local_workers, args)
        inputs = resolve_inputs(args, start_workers)  # every input checked before any work
        out.check_inputs(inputs.paths)
        if args.check:
            print(check_line(inputs, args, out))
            return 0
        done(sweep(args, inputs, out), out)
        return 0
    except KeyboardInterrupt as stop:
        return stopped(stop, out)
    except Exception as error:
        if args is not None and args.traceback and not isinstance(error, InputError):
            raise
        stop = stop_behind(error)
        if stop is not None:  # closing after the stop failed: the stop is what happened
            log.debug("closing after a stop failed", exc_info=error)
            return stopped(stop, out)
        message, status = explain(error, args, out)
        print("error: " + " ".join(message.split()), file=sys.stderr)  # always one line
        return status
    finally:
        if args is not None and args.slurm_runner and not cluster.is_service_rank(args):
            from jobs.slurm import end_unjoined_runner
            end_unjoined_runner(args)  # the job's scheduler and workers end with this rank's run


if __name__ == "__main__":
    sys.exit(main())
