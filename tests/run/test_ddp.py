"""The same config under DDP: ``regfw fit CONFIG trainer.strategy=ddp trainer.devices=2
trainer.accelerator=cpu`` (gloo) trains with the built-in regularizers and the MC dropout callback;
the logged MC metrics equal a single-process evaluation of the saved checkpoint on the same
validation shards; every rank draws different dropout masks."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from regfw.run import distributed as D

ZOO = '''
import os
import torch
from torch import nn


class Everything(nn.Module):
    """A conv stem on the 8x8 digit, self-attention with a residual add, an LSTM over the rows,
    a hidden Linear layer and a head: a layer of every kind some built-in regularizer acts on.

    On its first training step (planning runs a 2-example batch first) it saves the dropout mask
    that the random stream would draw next (inside fork_rng, so training is unchanged), one file
    per rank.
    """

    def __init__(self, in_features: int = 64, num_outputs: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_act = nn.ReLU()
        self.proj = nn.Linear(32, width)
        self.rows = nn.Embedding(8, width)  # a learned embedding of the row index
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.fc = nn.Linear(width, width)
        self.fc_act = nn.ReLU()
        self.head = nn.Linear(width, num_outputs)
        self.recorded = False
        self.register_forward_pre_hook(self._record_mask)  # a hook: torch.fx traces forward() alone

    def _record_mask(self, module, args):
        x = args[0]
        if self.training and x.shape[0] > 2 and not self.recorded and os.environ.get("REGFW_TEST_MASK_DIR"):
            self.recorded = True
            with torch.random.fork_rng():
                mask = torch.nn.functional.dropout(torch.ones(512), 0.5) == 0
            rank = os.environ.get("LOCAL_RANK", "0")
            torch.save(mask, os.path.join(os.environ["REGFW_TEST_MASK_DIR"], f"mask-rank{rank}.pt"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv_act(self.conv(x.reshape(-1, 1, 8, 8)))
        h = self.proj(c.permute(0, 2, 1, 3).reshape(-1, 8, 32))
        h = h + self.rows(torch.arange(8, device=h.device).expand(h.shape[0], 8))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        out, _ = self.rnn(h)
        return self.head(self.fc_act(self.fc(out[:, -1])))
'''

# One member of the dropout family per layer kind (the family allows one per kind), plus every
# regularizer of another family. alpha_dropout, spatial_dropout and concrete_dropout claim the same
# kinds as gaussian_dropout, dropblock and dropout; the second launch runs them.
CONFIG = """
seed: 0
data: {name: digits, batch_size: 32, train_fraction: 0.3, val_fraction: 0.1}  # 180 = 2 x 90 validation examples
model: {class_path: ddp_zoo.Everything, init_args: {in_features: 64, num_outputs: 10}}
optimizer: {name: adam, lr: 0.01}
regularizers:
  gaussian_dropout: {input: 0.1, hidden: 0, conv: 0}
  dropblock: {conv: 0.1, block_size: 3}
  attention_dropout: {attention: 0.1}
  drop_path: {rate: 0.1}
  locked_dropout: {recurrent: 0.2}
  dropconnect: {recurrent: 0.2}
  embedding_dropout: {embedding: 0.1}
  dropout: {input: 0, hidden: 0.3, conv: 0, recurrent: 0}
  noise: {input_std: 0, hidden_std: 0.05}
  l1: {}
  weight_decay: {}
  max_norm: {}
  adaptive_dropout: {patience: 1}
  coadaptation: {}
  mixup: {alpha: 0.2}
  label_smoothing: {epsilon: 0.1}
  confidence_penalty: {strength: 0.1}
  rdrop: {alpha: 1.0}
uncertainty: {enabled: true, samples: 8, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
"""
# The second launch runs the two variants the first cannot hold, in their places.
CONFIG_VARIANTS = (CONFIG.replace("gaussian_dropout: {input: 0.1, hidden: 0, conv: 0}",
                                  "alpha_dropout: {input: 0.05, hidden: 0}")
                   .replace("dropblock: {conv: 0.1, block_size: 3}", "spatial_dropout: {conv: 0.1}")
                   .replace("dropout: {input: 0, hidden: 0.3, conv: 0, recurrent: 0}", "concrete_dropout: {input: 0}")
                   .replace("adaptive_dropout: {patience: 1}", "adaptive_dropout: {patience: 1, kinds: [conv]}"))
NOT_RUN = {"alpha_dropout", "spatial_dropout", "concrete_dropout"}


def _launch_ddp(root, config: str):
    (root / "ddp_zoo.py").write_text(ZOO)
    (root / "cfg.yaml").write_text(config)
    (root / "masks").mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REGFW_TEST_MASK_DIR": str(root / "masks"),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for var in (D.RUN_DIR_ENV, D.RESUME_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "regfw", "fit", "cfg.yaml", "trainer.strategy=ddp", "trainer.devices=2",
         "trainer.accelerator=cpu"], cwd=root, env=env, capture_output=True, text=True, timeout=420)


def test_seeding_every_rank_alike_gives_every_rank_the_same_masks():
    """What ``seed_everything`` alone does under DDP, and what :class:`StepSeeding` does instead."""
    drop, ones = nn.Dropout(0.5), torch.ones(1000)

    def mask_after(seed_fn) -> torch.Tensor:
        seed_fn()
        return drop(ones) == 0

    alike = [mask_after(lambda: pl.seed_everything(0, verbose=False)) for _rank in (0, 1)]
    assert torch.equal(alike[0], alike[1])  # correlated noise across the global batch
    per_rank = [mask_after(lambda r=r: D.seed_all(D.step_seed(0, r, 0, 7))) for r in (0, 1)]
    assert (per_rank[0] != per_rank[1]).float().mean() > 0.4  # independent: about half the positions differ
    again = mask_after(lambda: D.seed_all(D.step_seed(0, 1, 0, 7)))
    assert torch.equal(again, per_rank[1])  # and reproducible, which is what makes resume exact
    assert not torch.equal(mask_after(lambda: D.seed_all(D.step_seed(0, 1, 0, 8))), per_rank[1])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    result = _launch_ddp(root, CONFIG)
    return root, result


def test_ddp_fit_trains_every_builtin_regularizer_in_one_run_directory(ddp_run):
    from regfw.registry.regularizers import get_registry

    root, result = ddp_run
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = list((root / "runs").iterdir())  # rank 1 wrote into rank 0's directory, made none of its own
    assert result.stdout.count("run directory:") == 1  # only rank 0 reports
    builtin = {n for n, s in get_registry().specs.items() if s.distribution == "regfw"}
    used = set(load_cfg(root).regularizers)
    assert builtin - used == NOT_RUN
    plan = (run / "plan.txt").read_text()
    described = {"l1", "weight_decay", "adaptive_dropout", "coadaptation", "mixup", "label_smoothing",
                 "confidence_penalty", "rdrop"}
    for name in used - described:
        assert f"\n{name} " in plan, name  # a plan row for every injecting regularizer
    for name in described:
        assert f"\n{name}: " in plan, name


def test_ddp_fit_trains_the_remaining_dropout_variants(tmp_path):
    """alpha_dropout, spatial_dropout and concrete_dropout take the input, conv and hidden places of
    the first launch's gaussian_dropout, dropblock and dropout: together the two launches run every
    built-in regularizer."""
    result = _launch_ddp(tmp_path, CONFIG_VARIANTS)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = list((tmp_path / "runs").iterdir())
    plan = (run / "plan.txt").read_text()
    for name in NOT_RUN:
        assert f"\n{name} " in plan, name
    assert NOT_RUN <= set(load_cfg(tmp_path).regularizers)
    assert "mc/acc" in (run / "metrics.csv").read_text().splitlines()[0]  # the MC callback ran under DDP


def load_cfg(root):
    from regfw.config.schema import load_config

    return load_config(root / "cfg.yaml")


def test_each_rank_draws_its_own_dropout_masks(ddp_run):
    root, result = ddp_run
    assert result.returncode == 0, result.stderr[-4000:]
    masks = [torch.load(root / "masks" / f"mask-rank{r}.pt") for r in (0, 1)]
    assert (masks[0] != masks[1]).float().mean() > 0.4


def test_ddp_mc_metrics_equal_a_single_process_evaluation_of_the_checkpoint(ddp_run, monkeypatch):
    """Rank r's validation shard is DistributedSampler(shuffle=False) of the validation set and its
    masks are seeded with rank r, as in the DDP run; one metric object over both shards must give
    what the synchronised, logged metrics say (sums over examples, global bins and ranking)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from regfw.build.factory import build_datamodule
    from regfw.build.fit import uncertainty_callback
    from regfw.run.job import evaluate
    from regfw.train.module import RegularizedModule
    from regfw.uncertainty.sampling import derive_seed, mc_predict

    root, result = ddp_run
    assert result.returncode == 0, result.stderr[-4000:]
    monkeypatch.syspath_prepend(str(root))
    (run,) = list((root / "runs").iterdir())
    cfg = load_cfg(root)
    module = RegularizedModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    val = build_datamodule(cfg.data, seed=cfg.seed).val_dataloader()
    assert len(val.dataset) == 180
    cb = uncertainty_callback(cfg, module, root / "plots")
    metric = cb._make_metric()
    cb.say_what_is_sampled(module)  # what the callback samples, read off the module's plan as in the fit
    for rank in (0, 1):
        shard = DataLoader(val.dataset, batch_size=val.batch_size,
                           sampler=DistributedSampler(val.dataset, num_replicas=2, rank=rank, shuffle=False))
        for batch_idx, (x, y) in enumerate(shard):
            out = mc_predict(module, x, samples=cb.samples, strategy=cb.strategy, budget_bytes=cb.budget_bytes,
                             seed=derive_seed(cb.seed, 0, rank, 0, batch_idx), task=cb.task, tau=cb.tau,
                             sample_model_stochastic=cb.sample_model_stochastic, selected=cb.selected_kinds)
            metric.update(out.summary, y)
    single = {f"mc/{k}": float(v) for k, v in metric.compute().items()}
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("mc/") and v}
    for key in ("mc/acc", "mc/nll", "mc/ece", "mc/referred_fraction", "mc/brier", "mc/auroc_error"):
        assert key in logged
    assert logged.keys() <= single.keys()
    for key, value in logged.items():
        assert value == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    # the module's own validation metrics are means over both ranks too (sync_dist)
    val_loss = next(float(r["val_loss"]) for r in rows if r.get("val_loss"))
    assert val_loss == pytest.approx(evaluate(module, val)["loss"], rel=1e-5)


RESUME_CONFIG = """
seed: 0
data: {class_path: stall_data.StallingDigits, init_args: {batch_size: 32, train_fraction: 0.3, val_fraction: 0.1}}
model: {name: mlp, init_args: {hidden: [32], in_features: 64, num_outputs: 10}}
optimizer: {name: adam, lr: 0.01}
regularizers: {dropout: {hidden: 0.3}}
uncertainty: {enabled: false}
trainer: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false, strategy: ddp, devices: 2,
          accelerator: cpu}
run: {checkpoint_every_n_steps: 3}
"""


@pytest.mark.skipif(not os.environ.get("REGFW_LONG_TESTS"), reason="three DDP launches (~45 s); REGFW_LONG_TESTS=1")
def test_ddp_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """Under DDP: SIGTERM to rank 0 reaches rank 1 through Lightning's launcher, both agree to save
    last.ckpt at the same step, and the resumed run (whose loader Lightning rebuilt around a
    DistributedSampler) ends with the weights of an uninterrupted DDP run."""
    import signal
    import time

    from test_resume import STALL_DATA

    from regfw.run.checkpoints import read_checkpoint

    (tmp_path / "stall_data.py").write_text(STALL_DATA)
    (tmp_path / "cfg.yaml").write_text(RESUME_CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for var in (D.RUN_DIR_ENV, D.RESUME_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    fit_cmd = [sys.executable, "-m", "regfw", "fit", "cfg.yaml"]
    full = subprocess.run([*fit_cmd, "--run-dir", "full"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    marker = tmp_path / "stalled"
    stall = {**env, "REGFW_TEST_STALL_AT": "12", "REGFW_TEST_STALL_S": "3", "REGFW_TEST_STALL_FILE": str(marker)}
    proc = subprocess.Popen([*fit_cmd, "--run-dir", "term"], cwd=tmp_path, env=stall, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert err.count("stopped by SIGTERM at global step 12 (epoch 1)") == 1  # rank 0 reports, rank 1 is quiet
    assert read_checkpoint(tmp_path / "term" / "checkpoints" / "last.ckpt")["global_step"] == 12

    resumed = subprocess.run([*fit_cmd, "--run-dir", "term", "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(tmp_path / "term" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
