"""Embedding dropout (Gal and Ghahramani 2016; AWD-LSTM): the ``embedding`` kind and its range,
whole words dropped per sequence at the planned rate, MC dropout sampling it, and the AWD-LSTM
combination with locked_dropout and dropconnect on an LSTM language model."""
from __future__ import annotations

import copy
import pickle

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.layers import EmbeddingDropout, apply_embedding_dropout, embedding_dropout
from regfw.placement import kinds as K
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_predict, stochastic_modules

VOCAB = 40


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear over the vocabulary, predicting the word after the sequence."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.decoder(out[:, -1])


AWD = {"embedding_dropout": {}, "locked_dropout": {"recurrent": 0.3}, "dropconnect": {"recurrent": 0.5}}


def _lm(regularizers=None, n: int = 512) -> RegularizedModule:
    torch.manual_seed(0)
    return RegularizedModule(LSTMLanguageModel(), regularizers=regularizers or AWD, n_examples=n,
                             example_input=torch.zeros(2, 12, dtype=torch.long))


def test_embedding_is_a_kind_with_its_own_default_range():
    assert K.builtin_kind(nn.Embedding(5, 3)) == K.EMBEDDING == "embedding"
    assert K.RATE_TABLE[K.EMBEDDING] == K.RateRange(0.05, 0.2, 0.1)
    assert K.EMBEDDING in K.RATE_KINDS and K.EMBEDDING in K.KINDS
    small, large = (K.policy_rate(K.EMBEDDING, n, 10**5) for n in (500, 10**6))
    assert 0.05 <= large < small <= 0.2


def test_whole_words_are_dropped_per_sequence_at_the_rate():
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, 4)
    tokens = torch.randint(0, VOCAB, (4000, 30))
    vectors = emb(tokens)
    out = embedding_dropout(vectors, tokens, 0.2, VOCAB)
    dropped = out.abs().sum(-1) == 0
    # every occurrence of a word in a sequence shares its fate; kept ones are scaled by 1 / (1 - p)
    for b in range(20):
        for word in tokens[b].unique():
            fate = dropped[b][tokens[b] == word]
            assert fate.all() or not fate.any()
    kept = ~dropped
    assert torch.allclose(out[kept], vectors[kept] / 0.8)
    # the share of (sequence, word) pairs dropped is p (about 80,000 pairs: 5 SE = 0.007)
    pairs = torch.unique(torch.arange(4000).unsqueeze(1) * VOCAB + tokens)
    pair_dropped = torch.zeros(4000 * VOCAB, dtype=torch.bool)
    pair_dropped[(torch.arange(4000).unsqueeze(1) * VOCAB + tokens)[dropped]] = True
    assert pair_dropped[pairs].float().mean().item() == pytest.approx(0.2, abs=0.007)
    # the same word in two sequences is dropped independently: one mask per sequence
    first, second = dropped[:, 0], dropped[:, 1]
    same = tokens[:, 0] == tokens[:, 1]
    assert 0 < (first & ~second & ~same).sum()
    assert embedding_dropout(vectors, tokens, 0.2, VOCAB, training=False) is vectors


def test_the_layer_keeps_parameters_state_dict_and_survives_copy_pickle_and_to():
    emb = nn.Embedding(VOCAB, 4)
    keys = list(emb.state_dict())
    apply_embedding_dropout(emb, 0.3, batch_dim=0)
    apply_embedding_dropout(emb, 0.1)  # again: the rate changes, no second hook
    assert list(emb.state_dict()) == keys and len(emb._forward_hooks) == 1
    assert emb.regfw_embedding_dropout.p == 0.1
    for clone in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb)), copy.deepcopy(emb).to(torch.float64)):
        clone.train()
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (200, 10))
        assert (clone(tokens).abs().sum(-1) == 0).any()  # the hook came along
        assert clone.eval()(tokens).abs().sum(-1).min() > 0
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        EmbeddingDropout(1.5)


def test_the_awd_lstm_combination_is_planned_on_the_lstm_language_model():
    module = _lm()
    rows = {(r.regularizer, r.path): r for r in module.plan.rows()}
    emb = rows[("embedding_dropout", "embed")]
    assert emb.kind == "embedding" and emb.action == "wrap" and emb.options == {"batch_dim": 0}
    assert 0.05 <= emb.rate <= 0.2 and "whole words, batch dim 0" in emb.reason
    assert rows[("locked_dropout", "lstm")].rate == 0.3 and rows[("dropconnect", "lstm")].rate == 0.5
    plain = LSTMLanguageModel()
    assert list(module.model.state_dict()) == list(plain.state_dict())  # names unchanged by all three
    found = sorted(type(m).__name__ for _, m in stochastic_modules(module))
    assert found == ["EmbeddingDropout", "LockedDropout", "WeightDrop"]


def test_mc_dropout_samples_the_embedding_dropout_alone_and_in_the_combination():
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16, 12))
    alone = _lm({"embedding_dropout": {"embedding": 0.2}})
    assert [type(m).__name__ for _, m in stochastic_modules(alone)] == ["EmbeddingDropout"]
    for module in (alone, _lm()):
        result = mc_predict(module, tokens, samples=8, seed=0, strategy="auto")
        spread = result.outputs.std(0)
        assert spread.min() > 0  # every example of the batch varies across samples
        # samples are independent across T: no two samples are the same pass
        flat = result.outputs.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 0


def test_the_combination_trains_under_lightning():
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (256, 12))
    y = (x[:, -1] + 1) % VOCAB  # the next word is the last one plus one
    module = _lm(n=256)
    module.hparams.optimizer["lr"] = 1e-2
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    before = torch.nn.functional.cross_entropy(module.eval()(x), y).item()
    module.train()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    after = torch.nn.functional.cross_entropy(module.eval()(x), y).item()
    assert after < 0.6 * before  # measured: 3.70 -> 1.58
