"""Hugging Face ``transformers`` models for the zoo: tiny configs, random weights, nothing downloaded
(``HF_HUB_OFFLINE=1``), across encoders, decoders, encoder-decoders and vision Transformers.

Each entry builds a model with its own loss head (``labels`` in the batch), the batch as the dict
of keyword arguments the model takes, and names its two kinds of dropout in the config: the hidden
dropout (sub-layer outputs, embeddings) and the attention-probability dropout, so a test can switch
either off.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from torch import nn  # noqa: E402

BATCH = 4
SEQ = 8
VOCAB = 64
IMAGE = 32
CLASSES = 3
#: Tiny sizes shared by every text config.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
             vocab_size=VOCAB, max_position_embeddings=64)


@dataclass(frozen=True)
class HFModel:
    """One Hugging Face architecture of the zoo."""

    name: str
    family: str  #: encoder, decoder, encoder-decoder or vision
    make: Callable[[dict], nn.Module]  #: config overrides -> model
    batch: Callable[[], dict[str, torch.Tensor]]  #: the keyword arguments, labels included
    hidden: tuple[str, ...]  #: config fields of the hidden dropout
    attention: tuple[str, ...]  #: config fields of the attention-probability dropout

    def build(self, hidden: float | None = None, attention: float | None = None) -> nn.Module:
        """The model with random weights (seeded), its hidden / attention dropout set where given."""
        over: dict[str, Any] = {}
        for fields, rate in ((self.hidden, hidden), (self.attention, attention)):
            if rate is not None:
                over.update({f: rate for f in fields})
        torch.manual_seed(0)
        return self.make(over).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def text_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row: the mask must travel with the ids
    return {"input_ids": _ids(), "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def lm_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long), "labels": _ids(2)}


def seq2seq_batch() -> dict[str, torch.Tensor]:
    labels = _ids(2)
    return {"input_ids": _ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "decoder_input_ids": torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), labels[:, :-1]], 1),
            "labels": labels}


def image_batch() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)),
            "labels": torch.tensor([0, 1, 2, 1])}


def _classifier(config_cls: type, model_cls: type, **fixed: Any) -> Callable[[dict], nn.Module]:
    def make(over: dict) -> nn.Module:
        return model_cls(config_cls(**{**fixed, **over}))
    return make


_BERT = ("hidden_dropout_prob",), ("attention_probs_dropout_prob",)
_VISION = dict(image_size=IMAGE, patch_size=8, num_channels=3, num_labels=CLASSES)

HF_ZOO: dict[str, HFModel] = {m.name: m for m in (
    HFModel("bert", "encoder", _classifier(tf.BertConfig, tf.BertForSequenceClassification, num_labels=CLASSES,
                                           **SMALL), text_batch, *_BERT),
    HFModel("roberta", "encoder", _classifier(tf.RobertaConfig, tf.RobertaForSequenceClassification,
                                              num_labels=CLASSES, pad_token_id=1, **SMALL), text_batch, *_BERT),
    HFModel("electra", "encoder", _classifier(tf.ElectraConfig, tf.ElectraForSequenceClassification,
                                              num_labels=CLASSES, embedding_size=16, **SMALL), text_batch, *_BERT),
    HFModel("distilbert", "encoder", _classifier(
        tf.DistilBertConfig, tf.DistilBertForSequenceClassification, num_labels=CLASSES, vocab_size=VOCAB, dim=32,
        n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64), text_batch,
        ("dropout", "seq_classif_dropout"), ("attention_dropout",)),
    HFModel("gpt2", "decoder", _classifier(tf.GPT2Config, tf.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2,
                                           n_head=2, n_positions=64), lm_batch,
            ("resid_pdrop", "embd_pdrop"), ("attn_pdrop",)),
    HFModel("llama", "decoder", _classifier(tf.LlamaConfig, tf.LlamaForCausalLM, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                            vocab_size=VOCAB, max_position_embeddings=64), lm_batch,
            (), ("attention_dropout",)),
    HFModel("qwen2", "decoder", _classifier(tf.Qwen2Config, tf.Qwen2ForCausalLM, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                            vocab_size=VOCAB, max_position_embeddings=64), lm_batch,
            (), ("attention_dropout",)),
    HFModel("t5", "encoder-decoder", _classifier(tf.T5Config, tf.T5ForConditionalGeneration, vocab_size=VOCAB,
                                                 d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                                                 decoder_start_token_id=0), seq2seq_batch, ("dropout_rate",), ()),
    HFModel("bart", "encoder-decoder", _classifier(
        tf.BartConfig, tf.BartForConditionalGeneration, vocab_size=VOCAB, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
        decoder_ffn_dim=37, max_position_embeddings=64), seq2seq_batch,
        ("dropout", "activation_dropout"), ("attention_dropout",)),
    HFModel("vit", "vision", _classifier(tf.ViTConfig, tf.ViTForImageClassification, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **_VISION),
            image_batch, *_BERT),
    HFModel("deit", "vision", _classifier(tf.DeiTConfig, tf.DeiTForImageClassification, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                          **_VISION), image_batch, *_BERT),
    HFModel("swin", "vision", _classifier(tf.SwinConfig, tf.SwinForImageClassification, image_size=IMAGE,
                                          patch_size=4, num_channels=3, num_labels=CLASSES, embed_dim=16,
                                          depths=[1, 1], num_heads=[2, 2], window_size=4,
                                          # HF's own drop path (SwinDropPath) is not recognised as stochastic
                                          # yet: MC dropout would not sample it
                                          drop_path_rate=0.0),
            image_batch, ("hidden_dropout_prob",), ("attention_probs_dropout_prob",)),
)}


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch less its labels: what the model is called with to predict."""
    return {k: v for k, v in batch.items() if k != "labels"}
