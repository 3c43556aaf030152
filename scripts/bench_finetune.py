"""Benchmark: fine-tuning time per epoch at the lab's size (``--fine-tune``'s task, one process).

    python scripts/bench_finetune.py                 # 11,547 images, DeepID, 1283 classes
    python scripts/bench_finetune.py --images 2000   # a quick look

A clean validation set of random 0-255 pixels, labelled by B itself, is split as the sweep
splits it (80 % fine-tuned, 20 % held out, per class); B is DeepID (widths 20, 40, 60, 80, 160)
with random weights and 45 of conv_3's 60 channels pruned (the lab's B'_X=2 prunes 45). Each
epoch is Adam over the fine-tuning images plus the held-out accuracy (what the sweep's task
does per epoch, checkpoints included); the first epoch also traces the training step, so it
is reported apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pruning.backend import keras  # noqa: E402
import numpy as np  # noqa: E402

from pruning.deepid import build_deepid  # noqa: E402
from pruning.finetune import fine_tune, split_clean  # noqa: E402
from pruning.finetune_settings import Settings  # noqa: E402
from pruning.prune import predict_classes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=11547, help="clean validation images (default: the lab's 11,547)")
    parser.add_argument("--classes", type=int, default=1283)
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed (default: 3)")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    model = build_deepid(args.classes, (20, 40, 60, 80, 160))
    images = np.random.default_rng(0).integers(0, 256, (args.images, 55, 47, 3)).astype(np.float32)
    labels = predict_classes(model, images)
    train, held = split_clean(labels, 0, 0.2)
    ends = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        fine_tune(model, "conv_3", range(45), (images[train], labels[train]), (images[held], labels[held]),
                  settings=Settings(epochs=args.epochs, patience=args.epochs), folder=folder,
                  on_epoch=lambda epoch, logs: ends.append(time.perf_counter()))
    times = np.diff([started] + ends)
    print(f"fine-tuning DeepID ({args.classes} classes), {len(train)} images fine-tuned + {len(held)} "
          f"held out, {os.cpu_count()} CPUs: first epoch {times[0]:.1f} s (with tracing), later epochs "
          f"{', '.join(f'{t:.1f}' for t in times[1:])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
