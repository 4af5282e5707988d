"""The zoo: regfw on the real model definitions of torchvision, timm and torch (random weights).

For every model and every variant that applies to it (``models.ZOO``), one test checks that:

* the plan printed by ``regfw plan`` matches the reviewed snapshot in ``tests/zoo/snapshots/``
  (``REGFW_UPDATE_SNAPSHOTS=1`` rewrites them; review the diff);
* nothing is inserted inside a gate (squeeze-excitation, LRASPP's scale branch), on a q/k/v
  projection, or after an output layer; existing stochastic layers are reused, never doubled;
* the eval output is exactly unchanged by the surgery;
* Monte Carlo dropout has spread > 0, and ``auto`` agrees with ``loop``: per output entry, the
  two-sample z statistic of the mean logit over T = 30 samples each exceeds 4 for at most
  1% of the entries, and at least one entry is always allowed (under the null about 1e-4 of
  the entries, t tails at 58 degrees of freedom; masks reused across samples push many entries
  far past it: 4.3% over z = 3 in the issue that asked for this test). Before comparing, the test
  measures the floating-point noise of the logits between batch B (``loop``) and T x B
  (``auto``'s replay) on the same model in eval mode, and compares only entries whose standard
  error is at least 100x above it, asserting they are at least a quarter of the entries
  (tests/noise_floor.py): below that the z statistic measures the CPU's kernels;
* BatchNorm statistics are unchanged by planning, surgery and MC sampling;
* a training step runs and changes the weights.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from model_checks import (
    OutputOf,
    T,
    bn_state,
    check_auto_matches,
    check_eval_unchanged,
    classification_loss,
    injected,
    is_path_drop,
)
from model_checks import training_step as one_step
from torch import nn

from regfw.placement import foreign
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.uncertainty import mc_predict
from regfw.uncertainty.sampling import stochastic_types

from .models import ZOO, ZooModel, build

SNAPSHOTS = Path(__file__).parent / "snapshots"
# T, Z, MAX_SHARE_OVER_Z and MIN_SHARE_COMPARED are tests/model_checks.py's (compared on the logits: where every
# sample's softmax is one-hot, the probabilities of the classes no sample picks have zero spread).

VARIANTS = {
    "dropout": {"dropout": {}},
    "spatial_dropout": {"spatial_dropout": {}},
    "dropblock": {"dropblock": {"block_size": 3}},
    "drop_path": {"drop_path": {}},
    "attention_dropout": {"attention_dropout": {}},
    "locked_dropout+dropconnect": {"locked_dropout": {}, "dropconnect": {}},
}

#: The output layers of each model, read off the model definitions (independent of regfw).
OUTPUT_LAYERS = {
    "resnet18": {"fc"},
    "mobilenet_v3_small": {"classifier.3"},
    "efficientnet_b0": {"classifier.1"},
    "lraspp_mobilenet_v3_large": {"classifier.low_classifier", "classifier.high_classifier"},
    "vit_tiny": {"head"},
    "convnext_atto": {"head.fc"},
    "convnext_atto_dp": {"head.fc"},
    "resnet18d": {"fc"},
    "text_transformer": {"head"},
    "lstm_lm": {"decoder"},
    # every head: the RPN's objectness and box deltas, the box predictor's class scores and box deltas
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"rpn.head.cls_logits", "rpn.head.bbox_pred",
                                              "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"},
}

#: Classes whose inside is a gating path (the whole module multiplies the main map by its output).
GATE_CLASSES = {"SqueezeExcitation", "SEModule", "SqueezeExcite", "EffectiveSEModule"}
QKV = {"qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj"}

CASES = [pytest.param(name, variant, id=f"{name}-{variant}")
         for name, entry in ZOO.items() for variant in entry.variants]
#: Checked on its own (below): auto reuses DropConnect weight masks there (issue 13, item 2).
AUTO_APART = {("lstm_lm", "locked_dropout+dropconnect")}


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("REGFW_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}; run with REGFW_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(), f"{path.name} changed; rerun with REGFW_UPDATE_SNAPSHOTS=1 if intended"


def check_places(entry: ZooModel, model: nn.Module, plan, before: dict[str, nn.Module]) -> None:
    modules = dict(model.named_modules())
    outputs = OUTPUT_LAYERS[entry.name]
    flow = plan.context.model_map.flow
    for path in injected(model):
        host = path.rsplit(".", 1)[0] if "." in path else ""
        chain = host.split(".")
        # not inside a gate
        for i in range(1, len(chain) + 1):
            cls = type(modules[".".join(chain[:i])]).__name__
            assert cls not in GATE_CLASSES, f"{path} is inside gate {'.'.join(chain[:i])} ({cls})"
        assert not host.startswith("classifier.scale"), f"{path} is inside LRASPP's scale (gate) branch"
        # not on q/k/v, not on or after an output layer
        assert chain[-1] not in QKV, f"{path} is on a q/k/v projection"
        assert host not in outputs, f"{path} is on output layer {host}"
        # never a second stochastic layer at a place that has one
        assert before.get(host) is None, f"{path} doubles the existing stochastic layer {host}"
        nxt = flow.next(host)
        if nxt is not None and not path.endswith("regfw_input_dropout") and before.get(nxt) is not None:
            # element dropout on a residual branch before its stochastic depth is two different things
            assert is_path_drop(before[nxt]) != is_path_drop(modules[path]), \
                f"{path} doubles the existing stochastic layer {nxt}"
    for path, module in before.items():  # the model's own stochastic layers are all still there
        assert modules.get(path) is module, f"existing stochastic layer {path} was replaced"


def sampled(entry: ZooModel, model: nn.Module) -> nn.Module:
    """What MC dropout samples: the model, or the one output of a model that returns a dict."""
    return OutputOf(model, entry.output_key) if entry.output_key else model


def mc(entry: ZooModel, model: nn.Module, x: torch.Tensor, strategy: str):
    return mc_predict(sampled(entry, model), x, samples=T, strategy=strategy, seed=3,
                      output_transform=entry.output_transform)


def check_auto_matches_loop(entry: ZooModel, model: nn.Module, x: torch.Tensor) -> None:
    check_auto_matches(sampled(entry, model), x, "loop", entry.output_transform, name=entry.name)


def training_step(entry: ZooModel, model: nn.Module, x: torch.Tensor) -> None:
    def loss(m: nn.Module) -> torch.Tensor:
        out = m(x)
        return classification_loss(out[entry.output_key] if entry.output_key else out, entry.output_transform)
    one_step(model, loss)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_zoo(name: str, variant: str) -> None:
    entry = ZOO[name]
    model, x = build(entry)
    with torch.no_grad():
        reference = copy.deepcopy(model(x))
    stats = bn_state(model)
    types = stochastic_types()
    before = {p: m for p, m in model.named_modules() if isinstance(m, types) or foreign.foreign_layer(m) is not None}

    regs = build_regularizers(VARIANTS[variant])
    plan = make_plan(model, regs, n_examples=10_000, example_input=x)
    check_snapshot(f"{name}__{variant}", plan.format() + "\n")
    with warnings.catch_warnings():  # the plan's warnings are in its snapshot
        warnings.simplefilter("ignore", UserWarning)
        apply_plan(model, regs, plan)
    check_places(entry, model, plan, before)

    model.eval()
    with torch.no_grad():
        check_eval_unchanged(reference, model(x))

    if (name, variant) in AUTO_APART:
        assert mc(entry, model, x, "loop").outputs.std(0).max() > 0, "MC spread is zero"
    else:
        check_auto_matches_loop(entry, model, x)
    for key, value in bn_state(model).items():
        assert torch.equal(value, stats[key]), f"BatchNorm statistics {key} changed"
    training_step(entry, model, x)



def test_lstm_dropconnect_locked_dropout_auto_matches_loop() -> None:
    entry = ZOO["lstm_lm"]
    model, x = build(entry)
    regs = build_regularizers(VARIANTS["locked_dropout+dropconnect"])
    apply_plan(model, regs, make_plan(model, regs, n_examples=10_000, example_input=x))
    check_auto_matches_loop(entry, model.eval(), x)


def test_the_documented_plans_are_lines_of_the_snapshots() -> None:
    """The `regfw plan` excerpts of docs/plans.md for resnet18 and the ViT stay what the zoo prints."""
    page = (Path(__file__).parents[2] / "docs" / "plans.md").read_text()
    section = page.split("## `regfw plan` on torchvision and timm models", 1)[1].split("\n## ", 1)[0]
    shown = [line for line in section.splitlines() if line.startswith(("plan: ", "dropout ", "attention_dropout "))]
    assert len(shown) >= 10
    snapshots = {line for f in SNAPSHOTS.glob("*.txt") for line in f.read_text().splitlines()}
    missing = [line for line in shown if line not in snapshots]
    assert not missing, f"docs/plans.md plan lines not in any tests/zoo snapshot: {missing}"


def test_planning_a_torch_model_imports_neither_timm_nor_torchvision() -> None:
    import subprocess
    import sys

    code = ("import sys, torch; from torch import nn; from regfw.placement.plan import make_plan; "
            "from regfw.registry.regularizers import build_regularizers; from regfw.uncertainty import mc_predict; "
            "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)); "
            "regs = build_regularizers({'dropout': {}, 'drop_path': {}}); x = torch.randn(3, 4); "
            "make_plan(m, regs, example_input=x); m.append(nn.Dropout(0.2)); mc_predict(m, x, samples=2, seed=0); "
            "print(sorted(k for k in ('timm', 'torchvision') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
