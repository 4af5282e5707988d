"""Dense and sequence outputs: a small segmentation net [B, C, H, W] and an LSTM language model [B, L, V]."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.uncertainty import MCDropoutUncertainty, derive_seed, mc_predict, rank
from regfw.uncertainty.accumulators import MCClassificationMetrics
from regfw.uncertainty.metrics import nll
from regfw.uncertainty.summaries import classification_summary


class SegNet(nn.Module):
    """Conv - ReLU - Dropout2d - 1x1 conv to 3 classes per pixel."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
                                  nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyLM(nn.Module):
    """Embedding - LSTM - Dropout - Linear to the vocabulary at every position."""

    def __init__(self, vocab: int = 11, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.lstm(self.emb(x))[0]))


def test_segmentation_summaries_per_pixel_match_the_flat_computation():
    torch.manual_seed(0)
    model, x = SegNet(), torch.randn(4, 1, 6, 5)
    r = mc_predict(model, x, samples=6, seed=0)
    assert r.outputs.shape == (6, 4, 3, 6, 5)
    assert r.mean_probs.shape == (4, 6, 5, 3) and r.mutual_information.shape == (4, 6, 5)
    flat = classification_summary(torch.softmax(r.outputs.movedim(2, -1).reshape(6, -1, 3), -1))
    assert torch.allclose(r.mutual_information.flatten(), flat.mutual_information, atol=1e-6)
    assert torch.allclose(r.variation_ratio.flatten(), flat.variation_ratio)
    assert r.deterministic_probs is not None and r.deterministic_probs.shape == (4, 6, 5, 3)


def test_dense_metrics_ignore_index_and_per_image_scores():
    torch.manual_seed(1)
    model, x = SegNet(), torch.randn(5, 1, 4, 4)
    y = torch.randint(0, 3, (5, 4, 4))
    y[0, :2] = 255  # unlabelled pixels
    r = mc_predict(model, x, samples=5, seed=0)
    m = MCClassificationMetrics(ignore_index=255, refer_fraction=0.2)
    m.update(r.summary, y)
    out = m.compute()
    keep = (y != 255).flatten()
    p = r.mean_probs.reshape(-1, 3)[keep]
    assert float(out["nll"]) == pytest.approx(nll(p, y.flatten()[keep]), rel=1e-6)
    assert float(out["acc"]) == pytest.approx(float((p.argmax(-1) == y.flatten()[keep]).double().mean()))
    score, correct = m.score_and_correct()
    assert score.shape == (5,) and correct.shape == (5,)  # one per image, not per pixel
    mi = r.mutual_information
    assert float(score[0]) == pytest.approx(float(mi[0, 2:].mean()), rel=1e-6)  # valid pixels only


def test_lstm_language_model_sequence_scores_and_rank():
    torch.manual_seed(2)
    model = TinyLM()
    tokens = torch.randint(0, 11, (12, 7))
    r = mc_predict(model, tokens, samples=5, seed=0)
    assert r.outputs.shape == (5, 12, 7, 11) and r.predictive_entropy.shape == (12, 7)
    ranked = rank(model, DataLoader(TensorDataset(tokens), batch_size=5), acquisition="bald", k=4, samples=5)
    assert ranked.scores.shape == (4,) and ranked.scores[0] >= ranked.scores[-1]
    # one batch: rank's masks are those of mc_predict with derive_seed(seed, 0); scores are per-sequence means
    full = rank(model, DataLoader(TensorDataset(tokens), batch_size=12), acquisition="bald", k=12, samples=5)
    same = mc_predict(model, tokens, samples=5, seed=derive_seed(0, 0), deterministic=False)
    per_sequence = same.mutual_information.double().mean(-1)
    assert torch.allclose(full.scores, per_sequence[full.indices], atol=1e-9)


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyLM()

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).transpose(1, 2), y, ignore_index=-100)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_on_a_language_model_with_padding_and_calibration(tmp_path):
    pl.seed_everything(0, verbose=False)
    seq = torch.arange(11).repeat(40)[: 40 * 8].reshape(40, 8) % 11  # a predictable sequence
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, -2:] = -100  # padding
    train = DataLoader(TensorDataset(x[:24], y[:24]), batch_size=8, shuffle=True)
    cal = DataLoader(TensorDataset(x[24:32], y[24:32]), batch_size=8)
    val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)
    cb = MCDropoutUncertainty(samples=4, seed=0, ignore_index=-100, calibrate=True, calibration_loader=cal,
                              plot_dir=str(tmp_path / "plots"))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(LitLM(), train, val)
    m = cb.last_metrics
    assert 0 <= m["mc/acc"] <= 1 and m["mc/nll"] > 0 and cb.temperature is not None
    assert m["cal/nll_after"] > 0 and "mc/aurc" in m
    assert sorted(p.name for p in (tmp_path / "plots" / "epoch=001").iterdir()) == [
        "referral.svg", "reliability.svg", "risk_coverage.svg", "score_hist.svg"]
