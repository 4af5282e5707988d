"""What a model's parts *do*, read from its traced forward pass rather than from torch types.

Placement rules need facts that a module's type does not tell for models written outside torch
(timm, torchvision, hand-written blocks):

* **activations by behaviour** (:func:`is_activation`): a parameterless leaf module whose output
  has its input's shape and whose forward calls only elementwise functions, at least one of them
  a nonlinearity (timm's ``GELU`` calls ``F.gelu``; it is not an ``nn.GELU``). The score softmax
  of attention is not elementwise and never counts.
* **gating paths** (:func:`gate_units`): the branch whose output multiplies, or softmax-weights,
  another path -- the squeeze-excitation ``scale * x`` (Hu et al., CVPR 2018), gated linear units
  ``a * s(b)`` (Dauphin et al., ICML 2017), focal modulation's ``ctx * gates``, global-context
  pooling's ``x @ softmax(conv(x))``. Dropout there would let gates exceed their range, so no unit of
  the branch gets dropout after it; the branch is found by lineage (:mod:`regfw.placement.gating`).
* **attention internals**: found by what the forward computes, in :mod:`regfw.placement.attention`
  (the one detector: q/k/v and everything feeding them with no weight layer between never get
  hidden-layer dropout). :func:`attention_modules` here is only the fallback for a bare model with
  no example input and no graph.
* **Transformer family**: a model with attention blocks takes its hidden, residual and
  existing-dropout rates from the Transformer range of :data:`regfw.placement.kinds.TRANSFORMER_RANGE`
  (0-0.1, Vaswani et al. 2017; timm and DeiT use <= 0.1), and the plan says why.
* **token dropout** (:func:`token_dropout_slot`): in a Transformer the input dropout acts on the
  token embeddings, after the position embedding is added (Vaswani et al. 2017, section 5.4; timm's
  ``pos_drop``), not on the pixels or ids; the model's own dropout there is that slot, and the stem
  before it (a ViT's ``patch_embed.proj``) gets no dropout of its own.
* **Transformer layers' own dropout** (:func:`transformer_layer_slots`): ``nn.TransformerEncoderLayer``
  drops each sub-layer's output (``dropout1`` after self-attention, ``dropout2`` after the
  feed-forward block) and the feed-forward hidden units (``dropout``); those are the layer's hidden
  dropout slots, as timm's ``proj_drop``, ``drop1`` and ``drop2`` are.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from regfw.placement.dataflow import INJECTED_PREFIX, SCALAR_ARITHMETIC, Dataflow

#: Elementwise nonlinearities, by the torch function name a forward calls.
NONLINEAR = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "hardsigmoid", "hardswish",
    "tanh", "tanh_", "mish", "elu", "selu", "celu", "leaky_relu", "softplus", "hardtanh", "erf", "logsigmoid",
    "softsign", "tanhshrink", "prelu", "threshold",
})
#: Elementwise arithmetic an activation may also use (``x * sigmoid(x)``, ``0.5 * x * (1 + erf(..))``): the four
#: operations of :data:`~regfw.placement.dataflow.SCALAR_ARITHMETIC` and a few elementwise functions.
_ARITHMETIC = SCALAR_ARITHMETIC | frozenset({
    "pow", "__pow__", "sqrt", "clamp", "clamp_", "clamp_min", "exp", "abs",
})

#: Functions that normalise over a dimension.
NORMALISING = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
                         "local_response_norm"})
#: A normalisation written out: a statistic over a dimension ...
_STATISTICS = frozenset({"mean", "var", "std", "var_mean", "std_mean", "norm"})
#: ... that the input is divided by.
_SCALING = frozenset({"rsqrt", "div", "__truediv__", "__rtruediv__", "div_"})


def _own(module: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The children and parameters of ``module`` that are its own, not those of modules regfw inserted
    (a plan applied earlier hangs a dropout on an activation: it stays an activation)."""
    children = [c for n, c in module.named_children() if not n.startswith(INJECTED_PREFIX)]
    params = list(module.parameters(recurse=False)) + [p for c in children for p in c.parameters()]
    return children, params


def is_activation(path: str, module: nn.Module, flow: Dataflow) -> bool:
    """True for a parameterless leaf module that the trace shows acting as an elementwise
    nonlinearity (see the module docstring): whatever its class (``class MyGELU(nn.Module)``,
    transformers' ``GELUActivation``), and still after regfw hung a module on it."""
    children, params = _own(module)
    if params or children:
        return False
    calls = flow.inner_calls.get(path)
    if not calls or path not in flow.same_shape:
        return False
    return bool(calls & NONLINEAR) and calls <= (NONLINEAR | _ARITHMETIC)


def is_norm(path: str, module: nn.Module, flow: Dataflow) -> bool:
    """True for a leaf module that the trace shows normalising its input over a dimension, whatever its
    class: its forward calls a normalising function (``F.layer_norm``, ``F.batch_norm``, ...), or divides
    by a statistic it computes (an RMSNorm written out: ``x * torch.rsqrt(x.pow(2).mean(-1))``), and its
    output has its input's shape."""
    calls = flow.inner_calls.get(path, set())
    if path not in flow.same_shape or _own(module)[0]:
        return False
    return bool(calls & NORMALISING) or (bool(calls & _STATISTICS) and bool(calls & _SCALING))


def gate_units(flow: Dataflow) -> set[str]:
    """Every unit on a gating branch (:mod:`regfw.placement.gating`): the units one operand of a product
    depends on and the other does not, inside the module that multiplies."""
    return set(flow.gates)


def attention_like(module: nn.Module) -> bool:
    """The fallback attention test by structure, for a bare model with neither an example input nor a
    graph (:func:`attention_modules`): ``nn.MultiheadAttention``, or a module with q/k/v projection
    children or an ``attn_drop`` dropout. Everything that has an example input or a graph asks
    :func:`regfw.placement.attention.find` instead, which reads what the forward computes."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    names = set(module._modules)
    if "attn_drop" in names or "qkv" in names or {"q", "k", "v"} <= names or {"q_proj", "k_proj", "v_proj"} <= names:
        return True
    return {"query", "key", "value"} <= names


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fallback list of attention blocks (:func:`attention_like`) and torch Transformer layers of a
    bare model, for which no pass and no graph is at hand (:mod:`regfw.uncertainty.own_layers` on a
    model alone). Where a plan was made, its attention blocks come from the graph
    (:attr:`regfw.placement.surgery.ModelMap.attention`) and this is not used."""
    return [(p, m) for p, m in model.named_modules()
            if attention_like(m) or isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]


#: The dropout children of torch's Transformer layers and the sub-layer each follows, in forward order.
Slots = tuple[tuple[str, str], ...]
_ENCODER_SLOTS: Slots = (("self_attn", "dropout1"), ("linear1", "dropout"), ("linear2", "dropout2"))
_DECODER_SLOTS: Slots = (("self_attn", "dropout1"), ("multihead_attn", "dropout2"), ("linear1", "dropout"),
                         ("linear2", "dropout3"))


def transformer_layer_slots(module: nn.Module) -> list[tuple[str, str]]:
    """``(sub-layer, dropout child)`` names of an ``nn.TransformerEncoderLayer`` / ``DecoderLayer``
    whose dropout child is an ``nn.Dropout`` (see the module docstring); ``[]`` for other modules."""
    if isinstance(module, nn.TransformerDecoderLayer):
        slots = _DECODER_SLOTS
    elif isinstance(module, nn.TransformerEncoderLayer):
        slots = _ENCODER_SLOTS
    else:
        return []
    return [(sub, drop) for sub, drop in slots if isinstance(module._modules.get(drop), nn.Dropout)]


def token_dropout_slot(flow: Dataflow, attention: list[str], is_dropout: Callable[[str], bool],
                       is_layer: Callable[[str], bool]) -> str | None:
    """The input dropout slot of a Transformer-family model: the dropout unit (``is_dropout(path)``)
    that the forward pass runs last before the first attention block with no layer
    (``is_layer(path)``: a weight layer, not a norm) in between (timm's ``pos_drop``), or None. A
    dropout inside a convolutional stem of a hybrid model is followed by more layers, so it is not."""
    if not attention or not flow.order:
        return None
    found = None
    for path in flow.order:
        if any(path == a or path.startswith(a + ".") for a in attention):
            return found
        if is_dropout(path):
            found = path
        elif is_layer(path):
            found = None
    return None


#: Parameter names of a ``forward`` that takes the targets and computes its own losses in training.
_TARGET_PARAMS = ("targets", "target")


def own_loss_forward(model: nn.Module) -> str | None:
    """The name of the ``targets`` parameter when ``model.forward(inputs, targets)`` computes its own
    losses in training (torchvision's detection models: ``FasterRCNN``, ``RetinaNet``, ``SSD``,
    ``FCOS``, ...), else None. Such a model cannot be trained as ``loss(model(inputs), targets)``."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return next((p for p in params[1:] if p in _TARGET_PARAMS), None)
