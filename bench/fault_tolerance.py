"""What fault tolerance costs: per-step reseeding and checked, atomic checkpoints.

1. Milliseconds per training step (forward, backward, Adam step) of the ``mlp`` demo model with
   dropout on a batch of 64 digits, without and with the per-step reseeding of
   :class:`regfw.run.distributed.StepSeeding` (torch, NumPy and ``random`` seeded from a hash of
   ``(seed, rank, epoch, batch)``), measured interleaved in one run.
2. Milliseconds to save a checkpoint of ``--mparams`` million float32 parameters plus Adam state
   with Lightning's ``TorchCheckpointIO`` and with :class:`regfw.run.checkpoints.AtomicCheckpointIO`
   (SHA-256 digest of every tensor, temporary file, fsync, rename), and to read it back with
   ``torch.load`` and with :func:`regfw.run.checkpoints.read_checkpoint` (which checks the digest).

Run: ``python bench/fault_tolerance.py`` (``--threads N``, ``--mparams M``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare  # noqa: E402
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402

from regfw.run.checkpoints import AtomicCheckpointIO, read_checkpoint  # noqa: E402
from regfw.run.distributed import seed_all, step_seed  # noqa: E402
from regfw.train.module import RegularizedModule  # noqa: E402


def step_costs() -> dict[str, float]:
    torch.manual_seed(0)
    module = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10}},
                               regularizers={"dropout": {}}, example_input=torch.zeros(2, 64))
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    counter = iter(range(10**9))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()

    def seeded_step() -> None:
        seed_all(step_seed(0, 0, 0, next(counter)))
        step()

    return compare({"plain": step, "reseeded": seeded_step}, repeats=200, warmup=20)


def checkpoint_costs(mparams: float) -> dict[str, float]:
    n = int(mparams * 1e6)
    weights = {f"layer{i}.weight": torch.randn(n // 8) for i in range(8)}
    ckpt = {"state_dict": weights, "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros(n // 8),
                                                                        "exp_avg_sq": torch.zeros(n // 8)}
                                                                    for i in range(8)}}],
            "hyper_parameters": {}, "regfw": {}, "epoch": 0, "global_step": 0}
    tmp = Path(tempfile.mkdtemp())
    plain, atomic = TorchCheckpointIO(), AtomicCheckpointIO()
    times = compare({
        "save: TorchCheckpointIO": lambda: plain.save_checkpoint(ckpt, tmp / "plain.ckpt"),
        "save: AtomicCheckpointIO": lambda: atomic.save_checkpoint(ckpt, tmp / "atomic.ckpt"),
    }, repeats=5, warmup=1)
    times.update(compare({
        "load: torch.load": lambda: torch.load(tmp / "atomic.ckpt", map_location="cpu", weights_only=False),
        "load: read_checkpoint (digest checked)": lambda: read_checkpoint(tmp / "atomic.ckpt"),
    }, repeats=5, warmup=1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mparams", type=float, default=8.0, help="million parameters in the checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    steps = step_costs()
    print(f"training step, mlp + dropout, batch 64 ({args.threads} thread(s)):")
    for name, ms in steps.items():
        print(f"  {name:10s} {ms:7.3f} ms  x{ms / steps['plain']:.3f}")
    size_mb = args.mparams * 3 * 4
    print(f"checkpoint of {args.mparams:g}M parameters + Adam state ({size_mb:.0f} MB):")
    ckpts = checkpoint_costs(args.mparams)
    base = {"save": ckpts["save: TorchCheckpointIO"], "load": ckpts["load: torch.load"]}
    for name, ms in ckpts.items():
        print(f"  {name:40s} {ms:8.1f} ms  x{ms / base[name.split(':')[0]]:.2f}")


if __name__ == "__main__":
    main()
