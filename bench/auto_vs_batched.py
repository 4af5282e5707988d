"""``auto`` against ``batched`` on the zoo's and the registry sweep's models: CPU time of one MC call each.

``auto`` decides for each call size whether its split beats ``batched``, by a prediction from the work
of the graph's nodes (``regfw.uncertainty.fast.work``), and runs the faster. Per model and regularizer
this bench times, after one warm-up call each (CPU time of the process, all threads; T = 30; the least
of three interleaved rounds): the split itself (``choose=False``), ``batched``, and ``auto`` as a user
gets it; it prints the predicted and the measured split / batched ratios, the share of a pass's work
the split computes once, and what ``auto`` ran. Targets: ``auto / batched`` at most 1.05 everywhere,
and at most 0.5 where only a model's head is stochastic (the ``head`` rows: timm's classifier dropout
``drop_rate``, torchvision's own classifier dropout with its stochastic depth not sampled).

Needs the zoo environment (torchvision, timm): ``make bench-auto`` or
``.venv-zoo/bin/python bench/auto_vs_batched.py [--sweep N] [--threads 1] [--skip N]`` (``--sweep N``: the
first N models of tests/sweep/selection.json besides the zoo; 0 for the zoo alone; -1 for all; ``--skip N``
leaves out the first N cases, to go on with a run that was stopped; ``--match TEXT``, repeatable: only the cases
whose name contains it; ``--shard K/N``: every N-th case from the K-th, to run N processes side by side).
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


def compare(model: nn.Module, x: torch.Tensor, repeats: int = 3, **kw: Any) -> dict[str, Any]:
    """CPU seconds of one call each (after a warm-up call; the least of ``repeats`` rounds, the three
    interleaved in each) of the split, ``batched`` and ``auto``; the split's predicted ratio and what
    ``auto`` ran."""
    from regfw.uncertainty import mc_predict
    from regfw.uncertainty.fast import cache

    def call(strategy: str, seed: int, **more: Any) -> None:
        mc_predict(model, x, T, strategy=strategy, seed=seed, **kw, **more)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call("auto", 0, choose=False)
        call("batched", 0)
        rounds = [(cpu(lambda: call("auto", 1, choose=False)), cpu(lambda: call("batched", 1)),
                   cpu(lambda: call("auto", 1))) for _ in range(repeats)]
        split_s, batched_s, auto_s = (min(r[i] for r in rounds) for i in range(3))
    entry = cache._CACHE.get(model)
    split = next((s for s in (entry.splits.values() if entry else ()) if s.ok), None)
    rows = x.shape[0]
    return {"split": split_s, "batched": batched_s, "auto": auto_s,
            "predicted": split.predicted_ratio(rows, T) if split else None,
            "reused": split.reused_share(rows) if split else None,
            "ran": ("split" if split.pays(rows, T) else "batched") if split else "batched (fallback)"}


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
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model; the least time of each is kept")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N cases (to go on with a run)")
    parser.add_argument("--shard", default="0/1", help="K/N: every N-th case from the K-th (to run N processes)")
    parser.add_argument("--match", action="append", default=[],
                        help="only the cases whose name contains this text (may be given again)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    worst = 0.0
    print(f"{'model':52} {'split/b':>7} {'pred.':>6} {'reused':>6} {'auto/b':>6}  auto ran")
    k, n = (int(v) for v in args.shard.split("/"))
    for name, make in cases(args.sweep)[args.skip:][k::n]:
        if args.match and not any(m in name for m in args.match):
            continue
        try:
            model, x, kw = make()
            r = compare(model, x, repeats=args.repeats, **kw)
        except Exception as exc:  # noqa: BLE001 - a model MC dropout refuses is reported, not fatal
            print(f"{name:52} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        ratio = r["auto"] / max(r["batched"], 1e-9)
        worst = max(worst, ratio)
        predicted = "-" if r["predicted"] is None else f"{r['predicted']:.2f}"
        reused = "-" if r["reused"] is None else f"{r['reused']:.2f}"
        print(f"{name:52} {r['split'] / max(r['batched'], 1e-9):7.2f} {predicted:>6} {reused:>6} {ratio:6.2f}  "
              f"{r['ran']}", flush=True)
    print(f"worst auto / batched: {worst:.2f} (target <= 1.05)")


if __name__ == "__main__":
    main()
