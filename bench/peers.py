"""regfw's Monte Carlo dropout next to torch-uncertainty and BaaL, in one run (``make bench-peers``).

Runs in the peers environment (``.venv-peers``: torch 2.14.1 + torchvision 0.29.1, torch-uncertainty,
BaaL; ``constraints-peers.txt``). CPU time of one thread, T = 30, median of interleaved repeats,
each as a ratio to one deterministic (eval-mode) pass of the same model on the same batch:

1. a CNN with dropout only in its classifier head (``bench/mc_dropout.py``'s), 128x3x32x32;
2. torchvision ``mobilenet_v3_small`` and ``efficientnet_b0`` (random weights), their own
   classifier dropout only, 64x64 inputs, batch 8;
3. an MLP 784-512-512-10 with dropout on its input and hidden layers, batch 256 (regfw's own
   ``Dropout`` layers for regfw, ``nn.Dropout`` for the peers, which look for torch's modules;
   regfw on the ``nn.Dropout`` model too, whose masks it draws from its CPU word masks in MC mode).

regfw runs ``mc_predict`` with its defaults (``strategy="auto"``, ``deterministic=True``: the
eval-mode comparison is included in its time); the peers run their MC dropout prediction (which
computes no deterministic comparison). A peer that is not installed is reported, not faked.

Usage: ``python bench/peers.py [--repeats N] [--parts 1,2,3]``.
"""
from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import cpu_times  # bench/ is the script directory, on sys.path
from torch import nn

from regfw.uncertainty import mc_predict

T = 30


def _cnn() -> nn.Module:
    spec = importlib.util.spec_from_file_location("mc_bench", Path(__file__).with_name("mc_dropout.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HeadDropoutCNN()


def _mlp(regfw_layers: bool) -> nn.Module:
    """The MLP with torch's nn.Dropout (what the peers sample) or regfw's Dropout (what regfw's plan
    inserts, with its CPU masks); same weights either way."""
    from regfw.layers import Dropout

    drop: Callable[[float], nn.Module] = Dropout if regfw_layers else nn.Dropout
    torch.manual_seed(0)
    return nn.Sequential(drop(0.2), nn.Linear(784, 512), nn.ReLU(), drop(0.5), nn.Linear(512, 512),
                         nn.ReLU(), drop(0.5), nn.Linear(512, 10))


def peers(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each installed peer's MC dropout prediction of T samples (or a line saying why not)."""
    out: dict[str, Callable[[], object]] = {}
    try:
        from torch_uncertainty.methods.mc_dropout import mc_dropout

        tu = mc_dropout(model, num_estimators=T, last_layer=False, on_batch=True).eval()

        def tu_run() -> object:
            with torch.no_grad():
                return tu(x)

        out["torch-uncertainty mc_dropout (on_batch)"] = tu_run
    except Exception as exc:  # noqa: BLE001 - report, do not fake
        print(f"    torch-uncertainty unavailable: {type(exc).__name__}: {exc}")
    try:
        from baal.bayesian.dropout import MCDropoutModule
        from baal.modelwrapper import ModelWrapper, TrainingArgs

        wrapper = ModelWrapper(MCDropoutModule(model), TrainingArgs(criterion=nn.CrossEntropyLoss(), use_cuda=False))
        out["BaaL predict_on_batch"] = lambda: wrapper.predict_on_batch(x, iterations=T)
    except Exception as exc:  # noqa: BLE001
        print(f"    BaaL unavailable: {type(exc).__name__}: {exc}")
    return out


def case(title: str, model: nn.Module, x: torch.Tensor, repeats: int, peer_model: nn.Module | None = None) -> None:
    model = model.eval()
    peer_model = model if peer_model is None else peer_model.eval()
    print(f"\n{title}, input {tuple(x.shape)}, T = {T}")

    def det() -> object:
        with torch.no_grad():
            return model(x)

    ours = {"deterministic pass": det,
            "regfw mc_predict (defaults)": lambda: mc_predict(model, x, T, seed=0),
            "regfw mc_predict, batched": lambda: mc_predict(model, x, T, seed=0, strategy="batched")}
    if peer_model is not model:  # torch's nn.Dropout: regfw's word masks in MC mode too (layers/torch_dropout.py)
        ours["regfw mc_predict (defaults), nn.Dropout"] = lambda: mc_predict(peer_model, x, T, seed=0)
    t = cpu_times(ours, repeats)
    t.update(cpu_times(peers(peer_model, x), max(1, repeats // 2)))
    base = t["deterministic pass"]
    for name, sec in t.items():
        print(f"    {name:<42} {sec * 1e3:9.1f} ms   {sec / base:6.2f}x one deterministic pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="1,2,3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = {p.strip() for p in args.parts.split(",")}
    print(f"torch {torch.__version__}, CPU, 1 thread, median CPU time")
    torch.manual_seed(0)
    if "1" in parts:
        case("[1] CNN, dropout only in the classifier head", _cnn(), torch.randn(128, 3, 32, 32), args.repeats)
    if "2" in parts:
        try:
            import torchvision.models as tvm
        except Exception as exc:  # noqa: BLE001
            print(f"\n[2] torchvision unavailable: {type(exc).__name__}: {exc}")
        else:
            for name in ("mobilenet_v3_small", "efficientnet_b0"):
                torch.manual_seed(0)
                model = getattr(tvm, name)(weights=None, num_classes=10)
                if name == "efficientnet_b0":  # head-only dropout: no stochastic depth in the blocks
                    for m in model.modules():
                        if type(m).__name__ == "StochasticDepth":
                            m.p = 0.0
                case(f"[2] torchvision {name}, its classifier dropout only", model, torch.randn(8, 3, 64, 64),
                     args.repeats)
    if "3" in parts:
        case("[3] MLP 784-512-512-10, dropout on input (0.2) and hidden layers (0.5); regfw with its "
             "Dropout layers, the peers with nn.Dropout", _mlp(True), torch.randn(256, 784), args.repeats,
             peer_model=_mlp(False))


if __name__ == "__main__":
    main()
