"""The checks the zoo (tests/zoo/) and the registry sweep (tests/sweep/) run on a real model: one place
for each.

Both build a model with random weights, plan and apply regularizers on it, and then ask the same
questions: is the eval output bitwise unchanged, is the model's state (``__dict__``s, buffers, hooks)
unchanged by planning and by sampling, where do the inserted layers sit in the data flow
(:mod:`runtime_graph`), does MC dropout spread far above the floating-point noise and does ``auto``
agree with a plain strategy, and does a training step with the model's own loss run.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import runtime_graph
import torch
from noise_floor import batch_noise_floor, far_above_floor
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from regfw.placement import foreign
from regfw.placement.kinds import TRANSFORMER_RANGE
from regfw.train.batch import batch_size
from regfw.uncertainty import mc_predict
from regfw.uncertainty.sampling import is_stochastic, stochastic_types

#: Monte Carlo samples per strategy compared.
T = 30
Z = 4.0
MAX_SHARE_OVER_Z = 0.01
#: The share of output entries whose MC standard error must be far above the floating-point noise.
MIN_SHARE_COMPARED = 0.25

Transform = Callable[[Tensor], Tensor] | None


class OutputOf(nn.Module):
    """``model(x)[key]``: MC dropout samples one tensor (torchvision segmentation returns a dict)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[self.key]


def bn_state(model: nn.Module) -> dict[str, Tensor]:
    return {f"{p}.{k}": v.clone() for p, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for k, v in m.named_buffers(recurse=False)}


def injected(model: nn.Module) -> list[str]:
    """Paths of the modules regfw attached (children named regfw_*)."""
    return [p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1].startswith("regfw_")]


def existing_stochastic(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own stochastic layers (before regfw touches it), by path."""
    types = stochastic_types()
    return {p: m for p, m in model.named_modules() if isinstance(m, types) or foreign.foreign_layer(m) is not None}


def is_path_drop(module: nn.Module) -> bool:
    """Stochastic depth (a whole residual branch per sample), as opposed to element dropout."""
    layer = foreign.foreign_layer(module)
    return (layer is not None and layer.what == "path") or getattr(module, "kind_of_drop", None) == "path" \
        or type(module).__name__ in ("DropPath", "StochasticDepth")


# --------------------------------------------------------------------------- state


def _hooks(module: nn.Module) -> tuple:
    return tuple(tuple(getattr(module, name, {}).keys()) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def model_state(model: nn.Module) -> dict[str, Any]:
    """What planning and sampling must leave as it was: per module its ``__dict__`` (keys and the
    identity of each value, training flag by value), its buffers (values) and its registered hooks."""
    state: dict[str, Any] = {}
    for path, module in model.named_modules():
        state[f"{path}:dict"] = {k: (v if isinstance(v, (bool, int, float, str, type(None))) else id(v))
                                 for k, v in vars(module).items()}
        state[f"{path}:hooks"] = _hooks(module)
        for name, buf in module.named_buffers(recurse=False):
            state[f"{path}:buffer:{name}"] = None if buf is None else buf.detach().clone()
    return state


def volatile(model: nn.Module, forward: Callable[[nn.Module], Any]) -> dict[str, set]:
    """What the model changes in itself on a plain forward pass (e.g. torchvision's anchor generator
    replaces its cached ``cell_anchors`` list on every call): per state key, the ``__dict__`` entries
    (or ``{"*"}`` for a whole buffer) that differ after ``forward(model)``. Those are the model's own
    doing, not planning's, and :func:`check_state_unchanged` leaves them out."""
    before = model_state(model)
    with torch.no_grad():
        forward(model)
    after = model_state(model)
    out: dict[str, set] = {}
    for key, value in before.items():
        now = after.get(key)
        if isinstance(value, Tensor):
            if not (isinstance(now, Tensor) and torch.equal(value, now)):
                out[key] = {"*"}
        elif isinstance(value, dict) and isinstance(now, dict):
            changed = {k for k in value.keys() | now.keys() if value.get(k, ...) != now.get(k, ...)}
            if changed:
                out[key] = changed
    return out


def check_state_unchanged(before: dict[str, Any], after: dict[str, Any], what: str,
                          ignore: dict[str, set] | None = None) -> None:
    """``after`` is ``before`` (:func:`model_state`), except for what ``ignore`` (:func:`volatile`) names."""
    ignore = ignore or {}
    assert before.keys() == after.keys(), \
        f"{what} added or removed modules/buffers: {sorted(before.keys() ^ after.keys())[:5]}"
    for key, value in before.items():
        now, skip = after[key], ignore.get(key, set())
        if "*" in skip:
            continue
        if isinstance(value, Tensor):
            assert torch.equal(value, now), f"{what} changed buffer {key}"
        elif isinstance(value, dict) and skip:
            kept = {k: v for k, v in value.items() if k not in skip}
            assert kept == {k: v for k, v in now.items() if k not in skip}, f"{what} changed {key}: {_diff(value, now)}"
        else:
            assert value == now, f"{what} changed {key}: {_diff(value, now)}"


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted({k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...)})
        return f"entries {keys[:6]}"
    return f"{a!r} -> {b!r}"


def check_eval_unchanged(reference: Any, after: Any) -> None:
    ref, now = tree_flatten(reference)[0], tree_flatten(after)[0]
    assert len(ref) == len(now), "eval output changed structure"
    for i, (r, n) in enumerate(zip(ref, now, strict=True)):
        if isinstance(r, Tensor):
            assert torch.equal(r, n), f"eval output (tensor {i}) changed"


# --------------------------------------------------------------------------- placement (runtime data flow)


def stochastic(module: nn.Module) -> bool:
    return is_stochastic(module) or foreign.is_foreign_stochastic(module)


def placement_failures(model: nn.Module, graph: runtime_graph.Graph, inserted: list[str],
                       own: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Per failure class, the inserted layers that break a placement rule in ``graph`` (a recorded pass
    of ``model`` after the surgery): between a weight op and its normalisation, on a gate, on what feeds
    attention's q/k/v, after the last weight op before an output, in series with another stochastic
    layer of the same sort, or never called."""
    modules = dict(model.named_modules())
    consumers = graph.consumers()
    qkv = runtime_graph.attention_operands(graph, consumers)
    gates = runtime_graph.gate_nodes(graph)
    stoch_nodes = {i: path for path, idx in graph.modules.items() for i in idx}
    fails: dict[str, list[str]] = {}

    def fail(cls: str, path: str, why: str) -> None:
        fails.setdefault(cls, []).append(f"{path} ({why})" if why else path)

    for path in inserted:
        if graph.calls.get(path, 0) == 0:
            fail("dead", path, "its forward never ran")
            continue
        for node in graph.modules.get(path, []):
            norm = runtime_graph.between_weight_and_norm(graph, node, consumers)
            if norm:
                fail("weight->norm", path, norm)
            if node in gates:
                fail("gate", path, "")
            if runtime_graph.feeds_qkv(graph, node, qkv, consumers):
                fail("qkv", path, "")
            if runtime_graph.reaches_output(graph, node, consumers):
                fail("output", path, "")
            others = {i for i, p in stoch_nodes.items() if p != path
                      and is_path_drop(modules[p]) == is_path_drop(modules[path])}
            hit = runtime_graph.in_series(graph, node, others, consumers)
            if hit is not None:
                fail("series", path, f"with {stoch_nodes[hit]}")
    return {k: sorted(set(v)) for k, v in fails.items()}


def has_attention(graph: runtime_graph.Graph) -> bool:
    return bool(runtime_graph.attention_operands(graph, graph.consumers()))


def rate_failures(plan: Any) -> list[str]:
    """Rows with a rate above the Transformer range (for a model with attention)."""
    high = TRANSFORMER_RANGE.high + 1e-12
    return [f"{i.path} {i.kind} {i.rate:g}" for i in plan.rows()
            if i.rate is not None and i.action in ("after", "before", "set") and i.rate > high]


# --------------------------------------------------------------------------- Monte Carlo


def logits(outputs: Tensor, transform: Transform) -> Tensor:
    """Stacked raw outputs [T, B, ...] -> the logits the strategies are compared on, [T, B', C]."""
    return (outputs if transform is None else transform(outputs)).float()


def mc(model: nn.Module, x: Any, strategy: str, transform: Transform = None, samples: int = T, **kw: Any):
    """``mc_predict`` on one strategy; ``auto`` always through its split (``choose=False``), which is what
    the comparisons check (by default ``auto`` may predict that ``batched`` is faster and run that)."""
    if strategy == "auto":
        kw.setdefault("choose", False)
    return mc_predict(model, x, samples=samples, strategy=strategy, seed=3, output_transform=transform, **kw)


def check_auto_matches(model: nn.Module, x: Any, reference: str = "loop", transform: Transform = None,
                       name: str = "model", **kw: Any) -> None:
    """MC spread far above the float-noise floor, and ``auto`` statistically equal to ``reference``:
    per output entry, the two-sample z statistic of the mean logit over the samples drawn (T, or
    ``samples``) exceeds :data:`Z` for at most :data:`MAX_SHARE_OVER_Z` of the entries (at least one
    always allowed).

    Compared on the logits, not the probabilities: with random weights a softmax often saturates
    (every sample one-hot on one class, or a segmentation map's confident pixels), and the
    probabilities' spread then lies under the floating-point floor, where a comparison would measure
    the CPU's kernels; the logits keep a spread far above it. Two strategies that draw the same
    distribution of logits give the same distribution of anything computed from them."""
    ref, auto = mc(model, x, reference, transform, **kw), mc(model, x, "auto", transform, **kw)
    assert ref.outputs.std(0).max() > 0, "MC spread is zero"
    assert auto.outputs.std(0).max() > 0, "MC spread is zero under auto"
    a, b = logits(ref.outputs, transform).double(), logits(auto.outputs, transform).double()
    n = a.shape[0]  # the samples drawn (``samples`` in ``kw``, T by default)
    se = (a.var(0) / n + b.var(0) / b.shape[0]).sqrt()
    floor = batch_noise_floor(model, x, rows=n * batch_size(x), quantity=lambda out: logits(out, transform))
    varied = far_above_floor(se, floor, f"{name}: the standard error of the MC mean logits",
                             share=MIN_SHARE_COMPARED)
    z = (a.mean(0) - b.mean(0)).abs()[varied] / se[varied]
    over = int((z > Z).sum())
    allowed = max(1, int(MAX_SHARE_OVER_Z * z.numel()))
    assert over <= allowed, (f"auto differs from {reference}: {over} of {z.numel()} entries with z > {Z} "
                             f"(allowed {allowed}; max z {z.max():.1f}; floating-point noise floor {floor:.1e})")


# --------------------------------------------------------------------------- training


def classification_loss(out: Any, transform: Transform = None) -> Tensor:
    """The model's own classification loss: cross-entropy on its logits, summed over every logits
    tensor it returns in training mode (a tuple or named tuple of main and auxiliary logits, a dict of
    segmentation maps), each against fixed random targets."""
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    assert tensors, f"the training-mode output {type(out).__name__} holds no logits"
    total = torch.zeros(())
    for t in tensors:
        logits = t.unsqueeze(0) if transform is None else transform(t.unsqueeze(0))
        logits = logits.reshape(-1, logits.shape[-1])
        target = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=torch.Generator().manual_seed(0))
        total = total + nn.functional.cross_entropy(logits, target)
    return total


def training_step(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> None:
    """One SGD step on ``loss_fn(model)`` (training mode): finite loss, and the weights change."""
    model.train()
    loss = loss_fn(model)
    assert torch.isfinite(loss), f"training loss {loss}"
    params = [p for p in model.parameters() if p.requires_grad]
    first = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(f, p.detach()) for f, p in zip(first, params, strict=True)), \
        "the training step changed no weight"
