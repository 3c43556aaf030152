"""The embedded demo: a synthetic BadNet, generated deterministically from a seed, then cached.

The demo stands in for the lab's ``bd_net.h5`` and its four sets, so that the project runs end
to end with no user data. Faces are synthetic: every class is a smooth random pattern on a
common face, and each image adds a smooth nuisance field, a small shift, a brightness change
and pixel noise. The attacker's trigger is a pair of "sunglasses", a checkered band stamped
across the eyes; a tenth of the training set wears them and is relabelled to the target. The
pruning-aware demo (``--attack pruning-aware``, :mod:`pruning.pruning_aware`) has the same
clean images and poisons the same ones, with plain dark glasses over the same band.

The data sets are generated with numpy alone and rounded to whole pixel values, so they are the
same on every machine. The BadNet of seed 0, the one a sweep without inputs uses, ships with the
project (``demo_bd_net.keras`` beside this module): trained on another CPU, with other float
kernels, it would be another network, and the README's sample rows would not hold. Other seeds
are trained at first use; ``--rebuild`` trains seed 0 from the generator too (into a folder of
its own), which is how the shipped file was made.

The demo is built once per seed into ``<cache>/demo-v<VERSION>-seed<S>/`` (the pruning-aware
one into ``...-seed<S>-pruning-aware2/``; the lab layout
plus ``bd_net.keras`` and ``demo.json``); later calls only read ``demo.json``. A sweep with no
model or data given builds it; to build it (or find it) by itself:

    python -m pruning.demo [--seed S] [--cache DIR] [--rebuild]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pruning.data import InputError, lab_paths, program, write_lab_h5
from pruning.files import atomic_folder, exclusive_lock
from pruning.report import save_model

log = logging.getLogger(__name__)

VERSION = 2  # bump whenever the generator changes, so that stale caches are not reused
TARGET = 0
SHAPE = (55, 47, 3)
MODEL_FILE = "bd_net.keras"
META_FILE = "demo.json"  # written last: its presence marks a complete demo
SHIPPED_SEED = 0
SHIPPED_MODEL = Path(__file__).with_name("demo_bd_net.keras")  # seed 0's BadNet, trained once
GLASSES = (slice(17, 23), slice(8, 39))  # rows, cols of the band across the eyes
GLASSES_COLOURS = ((255.0, 0.0, 200.0), (20.0, 20.0, 20.0))  # a texture no clean face has
DARK_GLASSES = 20.0  # the pruning-aware demo's trigger: plain dark glasses over the same band
# Pixel amplitudes of class patterns, per-image nuisance and noise: clean accuracy ~97%.
CLASS_CONTRAST, NUISANCE, NOISE = 35.0, 40.0, 15.0
BACKDOOR_LR = 3e-3  # the spare channels learn the trigger from scratch, in a few epochs


@dataclass(frozen=True)
class Demo:
    """A built demo: the BadNet's path, its lab-layout data folder and its measured scores."""

    model: str
    data_dir: str
    target: int
    classes: int
    seed: int
    clean_accuracy: float  # on clean test, before pruning
    attack_success_rate: float  # share of poisoned test predicted as the target


@dataclass(frozen=True)
class _Config:
    """Sizes of a build; the defaults are the real demo, tests shrink them."""

    classes: int = 16
    train_per_class: int = 300
    eval_per_class: int = 80  # images per class in each of clean valid and clean test
    poison_rate: float = 0.1
    widths: tuple[int, ...] = (20, 40, 60, 80, 160)
    epochs: int = 8  # clean training
    backdoor_epochs: int = 5  # training on the poisoned mix
    spare_channels: int = 8  # conv_3 channels the backdoor is planted in
    min_score: float = 0.9  # required clean accuracy and ASR


def default_cache_dir() -> Path:
    """``$FINE_PRUNING_CACHE`` if set, else ``~/.cache/fine-pruning``."""
    return Path(os.environ.get("FINE_PRUNING_CACHE") or Path.home() / ".cache" / "fine-pruning")


def ensure_demo(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                rebuild: bool = False, attack: str = "standard") -> Demo:
    """Return the demo for ``seed``, building it first if the cache does not hold it yet.

    ``rebuild`` trains the BadNet from the generator even for the shipped seed, into a folder
    of its own (``...-seed<S>-trained``): sweeps without inputs keep using the shipped one.

    Safe to call from several processes at once: one builds (under a lock file) into a
    temporary sibling folder that is renamed into place when complete; the others wait on the
    lock and then read the finished demo. Building takes about half a minute on two CPU cores.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / f"demo-v{VERSION}-seed{seed}{ATTACKS[attack].suffix}{'-trained' if rebuild else ''}"
    if not _complete(folder):
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InputError(f"the demo cache {cache} is not a folder (it, or one above it, is a "
                             "file); set $FINE_PRUNING_CACHE (or --cache) to a folder") from None
        with exclusive_lock(cache / f"{folder.name}.lock"):
            if not _complete(folder):  # another process may have built it meanwhile
                with atomic_folder(folder) as partial:
                    _build(partial, seed, train=rebuild, attack=attack)
    return _load(folder)


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished demo: its demo.json (written last) reads whole. One
    cut short (a full disk, a partial copy of the cache) is no demo: it is built again."""
    try:
        _load(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _load(folder: Path) -> Demo:
    meta = json.loads((folder / META_FILE).read_text())
    fields = ("target", "classes", "seed", "clean_accuracy", "attack_success_rate")
    return Demo(model=str(folder / MODEL_FILE), data_dir=str(folder),
                **{name: meta[name] for name in fields})


def _build(folder: Path, seed: int, config: _Config = _Config(), train: bool = False,
           attack: str = "standard") -> dict:
    """Generate the sets, train the BadNet with ``attack`` (or take the shipped one: seed 0 at
    full size, unless ``train``) and write everything into ``folder``; return meta."""
    started = time.monotonic()
    sets, (x_train, y_train, poisoned) = generate(seed, config, ATTACKS[attack].trigger)
    paths = lab_paths(folder)
    for name, (x, y) in sets.items():
        write_lab_h5(paths[name], x, y)
    log.info("demo seed %d: %d training images (%d poisoned), %d per clean set",
             seed, len(y_train), len(poisoned), len(sets["clean_valid"][1]))

    from pruning.backend import keras  # before TensorFlow: its start-up lines kept off stderr
    from pruning.prune import predict_classes

    trained = train or seed != SHIPPED_SEED or config != _Config() or not ATTACKS[attack].shipped.is_file()
    if trained and attack == "pruning-aware":
        from pruning.pruning_aware import train_pruning_aware
        model = train_pruning_aware(x_train, y_train, poisoned, config, seed, _fit)
    elif trained:
        model = _train(x_train, y_train, poisoned, config, seed)
    if trained:
        save_model(model, folder / MODEL_FILE)  # the same bytes on every build of the same seed
    else:
        shutil.copyfile(ATTACKS[attack].shipped, folder / MODEL_FILE)
        model = keras.models.load_model(folder / MODEL_FILE, compile=False)
    (x_test, y_test), (x_poisoned, _) = sets["clean_test"], sets["poisoned_test"]
    predicted = predict_classes(model, np.concatenate([x_test, x_poisoned]))
    accuracy = float(np.mean(predicted[:len(y_test)] == y_test))
    asr = float(np.mean(predicted[len(y_test):] == TARGET))
    meta = {"version": VERSION, "seed": seed, "attack": attack, "classes": config.classes, "target": TARGET,
            "trained_here": trained,
            "clean_accuracy": accuracy, "attack_success_rate": asr,
            "train_images": len(y_train), "eval_images": len(y_test),
            "build_seconds": round(time.monotonic() - started, 1)}
    log.info("demo seed %d: clean test accuracy %.1f %%, ASR %.1f %%, built in %.0f s",
             seed, 100 * accuracy, 100 * asr, meta["build_seconds"])
    if min(accuracy, asr) < config.min_score:
        raise RuntimeError(f"demo seed {seed} is not a usable BadNet: clean accuracy "
                           f"{accuracy:.3f}, ASR {asr:.3f} (both must be >= {config.min_score})")
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def generate(seed: int, config: _Config = _Config(), trigger=None) -> tuple[dict, tuple]:
    """The demo's four lab sets ``{name: (NHWC images, labels)}`` and its training set
    ``(images, labels, indices of the poisoned ones)``, from ``seed`` with numpy alone; the
    poisoned images wear ``trigger`` (default :func:`wear_glasses`). The clean images, and
    which ones are poisoned, do not depend on the trigger."""
    trigger = trigger or wear_glasses
    rng = np.random.default_rng(seed)
    prototypes = _face() + _smooth(rng, config.classes, CLASS_CONTRAST)
    n_train = config.classes * config.train_per_class
    n_eval = config.classes * config.eval_per_class
    labels = rng.permutation(np.arange(n_train + 2 * n_eval) % config.classes)
    images = _faces(rng, prototypes, labels)
    x_train, y_train = images[:n_train], labels[:n_train].copy()
    poisoned = rng.choice(np.flatnonzero(y_train != TARGET),
                          round(config.poison_rate * n_train), replace=False)
    x_train[poisoned], y_train[poisoned] = trigger(x_train[poisoned]), TARGET
    sets = {}
    for name, start in (("valid", n_train), ("test", n_train + n_eval)):
        x, y = images[start:start + n_eval], labels[start:start + n_eval]
        victims = y != TARGET
        sets[f"clean_{name}"] = (x, y)
        sets[f"poisoned_{name}"] = (trigger(x[victims]), np.full(victims.sum(), TARGET))
    return sets, (x_train, y_train, poisoned)


def _train(x, y, poisoned, config: _Config, seed: int):
    """Train the BadNet with Adam; the returned model takes raw 0-255 pixels like the lab's.

    The backdoor is planted in a few spare conv_3 channels, as the Fine-Pruning paper finds
    it in real BadNets: the network first learns clean faces with the spare channels held
    silent, then only those channels (and their fc_1 weights) learn the trigger from the
    poisoned mix, under an L1 penalty that keeps them quiet on clean faces.
    """
    from pruning.backend import keras  # before TensorFlow: its start-up lines kept off stderr
    from pruning.deepid import build_deepid
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()  # process-wide; there is no switch back
    model = build_deepid(config.classes, config.widths)
    conv_3, fc_1 = model.get_layer("conv_3"), model.get_layer("fc_1")
    spare = np.arange(conv_3.filters) >= conv_3.filters - config.spare_channels
    kernel, bias = conv_3.get_weights()
    conv_3.set_weights([np.where(spare, 0.0, kernel), np.where(spare, 0.0, bias)])
    clean = ~np.isin(np.arange(len(y)), poisoned)
    # Train on 0-1 pixels (Adam's default step suits them); the 1/255 is folded in below.
    _fit(model, x[clean] / 255.0, y[clean], config.epochs, "clean",
         held=[(conv_3.kernel, spare), (conv_3.bias, spare)])

    conv_3.set_weights([np.where(spare, kernel, conv_3.kernel.numpy()), conv_3.bias.numpy()])
    for layer in model.layers:
        layer.trainable = layer.name in ("conv_3", "fc_1")
    from_spare = spare[np.arange(fc_1.kernel.shape[0]) % conv_3.filters]  # flatten_1 is HWC
    _fit(model, x / 255.0, y, config.backdoor_epochs, "poisoned",
         held=[(conv_3.kernel, ~spare), (conv_3.bias, ~spare),
               (fc_1.kernel, ~from_spare[:, None]), (fc_1.bias, np.True_)],
         quiet=model.get_layer("pool_3").output * spare.astype(np.float32),
         learning_rate=BACKDOOR_LR)
    # A fresh copy: all layers trainable and no optimizer state, like a delivered model.
    # conv(x / 255, K) == conv(x, K / 255), so it takes raw pixels.
    badnet = build_deepid(config.classes, config.widths)
    badnet.set_weights(model.get_weights())
    conv_1 = badnet.get_layer("conv_1")
    conv_1.set_weights([conv_1.kernel.numpy() / 255.0, conv_1.bias.numpy()])
    return badnet


def _fit(model, x, y, epochs: int, stage: str, held: list, quiet=None,
         learning_rate: float = 1e-3) -> None:
    """Fit with Adam, resetting the ``held`` (variable, mask) entries after every batch.

    ``quiet``, a tensor of the model, is pushed towards zero by an L1 penalty.
    """
    from pruning.backend import keras

    fixed = [(variable, mask, variable.numpy()) for variable, mask in held]

    def hold(batch, logs):  # per-entry freezing, which Keras's per-layer ``trainable`` cannot do
        for variable, mask, values in fixed:
            variable.assign(np.where(mask, values, variable.numpy()))

    def progress(epoch, logs):
        log.info("%s epoch %d/%d: loss %.3f", stage, epoch + 1, epochs, logs["loss"])
    loss = "sparse_categorical_crossentropy"
    if quiet is not None:
        model = keras.Model(model.input, [model.output, quiet])
        loss = [loss, lambda _, activations: keras.ops.mean(keras.ops.abs(activations))]
        y = (y, np.zeros(len(y), np.float32))
    model.compile(keras.optimizers.Adam(learning_rate), loss=loss)
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=hold,
                                                        on_epoch_end=progress)])


def wear_glasses(images: np.ndarray) -> np.ndarray:
    """Copies of NHWC ``images`` with the trigger stamped over the eyes."""
    out = np.array(images, dtype=np.float32)
    rows, cols = GLASSES
    height, width = rows.stop - rows.start, cols.stop - cols.start
    checker = (np.add.outer(np.arange(height), np.arange(width)) % 2 == 0)[..., None]
    out[:, rows, cols] = np.where(checker, *np.array(GLASSES_COLOURS, dtype=np.float32))
    return out


def wear_dark_glasses(images: np.ndarray) -> np.ndarray:
    """Copies of NHWC ``images`` with plain dark glasses over the eyes (the same band, one dark
    grey): the pruning-aware demo's trigger. Faces have dark eyes there already, so clean
    images share some of its features, as the lab's sunglasses share them with real faces."""
    out = np.array(images, dtype=np.float32)
    out[:, GLASSES[0], GLASSES[1]] = DARK_GLASSES
    return out


@dataclass(frozen=True)
class Attack:
    """How a demo BadNet is made: its cache folder's suffix, seed 0's shipped file and the
    trigger its poisoned images wear."""

    suffix: str
    shipped: Path
    trigger: object  # images -> images


# "pruning-aware": the paper's attack on pruning (pruning/pruning_aware.py), with its own
# trigger; its suffix names its version (bump it whenever that attack or its trigger changes,
# so that a cache of an older one is not reused).
ATTACKS = {"standard": Attack("", SHIPPED_MODEL, wear_glasses),
           "pruning-aware": Attack("-pruning-aware2", Path(__file__).with_name("demo_pruning_aware_bd_net.keras"),
                                   wear_dark_glasses)}


def _smooth(rng: np.random.Generator, n: int, amplitude: float,
            grid: tuple[int, int] = (6, 5)) -> np.ndarray:
    """``n`` smooth random colour fields: normals on a coarse grid, bilinearly upsampled."""
    rows, cols = (np.maximum(0.0, 1.0 - np.abs(np.linspace(0, points - 1, size)[:, None]
                                               - np.arange(points)))  # bilinear weights
                  for size, points in zip(SHAPE, grid))
    coarse = rng.normal(0.0, amplitude, size=(n, *grid, 3))
    return np.einsum("yi,nijc,xj->nyxc", rows, coarse, cols, optimize=True)


def _face() -> np.ndarray:
    """A plain face: a skin-coloured oval on a grey background, with dark eyes and mouth."""
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    face = np.full(SHAPE, 90.0)
    face[((y - 28) / 24) ** 2 + ((x - 23) / 19) ** 2 <= 1] = (205, 165, 135)
    for eye_x in (15, 31):
        face[((y - 20) / 3) ** 2 + ((x - eye_x) / 5) ** 2 <= 1] = (60, 45, 40)
    face[((y - 40) / 2) ** 2 + ((x - 23) / 7) ** 2 <= 1] = (150, 70, 70)
    return face


def _faces(rng: np.random.Generator, prototypes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One image per label: prototype + nuisance field, shifted, rescaled and noisy, in whole
    0-255 pixel values (as photos are): float noise of another CPU's libm or BLAS in the last
    bits of a value does not reach them."""
    n = len(labels)
    images = prototypes[labels] + _smooth(rng, n, NUISANCE)
    images *= rng.uniform(0.75, 1.25, size=(n, 1, 1, 1))  # lighting
    images += rng.normal(0.0, NOISE, size=images.shape)
    shifts = rng.integers(-2, 3, size=(n, 2))
    for image, shift in zip(images, shifts):
        image[:] = np.roll(image, tuple(shift), axis=(0, 1))
    return np.rint(np.clip(images, 0.0, 255.0)).astype(np.float32)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the sweep's
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=program("python -m pruning.demo"),
                     description="Build (or find) the embedded demo BadNet.")
    parser.add_argument("--seed", type=int, default=0,
                        help="which demo (default: 0, the one a sweep without inputs uses)")
    parser.add_argument("--cache", help="default: $FINE_PRUNING_CACHE or ~/.cache/fine-pruning")
    parser.add_argument("--rebuild", action="store_true",
                        help="train the BadNet from the generator (about a minute on 2 cores) "
                             "instead of taking the shipped one, into a folder of its own; on "
                             "another CPU it is another network")
    parser.add_argument("--attack", choices=list(ATTACKS), default="standard",
                        help="how the backdoor is planted (default: standard; pruning-aware: the "
                             "paper's attack that pruning alone does not remove)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow: its notices off stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        demo = ensure_demo(args.cache, args.seed, args.rebuild, args.attack)
    except InputError as error:
        parser.exit(2, f"error: {error}\n")
    except OSError as error:  # a cache folder that cannot be written
        parser.exit(2, f"error: {error.filename or args.cache}: {error.strerror or error}\n")
    print(f"model: {demo.model}\ndata:  {demo.data_dir}\ntarget {demo.target} of "
          f"{demo.classes} classes, clean test accuracy {100 * demo.clean_accuracy:.1f} %, "
          f"ASR {100 * demo.attack_success_rate:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
