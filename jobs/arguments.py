"""The command line of ``python -m jobs.sweep``: its flags, read and checked before any work,
and how a run that did not finish is told: one line on stderr and an exit status.

2 for bad input, 1 for anything else (with where it happened, for an internal error), 128 +
the signal for a stopped run; a stopped or disconnected run also says what the same command
resumes from.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from distributed.client import FutureCancelledError
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from jobs import cluster, settings
from jobs.errors import NO_WORKERS_LEFT, ClusterError
from jobs.outdir import OutputFolder
from pruning.data import CHUNK_ROWS, PREFIXES_PER_TASK, InputError, named_sets, program
from pruning.scaling import parse_rescale



class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise InputError(f"{message} (see {self.prog} --help)")


def parse_args(argv=None, usage: str = "") -> argparse.Namespace:
    """Read and check ``python -m jobs.sweep``'s flags; ``usage``: a summary, a blank line and
    examples (the entry point's docstring). A bad flag raises :class:`InputError` (one line)."""
    summary, examples = (usage.split("\n\n") + ["", ""])[:2]
    # No abbreviated flags: slurm/sweep.sh reads the flags by their full names, and took
    # `--ou DIR` for no --out (adding its default, which won) and `--single` for no place to run.
    parser = Parser(prog=program("python -m jobs.sweep"), description=summary, epilog="examples:\n" + examples,
                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    model = parser.add_argument_group("the backdoored model B (default: the embedded demo)")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", help="full Keras model (.h5 of any Keras 2.3.1+ vintage, or .keras)")
    which.add_argument("--weights", metavar="PATH", help="weights-only file for --arch")
    model.add_argument("--arch", help="architecture for --weights (default: deepid)")
    model.add_argument("--classes", type=int, help="outputs of --arch (default: 1283, the lab's)")
    model.add_argument("--demo", choices=["standard", "pruning-aware"],
                       help="with no model or data: the embedded demo BadNet (default: standard; "
                            "pruning-aware: the paper's attack that pruning alone leaves in place)")
    data = parser.add_argument_group("data (lab HDF5: 'data' NxCxHxW or NxHxWxC at B's input size, the lab's "
                                     "Nx3x55x47 raw 0-255 pixels; 'label' N)")
    data.add_argument("--data", metavar="DIR", help="lab layout: cl/valid.h5 cl/test.h5 bd/bd_valid.h5 bd/bd_test.h5")
    data.add_argument("--clean-valid", metavar="H5", help="the clean validation set (the least a run needs, "
                                                          "with B)")
    data.add_argument("--clean-test", metavar="H5", help="the clean test set (optional)")
    for split, words in (("valid", "validation"), ("test", "test")):
        data.add_argument(f"--poisoned-{split}", metavar="[NAME=]H5", action="append",
                          help=f"a poisoned {words} set (optional, repeatable): NAME=H5 gets its own "
                               f"columns ({split}_asr_NAME), a bare H5 the column {split}_asr")
    data.add_argument("--rescale", metavar="R", default="1",
                      help="B takes the stored pixels times R, a number or fraction: 1/255 for "
                           "the CSAW-HackML-2020 nets on raw 0-255 data (default: 1)")
    sweep = parser.add_argument_group("the sweep")
    sweep.add_argument("--layer", help="conv layer to prune (default: the last Conv2D feeding a pooling layer, "
                                          "global pooling included)")
    sweep.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 4.0, 10.0], metavar="X",
                       help="accuracy drops that select B', in points of validation accuracy below B's (default: 2 4 10)")
    sweep.add_argument("--relative", action="store_true", help="thresholds are percent of B's accuracy, not points")
    sweep.add_argument("--out", default="results", help="output folder, e.g. on shared storage (default: results/)")
    sweep.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=f"images per task (default: {CHUNK_ROWS})")
    sweep.add_argument("--prefixes-per-task", type=int, default=PREFIXES_PER_TASK, metavar="P",
                       help=f"prefixes k evaluated by one task on one chunk (default: {PREFIXES_PER_TASK}); "
                            "smaller gives more tasks to spread over many workers, larger fewer head calls")
    add_fine_tune_arguments(parser)
    cluster.add_cluster_arguments(parser)
    parser.add_argument_group("a campaign (several suspect models, one job, one cluster)").add_argument(
        "--campaign", metavar="FILE", help="a YAML file of suspects, each with its model, data and "
        "settings as keys (docs/campaign.md); each writes its run's files to OUT/NAME, and "
        "OUT/campaign.csv and campaign.png compare them")
    checks = parser.add_argument_group("checks")
    checks.add_argument("--check", action="store_true",
                        help="check every input, the output folder and its lock, print one line "
                             "'inputs OK: ...' and exit, starting no cluster (slurm/sweep.sh "
                             "runs this before it starts Dask); no place to run is needed")
    checks.add_argument("--traceback", action="store_true",
                        help="on an unexpected (internal) error, show the full traceback instead "
                             "of one line")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (a campaign's suspects are run with them)
    if args.campaign:
        check_campaign_flags(args, parser)
    args.rescale = parse_rescale(args.rescale)
    for split in ("valid", "test"):  # NAME -> path ("" bare)
        flag = f"poisoned_{split}"
        setattr(args, flag, named_sets(getattr(args, flag), "--" + flag.replace("_", "-")))
    expand_home(args)
    described = [f"--{name}" for name in ("arch", "classes") if getattr(args, name) is not None]
    if described and not args.weights:
        raise InputError(f"{' and '.join(described)} {'are' if len(described) > 1 else 'is'} for a "
                         "weights-only file (--weights PATH); a full model or the demo brings its "
                         "own architecture and classes")
    args.arch = "deepid" if args.arch is None else args.arch
    args.classes = 1283 if args.classes is None else args.classes
    if not args.out.strip():
        raise InputError("--out is empty; give a folder (default: results/)")
    for option in ("chunk_rows", "prefixes_per_task"):
        if getattr(args, option) < 1:
            raise InputError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    check_fine_tune_arguments(args)
    problem = cluster.check_cluster_arguments(args) or settings.settings_problem()
    if problem:
        raise InputError(problem)
    if args.scheduler_file and Path(args.scheduler_file).is_dir():
        raise InputError(f"--scheduler-file {args.scheduler_file} is a directory; give the file "
                         "the scheduler wrote (dask scheduler --scheduler-file PATH)")
    return args


SUSPECT_FLAGS = ("model", "weights", "arch", "classes", "demo", "data", "clean_valid", "clean_test",
                 "poisoned_valid", "poisoned_test", "rescale", "layer", "thresholds", "relative",
                 "fine_tune", *(f"fine_tune_{name}" for name in ("epochs", "lr", "patience", "heldout",
                                                                  "seed", "batch")))


def check_campaign_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With --campaign, a suspect's own flags belong in the file (defaults: for all of them)."""
    for name in SUSPECT_FLAGS:
        if getattr(args, name) != parser.get_default(name):
            key = f"fine_tune: {{{name[10:]}: ...}}" if name.startswith("fine_tune_") else f"{name}:"
            raise InputError(f"--{name.replace('_', '-')} is a suspect's setting: with --campaign, "
                             f"give it in the file as '{key}' (under 'defaults:' for every suspect)")


FINE_TUNE_FLAGS = {  # --fine-tune-NAME: (type, pruning.finetune.Settings field, help)
    "epochs": (int, "epochs", "epochs of fine-tuning, fewer only where --fine-tune-patience "
                              "stops it (default: %(default)s)"),
    "lr": (float, "learning_rate", "Adam's learning rate (default: %(default)s)"),
    "patience": (int, "patience", "stop after this many epochs in a row more than the tolerance "
                                  "below the best held-out accuracy (default: %(default)s)"),
    "tolerance": (float, "tolerance", "keep the last epoch whose held-out accuracy is within this "
                                      "many points of the best epoch's (default: %(default)s)"),
    "heldout": (float, "heldout", "share of the clean validation set held out, per class, to "
                                  "choose epochs on (default: %(default)s)"),
    "seed": (int, "seed", "seed of that split and of Keras (default: %(default)s)"),
    "batch": (int, "batch_size", "images per training batch (default: %(default)s)"),
}


def add_fine_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from pruning.finetune_settings import Settings
    group = parser.add_argument_group(
        "fine-pruning (after selection, fine-tune each B' and B on clean validation data)")
    group.add_argument("--fine-tune", action="store_true",
                       help="fine-tune each selected B'_X with its pruned channels held at zero, "
                            "and B itself, on a share of the clean validation set; writes "
                            "finetuned_X=..h5, finetuned_B.h5, goodnet_finetuned_*.keras, "
                            "finepruning.csv and finetune_log.csv")
    for name, (kind, field, words) in FINE_TUNE_FLAGS.items():
        group.add_argument(f"--fine-tune-{name}", type=kind, default=getattr(Settings(), field),
                           metavar={"lr": "LR", "heldout": "SHARE"}.get(name, "N"), help=words)


def check_fine_tune_arguments(args: argparse.Namespace) -> None:
    """Each --fine-tune-* value in range; set ``args.fine_tune_settings`` (None without --fine-tune)."""
    import math
    from pruning.finetune_settings import Settings
    given = [f"--fine-tune-{name}" for name, (_, field, _) in FINE_TUNE_FLAGS.items()
             if getattr(args, f"fine_tune_{name}") != getattr(Settings(), field)]
    if given and not args.fine_tune:
        raise InputError(f"{given[0]} is a setting of --fine-tune; add --fine-tune")
    limits = {"epochs": (1, "at least 1"), "patience": (0, "0 or more"), "batch": (1, "at least 1"),
              "seed": (0, "0 or more")}
    for name, (least, words) in limits.items():
        if getattr(args, f"fine_tune_{name}") < least:
            raise InputError(f"--fine-tune-{name} must be {words}, got {getattr(args, f'fine_tune_{name}')}")
    if not (math.isfinite(args.fine_tune_lr) and args.fine_tune_lr > 0):
        raise InputError(f"--fine-tune-lr must be a positive number, got {args.fine_tune_lr}")
    if not (math.isfinite(args.fine_tune_tolerance) and 0 <= args.fine_tune_tolerance <= 100):
        raise InputError(f"--fine-tune-tolerance must be points between 0 and 100, got "
                         f"{args.fine_tune_tolerance}")
    if not 0 < args.fine_tune_heldout < 1:
        raise InputError(f"--fine-tune-heldout must be a share between 0 and 1 (e.g. 0.2), got "
                         f"{args.fine_tune_heldout}")
    args.fine_tune_settings = Settings(**{field: getattr(args, f"fine_tune_{name}") for name, (_, field, _)
                                          in FINE_TUNE_FLAGS.items()}) if args.fine_tune else None


PATH_FLAGS = ("campaign", "model", "weights", "data", "clean_valid", "poisoned_valid", "clean_test",
              "poisoned_test", "out", "scheduler_file")


def expand_home(args: argparse.Namespace) -> None:
    """A leading ~ in a path flag, as a shell would: it expands none after `--out=`, so
    `sbatch slurm/sweep.sh --out=~/run1` made a folder named ~ in the job's folder."""
    for name in PATH_FLAGS:
        value = getattr(args, name)
        if isinstance(value, dict):  # named poisoned sets
            value.update({key: os.path.expanduser(path) for key, path in value.items()})
        elif value and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


# ------------------------------------------------------------ a run that did not finish

def interrupted_line(out: OutputFolder | None, signum: int = signal.SIGINT) -> str:
    """What an interrupted run leaves to resume from: its finished chunks, if any."""
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    kept = resume_note(out)
    if kept:
        return f"{how}; {kept}"
    return f"{how} before any chunk of rows was finished; no results or checkpoints were written"


def resume_note(out: OutputFolder | None) -> str | None:
    """Where a stopped run's finished chunks are kept, if there are any of its inputs."""
    kept = out.checkpoints.finished() if out is not None and out.checkpoints else 0
    if not kept:
        return None
    return f"{out.checkpoints.folder} holds {kept} finished chunks of rows: the same command resumes from them"


def lost_scheduler_line(out: OutputFolder | None, why: str) -> str:
    """What a run that lost its scheduler leaves to resume from, once the cluster is back."""
    kept = resume_note(out)
    return (f"lost the connection to the Dask scheduler ({why}); "
            + (f"{kept} once the cluster is back" if kept else "no chunk of rows was finished"))


def _kept_per_chunk_size(out: OutputFolder | None) -> str:
    """What following the advice of a smaller --chunk-rows costs: chunks are checkpointed per
    chunk size, and a run with another one replaces them."""
    kept = resume_note(out)
    return f"; {kept} (another --chunk-rows starts over)" if kept else ""


def explain(error: Exception, args, out: OutputFolder | None = None) -> tuple[str, int]:
    """One line and an exit status for a failure: 2 for bad input, 1 for anything else."""
    if isinstance(error, InputError):
        return str(error), 2
    if isinstance(error, ClusterError):
        return str(error), 1
    if isinstance(error, KilledWorker):
        logs = ("the job log (fine-pruning-<jobid>.out)" if args.slurm_runner else
                f"{Path(args.out) / '.dask' / 'worker-logs'} (or jobqueue.slurm.log-directory)"
                if args.slurm_cluster is not None else
                "the lines above" if args.single_node else "the workers' own logs")
        return (f"task {error.task} killed {error.allowed_failures + 1} Dask worker(s), the "
                f"last {getattr(error.last_worker, 'address', error.last_worker)}: a worker "
                "process died while running it (most often out of memory, or a crash while "
                f"reading the data); see the worker logs in {logs}, and try a smaller "
                f"--chunk-rows or more memory per worker{_kept_per_chunk_size(out)}"), 1
    # Not an input problem. One line, as for every other failure (a malformed input that slips
    # past the checks still must not end in a traceback), but exit status 1, and it names where
    # it happened; --traceback shows the full traceback, for a bug report.
    text = " ".join(str(error).split())[:300]
    if isinstance(error, FutureCancelledError) and error.reason == NO_WORKERS_LEFT:
        return f"{error.msg}; {resume_note(out) or 'no chunk of rows was finished'}", 1
    if isinstance(error, FutureCancelledError) and error.reason == "scheduler-connection-lost":
        return lost_scheduler_line(out, error.reason), 1
    if isinstance(error, (CommClosedError, ConnectionError)):
        return lost_scheduler_line(out, text), 1
    if isinstance(error, OSError):  # the environment: a full disk, a lost connection
        if error.filename:
            text = f"{error.filename}: {error.strerror or text}; check the disk space and permissions there"
        kept = resume_note(out)  # finished chunks outlive a full disk, as they do a stop
        return f"{text}{f'; {kept}' if kept else ''} (rerun with --traceback for the details)", 1
    root = Path(__file__).resolve().parents[1]
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().parent.parent == root]
    place = f" at {Path((ours or frames)[-1].filename).name}:{(ours or frames)[-1].lineno}" if frames else ""
    return (f"internal error ({error.__class__.__name__}: {text}){place}; not a problem with the "
            "inputs: rerun with --traceback and report it"), 1
