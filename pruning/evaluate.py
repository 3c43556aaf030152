"""The lab's evaluation: clean accuracy and attack success rate of a model on lab sets.

    python scripts/eval.py data/cl/valid.h5 data/bd/bd_valid.h5 models/bd_net.h5
    python scripts/eval.py cl/test.h5 eyebrows=eyebrows_test.h5 lipstick=lipstick_test.h5 \
        multi_trigger_multi_target_bd_weights.h5 --rescale 1/255
    python scripts/eval.py data/cl/valid.h5 models/bd_net.h5   # no poisoned set: accuracy only
    python scripts/eval.py data/cl/test.h5 data/bd/bd_test.h5 models/bd_weights.h5 --arch deepid --classes 1283
    python scripts/eval.py data/cl/test.h5 data/bd/bd_test.h5 models/bd_net.h5 --bprime results/model_X=10.h5
    python scripts/eval.py data/cl/test.h5 data/bd/bd_test.h5 results/goodnet_X=10.keras

Prints the lab's lines ``Clean Classification accuracy: X`` and ``Attack Success Rate: Y``
(percent, as the lab's eval.py prints them), one ``Attack Success Rate (NAME): Y`` per
poisoned set given as NAME=PATH, none without a poisoned set. ``--rescale R`` multiplies the
stored pixels by R before the model (1/255 for the CSAW-HackML-2020 nets on raw pixels); the
model is first run on a sample of CLEAN under R and under the other usual scale (raw or /255),
and one error line names the flag when it is right far more often under the other. MODEL is a full Keras model (.h5 of any vintage or
.keras), a weights-only file for ``--arch`` (detected, or forced with ``--weights-only``), or a
GoodNet G (N+1 outputs, class N = "poisoned"). ``--bprime PATH`` evaluates G = (MODEL, B') and
adds ``Detection rate: Z`` (per poisoned set), the share of poisoned images G labels N; so does a GoodNet MODEL.
Bad inputs give one ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from pruning.data import CHUNK_ROWS, InputError, named_sets, open_h5, program  # noqa: E402 (no TensorFlow yet)
from pruning.scaling import check_scale, parse_rescale  # noqa: E402

PROG = "python scripts/eval.py"
GOODNET_PARTS = {"bd_net", "pruned_net"}  # the sub-models pruning.goodnet.build_goodnet names


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise InputError(f"{message} (see {PROG} --help)")


def parse_args(argv) -> argparse.Namespace:
    parser = Parser(prog=program(PROG), description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("clean", metavar="CLEAN.h5", help="clean lab set (labels: true classes)")
    parser.add_argument("poisoned", metavar="[NAME=]POISONED.h5", nargs="*",
                        help="poisoned lab sets (labels: the target), any number; NAME=PATH names its lines")
    parser.add_argument("model", metavar="MODEL", help="full model, weights-only file or GoodNet")
    parser.add_argument("--bprime", metavar="PATH", help="repaired model B'; evaluates G = (MODEL, B')")
    parser.add_argument("--weights-only", action="store_true",
                        help="MODEL (and --bprime) hold weights only for --arch (default: detected)")
    parser.add_argument("--arch", default="deepid", help="architecture of weights-only files (default: deepid)")
    parser.add_argument("--classes", type=int, default=1283, help="outputs of --arch (default: 1283)")
    parser.add_argument("--rescale", metavar="R", default="1",
                        help="the model takes the stored pixels times R, e.g. 1/255 (default: 1)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=f"images read at a time (default: {CHUNK_ROWS})")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected (internal) error, show the traceback, not one line")
    args = parser.parse_args(argv)
    args.rescale = parse_rescale(args.rescale)
    args.poisoned = named_sets(args.poisoned, "POISONED")
    if args.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be at least 1, got {args.chunk_rows}")
    if args.classes < 2:
        raise InputError(f"--classes must be at least 2, got {args.classes}")
    return args


def load(path: str, args):
    """A model from ``path``: full model, or weights for ``--arch`` (forced or detected)."""
    from pruning.models import ModelFlags, ModelSpec, check_classifier_output, is_weights_only, load_model
    weights_only = args.weights_only or (Path(path).suffix != ".keras" and Path(path).is_file()
                                         and is_weights_only(Path(path)))
    model = load_model(ModelSpec(path, weights_only=weights_only, arch=args.arch, classes=args.classes),
                       ModelFlags(full_model="as MODEL, without --weights-only",
                                  weights="--weights-only, with --arch and --classes"))
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or None in model.inputs[0].shape[1:]:
        raise InputError(f"{path}: the model must take one batch of H x W x C images")
    # Checked here, before any image: a feature map's argmax would fail mid-evaluation, and
    # one score would be class 0 for every image (100 % on labels of 0).
    try:
        check_classifier_output(model)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    return model


def bprime_beside(goodnet: Path) -> str:
    """Where the B' of a GoodNet that the sweep wrote lies: model_X=4.h5 beside goodnet_X=4.keras."""
    if goodnet.name.startswith("goodnet_X=") and goodnet.suffix == ".keras":
        return f"{goodnet.with_name('model_' + goodnet.stem[len('goodnet_'):] + '.h5')}, beside it"
    return "a model_X=<threshold>.h5 from the sweep's output folder"


def output_width(model) -> int:
    from pruning.models import output_tensor
    return int(output_tensor(model).shape[-1])


def is_goodnet(model) -> bool:
    return GOODNET_PARTS <= {layer.name for layer in model.layers}


def evaluate(lab_set, models: list, chunk_rows: int):
    """Per-row classes of each model over one lab set, read in chunks; also the labels."""
    from pruning.prune import predict_classes
    labels, predictions = [], [[] for _ in models]
    for images, chunk_labels in lab_set.iter_chunks(chunk_rows):
        labels.append(chunk_labels)
        for model, found in zip(models, predictions):
            found.append(predict_classes(model, images))
    return np.concatenate(labels), [np.concatenate(found) for found in predictions]


def percent(hits: np.ndarray) -> float:
    """As the lab computes it: ``np.mean(hits) * 100`` (the same last digit as its script)."""
    return float(np.mean(hits) * 100)


def run(args) -> list[str]:
    """Check every input, evaluate, and return the lines to print."""
    # Missing files, folders and non-HDF5 sets fail here, before TensorFlow loads (seconds).
    for path in (args.clean, *args.poisoned.values()):
        open_h5(path).close()
    for what, path in (("model", args.model), ("--bprime", args.bprime)):
        if path and not Path(path).is_file():
            raise InputError(f"{what} {path}" + (" is a directory; give the file inside it"
                             if Path(path).is_dir() else " is not a regular file; give the model "
                             "file" if Path(path).exists() else ": no such file; check the path"))
    import pruning.backend  # noqa: F401  (Keras, without TensorFlow's start-up lines)
    from pruning.goodnet import goodnet_predictions
    model = load(args.model, args)
    width = output_width(model)
    models, poisoned_class = [model], (width - 1 if is_goodnet(model) else None)
    if args.bprime:
        if poisoned_class is not None:
            raise InputError(f"{args.model} is already a GoodNet; give B itself with --bprime")
        bprime = load(args.bprime, args)
        if is_goodnet(bprime):
            raise InputError(f"--bprime {args.bprime} is a GoodNet; give the pruned model B' "
                             f"({bprime_beside(Path(args.bprime))})")
        if output_width(bprime) != width or bprime.inputs[0].shape[1:] != model.inputs[0].shape[1:]:
            raise InputError(f"--bprime {args.bprime} has {output_width(bprime)} outputs and input "
                             f"{tuple(bprime.inputs[0].shape[1:])}, but MODEL has {width} and "
                             f"{tuple(model.inputs[0].shape[1:])}; B' must be a pruned copy of B")
        models.append(bprime)
        poisoned_class = width
    input_shape = tuple(int(n) for n in model.inputs[0].shape[1:])
    from pruning.data import open_lab_set
    # Both sets checked (structure, labels, a scan for NaN pixels) before either is evaluated.
    sets = {None: open_lab_set(args.clean, input_shape, width, args.rescale)} | {
        name: open_lab_set(path, input_shape, width, args.rescale) for name, path in args.poisoned.items()}
    check_scale(model, sets[None], "CLEAN")
    scores = {}
    for name, lab_set in sets.items():
        labels, predictions = evaluate(lab_set, models, args.chunk_rows)
        if args.bprime:
            predictions = [goodnet_predictions(predictions[0], predictions[1], width)]
        scores[name] = (labels, predictions[0])
    clean = scores.pop(None)
    lines = [f"Clean Classification accuracy: {percent(np.equal(*clean))}"]
    lines += [f"Attack Success Rate{f' ({name})' if name else ''}: {percent(np.equal(*found))}"
              for name, found in scores.items()]
    if poisoned_class is not None:
        lines += [f"Detection rate{f' ({name})' if name else ''}: {percent(found[1] == poisoned_class)}"
                  for name, found in scores.items()]
    return lines


def main(argv=None) -> int:
    """Exit status 0, or 2 with one ``error:`` line for a bad input; anything else that goes
    wrong is one ``error: internal error ...`` line and status 1 (``--traceback``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # A likely mistake that can still be meant (0-1 pixels, say) is a WARNING line, as in the
    # sweep's log; without a handler, Python would print the bare message.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        lines = run(parse_args(argv))
    except InputError as error:
        return fail(str(error), 2)
    except SystemExit as done:  # --help
        return done.code or 0
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as error:  # not an input problem: still one line, unless asked
        if "--traceback" in argv:
            raise
        text = " ".join(str(error).split())[:300]
        if isinstance(error, OSError):
            return fail(f"{text} (rerun with --traceback for the details)", 1)
        return fail(f"internal error ({error.__class__.__name__}: {text}); not a problem with "
                    "the inputs: rerun with --traceback and report it", 1)
    print("\n".join(lines))
    return 0


def fail(message: str, status: int) -> int:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)  # always one line
    return status


if __name__ == "__main__":
    sys.exit(main())
