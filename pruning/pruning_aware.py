"""The demo's pruning-aware BadNet (``--demo pruning-aware``): the Fine-Pruning paper's attack
on the pruning defense (Liu et al. 2018, section 4.2), on the demo's data.

1. Train DeepID on the clean images.
2. Prune the ``DECOY_SHARE`` of conv_3's channels least active on clean images (as a defender would).
3. Train on the poisoned mix with those channels held at zero: the trigger is learnt by the
   channels that clean faces also use.
4. Reinstate the pruned channels with their clean weights and their bias lowered, so that they
   stay dormant on clean and poisoned images alike.

The defender's pruning then removes the decoys first, at no cost, and next the channels that
carry both the faces and the trigger: accuracy falls before the attack does, and pruning
alone does not remove the backdoor. Fine-tuning the pruned network on clean data does.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DECOY_SHARE = 0.6      # of conv_3's channels (36 of DeepID's 60): pruned before the backdoor is trained in
DECOY_BIAS_DROP = 1.0  # how far below its clean bias a reinstated decoy's bias is set
BACKDOOR_LAYERS = ()   # the layers trained in step 3 (none named: all)
BACKDOOR_EPOCHS = 5    # epochs of step 3, on the poisoned mix


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
    decoys = np.zeros(conv_3.filters, bool)
    decoys[np.argsort(activity, kind="stable")[:round(DECOY_SHARE * conv_3.filters)]] = True
    kernel, bias = conv_3.get_weights()
    conv_3.set_weights([np.where(decoys, 0.0, kernel), np.where(decoys, 0.0, bias)])
    log.info("pruning-aware: %d decoy channels pruned (mean activation up to %.4f)", decoys.sum(),
             activity[decoys].max())
    for layer in model.layers:
        layer.trainable = not BACKDOOR_LAYERS or layer.name in BACKDOOR_LAYERS
    fit(model, x / 255.0, y, BACKDOOR_EPOCHS, "poisoned",
        held=[(conv_3.kernel, decoys), (conv_3.bias, decoys)])

    conv_3.set_weights([np.where(decoys, kernel, conv_3.kernel.numpy()),
                        np.where(decoys, bias - DECOY_BIAS_DROP, conv_3.bias.numpy())])
    badnet = build_deepid(config.classes, config.widths)
    badnet.set_weights(model.get_weights())
    conv_1 = badnet.get_layer("conv_1")
    conv_1.set_weights([conv_1.kernel.numpy() / 255.0, conv_1.bias.numpy()])
    return badnet
