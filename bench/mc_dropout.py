"""MC dropout cost: the ``auto`` strategy against ``loop``, ``batched`` and one deterministic pass.

Prints ratios measured side by side in one run (median of interleaved repeats):

1. a CNN on 128x3x32x32 with dropout only in its classifier head, T = 30: each strategy's
   ``mc_predict`` with its defaults (``deterministic=True``: the eval-mode comparison included) and
   with ``deterministic=False`` / one deterministic pass (target for ``auto`` defaults: <= 1.15x);
2. a small ResNet with DropPath in its last stage, T = 30: ``batched`` / ``auto`` (target >= 2x);
3. peak memory of ``auto`` (and ``batched``) under several budgets, measured (torch.profiler's
   allocation events on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and as planned;
4. a validation epoch of the demo (digits, mlp, ``templates/demo.yaml``) with the MC callback /
   without it (target <= 1.5x);
5. an MLP 784-512-512-10 with regfw dropout on its input and hidden layers, batch 256, T = 30:
   ``mc_predict`` defaults / one deterministic pass (the floating-point floor is 30x; target <= 40x).

On CPU the times are CPU time of the process (``time.process_time``) with one intra-op thread by
default, so other load on the machine changes them little; on CUDA, wall time after a synchronise.

Usage: ``python bench/mc_dropout.py [--device cpu|cuda] [--parts 1,2,3,4,5] [--repeats N] [--threads N]``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import add_device_options, device_from
from torch import nn

from regfw.layers import DropPath
from regfw.uncertainty import mc_mode, mc_predict
from regfw.uncertainty.fast import split_model

SAMPLES = 30
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "templates" / "demo.yaml"
MiB = 2**20


# --------------------------------------------------------------------------- models


class HeadDropoutCNN(nn.Module):
    """Four conv-BN-ReLU layers with two max-pools, then Flatten-Linear-ReLU-Dropout-Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*conv(3, 32), *conv(32, 32), nn.MaxPool2d(2),
                                      *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """``relu(shortcut(x) + drop_path(bn(conv(relu(bn(conv(x)))))))`` (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.shortcut(x) + self.drop_path(out))


class SmallResNet(nn.Module):
    """A CIFAR ResNet-14: three stages of two blocks (16, 32, 64 channels); DropPath only in the last."""

    def __init__(self, drop_path: float = 0.1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(2):
                p = drop_path if stage == 2 else 0.0
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1, p))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, runs interleaved so load drifts hit all alike
    (CPU time of the process on CPU, wall time on CUDA)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (and the split's one-off analysis)
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of the bytes allocated during ``fn`` above the level at its start."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def mc(model: nn.Module, x: torch.Tensor, strategy: str, budget: int | None = 256 * MiB,
       deterministic: bool = False) -> Callable[[], object]:
    return lambda: mc_predict(model, x, SAMPLES, strategy=strategy, seed=0, budget_bytes=budget,
                              deterministic=deterministic)


def plain(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def describe(model: nn.Module, x: torch.Tensor) -> str:
    with mc_mode(model):
        return split_model(model, x).describe().replace("\n", "\n    ")


# --------------------------------------------------------------------------- parts


def part_cnn(device: torch.device, repeats: int) -> None:
    torch.manual_seed(0)
    model = HeadDropoutCNN().to(device).eval()
    x = torch.randn(128, 3, 32, 32, device=device)
    print(f"\n[1] CNN, dropout only in the classifier head, input {tuple(x.shape)}, T = {SAMPLES}")
    print(f"    split: {describe(model, x)}")
    # the fast pair first, on its own (the T-pass strategies would leave caches and allocator cold)
    t = timed({"deterministic pass": plain(model, x), "auto (defaults)": mc(model, x, "auto", deterministic=True),
               "auto, deterministic=False": mc(model, x, "auto")}, repeats, device)
    t.update(timed({"batched (defaults)": mc(model, x, "batched", deterministic=True),
                    "loop (defaults)": mc(model, x, "loop", deterministic=True)}, max(1, repeats // 2), device))
    base = t["deterministic pass"]
    for name, sec in t.items():
        print(f"    {name:<26} {sec * 1e3:9.1f} ms   {sec / base:6.2f}x one deterministic pass")
    auto = t["auto (defaults)"]
    print(f"    auto (defaults) / deterministic pass = {auto / base:.2f}x (target <= 1.15x); "
          f"batched / auto = {t['batched (defaults)'] / auto:.1f}x, loop / auto = {t['loop (defaults)'] / auto:.1f}x")


def part_mlp(device: torch.device, repeats: int) -> None:
    from regfw.layers import Dropout
    from regfw.placement.surgery import attach

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    attach(model, "0", "regfw_input_dropout", Dropout(0.2), "before")  # as regfw's dropout plan places it
    attach(model, "1", "regfw_dropout", Dropout(0.5), "after")
    attach(model, "3", "regfw_dropout", Dropout(0.5), "after")
    model = model.to(device).eval()
    x = torch.randn(256, 784, device=device)
    print(f"\n[5] MLP 784-512-512-10, regfw dropout on the input (0.2) and hidden layers (0.5), "
          f"input {tuple(x.shape)}, T = {SAMPLES}")
    print(f"    split: {describe(model, x)}")
    t = timed({"deterministic pass": plain(model, x), "auto (defaults)": mc(model, x, "auto", deterministic=True),
               "batched (defaults)": mc(model, x, "batched", deterministic=True),
               "loop (defaults)": mc(model, x, "loop", deterministic=True)}, repeats, device)
    base = t["deterministic pass"]
    for name, sec in t.items():
        print(f"    {name:<26} {sec * 1e3:9.1f} ms   {sec / base:6.2f}x one deterministic pass")
    print(f"    auto (defaults) / deterministic pass = {t['auto (defaults)'] / base:.1f}x "
          f"(floating-point floor 30x; target <= 40x)")


def part_resnet(device: torch.device, repeats: int, batch: int) -> None:
    torch.manual_seed(0)
    model = SmallResNet(drop_path=0.1).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    print(f"\n[2] ResNet-14, DropPath 0.1 in its last stage only, input {tuple(x.shape)}, T = {SAMPLES}")
    print(f"    split: {describe(model, x)}")
    t = timed({"deterministic pass": plain(model, x), "auto": mc(model, x, "auto")}, repeats, device)
    t.update(timed({"batched": mc(model, x, "batched")}, max(1, repeats // 2), device))
    base = t["deterministic pass"]
    for name, sec in t.items():
        print(f"    {name:<20} {sec * 1e3:9.1f} ms   {sec / base:6.2f}x one deterministic pass")
    print(f"    batched / auto = {t['batched'] / t['auto']:.2f}x faster (target >= 2x)")


def part_memory(device: torch.device) -> None:
    torch.manual_seed(0)
    model = HeadDropoutCNN().to(device).eval()
    x = torch.randn(128, 3, 32, 32, device=device)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation events"
    print(f"\n[3] peak activation memory, CNN of [1], T = {SAMPLES} (measured: {how}, above the level at the call;")
    print("    planned: the split's estimate; the [T, B, C] output buffer, 150 KiB here, is included in measured)")
    mc(model, x, "auto", None)()  # analysis outside the measurement
    with mc_mode(model):
        split = split_model(model, x)
    print(f"    one deterministic pass: {peak_bytes(plain(model, x), device) / MiB:8.1f} MiB")
    for budget_mib in (8, 32, 128):
        budget = budget_mib * MiB
        for strategy in ("auto", "batched"):
            peak = peak_bytes(mc(model, x, strategy, budget), device)
            line = (f"    budget {budget_mib:4d} MiB  {strategy:<8} peak {peak / MiB:8.1f} MiB "
                    f"({peak / budget:5.2f}x budget)")
            if strategy == "auto":
                run = split.last_run
                line += (f"; planned {run.planned_peak_bytes / MiB:.1f} MiB, prefix in {run.prefix_chunks} chunk(s), "
                         f"replay in {run.chunks} chunk(s) of <= {run.chunk_rows} rows")
            print(line)


def part_callback(device: torch.device, repeats: int) -> None:
    import logging
    import tempfile
    import warnings

    import pytorch_lightning as pl

    from regfw.build.fit import build_fit
    from regfw.config.schema import load_config
    from regfw.uncertainty import MCDropoutUncertainty

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*")

    class EpochTimer:
        """Wall time from the first callback's epoch start to the last callback's epoch end."""

        def __init__(self) -> None:
            self.start = 0.0
            self.seconds: list[float] = []

        def start_hook(self, *_: object) -> None:
            sync(device)
            self.start = time.perf_counter()

        def end_hook(self, *_: object) -> None:
            sync(device)
            self.seconds.append(time.perf_counter() - self.start)

        @property
        def median(self) -> float:
            return statistics.median(self.seconds[1:])  # the first round is warm-up

    def trainer_with(mc_cb: pl.Callback | None) -> tuple[pl.Trainer, EpochTimer]:
        timer = EpochTimer()
        first, last = pl.Callback(), pl.Callback()
        first.on_validation_epoch_start = timer.start_hook  # type: ignore[method-assign]
        last.on_validation_epoch_end = timer.end_hook  # type: ignore[method-assign]
        callbacks = [first, *([mc_cb] if mc_cb else []), last]
        trainer = pl.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
        return trainer, timer

    for title, overrides in (("the demo config", []),
                             ("the demo config, regularizers.dropout.input=0", ["regularizers.dropout.input=0"])):
        cfg = load_config(str(DEMO_CONFIG), overrides)
        built = build_fit(cfg)
        datamodule, module = built.datamodule, built.module.to(device)
        unc = cfg.uncertainty
        runs: dict[str, pl.Callback | None] = {"without the callback": None}
        for strategy in ("auto", "batched", "loop"):
            runs[f"callback, {strategy}"] = MCDropoutUncertainty(samples=unc.samples, strategy=strategy, plots=False,
                                                                 seed=0)
        runs["callback, auto, plots on"] = MCDropoutUncertainty(
            samples=unc.samples, strategy="auto", plots=True, plot_dir=tempfile.mkdtemp(prefix="regfw-bench-"), seed=0)
        trainers = {name: trainer_with(cb) for name, cb in runs.items()}
        x = datamodule.x_val[:256].to(device)
        print(f"\n[4] a validation epoch of {title} ({cfg.model.name} on {cfg.data.name}, "
              f"{len(datamodule.x_val)} validation rows, T = {unc.samples}), median of {repeats}")
        print(f"    split: {describe(module, x)}")
        for _ in range(repeats + 1):  # interleaved
            for trainer, _timer in trainers.values():
                trainer.validate(module, datamodule=datamodule, verbose=False)
        base = trainers["without the callback"][1].median
        for name, (_trainer, timer) in trainers.items():
            print(f"    {name:<26} {timer.median * 1e3:8.1f} ms   {timer.median / base:5.2f}x without the callback")
        def sample_all(module=module, unc=unc, datamodule=datamodule) -> object:
            return [mc_predict(module, xb.to(device), unc.samples, seed=0, deterministic=False)
                    for xb in datamodule.x_val.split(256)]

        sampling = timed({"auto": sample_all}, repeats, device)["auto"]
        print(f"    of which mc_predict 'auto' alone: {sampling * 1e3:.1f} ms "
              f"({sampling / base:.2f}x a validation epoch without the callback)")
        print(f"    callback (auto, plots off) / without = {trainers['callback, auto'][1].median / base:.2f}x "
              f"(target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run (1-5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-batch", type=int, default=128)
    args = parser.parse_args()
    device, name = device_from(parser, args)
    print(name)
    parts = {p.strip() for p in args.parts.split(",")}
    if "1" in parts:
        part_cnn(device, args.repeats)
    if "2" in parts:
        part_resnet(device, args.repeats, args.resnet_batch)
    if "3" in parts:
        part_memory(device)
    if "4" in parts:
        part_callback(device, args.repeats)
    if "5" in parts:
        part_mlp(device, args.repeats)


if __name__ == "__main__":
    main()
