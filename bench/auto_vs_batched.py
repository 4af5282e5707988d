"""``auto`` against ``batched`` on the zoo's and the registry sweep's models: CPU time of one MC call each.

``auto`` decides on its first call of a size whether its split beats ``batched`` (timing both) and runs
the faster from then on; this bench makes that first call, then times one more call of each strategy
(CPU time of the process, all threads; T = 30) and prints ``auto / batched`` per model and
regularizer. Targets: at most 1.05 everywhere, and at most 0.5 where only a model's head is stochastic
(the ``head`` rows: timm's classifier dropout ``drop_rate``, torchvision's own classifier dropout with
its stochastic depth not sampled).

Needs the zoo environment (torchvision, timm): ``make bench-auto`` or
``.venv-zoo/bin/python bench/auto_vs_batched.py [--sweep N] [--threads 1]`` (``--sweep N``: the first
N models of tests/sweep/selection.json besides the zoo; 0 for the zoo alone; -1 for all).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

T = 30


def cpu(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def compare(model: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[float, float, str]:
    """``(auto seconds, batched seconds, the strategy auto kept)`` for one call each after the decision."""
    from regfw.uncertainty import mc_predict
    from regfw.uncertainty.fast import cache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mc_predict(model, x, T, strategy="auto", seed=0, choose=True, **kw)  # decides
        mc_predict(model, x, T, strategy="batched", seed=0, **kw)  # warm
        auto = cpu(lambda: mc_predict(model, x, T, strategy="auto", seed=1, choose=True, **kw))
        batched = cpu(lambda: mc_predict(model, x, T, strategy="batched", seed=1, **kw))
    entry = cache._CACHE.get(model)  # the split of the call (made under the call's sampling setting)
    kept = next((s.choices[(x.shape[0], T)] for s in (entry.splits.values() if entry else ())
                 if (x.shape[0], T) in s.choices), "batched (fallback)")
    return auto, batched, kept


def regularized(model: nn.Module, x: Any, regs: dict) -> nn.Module:
    from regfw.placement.plan import apply_plan, make_plan
    from regfw.registry.regularizers import build_regularizers

    regularizers = build_regularizers(regs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, regularizers, make_plan(model, regularizers, n_examples=10_000, example_input=x))
    return model.eval()


def cases(sweep: int) -> list[tuple[str, Any]]:
    """``(name, make)``: ``make()`` returns ``(model, inputs, mc_predict keywords)``."""
    from model_checks import OutputOf
    from zoo.models import ZOO, build
    from zoo.test_zoo import VARIANTS

    out: list[tuple[str, Any]] = []
    for name, entry in ZOO.items():
        for variant in entry.variants:
            def make(entry=entry, variant=variant):
                model, x = build(entry)
                model = regularized(model, x, VARIANTS[variant])
                return (OutputOf(model, entry.output_key) if entry.output_key else model), x, {}
            out.append((f"zoo {name} {variant}", make))

    def timm_head(name: str, **kw: Any):
        def make():
            import timm

            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.3, **kw).eval()
            return model, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), {}
        return make

    def tv_head(name: str):
        def make():
            import torchvision

            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
            return model, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), \
                {"selected": ["dropout"]}
        return make

    out += [("head timm resnet18d", timm_head("resnet18d")), ("head timm convnext_atto", timm_head("convnext_atto")),
            ("head timm vit_tiny", timm_head("vit_tiny_patch16_224", img_size=64)),
            ("head torchvision efficientnet_b0", tv_head("efficientnet_b0")),
            ("head torchvision mobilenet_v3_small", tv_head("mobilenet_v3_small"))]
    if sweep:
        from sweep.models import build as sweep_build
        from sweep.models import load

        models = [m for m in load()[0] if not m.detection]
        for entry in models if sweep < 0 else models[:sweep]:
            def make(entry=entry):
                model, x = sweep_build(entry)
                model = regularized(model, x, {"dropout": {}})
                return (OutputOf(model, entry.output_key) if entry.output_key else model), x, {}
            out.append((f"sweep {entry.key} dropout", make))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    worst = 0.0
    print(f"{'model':58} {'auto s':>8} {'batched s':>9} {'ratio':>6}  kept")
    for name, make in cases(args.sweep):
        try:
            model, x, kw = make()
            auto, batched, kept = compare(model, x, **kw)
        except Exception as exc:  # noqa: BLE001 - a model MC dropout refuses is reported, not fatal
            print(f"{name:58} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        ratio = auto / max(batched, 1e-9)
        worst = max(worst, ratio)
        print(f"{name:58} {auto:8.3f} {batched:9.3f} {ratio:6.2f}  {kept}", flush=True)
    print(f"worst auto / batched: {worst:.2f} (target <= 1.05)")


if __name__ == "__main__":
    main()
