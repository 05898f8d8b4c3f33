"""`convert(model)`: compressed backprop for an existing functional or Sequential CNN.

Every chain BatchNormalization -> activation -> [ZeroPadding2D] -> Conv2D of
the model becomes one `ApproxConvBlock`, which keeps only the K-bit code of the
BN output for the backward pass. The activation is any the block computes, as
stock layers write it: ``ReLU()``, ``ReLU(6.0)``, ``LeakyReLU``,
``ReLU(negative_slope=...)``, ``Activation`` of relu, relu6, leaky_relu,
silu/swish, gelu or hard_silu/hard_swish. One BN+activation feeding several
convs (ResNetV2's pre-activation feeds the projection shortcut and the first
conv) becomes one block with several conv heads reading the same code; a
DepthwiseConv2D, a SeparableConv2D (a depthwise head, its pointwise part a
stock 1x1 Conv2D named after it, after the block) or a Dense on a 4D input
(a dense head) reading the activation is a head as a Conv2D is; a
ZeroPadding2D between the activation and a "valid" conv is folded into the
conv as explicit padding; if the BN+activation output also feeds other layers
(a residual add, a pooling), the block returns it as well. A
LayerNormalization over the channels (ConvNeXt's ``LayerNormalization(epsilon=
1e-6) -> Dense``), followed by an activation the block computes or read by the
heads directly (a linear activation), becomes a normalization="layer" block. A
squeeze-excite between the activation and the conv (EfficientNet's
GlobalAveragePooling2D -> Reshape -> 1x1 Conv2D -> 1x1 Conv2D(sigmoid) ->
Multiply; MobileNetV3's ReLU layer and hard_sigmoid written as
``ReLU(6.0)(x + 3.0) * (1.0 / 6.0)``) is computed by the block too. A
BatchNormalization read by convs directly (MobileNet's project BN feeding the
next expand conv) is a linear block; one read only by layers that keep
nothing (a residual Add, a Concatenate, a global pooling), with or without an
activation, becomes a block without heads that returns its activation. Convs
reading an Add, a Concatenate, an AveragePooling2D, a split or an argmax
pooling's output directly become a linear normalization="none" block, where
the tensor's other readers keep nothing of it in float (a max pooling keeps
its argmax code).

Functional and Sequential models nested as layers (a backbone called on the
input) are converted inside; a keras-hub task (``ResNetImageClassifier``)
becomes a task of its own class around its converted backbone, which keeps
its ``pyramid_outputs`` (the backbone itself becomes a functional model: its
keras-hub class, and with it ``save_to_preset``, is what is lost). Only what
the backward pass reaches is converted: a frozen base before a trainable
head keeps nothing in stock Keras either. Every ``keras.layers.MaxPooling2D``
becomes an `ArgmaxPooling2D` with its config (``argmax_pooling=False`` keeps
all but those with a 1x1 window, which keep nothing as ArgmaxPooling2D): the
same forward, and a backward that keeps a one-byte argmax code per output
instead of the float input and output. Everything else is copied unchanged,
so the forward pass is exactly the original's.

`memory_report(model, ...)` tells, per layer, which activation bytes the
backward pass keeps before and after conversion, and why what stays float
stays float (see keras_blpa.activation_report for how these figures relate to the
allocator's peak).

The graph walk reads the functional model's nodes (``_nodes_by_depth``,
``node.arguments``), as Keras' own `clone_model` does.
"""

import collections
import math
import re
import warnings

import keras
import numpy as np

from keras_blpa import backends
from keras_blpa import layers as blpa_layers
from keras_blpa.activation_report import LayerMemory
from keras_blpa.activation_report import MemoryReport
from keras_blpa.blocks import RELU
from keras_blpa.blocks import Activation
from keras_blpa.pooling import ArgmaxPooling2D
from keras_blpa.validation import check_bits
from keras_blpa.validation import check_choice
from keras_blpa.validation import check_int
from keras_blpa.windows import index_dtype

__all__ = ["convert", "memory_report"]

# Layers whose backward keeps nothing but shapes.
_STATELESS = (
    keras.layers.InputLayer,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Average,
    keras.layers.Concatenate,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping2D,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Permute,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.Rescaling,
    keras.layers.Identity,
    blpa_layers.ResidualBuffer,
)
# keras.ops operations (keras.src.ops classes, not layers) whose backward keeps nothing.
_STATELESS_OPS = frozenset((
    "Add", "Subtract", "Negative", "Pad", "Reshape", "Transpose", "Concatenate", "Stack",
    "ExpandDims", "Squeeze", "GetItem", "Mean", "Sum", "Flatten", "Cast", "Split",
))
_KEEPS_INPUT = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose,
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
)
_KEEPS_INPUT_AND_OUTPUT = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
)
# Why an activity regularizer on the BN output, the activation or its padding
# stops a conversion: the block keeps only the code of these tensors.
_ACTIVITY_REASON = "its gradient needs the float tensor, which the block does not keep"
# The layers that can read a block's activation (its heads), by the head kind
# they become (SeparableConv2D: a depthwise head, then its pointwise part as a
# stock 1x1 Conv2D that keeps the float depthwise output, as stock does).
_HEAD_KINDS = {
    keras.layers.Conv2D: "conv",
    keras.layers.DepthwiseConv2D: "depthwise",
    keras.layers.SeparableConv2D: "depthwise",
    keras.layers.Dense: "dense",
}
_HEAD_NAMES = "Conv2D, DepthwiseConv2D, SeparableConv2D or Dense"
# Activations whose gradient reads their output (TensorFlow's registered grads).
_OUTPUT_GRAD_ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "exponential")


# ---------------------------------------------------------------- the graph


def _functional(model):
    """The functional graph behind `model`, or a ValueError saying what to do."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                "convert() needs a built Sequential model: start it with "
                "keras.Input(shape) or call model.build(input_shape) first. "
                f"Received: Sequential model {model.name!r} without an input shape"
            )
        return graph
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth"):
        return model
    what = type(model).__name__
    raise ValueError(
        "convert() needs a functional or Sequential keras.Model (it rewrites the "
        f"layer graph). Received: a model of class {what}"
        + (" (subclassed: its graph is in Python code). " if isinstance(model, keras.Model) else ". ")
        + "Rebuild it with the functional API (keras.Model(inputs, outputs)), or "
        "use keras_blpa.ApproxConvBlock in place of BatchNormalization -> activation -> "
        "Conv2D inside its call()."
    )


class _Graph:
    """Nodes of a functional model in topological order, with their consumers."""

    def __init__(self, fn, extra_outputs=()):
        self.fn = fn
        self.nodes = []
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                if node.operation is not None and not node.is_input:
                    self.nodes.append(node)
        self.consumers = {}
        self.producer = {}
        for node in self.nodes:
            for t in node.input_tensors:
                self.consumers.setdefault(id(t), []).append(node)
            for t in node.outputs:
                self.producer[id(t)] = node
        self.output_ids = {id(t) for t in fn.outputs} | {id(t) for t in extra_outputs}
        self.order = {id(n): i for i, n in enumerate(self.nodes)}

    def users(self, tensor):
        return self.consumers.get(id(tensor), [])

    def only_user(self, tensor):
        """The single node reading `tensor`, or None (several, none, or a model output)."""
        users = self.users(tensor)
        if len(users) == 1 and id(tensor) not in self.output_ids:
            return users[0]
        return None


def _describe(node):
    return f"{type(node.operation).__name__} {node.operation.name!r}"


def _single_call(layer):
    return len(getattr(layer, "_inbound_nodes", [])) == 1


# --------------------------------------------------------- the pattern rules


# keras.activations functions the block computes, by its activation name.
_ACTIVATION_FUNCTIONS = {
    keras.activations.relu: "relu",
    keras.activations.relu6: "relu6",
    keras.activations.leaky_relu: "leaky_relu",
    keras.activations.silu: "silu",  # also "swish"
    keras.activations.gelu: "gelu",  # Activation("gelu"): approximate=False
    keras.activations.hard_silu: "hard_silu",  # also "hard_swish"
}


def _block_activation(layer):
    """The block's `Activation` of a stock activation layer, or None.

    ``ReLU(max_value, negative_slope, threshold)``: relu, relu6 (max_value 6)
    or leaky_relu (a slope, no maximum); ``LeakyReLU``; ``Activation`` with one
    of `_ACTIVATION_FUNCTIONS`.
    """
    if type(layer) is keras.layers.ReLU:
        if layer.threshold or (layer.negative_slope and layer.max_value is not None):
            return None
        if layer.negative_slope:
            return Activation.get("leaky_relu", float(layer.negative_slope))
        if layer.max_value is None:
            return RELU
        return Activation.get("relu6") if float(layer.max_value) == 6.0 else None
    if type(layer) is keras.layers.LeakyReLU:
        return Activation.get("leaky_relu", float(layer.negative_slope))
    if type(layer) is keras.layers.Activation:
        name = _REDUCE_FUNCTIONS.get(layer.activation)
        return None if name is None else Activation.get(name)
    return None


_BLOCK_ACTIVATIONS = "relu, relu6, leaky_relu, linear, silu/swish, gelu, hard_silu/hard_swish"


def _activation_like(layer):
    return type(layer) in (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.Activation,
                           keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax)


def _activation_text(layer):
    """How a stock activation layer's function reads in a reason (no layer names)."""
    if type(layer) is keras.layers.ReLU:
        return (f"ReLU(max_value={layer.max_value}, negative_slope={float(layer.negative_slope)}, "
                f"threshold={float(layer.threshold)})")
    if type(layer) is keras.layers.Activation:
        return getattr(layer.activation, "__name__", type(layer.activation).__name__)
    return type(layer).__name__


def _cause(reason):
    """A reason without the layer names in it: one cause for many layers."""
    return re.sub(r" '[^']*'", "", reason)


def _is_relu(layer):
    return _block_activation(layer) == RELU


def _bn_problem(node):
    """Why this BatchNormalization cannot start a block (None if it can)."""
    bn = node.operation
    rank = len(node.input_tensors[0].shape)
    if rank != 4:
        return f"BatchNormalization on a rank-{rank} input (needs 4D)"
    if bn.axis not in (-1, 3):
        return f"BatchNormalization axis={bn.axis} (needs channels last)"
    if getattr(bn, "renorm", False):
        return "BatchNormalization with renorm"
    if bn.activity_regularizer is not None:
        return f"BatchNormalization with an activity_regularizer ({_ACTIVITY_REASON})"
    if not _single_call(bn):
        return "BatchNormalization layer shared by several calls"
    return None


def _is_head_candidate(node):
    """Whether `node` is a layer that can be a head: a Conv2D, DepthwiseConv2D,
    SeparableConv2D, or a Dense on a 4D input (on the channel axis)."""
    layer = node.operation
    if type(layer) not in _HEAD_KINDS:
        return False
    return type(layer) is not keras.layers.Dense or len(node.input_tensors[0].shape) == 4


def _conv_problem(node, act_out, source, pad=None):
    """Why this Conv2D, DepthwiseConv2D, SeparableConv2D or Dense (after the
    ZeroPadding2D node `pad`, if given) cannot be a head of the block that starts at
    layer `source` (its BatchNormalization, or its activation when there is none);
    None if it can."""
    conv = node.operation
    if not _is_head_candidate(node):
        return f"{_describe(node)} is not a {_HEAD_NAMES} (on a 4D input)"
    if len(node.input_tensors) != 1 or node.input_tensors[0] is not act_out:
        return f"{_describe(node)} has other inputs"
    if pad is not None and pad.operation.activity_regularizer is not None:
        return (
            f"{_describe(pad)} before {_describe(node)} has an activity_regularizer "
            f"({_ACTIVITY_REASON})"
        )
    is_bn = isinstance(source, keras.layers.BatchNormalization)
    dense = type(conv) is keras.layers.Dense
    dilation = tuple(getattr(conv, "dilation_rate", (1, 1)))
    checks = [
        (pad is not None and dense, "a ZeroPadding2D before it"),
        (getattr(conv, "data_format", "channels_last") != "channels_last", "data_format channels_first"),
        (dilation != (1, 1), f"dilation_rate={dilation}"),
        (getattr(conv, "groups", 1) != 1, f"groups={getattr(conv, 'groups', 1)}"),
        (
            getattr(conv, "quantization_mode", None) is not None,
            f"quantization_mode={getattr(conv, 'quantization_mode', None)!r}",
        ),
        (conv.activation is not keras.activations.linear, "an activation"),
        (
            conv.activity_regularizer is not None,
            "an activity_regularizer (the block's outputs carry none)",
        ),
        (getattr(conv, "lora_enabled", False), "LoRA enabled"),
        (not _single_call(conv), "several calls (shared layer)"),
        (
            pad is not None and getattr(conv, "padding", "valid") != "valid",
            "padding='same' after a ZeroPadding2D",
        ),
        (
            conv.dtype_policy.name != source.dtype_policy.name,
            f"a dtype policy other than the {type(source).__name__}'s",
        ),
        (
            is_bn and source.trainable and not conv.trainable,
            "trainable=False while its BatchNormalization trains",
        ),
    ]
    for failed, what in checks:
        if failed:
            return f"{_describe(node)} has {what}"
    return None


class _Chain:
    """A convertible [BN ->] activation -> conv heads group, and the block it becomes."""

    def __init__(self, bn, act, heads, others, gate=None, start=None):
        # bn None: an activation with no BN in front; act None too: convs reading a
        # tensor with neither (a linear normalization="none" block that starts at
        # `start`, the first of its convs or pads in graph order).
        self.bn, self.act = bn, act
        self._start = start
        self.gate = gate  # a _Gate between the activation and the heads, or None
        self.heads = heads  # [(conv node, ZeroPadding2D node or None)]
        self.others = others  # nodes (or model outputs) reading the activation
        if not heads:  # a block without heads is named after its BN
            self.name = bn.operation.name
            return
        first = heads[0][0].operation
        # A SeparableConv2D's name stays with its output (the pointwise conv after the block).
        separable = type(first) is keras.layers.SeparableConv2D
        self.name = first.name + ("_depthwise" if separable else "")

    @property
    def layer_norm(self):
        return self.bn is not None and isinstance(self.bn.operation, keras.layers.LayerNormalization)

    @property
    def activation(self):
        """The block's `Activation` (linear where the normalization feeds the heads)."""
        if self.act is self.bn or self.act is None:
            return Activation.get("linear")
        return _block_activation(self.act.operation)

    @property
    def start(self):
        """The first node: its input is the block's input."""
        if self.act is None:
            return self._start
        return self.act if self.bn is None else self.bn

    @property
    def nodes(self):
        pads = [pad for _, pad in self.heads if pad is not None]
        if self.act is None:
            first = []
        elif self.bn is None or self.act is self.bn:
            first = [self.act]
        else:
            first = [self.bn, self.act]
        gate = [] if self.gate is None else self.gate.nodes
        return first + gate + pads + [conv for conv, _ in self.heads]

    @property
    def return_activation(self):
        return bool(self.others)

    @property
    def normalization(self):
        """The block's normalization: "none", "frozen" (BN frozen, conv trainable) or "batch"."""
        if self.bn is None:
            return "none"
        if self.layer_norm:
            return "layer"
        bn = self.bn.operation
        trainable = self.heads[0][0].operation.trainable if self.heads else bn.trainable
        return "frozen" if trainable and not bn.trainable else "batch"


def _activation_problem(act, source):
    """Why the activation node `act` cannot be the block's (None if it can)."""
    layer = act.operation
    if not _single_call(layer):
        return "its activation layer is shared by several calls"
    if layer.dtype_policy.name != source.dtype_policy.name:
        return "its activation layer has another dtype policy"
    if layer.activity_regularizer is not None:
        return f"its activation layer has an activity_regularizer ({_ACTIVITY_REASON})"
    return None


# The gate functions of a squeeze-excite's second 1x1 conv, by the block's name.
_GATE_FUNCTIONS = {
    keras.activations.sigmoid: "sigmoid",
    keras.activations.hard_sigmoid: "hard_sigmoid",
}
_REDUCE_FUNCTIONS = {**_ACTIVATION_FUNCTIONS, keras.activations.linear: "linear"}
_EXPAND_FUNCTIONS = {**_GATE_FUNCTIONS, keras.activations.linear: "linear"}


class _Gate:
    """A squeeze-excite reading a block's activation, as EfficientNet writes it:
    GlobalAveragePooling2D [-> Reshape((1, 1, C))] -> Conv2D(1x1, activation) ->
    Conv2D(1x1, sigmoid or hard_sigmoid) -> Multiply with the activation."""

    def __init__(self, nodes, reduce, expand, multiply, activation, gate):
        self.nodes, self.reduce, self.expand, self.multiply = nodes, reduce, expand, multiply
        self.activation, self.gate = activation, gate

    @property
    def output(self):
        return self.multiply.outputs[0]

    @property
    def config(self):
        reduce = self.reduce.operation
        return dict(filters=reduce.filters, activation=self.activation, gate=self.gate,
                    use_bias=reduce.use_bias)

    def weights(self):
        """The stock weights in `SqueezeExcite.weight_shapes`' order."""
        reduce, expand = self.reduce.operation, self.expand.operation
        if not reduce.use_bias:
            return [reduce.kernel, expand.kernel]
        return [reduce.kernel, reduce.bias, expand.kernel, expand.bias]


def _gate_conv_ok(node, channels, functions, source):
    """Whether `node` is a 1x1 Conv2D of a squeeze-excite the block computes."""
    conv = node.operation
    return (
        type(conv) is keras.layers.Conv2D
        and tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.strides) == (1, 1)
        and tuple(conv.dilation_rate) == (1, 1)
        and conv.groups == 1
        and conv.data_format == "channels_last"
        and conv.activation in functions
        and (channels is None or conv.filters == channels)
        and conv.activity_regularizer is None
        and all(getattr(conv, n) is None for n in (
            "kernel_regularizer", "bias_regularizer", "kernel_constraint", "bias_constraint"))
        and getattr(conv, "quantization_mode", None) is None
        and not getattr(conv, "lora_enabled", False)
        and conv.dtype_policy.name == source.dtype_policy.name
        and _single_call(conv)
    )


def _gate(graph, act, source):
    """The `_Gate` that reads the activation node `act` (of a block starting at
    layer `source`), or None."""
    activation = act.outputs[0]
    channels = activation.shape[-1]
    for pool in graph.users(activation):
        layer = pool.operation
        if type(layer) is not keras.layers.GlobalAveragePooling2D or (
            layer.data_format != "channels_last" or not _single_call(layer)
        ):
            continue
        nodes, node = [pool], graph.only_user(pool.outputs[0])
        if node is not None and type(node.operation) is keras.layers.Reshape:
            if tuple(node.operation.target_shape) != (1, 1, channels):
                continue
            nodes.append(node)
            node = graph.only_user(node.outputs[0])
        elif not layer.keepdims:
            continue
        if node is None or not _gate_conv_ok(node, None, _REDUCE_FUNCTIONS, source):
            continue
        reduce = node
        found = _reduce_activation(graph, reduce)
        if found is None:
            continue
        act_name, act_nodes = found
        last = act_nodes[-1] if act_nodes else reduce
        expand = graph.only_user(last.outputs[0])
        if expand is None or not _gate_conv_ok(expand, channels, _EXPAND_FUNCTIONS, source):
            continue
        if expand.operation.use_bias != reduce.operation.use_bias:
            continue
        found = _gate_function(graph, expand)
        if found is None:
            continue
        gate_name, gate_nodes = found
        scale = (gate_nodes[-1] if gate_nodes else expand).outputs[0]
        multiply = graph.only_user(scale)
        if multiply is None or type(multiply.operation) is not keras.layers.Multiply:
            continue
        ids = {id(t) for t in multiply.input_tensors}
        if len(multiply.input_tensors) != 2 or ids != {id(activation), id(scale)}:
            continue
        if multiply.operation.activity_regularizer is not None or not _single_call(
            multiply.operation
        ):
            continue
        nodes += [reduce, *act_nodes, expand, *gate_nodes, multiply]
        return _Gate(nodes, reduce, expand, multiply, act_name, gate_name)
    return None


def _reduce_activation(graph, reduce):
    """(activation name, [its nodes]) of a squeeze-excite's first 1x1 conv: the conv's
    own activation, or a stock activation layer reading its linear output; or None."""
    conv = reduce.operation
    if conv.activation is not keras.activations.linear:
        return _ACTIVATION_FUNCTIONS[conv.activation], []
    node = graph.only_user(reduce.outputs[0])
    if node is None or not _single_call(node.operation):
        return None
    act = _block_activation(node.operation)
    return None if act is None else (act, [node])


def _gate_function(graph, expand):
    """(gate name, [its nodes]) of a squeeze-excite's second 1x1 conv: the conv's own
    sigmoid or hard_sigmoid; an Activation layer of one; or hard_sigmoid written as
    MobileNetV3 writes it, ReLU(6.0)(x + 3.0) * (1.0 / 6.0) (the block's is
    relu6(x + 3) / 6, the same to one rounding); or None."""
    conv = expand.operation
    if conv.activation is not keras.activations.linear:
        return _GATE_FUNCTIONS[conv.activation], []
    node = graph.only_user(expand.outputs[0])
    if node is None:
        return None
    if type(node.operation) is keras.layers.Activation:
        name = _GATE_FUNCTIONS.get(node.operation.activation)
        return None if name is None or not _single_call(node.operation) else (name, [node])
    nodes = [node]
    for want, constant in (("Add", 3.0), ("ReLU", None), ("Multiply", 1.0 / 6.0)):
        op = node.operation
        if type(op).__name__ != want:
            return None
        if constant is None:
            if _block_activation(op) != Activation.get("relu6") or not _single_call(op):
                return None
        else:
            args = node.arguments.args
            if type(op).__module__ != "keras.src.ops.numpy" or len(args) != 2 or not (
                isinstance(args[1], (int, float)) and math.isclose(args[1], constant, rel_tol=1e-7)
            ):
                return None
        if want != "Multiply":
            node = graph.only_user(node.outputs[0])
            if node is None:
                return None
            nodes.append(node)
    return "hard_sigmoid", nodes


def _heads(graph, act, source, rejected):
    """(heads, others, reasons, gate) of the activation node `act` of a block
    starting at layer `source`, with a squeeze-excite `_Gate` between them where
    one reads the activation and only heads read its Multiply (else gate None)."""
    gate = _gate(graph, act, source)
    if gate is not None:
        scratch = dict(rejected)
        heads, others, reasons = _readers(graph, gate.output, source, scratch)
        if heads and not others:
            rejected.update(scratch)
            readers = {id(n) for n in gate.nodes}
            others = [u for u in graph.users(act.outputs[0]) if id(u) not in readers]
            if id(act.outputs[0]) in graph.output_ids:
                others.append(None)
            return heads, others, reasons, gate
    return (*_readers(graph, act.outputs[0], source, rejected), None)


def _readers(graph, activation, source, rejected):
    """(heads, others, reasons) of the tensor `activation` of a block starting at
    layer `source`: the convs (after a ZeroPadding2D or not) that can read its code,
    the other readers, and why the rejected convs cannot."""
    heads, others, reasons = [], [], []
    for user in graph.users(activation):
        layer = user.operation
        if type(layer) is keras.layers.ZeroPadding2D and layer.data_format == "channels_last":
            convs = graph.users(user.outputs[0])
            problems = [_conv_problem(c, user.outputs[0], source, pad=user) for c in convs]
            if convs and id(user.outputs[0]) not in graph.output_ids and not any(problems) and _single_call(layer):
                heads += [(c, user) for c in convs]
                continue
            for c, p in zip(convs, problems):
                if p:
                    if _is_head_candidate(c):
                        rejected[id(c)] = p
                    reasons.append(p)
        elif _is_head_candidate(user):
            problem = _conv_problem(user, activation, source)
            if problem is None:
                heads.append((user, None))
                continue
            rejected[id(user)] = problem
            reasons.append(problem)
        others.append(user)
    if id(activation) in graph.output_ids:
        others.append(None)
    return heads, others, reasons


def _no_heads_reason(what_feeds, others, reasons):
    what = ", ".join(_describe(u) if u is not None else "a model output" for u in others)
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return f"{what_feeds} output feeds no convertible {_HEAD_NAMES}: {what}{why}"


def _find_chain(graph, node, rejected):
    """(_Chain, None) for a BN node that starts a block, else (None, reason).

    Consumers of the activation that cannot be heads get their reason in
    `rejected` ({id(node): reason}).
    """
    problem = _bn_problem(node)
    if problem:
        return None, problem
    bn = node.operation
    act = graph.only_user(node.outputs[0])
    if act is not None and _activation_like(act.operation) and _block_activation(act.operation) is None:
        return None, (
            f"its activation is {_activation_text(act.operation)}, not one the block computes "
            f"({_BLOCK_ACTIVATIONS})"
        )
    if act is None or _block_activation(act.operation) is None:
        # Heads reading the BN output itself: a linear block (MobileNet's project BN
        # read by the next expand conv and by the residual Add).
        heads, others, reasons, gate = _heads(graph, node, bn, rejected)
        if (heads or _headless_ok(bn, others)) and not _trainable_problem(heads, gate):
            return _Chain(node, node, heads, others, gate), None
        users = graph.users(node.outputs[0])
        what = ", ".join(_describe(u) for u in users) or "a model output"
        return None, f"its output feeds {what}, not a single activation the block computes"
    problem = _activation_problem(act, bn)
    if problem:
        return None, problem
    heads, others, reasons, gate = _heads(graph, act, bn, rejected)
    if not heads and _headless_ok(bn, others):
        return _Chain(node, act, [], others), None
    if not heads:
        return None, _no_heads_reason("BN -> activation", others, reasons)
    problem = _trainable_problem(heads, gate)
    if problem:
        return None, problem
    return _Chain(node, act, heads, others, gate), None


def _headless_ok(bn, others):
    """Whether a trainable BN [-> activation] read by no head becomes a block without
    heads: where its readers keep nothing of it (an Add, a Concatenate, a global
    average pooling, a Dropout, a model output), the block's code replaces all that
    stock keeps for it, the BN input and the activation's tensor; before a max
    pooling, which keeps the tensor anyway (unless it becomes an ArgmaxPooling2D),
    it replaces the BN input.
    (Before a layer that keeps the tensor and could be a head, such as a dilated
    conv, the chain stays, with that layer's reason; a frozen BN keeps nothing in
    stock Keras.)"""
    return bool(others) and bn.trainable and all(
        reader is None or _keeps_none_of_its_input(reader.operation)
        or isinstance(reader.operation, _KEEPS_INPUT_AND_OUTPUT) for reader in others)


def _keeps_none_of_its_input(op):
    """Whether the backward of `op` keeps none of its inputs: a stateless layer, or a
    Dropout (its own mask; EfficientNet's drop-connect after the project BN)."""
    return _keeps_nothing(op) or isinstance(op, keras.layers.Dropout)


def _keeps_nothing(op):
    """Whether the backward of `op` keeps none of its inputs (shapes only)."""
    if getattr(op, "activity_regularizer", None) is not None:
        return False  # its loss term's gradient reads its output
    return isinstance(op, _STATELESS) or (
        not isinstance(op, keras.layers.Layer) and type(op).__name__ in _STATELESS_OPS)


def _find_unnormalised_chain(graph, act, rejected):
    """(_Chain, None) for an activation node with no BN chain that starts a
    normalization="none" block, else (None, reason)."""
    problem = _activation_problem(act, act.operation)
    if problem:
        return None, problem
    heads, others, reasons, gate = _heads(graph, act, act.operation, rejected)
    if not heads:
        return None, _no_heads_reason("activation", others, reasons)
    problem = _trainable_problem(heads, gate)
    if problem:
        return None, problem
    return _Chain(None, act, heads, others, gate), None


def _trainable_problem(heads, gate):
    """Why the heads (and the squeeze-excite's convs) cannot be one block's, or None."""
    layers = [conv.operation for conv, _ in heads]
    if gate is not None:
        layers += [gate.reduce.operation, gate.expand.operation]
    if len({layer.trainable for layer in layers}) > 1:
        return "its conv heads differ in trainable (one block trains all or none)"
    return None


def _ln_problem(node):
    """Why this LayerNormalization cannot start a block (None if it can)."""
    ln = node.operation
    rank = len(node.input_tensors[0].shape)
    axis = ln.axis if isinstance(ln.axis, (list, tuple)) else [ln.axis]
    if rank != 4:
        return f"LayerNormalization on a rank-{rank} input (needs 4D)"
    if list(axis) not in ([-1], [3]):
        return f"LayerNormalization axis={ln.axis} (needs the channels, last)"
    if getattr(ln, "rms_scaling", False):
        return "LayerNormalization with rms_scaling"
    if ln.activity_regularizer is not None:
        return f"LayerNormalization with an activity_regularizer ({_ACTIVITY_REASON})"
    if not _single_call(ln):
        return "LayerNormalization layer shared by several calls"
    return None


def _find_layer_norm_chain(graph, node, rejected):
    """(_Chain, None) for a LayerNormalization node that starts a normalization="layer"
    block (its heads read the LN output, or the output of its only user, an
    activation the block computes), else (None, reason)."""
    problem = _ln_problem(node)
    if problem:
        return None, problem
    ln = node.operation
    act = graph.only_user(node.outputs[0])
    if act is None or _block_activation(act.operation) is None or _activation_problem(act, ln):
        act = node  # the heads read the LN output: a linear activation
    heads, others, reasons, gate = _heads(graph, act, ln, rejected)
    if not heads:
        return None, _no_heads_reason("LayerNormalization", others, reasons)
    problem = _trainable_problem(heads, gate)
    if problem:
        return None, problem
    if heads[0][0].operation.trainable != ln.trainable:
        return None, "its heads and LayerNormalization differ in trainable (one block trains all or none)"
    return _Chain(node, act, heads, others, gate), None


def _plan(graph, argmax_pooling):
    """(chains, {id(node): reason}) of the whole graph.

    BatchNormalization -> activation chains first; then every other activation
    the block computes (after an Add, a pooling, a conv, or a BN that starts no
    block) that feeds a convertible conv becomes a normalization="none" block;
    last, convs reading an Add, a Concatenate or a pooling directly become a
    linear one (after a max pooling only where it keeps no float tensor: an
    ArgmaxPooling2D, or one that `argmax_pooling` makes one).
    """
    chains, reasons = [], {}
    for node in graph.nodes:
        if isinstance(node.operation, keras.layers.BatchNormalization):
            chain, reason = _find_chain(graph, node, reasons)
            if chain is not None:
                chains.append(chain)
            else:
                reasons[id(node)] = reason
                act = graph.only_user(node.outputs[0])
                if act is not None and _block_activation(act.operation) is not None:
                    reasons[id(act)] = reason
        elif isinstance(node.operation, keras.layers.LayerNormalization):
            chain, reason = _find_layer_norm_chain(graph, node, reasons)
            if chain is not None:
                chains.append(chain)
            else:
                reasons[id(node)] = reason
    claimed = {id(c.act) for c in chains}
    for node in graph.nodes:
        if id(node) in claimed or _block_activation(node.operation) is None:
            continue
        chain, reason = _find_unnormalised_chain(graph, node, reasons)
        if chain is not None:
            chains.append(chain)
            reasons.pop(id(node), None)
        elif id(node) not in reasons:
            reasons[id(node)] = reason
    for node in graph.nodes:
        op = node.operation
        if type(op) is keras.layers.MaxPooling2D and not _becomes_argmax(op, argmax_pooling):
            continue  # it keeps its float output anyway
        if isinstance(op, _LINEAR_SOURCES) or (
                type(op).__name__ in _LINEAR_SOURCE_OPS and not isinstance(op, keras.layers.Layer)):
            for tensor in node.outputs:
                chain = _find_linear_chain(graph, tensor, argmax_pooling)
                if chain is not None:
                    chains.append(chain)
                    for conv, _ in chain.heads:
                        reasons.pop(id(conv), None)
    return chains, reasons


# Layers (and keras.ops operations) whose output, read by convs with no BN or
# activation between, becomes a linear normalization="none" block's input.
_LINEAR_SOURCES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Average,
    keras.layers.Concatenate,
    keras.layers.AveragePooling2D,
    keras.layers.MaxPooling2D,
    ArgmaxPooling2D,
)
_LINEAR_SOURCE_OPS = frozenset(("Add", "Subtract", "Concatenate", "Split"))


def _find_linear_chain(graph, tensor, argmax_pooling):
    """The linear normalization="none" `_Chain` of the convs reading `tensor` (an
    Add's, a Concatenate's, a pooling's output), or None. Only where every other
    reader keeps nothing of it in float (an argmax pooling keeps its own code; the
    max poolings of InceptionV3's reduction blocks read the Concatenate the convs
    read): the code then replaces the float tensor the convs keep.
    Frozen convs keep nothing of it (their input gradient needs only the kernel)."""
    first = next(filter(None, (_first_conv(graph, u) for u in graph.users(tensor))), None)
    if first is None or id(tensor) in graph.output_ids:
        return None
    heads, others, _ = _readers(graph, tensor, first.operation, {})
    if not heads or _trainable_problem(heads, None) or not heads[0][0].operation.trainable or not all(
            u is not None and (_keeps_none_of_its_input(u.operation)
                               or _is_argmax(u.operation, argmax_pooling))
            for u in others):
        return None
    nodes = [n for conv, pad in heads for n in (conv, pad) if n is not None]
    return _Chain(None, None, heads, [], start=min(nodes, key=lambda n: graph.order[id(n)]))


def _first_conv(graph, user):
    """`user` if it is a head candidate, the first one after it if it is a ZeroPadding2D."""
    if _is_head_candidate(user):
        return user
    if isinstance(user.operation, keras.layers.ZeroPadding2D):
        return next((c for c in graph.users(user.outputs[0]) if _is_head_candidate(c)), None)
    return None


def _nested(layer):
    """Whether `layer` is a functional or Sequential model that `convert` descends into."""
    if not isinstance(layer, keras.Model):
        return False
    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None) is not None
    return hasattr(layer, "_nodes_by_depth")


def _has_trainable_weights(op):
    return isinstance(op, keras.layers.Layer) and bool(op.trainable_weights)


class _Plan:
    """The chains of one functional graph, and the plans of the models nested in it.

    Only what the backward pass reaches is planned: a node is live when it has
    trainable weights or reads a live tensor (the model's inputs are not live
    unless it is nested after a live layer). A frozen base before a trainable
    head keeps nothing for the backward pass, so its chains stay stock layers;
    a frozen BatchNormalization before a trainable conv is converted (the conv's
    kernel gradient reads the activation).
    """

    def __init__(self, model, live_inputs=None, argmax_pooling=True):
        fn = _functional(model)
        pyramid = getattr(model, "pyramid_outputs", None)  # a keras-hub backbone's
        self.graph = graph = _Graph(fn, pyramid.values() if isinstance(pyramid, dict) else ())
        live = set(id(t) for t, flag in zip(fn.inputs, live_inputs or ()) if flag)
        self.live = set()
        self.nested = {}
        for node in graph.nodes:
            op = node.operation
            reads_live = [id(t) in live for t in node.input_tensors]
            if _nested(op):
                plan = self.nested.get(id(op))
                if plan is None or (any(reads_live) and not plan.any_live):
                    self.nested[id(op)] = plan = _Plan(op, reads_live, argmax_pooling)
                alive = plan.any_live
            else:
                alive = any(reads_live) or _has_trainable_weights(op)
            if alive:
                self.live.add(id(node))
                live.update(id(t) for t in node.outputs)
        chains, self.reasons = _plan(graph, argmax_pooling)
        self.chains = []
        for chain in chains:
            if any(id(conv) in self.live for conv, _ in chain.heads) or (
                    not chain.heads and id(chain.start) in self.live):
                self.chains.append(chain)
            else:
                for node in (chain.act, chain.start):
                    if node is not None:
                        self.reasons[id(node)] = _FROZEN_REASON
        self.any_live = bool(self.live)

    def block_count(self):
        return len(self.chains) + sum(p.block_count() for p in self.nested.values())

    def causes(self):
        """{reason: count} of the layers left as they were, nested models included."""
        counts = collections.Counter(
            _cause(why) for key, why in self.reasons.items() if key in self.live or why == _FROZEN_REASON
        )
        for plan in self.nested.values():
            counts.update(plan.causes())
        return counts

    def compressed_blocks(self):
        """Count of ApproxConvBlocks with a code already in the graph (nested ones too)."""
        own = sum(
            isinstance(n.operation, blpa_layers.ApproxConvBlock) and n.operation.bits is not None
            for n in self.graph.nodes
        )
        return own + sum(p.compressed_blocks() for p in self.nested.values())


_FROZEN_REASON = "frozen: no trainable weight at or before it, so the backward pass never reaches it"


# ------------------------------------------------------------ memory model


def _dtype_size(dtype):
    return np.dtype(keras.backend.standardize_dtype(dtype)).itemsize


def _nbytes(spec, dtype=None):
    return int(np.prod(spec.shape, dtype=np.int64)) * _dtype_size(dtype or spec.dtype)


def _depthwise_nbytes(layer, input_spec, output_spec):
    """Bytes of a SeparableConv2D's depthwise output (float, the output's dtype)."""
    channels = input_spec.shape[-1] * layer.depth_multiplier
    n = int(np.prod(output_spec.shape[:-1], dtype=np.int64)) * channels
    return n * _dtype_size(output_spec.dtype)


def _keeps(node, spec):
    """[(key, bytes)] the backward of `node` keeps (key: shared tensors once)."""
    layer = node.operation
    ins = [spec[id(t)] for t in node.input_tensors]
    outs = [spec[id(t)] for t in node.outputs]
    tin = [("t", id(t)) for t in node.input_tensors]
    tout = [("t", id(t)) for t in node.outputs]
    new = ("new", id(node))
    if isinstance(layer, blpa_layers.ApproxConvBlock):
        if layer.bits is None:
            return [((new, 0), _nbytes(ins[0], "float32")), ((new, 1), _nbytes(ins[0], layer.compute_dtype))]
        n = int(np.prod(ins[0].shape, dtype=np.int64))
        kept = math.ceil(n * layer.bits / 8)
        if layer.normalization == "layer":  # and rsqrt(var + eps), one float32 per position
            kept += n // ins[0].shape[-1 if layer.data_format == "channels_last" else 1] * 4
        return [((new, 0), kept)]
    if not ins or _keeps_nothing(layer):
        return []
    if isinstance(layer, keras.layers.BatchNormalization):
        # The float32 copy of the input (the input itself when float32).
        if keras.backend.standardize_dtype(ins[0].dtype) == "float32":
            return [(tin[0], _nbytes(ins[0]))]
        return [((new, 0), _nbytes(ins[0], "float32"))]
    if isinstance(layer, keras.layers.ReLU):
        if _is_relu(layer):
            return [(tout[0], _nbytes(outs[0]))]
        return [(tin[0], _nbytes(ins[0]))]
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        if name == "linear":
            return []
        if name in _OUTPUT_GRAD_ACTIVATIONS:
            return [(tout[0], _nbytes(outs[0]))]
        return [(tin[0], _nbytes(ins[0]))]
    if isinstance(layer, keras.layers.Dropout):
        return [((new, 0), _nbytes(ins[0]))] if layer.rate > 0 else []
    if isinstance(layer, ArgmaxPooling2D):
        return _argmax_keeps(node, spec)
    if isinstance(layer, _KEEPS_INPUT_AND_OUTPUT):
        return [(tin[0], _nbytes(ins[0])), (tout[0], _nbytes(outs[0]))]
    if isinstance(layer, keras.layers.SeparableConv2D):
        # Its input, and the depthwise output that its pointwise conv reads.
        kept = [(tin[0], _nbytes(ins[0])), ((new, 1), _depthwise_nbytes(layer, ins[0], outs[0]))]
        name = getattr(layer.activation, "__name__", "linear")
        if name in _OUTPUT_GRAD_ACTIVATIONS:
            kept.append((tout[0], _nbytes(outs[0])))
        elif name != "linear":
            kept.append(((new, 0), _nbytes(outs[0])))
        return kept
    if isinstance(layer, _KEEPS_INPUT):
        kept = [(tin[0], _nbytes(ins[0]))]
        activation = getattr(layer, "activation", None)
        name = getattr(activation, "__name__", "linear")
        if name in _OUTPUT_GRAD_ACTIVATIONS:
            kept.append((tout[0], _nbytes(outs[0])))
        elif name != "linear":
            kept.append(((new, 0), _nbytes(outs[0])))
        return kept
    kept = [(k, _nbytes(s)) for k, s in zip(tin, ins)]
    if _builtin(layer):
        return kept  # Multiply and the like: their inputs
    # A custom layer or a subclassed model: at least its inputs and its output.
    return kept + [(k, _nbytes(s)) for k, s in zip(tout, outs)]


def _builtin(layer):
    """Whether `layer` is a Keras (or keras_blpa) class, whose backward is known."""
    return type(layer).__module__.startswith(("keras.", "keras_blpa."))


def _argmax_dtype(layer):
    """The argmax code's dtype of a MaxPooling2D or ArgmaxPooling2D."""
    return index_dtype(int(np.prod(layer.pool_size)))


def _argmax_keeps(node, spec):
    """[(key, bytes)] the `ArgmaxPooling2D` of `node` keeps (or would keep): its argmax
    code; nothing for a 1x1 window."""
    if _one_by_one(node.operation):
        return []
    out = spec[id(node.outputs[0])]
    itemsize = np.dtype(_argmax_dtype(node.operation)).itemsize
    return [(("new", id(node)), int(np.prod(out.shape, dtype=np.int64)) * itemsize)]


def _argmax_reason(layer):
    """The report's note of a max pooling that keeps (or will keep) the argmax code."""
    if _one_by_one(layer):
        return "ArgmaxPooling2D with a 1x1 window: a strided subsample, which keeps nothing"
    dtype = _argmax_dtype(layer)
    size = np.dtype(dtype).itemsize
    return (
        f"ArgmaxPooling2D: keeps the {dtype} index of each output's max within its window "
        f"({size} byte{'s' if size > 1 else ''} per output), not its float input and output"
    )


def _float_reason(node, graph, reasons):
    """Why an unconverted node keeps float activations."""
    if id(node) in reasons:
        return reasons[id(node)]
    layer = node.operation
    name = type(layer).__name__
    if isinstance(layer, _KEEPS_INPUT_AND_OUTPUT):
        if type(layer) is keras.layers.MaxPooling2D:
            return f"{name} keeps its input and output (argmax_pooling=False)"
        return f"{name} keeps its input and output (only a MaxPooling2D has an argmax form)"
    if type(layer) in _HEAD_KINDS:
        producer = graph.producer.get(id(node.input_tensors[0]))
        source = "the model input" if producer is None else _describe(producer)
        if producer is not None and _block_activation(producer.operation) is not None:
            before = graph.producer.get(id(producer.input_tensors[0]))
            if before is not None:
                source += f" after {_describe(before)}"
        return f"its input comes from {source}, not from BN -> activation"
    if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
        producer = graph.producer.get(id(node.input_tensors[0]))
        source = "the model input" if producer is None else _describe(producer)
        return f"its input comes from {source}, not from a BatchNormalization"
    if isinstance(layer, blpa_layers.ApproxConvBlock):
        return "exact block (bits=None) keeps float activations"
    if not _builtin(layer):
        what = "subclassed model" if isinstance(layer, keras.Model) else "custom layer"
        return (
            f"unknown: {what} {name} (its graph is Python code); counted as keeping its "
            "inputs and output, what it keeps inside is not known"
        )
    return f"{name} keeps float activations (not a BN -> activation -> Conv2D chain)"


def _specs(fn, input_specs):
    """{id(tensor): KerasTensor with concrete shapes} through the whole graph."""
    spec = {id(t): s for t, s in zip(fn.inputs, input_specs)}
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            args, kwargs = node.arguments.fill_in(spec)
            out = node.operation.compute_output_spec(*args, **kwargs)
            for t, s in zip(node.outputs, keras.tree.flatten(out)):
                spec[id(t)] = s
    return spec


def _batch_shapes(fn, batch_size, input_shape):
    if input_shape is not None:
        shapes = [tuple(input_shape)] if len(fn.inputs) == 1 else [tuple(s) for s in input_shape]
    else:
        shapes = [tuple(t.shape[1:]) for t in fn.inputs]
    batch = check_int(batch_size, "batch_size")
    out = [(batch,) + s for s in shapes]
    for s in out:
        if any(d is None for d in s):
            raise ValueError(
                "memory_report needs concrete input sizes: pass input_shape=(height, "
                f"width, channels). Received: input shape {s}"
            )
    return out


class _Tally:
    """What the rows of a report (and of the models nested in it) have counted so far."""

    def __init__(self):
        self.before, self.after = set(), set()
        # (scope, id(a nested model's input)) -> the key of the tensor it was called on.
        # A scope is the path of calling nodes: each call of a shared nested model
        # keeps its own tensors.
        self.alias = {}
        self.largest = 0
        self.blocks = {}

    def key(self, scope, key):
        """The counted identity of `key` (("t", id(tensor)) or ("new", id(node))) in `scope`."""
        return self.alias.get((scope, key[1]), (scope, *key)) if key[0] == "t" else (scope, *key)

    def new(self, claimed, kept, scope=()):
        """The bytes of `kept` [(key, bytes)] in `scope` not counted yet in `claimed`."""
        total = 0
        for key, nbytes in kept:
            key = self.key(scope, key)
            if key not in claimed:
                claimed.add(key)
                total += nbytes
        return total


def _rows(plan, spec, bits, argmax_pooling, tally, prefix="", scope=()):
    """The report's rows of `plan`'s graph, whose tensors have the specs `spec`."""
    graph = plan.graph
    fused = {}
    for chain in plan.chains:
        tally.blocks[prefix + chain.name] = [prefix + n.operation.name for n in chain.nodes]
        for node in chain.nodes:
            fused[id(node)] = chain
    rows = []
    for node in graph.nodes:
        layer = node.operation
        for t in node.outputs:
            tally.largest = max(tally.largest, _nbytes(spec[id(t)]))
        if id(node) not in plan.live:
            continue  # its backward never runs: it keeps nothing
        inner = plan.nested.get(id(layer))
        if inner is not None:
            fn = inner.graph.fn
            for t, outer in zip(fn.inputs, node.input_tensors):
                tally.alias[(scope + (id(node),), id(t))] = tally.key(scope, ("t", id(outer)))
            inner_spec = _specs(fn, [spec[id(t)] for t in node.input_tensors])
            rows += _rows(inner, inner_spec, bits, argmax_pooling, tally, f"{prefix}{layer.name}/",
                          scope + (id(node),))
            continue
        name = prefix + layer.name
        before = tally.new(tally.before, _keeps(node, spec), scope)
        chain = fused.get(id(node))
        if chain is not None:
            after = 0
            if isinstance(layer, keras.layers.SeparableConv2D):
                # The stock pointwise conv after the block keeps the depthwise output.
                after = _depthwise_nbytes(layer, spec[id(node.input_tensors[0])], spec[id(node.outputs[0])])
            if node is chain.start:
                x = spec[id(node.input_tensors[0])]
                n = int(np.prod(x.shape, dtype=np.int64))
                after += (
                    math.ceil(n * bits / 8)
                    if bits is not None
                    else _nbytes(x, "float32") + _nbytes(x, layer.compute_dtype)
                )
                if bits is not None and chain.layer_norm:
                    after += n // x.shape[-1] * 4  # rsqrt(var + eps) per position
            rows.append(LayerMemory(name, type(layer).__name__, before, after, prefix + chain.name, None))
            continue
        argmax = _is_argmax(layer, argmax_pooling)
        after = tally.new(tally.after, _argmax_keeps(node, spec) if argmax else _keeps(node, spec), scope)
        if argmax:
            # Codes, not float activations (not in `still_float`).
            rows.append(LayerMemory(name, type(layer).__name__, before, after, None,
                                    _argmax_reason(layer), codes=True))
            continue
        if isinstance(layer, blpa_layers.ApproxConvBlock) and layer.bits is not None:
            # Already compressed: it keeps its code.
            rows.append(LayerMemory(name, type(layer).__name__, before, after, name, None))
            continue
        reason = _float_reason(node, graph, plan.reasons) if after else None
        rows.append(LayerMemory(name, type(layer).__name__, before, after, None, reason))
    return rows


def _report(plan, batch_shapes, bits, argmax_pooling):
    fn = plan.graph.fn
    specs = [keras.KerasTensor(shape, dtype=t.dtype) for t, shape in zip(fn.inputs, batch_shapes)]
    tally = _Tally()
    rows = _rows(plan, _specs(fn, specs), bits, argmax_pooling, tally)
    factor = backends.get().working_set_factor()
    return MemoryReport(rows, batch_shapes, bits, factor * tally.largest, tally.blocks)


# ------------------------------------------------------------- the rebuild


def _becomes_argmax(layer, argmax_pooling):
    """Whether `convert` replaces `layer` by an ArgmaxPooling2D: a stock MaxPooling2D
    with `argmax_pooling`, and always one with a 1x1 window (a strided subsample)."""
    return type(layer) is keras.layers.MaxPooling2D and (
        argmax_pooling or _one_by_one(layer)
    )


def _is_argmax(layer, argmax_pooling):
    """Whether `layer` is an ArgmaxPooling2D or `convert` makes it one."""
    return isinstance(layer, ArgmaxPooling2D) or _becomes_argmax(layer, argmax_pooling)


def _one_by_one(layer):
    """Whether the pooling `layer` has a 1x1 window."""
    return tuple(layer.pool_size) == (1, 1)


def _clone(layer, argmax_pooling):
    if _becomes_argmax(layer, argmax_pooling):
        return ArgmaxPooling2D.from_config(layer.get_config())
    if isinstance(layer, keras.layers.Layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer)
        try:
            return type(layer).from_config(layer.get_config())
        except (TypeError, ValueError) as error:
            # A config that does not load back (a Python lambda in a Lambda or
            # Activation layer): share the layer where it holds no state.
            if layer.variables:
                raise ValueError(
                    f"keras_blpa.convert cannot copy layer '{layer.name}' "
                    f"({type(layer).__name__}) from its config: {error}"
                ) from error
            return layer
    return layer  # a stateless keras Operation


def _bn_arguments(bn):
    """The block arguments that carry a BatchNormalization's options."""
    return dict(
        momentum=bn.momentum,
        epsilon=bn.epsilon,
        center=bn.center,
        scale=bn.scale,
        synchronized=bool(getattr(bn, "synchronized", False)),
        gamma_initializer=bn.gamma_initializer,
        beta_initializer=bn.beta_initializer,
        gamma_regularizer=bn.gamma_regularizer,
        beta_regularizer=bn.beta_regularizer,
        gamma_constraint=bn.gamma_constraint,
        beta_constraint=bn.beta_constraint,
    )


def _ln_arguments(ln):
    """The block arguments that carry a LayerNormalization's options."""
    return dict(
        epsilon=ln.epsilon,
        center=ln.center,
        scale=ln.scale,
        gamma_initializer=ln.gamma_initializer,
        beta_initializer=ln.beta_initializer,
        gamma_regularizer=ln.gamma_regularizer,
        beta_regularizer=ln.beta_regularizer,
        gamma_constraint=ln.gamma_constraint,
        beta_constraint=ln.beta_constraint,
    )


def _head(layer, pad):
    """The block's head dict of a head layer (after the ZeroPadding2D node `pad`)."""
    kind = _HEAD_KINDS[type(layer)]
    if kind == "dense":
        return dict(
            kind=kind,
            filters=layer.units,
            use_bias=layer.use_bias,
            kernel_regularizer=layer.kernel_regularizer,
            kernel_constraint=layer.kernel_constraint,
            bias_regularizer=layer.bias_regularizer,
            bias_constraint=layer.bias_constraint,
        )
    head = dict(
        kind=kind,
        kernel_size=tuple(layer.kernel_size),
        strides=tuple(layer.strides),
        padding=layer.padding,
        explicit_padding=None if pad is None else pad.operation.padding,
    )
    if type(layer) is keras.layers.SeparableConv2D:
        # Its bias is added after the pointwise part (the stock 1x1 Conv2D).
        return dict(
            head,
            depth_multiplier=layer.depth_multiplier,
            use_bias=False,
            kernel_regularizer=layer.depthwise_regularizer,
            kernel_constraint=layer.depthwise_constraint,
        )
    options = dict(
        use_bias=layer.use_bias,
        bias_regularizer=layer.bias_regularizer,
        bias_constraint=layer.bias_constraint,
    )
    if kind == "depthwise":
        return dict(
            head,
            depth_multiplier=layer.depth_multiplier,
            kernel_regularizer=layer.depthwise_regularizer,
            kernel_constraint=layer.depthwise_constraint,
            **options,
        )
    return dict(
        head,
        filters=layer.filters,
        kernel_regularizer=layer.kernel_regularizer,
        kernel_constraint=layer.kernel_constraint,
        **options,
    )


def _kernel(layer):
    """(kernel variable, initializer) of a head layer (a SeparableConv2D's depthwise kernel)."""
    if type(layer) is keras.layers.SeparableConv2D:
        return layer.depthwise_kernel, layer.depthwise_initializer
    if type(layer) is keras.layers.DepthwiseConv2D:
        return layer.kernel, layer.depthwise_initializer
    return layer.kernel, layer.kernel_initializer


def _pointwise(layer, x):
    """A SeparableConv2D's pointwise part (its 1x1 kernel, bias and activation) as a
    stock Conv2D named after it, applied to `x` and given its weights."""
    pointwise = keras.layers.Conv2D(
        layer.filters,
        1,
        activation=layer.activation,
        use_bias=layer.use_bias,
        kernel_initializer=layer.pointwise_initializer,
        bias_initializer=layer.bias_initializer,
        kernel_regularizer=layer.pointwise_regularizer,
        bias_regularizer=layer.bias_regularizer,
        kernel_constraint=layer.pointwise_constraint,
        bias_constraint=layer.bias_constraint,
        trainable=layer.trainable,
        dtype=layer.dtype_policy,
        name=layer.name,
    )
    out = pointwise(x)
    pairs = [(pointwise.kernel, layer.pointwise_kernel)]
    if layer.use_bias:
        pairs.append((pointwise.bias, layer.bias))
    for target, source in pairs:
        target.assign(keras.ops.copy(source.value))
    return out


def _make_block(chain, bits, quantization):
    convs = [c.operation for c, _ in chain.heads]
    source = chain.start.operation if chain.act is not None else convs[0]
    heads = [_head(conv, pad) for conv, (_, pad) in zip(convs, chain.heads)]
    common = dict(
        bits=bits,
        quantization=quantization,
        kernel_initializer=_kernel(convs[0])[1] if convs else "glorot_uniform",
        return_activation=chain.return_activation,
        activation=chain.activation,
        normalization=chain.normalization,
        squeeze_excite=None if chain.gate is None else chain.gate.config,
        data_format="channels_last",  # the only layout converted, whatever the Keras config
        trainable=(convs[0] if convs else source).trainable,
        dtype=source.dtype_policy,
        name=chain.name,
        **({} if chain.bn is None or chain.layer_norm else _bn_arguments(chain.bn.operation)),
        **(_ln_arguments(chain.bn.operation) if chain.layer_norm else {}),
    )
    if len(heads) == 1 and heads[0].get("explicit_padding") is None:
        head = {k: v for k, v in heads[0].items() if k != "explicit_padding"}
        return blpa_layers.ApproxConvBlock(**head, **common)
    return blpa_layers.ApproxConvBlock(heads=heads, **common)


def _copy_block_weights(chain, block):
    pairs = []
    if chain.bn is not None:
        bn = chain.bn.operation
        pairs = [] if chain.layer_norm else [
            (block.moving_mean, bn.moving_mean), (block.moving_variance, bn.moving_variance),
        ]
        if bn.scale:
            pairs.append((block.gamma, bn.gamma))
        if bn.center:
            pairs.append((block.beta, bn.beta))
    for (conv, _), kernel, bias in zip(chain.heads, block.kernels, block.biases):
        pairs.append((kernel, _kernel(conv.operation)[0]))
        if bias is not None:
            pairs.append((bias, conv.operation.bias))
    if chain.gate is not None:
        pairs += list(zip(block.gate_weights, chain.gate.weights()))
    for target, source in pairs:
        # A copy: on JAX assign would alias the source array, which fit on
        # the converted model donates (and deletes).
        target.assign(keras.ops.copy(source.value))


def _rebuild(plan, options):
    """(the converted functional model of `plan`, {id(old tensor): new tensor})."""
    graph = plan.graph
    fn = graph.fn
    tensors = {}
    for t in fn.inputs:
        layer = t._keras_history[0]
        tensors[id(t)] = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=layer.name)
    starts = {id(c.start): c for c in plan.chains}
    skip = {id(n) for c in plan.chains for n in c.nodes if n is not c.start}
    clones = {}
    for node in graph.nodes:
        if id(node) in skip:
            continue
        chain = starts.get(id(node))
        if chain is not None:
            block = _make_block(chain, options["bits"], options["quantization"])
            outs = keras.tree.flatten(block(tensors[id(node.input_tensors[0])]))
            for (conv, _), out in zip(chain.heads, outs):
                if type(conv.operation) is keras.layers.SeparableConv2D:
                    out = _pointwise(conv.operation, out)
                tensors[id(conv.outputs[0])] = out
            if chain.return_activation:
                tensors[id(chain.act.outputs[0])] = outs[-1]
            _copy_block_weights(chain, block)
            continue
        op = node.operation
        first = id(op) not in clones
        nested = plan.nested.get(id(op))
        if first:
            if nested is not None:
                clones[id(op)] = _rebuild_nested(op, nested, options)
            else:
                clones[id(op)] = _clone(op, options["argmax_pooling"])
        new_op = clones[id(op)]
        args, kwargs = node.arguments.fill_in(tensors)
        out = new_op(*args, **kwargs)
        for t, new in zip(node.outputs, keras.tree.flatten(out)):
            tensors[id(t)] = new
        if first and nested is None and isinstance(op, keras.layers.Layer):
            new_op.set_weights(op.get_weights())
    # The model's own structure of inputs and outputs (a dict, a list, one tensor).
    def new(structure):
        return keras.tree.map_structure(lambda t: tensors[id(t)], structure)

    return keras.Model(new(fn.input), new(fn.output), name=fn.name), tensors


def _rebuild_nested(model, plan, options):
    """A nested model, converted: a functional model with its name, its trainable
    flag, and a keras-hub backbone's `pyramid_outputs` and `data_format`."""
    new, tensors = _rebuild(plan, options)
    new.name = model.name
    if not model.trainable:
        new.trainable = False
    pyramid = getattr(model, "pyramid_outputs", None)
    if isinstance(pyramid, dict):
        new.pyramid_outputs = {k: tensors[id(v)] for k, v in pyramid.items()}
    if isinstance(getattr(model, "data_format", None), str):
        new.data_format = model.data_format
    return new


def _hub_task(model):
    """Whether `model` is a keras-hub task (a functional model around `.backbone`)."""
    return type(model).__module__.startswith("keras_hub.") and _nested(getattr(model, "backbone", None))


def _rebuild_task(model, plan, options):
    """A keras-hub task of `model`'s class around its converted backbone, its other
    layers' weights copied; or (None, why) where the class cannot be rebuilt so."""
    backbone = model.backbone
    inner = plan.nested.get(id(backbone))
    if inner is None:
        return None, "its backbone is not called in its graph"
    config = model.get_config()
    config["backbone"] = _rebuild_nested(backbone, inner, options)
    config["preprocessor"] = model.preprocessor
    try:
        task = type(model).from_config(config)
    except Exception as error:  # a task class whose config does not rebuild it
        return None, f"{type(model).__name__}.from_config failed ({type(error).__name__}: {error})"
    old = {layer.name: layer for layer in model.layers if layer is not backbone}
    new = {layer.name: layer for layer in task.layers if layer is not task.backbone}
    if sorted(old) != sorted(new):
        return None, f"its rebuilt layers differ: {sorted(old)} vs {sorted(new)}"
    for name, layer in old.items():
        new[name].set_weights(layer.get_weights())
        new[name].trainable = layer.trainable
    return task, None


# ------------------------------------------------------------------- public


def memory_report(model, batch_size=1, input_shape=None, bits=4, argmax_pooling=True):
    """Activation bytes kept for backprop per layer, before and after `convert`.

    Args:
        model: functional or Sequential keras.Model (original or converted).
        batch_size: batch size of the analysed training step.
        input_shape: per-sample input shape (height, width, channels), needed
            when the model's own input shape has unknown sizes; a list of
            shapes for several inputs.
        bits: bits of the code that `convert` would use (None: exact blocks).
        argmax_pooling: as `convert`'s (MaxPooling2D rows count the argmax code).

    Returns:
        A `keras_blpa.activation_report.MemoryReport` (``print(report)`` for a table).

    Raises:
        ValueError: for a subclassed model, bad bits or unknown input sizes.

    Example:
    >>> report = memory_report(keras.applications.ResNet50V2(weights=None), 32)
    >>> print(report.summary(max_rows=20))
    """
    fn = _functional(model)
    bits = check_bits(bits, allow_none=True)
    shapes = _batch_shapes(fn, batch_size, input_shape)
    return _report(_Plan(model, argmax_pooling=bool(argmax_pooling)), shapes, bits, bool(argmax_pooling))


def convert(model, bits=4, quantization="blpa", return_report=False, batch_size=1,
            argmax_pooling=True):
    """A copy of `model` whose BN -> activation -> Conv2D chains keep K-bit codes.

    Returns a new functional model with the same inputs, outputs, layer names
    (a block is named after its first conv) and weights (copied). Every chain
    BatchNormalization -> activation (the module docstring lists the layers:
    ReLU, ReLU(6.0), LeakyReLU, Activation("swish"), ...) -> [ZeroPadding2D] ->
    Conv2D is computed by one `ApproxConvBlock`; several convs reading one
    BN+activation share one block and one code; a BN+activation output that
    also feeds other layers is returned by the block for them. Every
    MaxPooling2D becomes an `ArgmaxPooling2D` (same config and output; its
    backward keeps the argmax code; a 1x1 window keeps nothing). What cannot
    be converted is copied as it was: the forward pass is exactly the original's.
    Call it inside ``strategy.scope()`` to get mirrored variables.

    Args:
        model: functional or Sequential keras.Model (built).
        bits: 2, 4 or 8; None gives exact blocks (an equivalent model).
        quantization: "blpa" or "naive" (see ApproxConvBlock).
        return_report: also return the `memory_report` of the conversion.
        batch_size: batch size of that report.
        argmax_pooling: replace every MaxPooling2D by an `ArgmaxPooling2D`
            (default). False keeps them stock, except those with a 1x1 window
            (ResNet v2's strided shortcut): a strided subsample, which keeps
            nothing as an ArgmaxPooling2D.

    Returns:
        The converted keras.Model, or ``(model, report)`` with return_report
        (report None when the model's input sizes are unknown: call
        `memory_report` with ``input_shape`` then). A model with nothing to
        convert gives an unchanged copy (and its report).

    Raises:
        ValueError: for a subclassed model (naming its class), bad bits or
            quantization.

    Warns:
        UserWarning, once, when nothing can be converted (with the reasons).
    """
    backends.check()
    fn = _functional(model)
    bits = check_bits(bits, allow_none=True)
    quantization = check_choice(quantization, "quantization", blpa_layers.QUANTIZATION_MODES)
    options = dict(bits=bits, quantization=quantization, argmax_pooling=bool(argmax_pooling))
    plan = _Plan(model, argmax_pooling=options["argmax_pooling"])
    if not plan.block_count():
        _warn_nothing(model, plan, options["argmax_pooling"])
    new_model = None
    if _hub_task(model):
        new_model, why = _rebuild_task(model, plan, options)
        if new_model is None:
            warnings.warn(
                f"keras_blpa.convert: {type(model).__name__} {model.name!r} is returned as a "
                f"functional keras.Model (its class is lost): {why}",
                UserWarning,
                stacklevel=2,
            )
    if new_model is None:
        new_model = _rebuild(plan, options)[0]
    if not return_report:
        return new_model
    shapes = _batch_shapes(fn, batch_size, None) if all(
        d is not None for t in fn.inputs for d in t.shape[1:]
    ) else None
    report = _report(plan, shapes, bits, options["argmax_pooling"]) if shapes else None
    return new_model, report


def _warn_nothing(model, plan, argmax_pooling):
    """The warning of a model with nothing to convert, with its distinct causes counted."""
    pools = sum(_becomes_argmax(n.operation, argmax_pooling) for n in plan.graph.nodes)
    rest = (
        f"only its {pools} MaxPooling2D layer(s) become ArgmaxPooling2D."
        if pools else "returning an unchanged copy."
    )
    done = plan.compressed_blocks()
    if done:
        what = f"is already converted ({done} compressed ApproxConvBlock(s)); nothing is left to convert"
    else:
        what = "has no BatchNormalization -> activation -> Conv2D chain to convert"
    causes = plan.causes().most_common()
    shown = "; ".join(f"{n} x {cause}" for cause, n in causes[:8])
    more = f"; and {len(causes) - 8} more causes (see memory_report)" if len(causes) > 8 else ""
    warnings.warn(
        f"keras_blpa.convert: model {model.name!r} {what}; {rest}"
        + (f" Layers left as they were, by cause: {shown}{more}" if causes else ""),
        UserWarning,
        stacklevel=3,
    )
