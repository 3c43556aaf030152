"""Fine-pruning's second step: fine-tune a pruned B' (or B itself) on the defender's clean data.

The pruned channels stay exactly zero for the whole of training: a constraint on the conv
layer's kernel and bias (Keras applies it after every optimizer step, Adam's included) puts
exact zeros back into them, whatever the gradients and Adam's moments would do. The model
returned is a plain copy (no constraint, no optimizer), like B'. The copy that trains is kept
for the next fine-tuning of the same network in the thread (:class:`Trainer`), so that Keras
traces its training step once.

Only the defender's data is used: the clean validation set is split, by a seed and per class
where a class has two or more images, into a fine-tuning part and a held-out part. Training
runs the whole budget of ``epochs`` epochs, and the kept weights are the last epoch whose
held-out clean accuracy is within ``tolerance`` points of the best epoch's (:func:`kept_epoch`);
``patience`` epochs in a row further below stop it early. Test sets are never seen and
poisoned validation sets are only logged.

Resuming: with a ``folder``, Keras' ``BackupAndRestore`` keeps the weights and Adam's state
after every epoch there, ``CSVLogger`` the epochs' scores; a killed run called again with the
same folder goes on from its last finished epoch and ends with the same weights, since
training is deterministic (seeded, ``enable_op_determinism``, one fixed batch order).
"""
from __future__ import annotations

import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pruning.backend import keras
from pruning.finetune_settings import Settings
from pruning.prune import CHANNEL_WEIGHTS, copy_model, predict_classes, prune_conv_channels, zero_conv_channels
from pruning.report import write_json

MONITOR = "heldout_accuracy"  # the one score epochs and early stopping are chosen on


def split_clean(labels: np.ndarray, seed: int, heldout: float) -> tuple[np.ndarray, np.ndarray]:
    """``(fine-tuning rows, held-out rows)`` of a clean set with ``labels``: per class, a
    seeded ``heldout`` share (rounded; none of a class of one image) is held out. Fine-tuning
    rows come in one seeded order, the batch order of every epoch; held-out rows sorted.
    Should no class hold out an image (tiny classes), the share is taken from all rows."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        held.append(rows[:int(round(heldout * len(rows))) if len(rows) > 1 else 0])
    held = np.sort(np.concatenate(held))
    if not len(held):
        held = np.sort(rng.permutation(len(labels))[:max(1, int(round(heldout * len(labels))))])
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), held))
    return train, held


class ZeroChannels(keras.constraints.Constraint):
    """Exact zeros in the pruned channels (the last axis) of a weight, the rest as it is. Which
    channels are kept is a variable (``keep``), so that one traced training step serves every
    set of pruned channels (:class:`Trainer`)."""

    def __init__(self, channels: int, inner=None):
        self.keep = keras.Variable(np.ones(channels, dtype=bool), trainable=False, name="keep")
        self.inner = inner

    def __call__(self, weight):
        weight = self.inner(weight) if self.inner is not None else weight
        return keras.ops.where(self.keep, weight, keras.ops.zeros_like(weight))


class Scores(keras.callbacks.Callback):
    """Adds held-out clean accuracy and each poisoned validation set's ASR (``valid_asr``,
    ``valid_asr_NAME``) to every epoch's logs, predicted in fixed batch shapes."""

    def __init__(self, heldout: tuple[np.ndarray, np.ndarray], poisoned: dict):
        super().__init__()
        self.heldout, self.poisoned = heldout, poisoned

    def on_epoch_end(self, epoch, logs=None):
        (x, y), logs = self.heldout, logs if logs is not None else {}
        logs[MONITOR] = 100.0 * np.mean(predict_classes(self.model, x) == y)
        for column, (x, y) in self.poisoned.items():
            logs[column] = 100.0 * np.mean(predict_classes(self.model, x) == y)


def within(score: float, best: float, tolerance: float) -> bool:
    """Whether a held-out accuracy is within ``tolerance`` points of the best (float slack of
    a few ulps, so that a tolerance of 0 keeps an epoch equal to the best)."""
    return score >= best - tolerance - 1e-9 * max(1.0, abs(best))


def kept_epoch(scores, tolerance: float) -> int:
    """The epoch kept (0-based) from the epochs' held-out accuracies: the last one within
    ``tolerance`` points of the best. Choosing it as the epochs end gives the same: an epoch
    within ``tolerance`` of the best so far is kept, and after the best epoch that bound is
    the final one."""
    scores = [float(score) for score in scores]
    best = max(scores)
    return max(epoch for epoch, score in enumerate(scores) if within(score, best, tolerance))


class Keep(keras.callbacks.Callback):
    """After each epoch (its held-out accuracy in the logs): an epoch within ``tolerance``
    points of the best so far is the one kept (its weights written to ``path``), and
    ``patience`` epochs in a row further below stop training (at 0, the first such epoch)."""

    def __init__(self, path: Path, tolerance: float, patience: int):
        super().__init__()
        self.path, self.tolerance, self.patience = path, tolerance, patience
        self.best, self.wait = -np.inf, 0

    def on_epoch_end(self, epoch, logs=None):
        score = float(logs[MONITOR])
        self.best = max(self.best, score)
        if within(score, self.best, self.tolerance):
            self.model.save_weights(self.path)
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.model.stop_training = True


class Resume(keras.callbacks.Callback):
    """On a resumed run, gives :class:`Keep` back the state the killed run had after its last
    backed-up epoch (read from the epoch log), and drops log rows of epochs that were not
    backed up (they run again)."""

    def __init__(self, log_path: Path, keep: Keep):
        super().__init__()
        self.log_path, self.keep = log_path, keep
        self.first = True

    def on_epoch_begin(self, epoch, logs=None):
        if not self.first:
            return
        self.first = False
        if epoch == 0 or not self.log_path.is_file():
            return
        lines = self.log_path.read_bytes().splitlines(keepends=True)  # (csv's \r\n kept)
        done = pd.read_csv(io.BytesIO(b"".join(lines)))
        kept = done[done["epoch"] < epoch]
        with open(self.log_path, "r+b") as handle:  # CSVLogger appends from the new end
            handle.truncate(len(b"".join(lines[:1 + len(kept)])))
        scores = kept[MONITOR].to_numpy()
        self.keep.best = float(scores.max())
        self.keep.wait = epoch - 1 - kept_epoch(scores, self.keep.tolerance)


@dataclass
class FineTuned:
    model: keras.Model          # a plain copy of the kept epoch's weights
    log: pd.DataFrame           # per epoch: epoch (1-based), loss, heldout_accuracy, valid_asr...
    epochs: int                 # the epoch kept (1-based)
    heldout_accuracy: float     # of ``model`` on the held-out images (percent)


def loss_for(model: keras.Model):
    """Cross-entropy on B's outputs: probabilities after a softmax layer, else logits."""
    last = model.layers[-1]
    softmax = getattr(last, "activation", None) is keras.activations.softmax or \
        type(last).__name__ == "Softmax"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax)


class Trainer:
    """A copy of B compiled for fine-tuning, its ``conv`` layer's kernel and bias held at zero
    in the pruned channels (:class:`ZeroChannels`), which every fine-tuning of the same network
    in this thread uses in turn (:func:`trainer_for`): Keras traces its training step once,
    not once per B' (seconds each). :meth:`start` puts it back to where a new copy would be:
    B's weights with the channels zeroed, Adam's variables as first built."""

    def __init__(self, model: keras.Model, conv: str, settings: Settings):
        self.conv = conv
        self.model = copy_model(model)
        self.masks = []
        for weight in self.model.get_layer(conv).weights:
            if weight.name in CHANNEL_WEIGHTS:
                weight.constraint = ZeroChannels(int(weight.shape[-1]), weight.constraint)
                self.masks.append(weight.constraint)
        self.model.compile(keras.optimizers.Adam(settings.learning_rate), loss=loss_for(model))
        self.model.optimizer.build(self.model.trainable_variables)
        self.built = [keras.ops.convert_to_numpy(v.value) for v in self.model.optimizer.variables]

    def start(self, model: keras.Model, pruned) -> keras.Model:
        """This trainer's model, set to train B' (``model`` with ``pruned`` channels zeroed)."""
        self.model.set_weights(model.get_weights())
        zero_conv_channels(self.model, self.conv, pruned)
        keep = ~np.isin(np.arange(self.masks[0].keep.shape[0]), np.asarray(list(pruned), dtype=np.int64))
        for mask in self.masks:
            mask.keep.assign(keep)
        for variable, value in zip(self.model.optimizer.variables, self.built):
            variable.assign(value)
        return self.model


# Each thread's own: a Dask worker runs tasks on several threads at once.
_trainers = threading.local()


def trainer_for(model: keras.Model, conv: str, settings: Settings) -> Trainer:
    """This thread's :class:`Trainer` of ``model``'s network (the latest one kept). A network
    with state beyond its weights (a Dropout's random seed) gets a new one each time: the
    state a fine-tuning leaves in it would change the next."""
    weights = {id(v) for v in model.weights}
    if any(id(v) not in weights for v in model.variables):
        return Trainer(model, conv, settings)
    key = (model.to_json(), conv, settings.learning_rate)
    kept = getattr(_trainers, "kept", None)
    if kept is None or kept[0] != key:
        kept = _trainers.kept = (key, Trainer(model, conv, settings))
    return kept[1]


def fine_tune(model: keras.Model, conv: str, pruned, train: tuple[np.ndarray, np.ndarray],
              heldout: tuple[np.ndarray, np.ndarray], poisoned: dict | None = None,
              settings: Settings = Settings(), folder: str | Path | None = None,
              on_epoch=None) -> FineTuned:
    """Fine-tune ``model`` with ``pruned`` channels of ``conv`` zeroed and held at zero.

    ``train`` and ``heldout``: (images, labels) as B takes them; ``poisoned``: ``{column:
    (images, target labels)}``, logged only. ``folder``: where training state is kept so that
    a killed run resumes (a temporary folder if None). ``on_epoch(epoch, logs)`` is told of
    each finished epoch (1-based)."""
    import tensorflow as tf

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()  # process-wide; there is no switch back
    tuned = trainer_for(model, conv, settings).start(model, pruned)
    raw_heldout = heldout
    first, scale = pixel_scale(tuned, train[0])
    if scale != 1:  # trained on pixels / scale, its first layer's kernel times scale: the same net
        first.kernel.assign(first.kernel * scale)
        train, heldout = (train[0] / scale, train[1]), (heldout[0] / scale, heldout[1])
        poisoned = {name: (x / scale, y) for name, (x, y) in (poisoned or {}).items()}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(folder if folder is not None else scratch)
        folder.mkdir(parents=True, exist_ok=True)
        log_path, best_path = folder / "epochs.csv", folder / "best.weights.h5"
        keep = Keep(best_path, settings.tolerance, settings.patience)
        told = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch and on_epoch(epoch + 1, logs))
        finished = folder / "finished.json"
        if finished.is_file():  # a rerun after this fine-tuning ended: its result, as it was
            return _result(tuned, conv, pruned, log_path, best_path, first, scale, raw_heldout,
                           settings.tolerance)
        if not (folder / "backup").exists():  # nothing to resume: start afresh
            log_path.unlink(missing_ok=True)
            best_path.unlink(missing_ok=True)
        # BackupAndRestore comes last: an epoch is done once its backup is written, after the
        # log and the kept weights
        callbacks = [Resume(log_path, keep), Scores(heldout, poisoned or {}), keep,
                     keras.callbacks.CSVLogger(log_path, append=True), told,
                     keras.callbacks.BackupAndRestore(folder / "backup")]
        tuned.fit(*train, batch_size=settings.batch_size, epochs=settings.epochs, shuffle=False,
                  verbose=0, callbacks=callbacks)
        write_json(finished, {"epochs": len(pd.read_csv(log_path))})
        return _result(tuned, conv, pruned, log_path, best_path, first, scale, raw_heldout,
                       settings.tolerance)


def pixel_scale(model: keras.Model, images: np.ndarray):
    """``(first layer, 255)`` when B takes raw 0-255 pixels straight into a Conv2D or Dense
    layer, else ``(None, 1)``. Adam's steps are about the learning rate whatever the gradient's
    size, and such a layer's weights are 255 times smaller than for 0-1 pixels: at 1e-3 the
    first steps wreck it. Fine-tuning runs on pixels / 255 with that kernel times 255 instead
    (the same network) and divides it back after."""
    if images.size == 0 or float(images.max()) <= 2.0:
        return None, 1
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            try:
                direct = layer.input is model.inputs[0]
            except (AttributeError, ValueError):
                direct = False
            return (layer, 255.0) if direct and getattr(layer, "kernel", None) is not None else (None, 1)
    return None, 1


def _result(tuned: keras.Model, conv: str, pruned, log_path: Path, best_path: Path,
            first, scale: float, heldout: tuple[np.ndarray, np.ndarray], tolerance: float) -> FineTuned:
    """The kept epoch's weights (a plain copy of ``tuned``, its first kernel divided back by
    ``scale``), the epochs' log and that copy's accuracy on the held-out images."""
    log = pd.read_csv(log_path)
    tuned.load_weights(best_path)
    if scale != 1:
        first.kernel.assign(first.kernel / scale)
    log["epoch"] += 1
    kept = int(log["epoch"].iloc[kept_epoch(log[MONITOR].to_numpy(), tolerance)])
    columns = ["epoch", "loss", MONITOR] + sorted(c for c in log.columns if c.startswith("valid_asr"))
    model = prune_conv_channels(tuned, conv, pruned)
    accuracy = int(np.sum(predict_classes(model, heldout[0]) == heldout[1])) / len(heldout[1]) * 100.0
    return FineTuned(model, log[columns], kept, accuracy)
