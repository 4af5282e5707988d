"""Monte Carlo dropout on models that take keyword or positional inputs and return a ``ModelOutput``:
real Hugging Face ``transformers`` models built from tiny configs with random weights (nothing is
downloaded), sampled as they are, with no wrapper, by every strategy."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers
from noise_floor import batch_noise_floor, far_above_floor
from torch import nn

from regfw.model_io import OutputSelectionError
from regfw.uncertainty import mc_predict
from regfw.uncertainty.calibration import Temperature

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config


def tiny_bert(seed: int = 0, labels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=labels, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0,
        initializer_range=0.5)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.2, embd_pdrop=0.2,
                                     attn_pdrop=0.0, initializer_range=0.5)
    return transformers.GPT2ForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.2, decoder_start_token_id=0, pad_token_id=0, initializer_factor=4.0)
    return transformers.T5ForConditionalGeneration(config).eval()


def token_batch(rows: int = 4, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with right padding (id 0) under an attention mask; every row keeps at least 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (rows, length), generator=g)
    keep = torch.randint(3, length + 1, (rows,), generator=g)
    mask = (torch.arange(length) < keep[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _quiet_auto(**kw):
    """``mc_predict`` with strategy ``auto``, returning the result and the fallback warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = mc_predict(strategy="auto", **{"choose": False, **kw})  # the split itself
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_every_strategy_samples_the_logits_of_a_model_output_from_dict_inputs(build):
    model, x = build(), token_batch()
    with torch.no_grad():
        eval_logits = model(**x).logits
    loop = mc_predict(model, x, samples=6, strategy="loop", seed=3)
    # batched in chunks of one sample (B rows): the same passes in the same order as loop, so the same masks
    batched = mc_predict(model, x, samples=6, strategy="batched", seed=3, chunk_rows=4)
    auto, said = _quiet_auto(model=model, inputs=x, samples=6, seed=3, chunk_rows=4)
    assert loop.outputs.shape == (6, 4, 3)
    torch.testing.assert_close(batched.outputs, loop.outputs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto.outputs, batched.outputs, rtol=0, atol=0)
    # auto: a clean fall-back to batched for keyword inputs, said once, with the same statistics
    assert auto.strategy == "auto" and len(said) <= 1
    assert all("uses 'batched'" in s for s in said)
    torch.testing.assert_close(loop.deterministic, eval_logits)  # the eval pass read .logits too
    assert float(loop.outputs.var(0).min()) > 1e-6  # the hidden dropout really sampled


def test_strategies_sample_one_distribution_on_dict_inputs_far_above_the_noise_floor():
    model, x = tiny_bert(), token_batch()
    t = 600
    a = mc_predict(model, x, samples=t, strategy="loop", seed=0, task="regression").outputs.double()
    b = mc_predict(model, x, samples=t, strategy="batched", seed=1, task="regression", chunk_rows=397).outputs.double()
    c, _ = _quiet_auto(model=model, inputs=x, samples=t, seed=2, task="regression")
    c_out = c.outputs.double()
    # means: within 5 standard errors (two-sample z per logit), each standard error first asserted 100x above the
    # floating-point noise between loop's 4 rows and the batched chunks' 397 and 2400 rows
    floor = batch_noise_floor(model, x, rows=(397, 4 * t))
    for other, name in ((b, "batched"), (c_out, "auto")):
        se = (a.var(0) / t + other.var(0) / t).sqrt()
        far_above_floor(se, floor, f"the standard error of the MC means ({name})")
        z = (a.mean(0) - other.mean(0)).abs() / se
        assert z.max() < 5, (name, z)
        ratio = a.var(0) / other.var(0)  # the standard error of a variance ratio at T=600 is ~6%
        assert ratio.min() > 0.75 and ratio.max() < 1.33, (name, ratio)


def test_the_attention_mask_comes_along_when_the_batch_is_repeated():
    model, x = tiny_bert(), token_batch()
    changed = dict(x)
    changed["input_ids"] = torch.where(x["attention_mask"].bool(), x["input_ids"], torch.full_like(x["input_ids"], 7))
    assert not torch.equal(changed["input_ids"], x["input_ids"])  # some padded positions hold other tokens now
    for strategy in ("batched", "loop"):
        a = mc_predict(model, x, samples=5, strategy=strategy, seed=0, chunk_rows=11)
        b = mc_predict(model, changed, samples=5, strategy=strategy, seed=0, chunk_rows=11)
        # the masked positions are invisible to every sample: the mask was repeated with its rows
        torch.testing.assert_close(a.outputs, b.outputs, rtol=1e-5, atol=1e-5)
    # the check can fail: without the mask the padded tokens change the samples
    unmasked = mc_predict(model, {"input_ids": changed["input_ids"]}, samples=5, strategy="batched", seed=0,
                          chunk_rows=11)
    assert (unmasked.outputs - a.outputs).abs().max() > 1e-3


def test_t5_decoder_inputs_are_repeated_with_the_encoder_inputs():
    model = tiny_t5()
    x = token_batch(rows=3, length=6)
    x["decoder_input_ids"] = torch.randint(1, 40, (3, 4), generator=torch.Generator().manual_seed(5))
    loop = mc_predict(model, x, samples=4, strategy="loop", seed=0)
    batched = mc_predict(model, x, samples=4, strategy="batched", seed=0, chunk_rows=3)
    auto, _ = _quiet_auto(model=model, inputs=x, samples=4, seed=0, chunk_rows=3)
    assert loop.outputs.shape == (4, 3, 4, 40)  # [T, B, decoder length, vocabulary]
    assert loop.summary.mutual_information.shape == (3, 4)  # one score per decoded position
    torch.testing.assert_close(batched.outputs, loop.outputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto.outputs, batched.outputs, rtol=0, atol=0)
    one_chunk = mc_predict(model, x, samples=4, strategy="batched", seed=0)  # 12 rows in one pass
    assert one_chunk.outputs.shape == (4, 3, 4, 40)
    assert float(one_chunk.outputs.var(0).mean()) > 1e-6


def test_flags_and_broadcast_tensors_among_keyword_inputs_are_passed_as_they_are():
    model, x = tiny_bert(), token_batch()
    # a flag, and position ids of one row that broadcast over the batch
    x = {**x, "return_dict": True, "position_ids": torch.arange(8)[None]}
    loop = mc_predict(model, x, samples=4, strategy="loop", seed=0)
    batched = mc_predict(model, x, samples=4, strategy="batched", seed=0, chunk_rows=4)
    torch.testing.assert_close(batched.outputs, loop.outputs, rtol=1e-5, atol=1e-6)
    one_chunk = mc_predict(model, x, samples=4, strategy="batched", seed=0)
    assert one_chunk.outputs.shape == (4, 4, 3)


class MaskedMean(nn.Module):
    """A plain torch model taking two positional arguments: features and a mask over positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.drop, self.head = nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h = self.drop(torch.relu(self.proj(x)))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled), {"pooled": pooled}  # a lone tensor beside a dict


def test_tuple_inputs_are_positional_arguments_in_every_strategy():
    model = MaskedMean().eval()
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(3, 6, 5, generator=g), torch.ones(3, 6)
    mask[0, 4:] = 0
    loop = mc_predict(model, (x, mask), samples=5, strategy="loop", seed=0)
    batched = mc_predict(model, (x, mask), samples=5, strategy="batched", seed=0, chunk_rows=3)
    auto, _ = _quiet_auto(model=model, inputs=(x, mask), samples=5, seed=0, chunk_rows=3)
    assert loop.outputs.shape == (5, 3, 2)
    torch.testing.assert_close(batched.outputs, loop.outputs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto.outputs, loop.outputs, rtol=1e-6, atol=1e-6)
    picked = mc_predict(model, (x, mask), samples=5, strategy="loop", seed=0, task="regression",
                        output_key=lambda out: out[1]["pooled"])
    assert picked.outputs.shape == (5, 3, 16)


def test_output_transform_applies_to_the_selected_tensor():
    model, x = tiny_bert(), token_batch()
    plain = mc_predict(model, x, samples=4, strategy="loop", seed=0)
    scaled = mc_predict(model, x, samples=4, strategy="loop", seed=0, output_transform=Temperature(2.0))
    torch.testing.assert_close(scaled.outputs, plain.outputs)  # the raw samples are the selected logits
    expected = torch.softmax(plain.outputs / 2.0, -1).mean(0)
    torch.testing.assert_close(scaled.summary.mean_probs, expected.to(scaled.summary.mean_probs.dtype))
    by_key = mc_predict(model, x, samples=4, strategy="loop", seed=0, output_key="logits")
    torch.testing.assert_close(by_key.outputs, plain.outputs, rtol=0, atol=0)


def test_a_selector_that_finds_nothing_names_what_the_output_holds():
    model, x = tiny_bert(), token_batch()
    with pytest.raises(OutputSelectionError, match=r"output_key='hidden_states': the model output has no such entry; "
                                                   r"it is a SequenceClassifierOutput with keys 'logits' "
                                                   r"\(Tensor\[4, 3\]\)\. Choose the tensor to read with "
                                                   r"output_key='logits'"):
        mc_predict(model, x, samples=3, strategy="batched", seed=0, output_key="hidden_states")


def test_a_list_is_one_argument_and_only_loop_takes_it():
    class Images(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop, self.fc = nn.Dropout(0.5), nn.Linear(4, 2)

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return self.fc(self.drop(torch.stack([i.mean((1, 2)) for i in images])))

    images = [torch.randn(4, 3, 3), torch.randn(4, 5, 5)]
    assert mc_predict(Images(), images, samples=3, strategy="loop", seed=0).outputs.shape == (3, 2, 2)
    with pytest.raises(TypeError, match=r"mc_predict: inputs: got a list of 2 \(Tensor\[4, 3, 3\], "
                                        r"Tensor\[4, 5, 5\]\), expected one input batch for strategy 'batched': a "
                                        r"tensor \[B, \.\.\.\], a dict of keyword arguments or a tuple of positional "
                                        r"arguments"):
        mc_predict(Images(), images, samples=3, strategy="batched", seed=0)
