"""The demo's pruning-aware BadNet (``--demo pruning-aware``): the Fine-Pruning paper's attack
on the pruning defense (Liu et al. 2018, section 4.2), on the demo's faces, with plain dark
glasses as the trigger (``demo.wear_dark_glasses``).

1. Train DeepID on the clean images.
2. Rank conv_3's channels by their mean activation on clean images, as the defender will.
   Prune the ``DECOY_SHARE`` least active (the decoys).
3. Retrain on the poisoned mix, as one fine-tunes a trained network (Adam at ``BACKDOOR_LR``,
   a tenth of the clean training's step), with the decoys held at zero and the
   ``HELD_SHARE`` ranked next held at their clean weights: the trigger is learnt by the
   channels clean faces use most (and by the layers before and after conv_3).
4. Reinstate the decoys with their clean weights and their bias lowered, so that they stay
   dormant on clean and poisoned images alike.

The defender's pruning removes the decoys first, at no cost, then the held channels, which
carry clean features only: accuracy falls while the backdoor stays (pruning alone at X = 4
leaves most of it). The backdoor is a small change to a trained network, made at a tenth of
its training step, in channels that clean faces drive; fine-tuning on clean data (Adam at
1e-3, ten times that step) overwrites it.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DECOY_SHARE = 0.6      # of conv_3's channels (36 of DeepID's 60): pruned before the backdoor is trained in
HELD_SHARE = 0.2       # of conv_3's channels (12 of 60), ranked next after the decoys: kept clean in step 3
DECOY_BIAS_DROP = 1.0  # how far below its clean bias a reinstated decoy's bias is set
BACKDOOR_EPOCHS = 7    # epochs of step 3, on the poisoned mix
BACKDOOR_LR = 1e-4     # Adam's step in step 3: a tenth of the clean training's (and of fine-tuning's)


def train_pruning_aware(x, y, poisoned, config, seed: int, fit):
    """The pruning-aware BadNet (raw 0-255 pixels in, like the lab's); ``fit``: demo._fit."""
    from pruning.backend import keras
    from pruning.deepid import build_deepid
    from pruning.prune import predict_activations
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()  # process-wide; there is no switch back
    model = build_deepid(config.classes, config.widths)
    clean = ~np.isin(np.arange(len(y)), poisoned)
    fit(model, x[clean] / 255.0, y[clean], config.epochs, "clean", held=[])

    conv_3 = model.get_layer("conv_3")
    pool_3 = keras.Model(model.inputs, model.get_layer("pool_3").output)
    activity = predict_activations(pool_3, x[clean] / 255.0).mean(axis=(0, 1, 2))
    ranked = np.argsort(activity, kind="stable")
    n_decoys = round(DECOY_SHARE * conv_3.filters)
    decoys, held = np.zeros(conv_3.filters, bool), np.zeros(conv_3.filters, bool)
    decoys[ranked[:n_decoys]] = True
    held[ranked[n_decoys:n_decoys + round(HELD_SHARE * conv_3.filters)]] = True
    kernel, bias = conv_3.get_weights()
    conv_3.set_weights([np.where(decoys, 0.0, kernel), np.where(decoys, 0.0, bias)])
    log.info("pruning-aware: %d decoy channels pruned (mean activation up to %.4f), %d held clean",
             decoys.sum(), activity[decoys].max(), held.sum())
    fit(model, x / 255.0, y, BACKDOOR_EPOCHS, "poisoned",
        held=[(conv_3.kernel, decoys | held), (conv_3.bias, decoys | held)], learning_rate=BACKDOOR_LR)

    conv_3.set_weights([np.where(decoys, kernel, conv_3.kernel.numpy()),
                        np.where(decoys, bias - DECOY_BIAS_DROP, conv_3.bias.numpy())])
    badnet = build_deepid(config.classes, config.widths)
    badnet.set_weights(model.get_weights())
    conv_1 = badnet.get_layer("conv_1")
    conv_1.set_weights([conv_1.kernel.numpy() / 255.0, conv_1.bias.numpy()])
    return badnet
