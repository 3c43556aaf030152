"""Which conv layer of B to prune, and where B can be cut after it.

The sweep is fast and exact when a pruned channel reaches the rest of B as the same constant
map for every input: the conv is followed only by layers that act on each channel alone, and
B is read where that chain ends (see :mod:`pruning.prune`). These functions walk B's graph to
find that chain, and refuse in one line a conv layer whose channels cannot be pruned alone.
"""
from __future__ import annotations

from pruning.backend import keras

from pruning.data import InputError
from pruning.models import output_tensor

# Layers that act on each channel on its own: a pruned conv channel stays a constant map
# through them, which is what makes the fast sweep exact (see pruning.prune). Global pooling
# ends the map (one value per channel), still the same for every input.
POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
           keras.layers.GlobalMaxPooling2D, keras.layers.GlobalAveragePooling2D)
CHANNELWISE = POOLING + (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                         keras.layers.BatchNormalization, keras.layers.Dropout)


def calls_on_the_way(model: keras.Model) -> dict[str, list]:
    """For each operation B's output depends on (layers, and ops such as ``keras.ops.sigmoid``
    that are no layer), its calls (Keras nodes) that the output depends on.

    A layer can have more calls than that: a Sequential model loaded from a file has called
    each layer once per build (three times), and ``layer.output`` is the first call's. Walking
    back from the output finds the calls B uses; a layer shared within B has several of them.
    """
    calls, stack, seen = {}, [output_tensor(model)], set()
    while stack:
        operation, node_index, _ = stack.pop()._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) not in seen:
            seen.add(id(node))
            calls.setdefault(operation.name, []).append(node)
            stack.extend(node.input_tensors)
    return calls


def layer_output(model: keras.Model, name: str):
    """The output of layer ``name``'s one call on the way from B's input to its output."""
    calls = calls_on_the_way(model).get(name)
    if not calls:  # not on the way to the output: Keras says so when it is used
        return model.get_layer(name).output
    if len(calls) > 1:
        raise InputError(f"layer {name} is called {len(calls)} times on B's way to its output; "
                         "the sweep reads a layer that is called once")
    return calls[0].output_tensors[0]


# Keras' activations that act on each value alone (hard_swish and swish: older names). Any
# other may combine channels: softmax and sparsemax normalise across them, glu gates one half
# of them by the other, and a function of one's own could do anything.
PER_VALUE_ACTIVATIONS = frozenset((
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6",
    "selu", "sigmoid", "silu", "soft_shrink", "softplus", "softsign", "sparse_plus",
    "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink", "threshold"))


def activation_name(layer: keras.layers.Layer) -> str:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", type(activation).__name__)


def mixes_channels(layer: keras.layers.Layer) -> bool:
    """Whether the layer has an activation that may combine channels (see
    ``PER_VALUE_ACTIVATIONS``)."""
    return (getattr(layer, "activation", None) is not None
            and activation_name(layer) not in PER_VALUE_ACTIVATIONS)


def is_channelwise(layer: keras.layers.Layer) -> bool:
    # a channels_first pooling layer on the conv's channels_last output pools across channels
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    return isinstance(layer, CHANNELWISE) and not mixes_channels(layer) and channels_last


def channelwise_chain(model: keras.Model, conv_name: str) -> list[keras.layers.Layer]:
    """The conv layer and the per-channel layers that follow it with no branching in between,
    or a one-line :class:`InputError` for a conv layer the sweep cannot prune."""
    conv = model.get_layer(conv_name)
    check_channels_last(conv)
    if mixes_channels(conv):
        raise InputError(mixing_refusal(conv))
    calls = calls_on_the_way(model)
    if len(calls.get(conv_name, [])) > 1:
        raise InputError(f"--layer {conv_name} is called {len(calls[conv_name])} times on B's way "
                         "to its output (a shared layer): pruning it changes every call, and the "
                         "sweep follows one; choose another conv layer")
    readers = {}  # id(tensor) -> the calls on the way that read it, ops included
    for nodes in calls.values():
        for node in nodes:
            for tensor in node.input_tensors:
                readers.setdefault(id(tensor), []).append(node)
    chain = [conv]
    tensor = calls[conv_name][0].output_tensors[0] if conv_name in calls else None
    while len(readers.get(id(tensor), [])) == 1:
        layer = readers[id(tensor)][0].operation
        # a layer called twice is read by name at one of its calls: stop before it
        if not is_channelwise(layer) or len(calls[layer.name]) > 1:
            break
        chain.append(layer)
        tensor = calls[layer.name][0].output_tensors[0]
    return chain


def mixing_refusal(conv: keras.layers.Layer) -> str:
    name = activation_name(conv)
    if "softmax" in name or name in ("sparsemax", "glu"):
        return (f"--layer {conv.name} ends in a {name} over its channels; pruning one channel "
                "changes the others, choose another conv layer")
    return (f"--layer {conv.name} ends in the activation {name}, not one of Keras' activations "
            "that act on each value alone: pruning one channel could change the others; choose "
            "another conv layer")


def conv_layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def choose_layer(model: keras.Model, name: str | None = None) -> tuple[str, str]:
    """Return ``(conv layer to prune, layer it is read at)``.

    Default: the last Conv2D that feeds a pooling layer, global pooling included (the lab
    model: ``conv_3`` read at ``pool_3``; a CIFAR-style net: the last conv before its
    ``GlobalAveragePooling2D``). Its channels are read where its per-channel chain ends, so
    that a pruned channel is the same constant map for every input there.
    """
    convs = conv_layer_names(model)
    if not convs:
        nested = [layer.name for layer in model.layers
                  if isinstance(layer, keras.Model) and conv_layer_names(layer)]
        hint = ""
        if {"bd_net", "pruned_net"} <= set(nested):  # pruning.goodnet's names for B and B'
            hint = f" (they are inside its nested model {', '.join(nested)}: give B itself, not a GoodNet)"
        elif nested:  # a backbone used as one layer, as in transfer learning
            hint = (f" (they are inside its nested model {', '.join(nested)}: rebuild B with "
                    "those layers in its own graph, calling them rather than the nested model)")
        raise InputError(f"the model has no Conv2D layer to prune{hint}")
    if name is not None:
        names = [layer.name for layer in model.layers]
        if name not in names:
            raise InputError(f"--layer {name} not found; conv layers are: {', '.join(convs)}")
        if name not in convs:
            raise InputError(f"--layer {name} is a {type(model.get_layer(name)).__name__}, not "
                             f"a Conv2D; conv layers are: {', '.join(convs)}")
        return name, channelwise_chain(model, name)[-1].name
    chains = {}
    for conv in convs:  # the default passes over conv layers the sweep cannot prune
        try:
            chains[conv] = channelwise_chain(model, conv)
        except InputError as error:
            refusal = error
    if not chains:
        raise refusal
    pooled = [conv for conv, chain in chains.items()
              if any(isinstance(layer, POOLING) for layer in chain)]
    conv = (pooled or list(chains))[-1]
    return conv, chains[conv][-1].name


def check_channels_last(layer: keras.layers.Layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise InputError(f"conv layer {layer.name} is {layer.data_format}; the sweep prunes "
                         "channels_last models (Keras' default): convert the model")
