"""Dict batches and ``ModelOutput``s through training, validation-time MC dropout and the command line:
``RegularizedModule``, the ``Regularize`` callback and ``MCDropoutUncertainty`` on Hugging Face
models built from tiny configs with random weights (nothing downloaded), and ``regfw fit`` /
``predict`` / ``rank`` on a config whose data module yields dicts and whose model takes keyword
inputs. The data module and the models below are also the config's ``class_path`` targets."""
from __future__ import annotations

import csv
import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset

from regfw.train.module import RegularizedModule
from regfw.train.regularize import Regularize
from regfw.uncertainty import MCDropoutUncertainty
from regfw.uncertainty.fast import cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config

VOCAB, LENGTH = 40, 8


class TokenSet(Dataset):
    """Right-padded token sequences (id 0 under a zero attention mask); the label says whether most
    real tokens are below ``VOCAB / 2``. Examples are dicts, so a DataLoader yields dict batches."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        keep = torch.randint(3, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < keep[:, None]).long()
        self.ids = self.ids * self.mask
        low = ((self.ids > 0) & (self.ids < VOCAB // 2)).sum(1).float() / keep
        self.labels = (low > 0.5).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TokenData(pl.LightningDataModule):
    """A data module of dict batches ``{"input_ids", "attention_mask", "labels"}``."""

    task = "classification"
    num_outputs = 2

    def __init__(self, batch_size: int = 32, n_train: int = 256) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n_train = n_train
        self.train_set, self.val_set = TokenSet(n_train, 0), TokenSet(64, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def train_eval_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class BagOfTokens(nn.Module):
    """A plain torch model that takes keyword inputs and returns a dict holding ``logits``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = attention_mask[..., None].float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return {"logits": self.head(torch.relu(self.fc(pooled))), "pooled": pooled}


class ScoresOfTokens(BagOfTokens):
    """Returns two tensors and no ``logits``: the tensor to read is named by ``model.output_key``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(input_ids, attention_mask)
        return {"scores": out["logits"], "pooled": out["pooled"]}


def tiny_bert(num_labels: int = 2, seed: int = 0) -> nn.Module:
    """A BERT classifier from a tiny config with random weights (a ``model.class_path`` factory)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.BertForSequenceClassification(config)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", **kw)


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_regularized_module_learns_from_dict_batches_with_a_dict_output():
    pl.seed_everything(0, verbose=False)
    data = TokenData()
    example = _inputs(next(iter(data.val_dataloader())))
    module = RegularizedModule(BagOfTokens(), regularizers={"dropout": {}}, optimizer={"name": "adam", "lr": 1e-2},
                               n_examples=256, example_input=example)
    assert module.hparams.input_shape == {"input_ids": [32, LENGTH], "attention_mask": [32, LENGTH]}
    assert module.hparams.input_dtype == {"input_ids": "int64", "attention_mask": "int64"}
    # planned on the dict example: the hidden layer gets its dropout
    assert "fc.regfw_dropout" in dict(module.model.named_modules()), module.plan.format()
    _trainer(max_epochs=8).fit(module, data)
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            correct += int((module(_inputs(batch)).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    # the model saw its keyword inputs (mask included) and the loss read its "logits": well above chance
    assert correct / total > 0.8, correct / total


@pytest.mark.parametrize("batched", [True, False], ids=["one-call", "two-calls"])
def test_rdrop_repeats_every_tensor_of_a_dict_batch(batched):
    pl.seed_everything(0, verbose=False)
    data = TokenData(n_train=64)
    seen = []
    model = BagOfTokens()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append({k: v.shape for k, v in kwargs.items()}),
                                    with_kwargs=True)
    module = RegularizedModule(model, regularizers={"dropout": {}, "rdrop": {"batched": batched, "alpha": 1.0}},
                               n_examples=64, example_input=_inputs(next(iter(data.val_dataloader()))))
    seen.clear()
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, data)
    penalty = float(trainer.callback_metrics["train_penalty/rdrop"])
    assert math.isfinite(penalty) and penalty > 0  # two dropout passes of the same examples disagree
    rows = [32 * 2] if batched else [32, 32]
    assert [s["input_ids"][0] for s in seen] == rows * 2  # ids and mask repeated together, batch by batch
    assert all(s["attention_mask"] == s["input_ids"] for s in seen)


def test_regularized_module_trains_bert_on_dict_batches_and_its_checkpoint_reloads(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = TokenData(n_train=64)
    batch = next(iter(data.val_dataloader()))
    module = RegularizedModule(tiny_bert(), regularizers={"dropout": {}, "weight_decay": {}}, n_examples=64,
                               example_input=_inputs(batch))
    before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("classifier" in k for k in changed) and any("encoder" in k for k in changed)
    path = tmp_path / "bert.ckpt"
    trainer.save_checkpoint(path)
    loaded = RegularizedModule.load_from_checkpoint(path, model=tiny_bert(seed=1), weights_only=False).eval()
    assert isinstance(loaded.example_input_array, dict)  # rebuilt from the recorded shapes and dtypes
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_inputs(batch)), module(_inputs(batch)), rtol=0, atol=0)


class OwnHFModule(pl.LightningModule):
    """A LightningModule of one's own around a Hugging Face classifier, with no wrapper: its forward
    passes keyword inputs through and returns the ``ModelOutput``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def forward(self, **inputs: torch.Tensor):
        return self.model(**inputs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(**_inputs(batch)).logits, batch["labels"])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(**_inputs(batch)).logits, batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_regularize_callback_reads_the_logits_of_the_model_output_for_its_loss_terms():
    pl.seed_everything(0, verbose=False)
    module = OwnHFModule()
    callback = Regularize({"dropout": {}, "confidence_penalty": {"strength": 0.5}}, target="model",
                          example_input=_inputs(next(iter(TokenData().val_dataloader()))))
    trainer = _trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, TokenData(n_train=64))
    penalty = float(trainer.callback_metrics["train_penalty/confidence_penalty"])
    # -strength x the entropy of softmax(logits) of 2 classes: in (-0.5 ln 2, 0), so the logits were read
    assert -0.5 * math.log(2) - 1e-6 <= penalty < 0, penalty


def test_mc_callback_samples_dict_batches_through_a_model_output():
    found = {}
    for run, strategy in enumerate(("batched", "auto", "auto")):
        pl.seed_everything(0, verbose=False)
        module = OwnHFModule()
        mc = MCDropoutUncertainty(samples=6, strategy=strategy, plots=False, seed=0)
        with warnings.catch_warnings():  # auto splits the model (graph from torch.export): no fallback warning
            warnings.filterwarnings("error", message="Monte Carlo strategy 'auto' uses 'batched'")
            _trainer(max_epochs=1, callbacks=[mc]).fit(module, TokenData(n_train=64))
        found[strategy, run] = mc.last_metrics
    for metrics in found.values():
        assert 0.0 <= metrics["mc/acc"] <= 1.0
        assert math.isfinite(metrics["mc/nll"]) and metrics["mc/nll"] > 0
        assert metrics["mc/mean_mi"] > 0  # the hidden dropout sampled the logits
    assert found["auto", 1] == found["auto", 2]  # the same seed, the same masks, the same statistics
    splits = list(cache._CACHE[module].splits.values())  # the module of the last run
    assert splits and all(s.ok and s.capture == "torch.export" for s in splits)  # auto split it: no fallback
    rows = next(iter(TokenData().val_dataloader()))["input_ids"].shape[0]
    # what auto ran is work.py's choice (tests/uncertainty/test_auto_choice.py): its split drew its own samples,
    # batched exactly batched's
    assert (found["auto", 1] != found["batched", 0]) == splits[0].pays(rows, 6)


def test_mc_callback_output_key_from_yaml_and_a_wrong_key_named():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MCDropoutUncertainty, "mc")
    for text, key in (("mc: {output_key: logits, samples: 4, plots: false}", "logits"),
                      ("mc: {output_key: 0, samples: 4, plots: false}", 0)):
        callback = parser.instantiate_classes(parser.parse_string(text)).mc
        assert callback.output_key == key
    module = OwnHFModule()
    wrong = MCDropoutUncertainty(samples=4, strategy="batched", plots=False, output_key="scores")
    from regfw.model_io import OutputSelectionError

    with pytest.raises(OutputSelectionError, match=r"output_key='scores': the model output has no such entry; it is "
                                                   r"a SequenceClassifierOutput with keys 'logits'"):
        _trainer(max_epochs=1, limit_train_batches=1, callbacks=[wrong]).fit(module, TokenData(n_train=64))


CONFIG = """\
data: {{class_path: with_lightning.test_dict_batches.TokenData}}
model: {{class_path: {model}, loss: cross_entropy{output_key}}}
regularizers: {{dropout: {{}}}}
optimizer: {{name: adam, lr: 0.01}}
trainer: {{max_epochs: 2, enable_progress_bar: false}}
uncertainty: {{samples: 4, plots: false, strategy: {strategy}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize(("model", "strategy"), [("ScoresOfTokens", "batched"), ("tiny_bert", "auto")],
                         ids=["dict-model", "bert"])
def test_regfw_fit_predict_and_rank_on_dict_batches(tmp_path, monkeypatch, capsys, model, strategy):
    from regfw.cli.main import main

    monkeypatch.chdir(tmp_path)
    # the dict model's output has no logits: model.output_key names its tensor (kept in the checkpoint)
    key = ", output_key: scores" if model == "ScoresOfTokens" else ""
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(model=f"with_lightning.test_dict_batches.{model}",
                                                     strategy=strategy, output_key=key))
    assert main(["fit", "cfg.yaml", "--run-dir", "run"]) == 0
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    assert main(["predict", "cfg.yaml", str(ckpt), "--out", "pred.csv"]) == 0
    assert capsys.readouterr().out.startswith("wrote pred.csv: 64 predictions")
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64  # one row per validation input
    assert {"prediction", "prob_0", "prob_1", "mutual_information", "score", "refer"} <= set(rows[0])
    assert all(abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-5 for r in rows)
    assert main(["rank", "cfg.yaml", str(ckpt), "--k", "5"]) == 0
    out = capsys.readouterr().out
    ranked = [line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(ranked) == 5 and out.startswith("top 5 of the val split by bald"), out
