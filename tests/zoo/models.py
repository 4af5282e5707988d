"""The zoo's models: real torchvision, timm and torch definitions with random weights (never a
download: ``weights=None``, ``pretrained=False``), small inputs (64x64 images, batch 4).

Every model gets the residual-branch scales a trained net has (:func:`train_like_scales`): at
initialisation several architectures silence their residual branches on purpose, by a per-channel
scale that starts tiny (layer scale: timm's ConvNeXt multiplies each branch by 1e-6, timm's
``LayerScale`` starts at 1e-5) or at zero (timm's ResNets zero the last BatchNorm weight of each
branch). Stochastic depth on a silent branch moves the output by about the scale (a spread of
1e-8 in ConvNeXt's probabilities), below the floating-point noise between batch sizes, so MC
dropout would be tested on noise. Trained nets have such scales of order 0.1-1.

Random-init torchvision mobilenet/efficientnet nets give near-constant logits: the BatchNorm
layers hold their initial statistics (mean 0, variance 1) while the activations they see are far
from that, and the last layer's tiny initial weights squash what is left. :func:`prepare` fixes
both the way a trained net would look: BatchNorm statistics from a few random batches (training
mode, momentum None = a plain average, no gradient step), then the last weight layer scaled so the
logits spread over a few units. Without it MC spread and auto-vs-loop agreement would be tested
on outputs that barely move.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BATCH = 4
IMAGE = 64
VOCAB = 50
SEQ = 12


@dataclass
class ZooModel:
    """A model of the zoo, how to feed it and which variants apply to it."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], Any]
    variants: tuple[str, ...]
    #: maps the stacked MC outputs [T, B, ...] to [T, B', C] logits (sequence / per-pixel models)
    output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the model returns a dict: the key to sample
    output_key: str | None = None
    prepare: bool = False
    notes: dict = field(default_factory=dict)


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


class TextClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers, dropout 0.1) -> mean over tokens -> Linear."""

    def __init__(self, d_model: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class LSTMLanguageModel(nn.Module):
    """AWD-LSTM style (Merity et al. 2018): Embedding -> 2-layer LSTM -> Linear over the vocabulary;
    logits [B, L, V]."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.decoder(out)


def sequence_logits(out: torch.Tensor) -> torch.Tensor:
    """[T, B, L, V] -> [T, B*L, V]: every position is a prediction."""
    return out.reshape(out.shape[0], -1, out.shape[-1])


def pixel_logits(out: torch.Tensor) -> torch.Tensor:
    """[T, B, C, H, W] -> [T, B*H*W, C]: every pixel is a prediction."""
    return out.movedim(2, -1).reshape(out.shape[0], -1, out.shape[2])


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kw)
    return build


def _lraspp() -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)
    return build


CNN = ("dropout", "spatial_dropout", "dropblock", "drop_path")
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("resnet18", _tv("resnet18", num_classes=10), images, CNN),
    ZooModel("mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=10), images, CNN, prepare=True),
    ZooModel("efficientnet_b0", _tv("efficientnet_b0", num_classes=10), images, CNN, prepare=True),
    ZooModel("lraspp_mobilenet_v3_large", _lraspp, images, ("dropout", "spatial_dropout"),
             output_transform=pixel_logits, output_key="out", prepare=True),
    ZooModel("vit_tiny", _timm("vit_tiny_patch16_224", img_size=IMAGE, num_classes=10), images,
             ("dropout", "drop_path", "attention_dropout")),
    ZooModel("convnext_atto", _timm("convnext_atto", num_classes=10), images, ("dropout", "drop_path")),
    ZooModel("convnext_atto_dp", _timm("convnext_atto", num_classes=10, drop_path_rate=0.1), images,
             ("dropout", "drop_path")),
    # timm zero-initialises the last BatchNorm weight of every residual branch: train_like_scales gives it one
    ZooModel("resnet18d", _timm("resnet18d", num_classes=10), images, CNN),
    ZooModel("text_transformer", TextClassifier, tokens, ("dropout", "attention_dropout")),
    ZooModel("lstm_lm", LSTMLanguageModel, tokens, ("dropout", "locked_dropout+dropconnect"),
             output_transform=sequence_logits),
)}


#: The detection model: torchvision's cheapest detector on the CPU, images resized to 64 (min_size and
#: max_size), so one eval pass takes a fraction of a second. Its forward takes a list of images.
DETECTOR_CLASSES = 5


def detector() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=DETECTOR_CLASSES,
                                                 min_size=IMAGE, max_size=IMAGE)


def detection_images() -> list[torch.Tensor]:
    """Two images in [0, 1], as torchvision detection models take them."""
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, IMAGE, IMAGE, generator=gen) for _ in range(2)]


def detection_targets() -> list[dict[str, torch.Tensor]]:
    """One box per image, what a detection model's training step takes beside the images."""
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0]]), "labels": torch.tensor([3])}]


DETECTION = ZooModel("fasterrcnn_mobilenet_v3_large_320_fpn", detector, detection_images, ("dropout",))


#: A per-channel scale initialised to one constant of at most this magnitude silences its branch (layer scale
#: starts at 1e-6 or 1e-5; a trained one is of order 0.1-1).
TINY_SCALE = 1e-3
#: The range trained residual-branch scales are drawn from.
TRAINED_SCALE = (0.1, 1.0)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def silencing_scales(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The per-channel scales ``model`` starts with that silence what they multiply, found by what they
    are, never by name: a parameter with one value per channel (one dimension, or one non-singleton one)
    holding a single non-zero constant of magnitude at most :data:`TINY_SCALE` (layer scale; biases start
    at zero or at random values, never at one tiny non-zero constant), or a normalisation layer's weight
    (its per-channel scale) that is all zero (zero-init-last)."""
    found = []
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            # one value per channel, in any broadcast shape: (C,), or (C, 1, 1) as torchvision's ConvNeXt holds it
            if max(param.shape, default=0) != param.numel() or not param.is_floating_point() or param.numel() == 0:
                continue
            values = param.detach().reshape(-1)
            value = float(values[0])
            constant = bool((values == value).all())
            tiny = constant and 0 < abs(value) <= TINY_SCALE
            zero_norm_scale = isinstance(module, NORMS) and name == "weight" and constant and value == 0
            if tiny or zero_norm_scale:
                found.append((f"{path}.{name}" if path else name, param))
    return found


@torch.no_grad()
def train_like_scales(model: nn.Module, seed: int = 3) -> list[str]:
    """Every scale :func:`silencing_scales` finds drawn uniformly from :data:`TRAINED_SCALE`, per channel
    (seeded); returns their paths."""
    gen = torch.Generator().manual_seed(seed)
    low, high = TRAINED_SCALE
    found = silencing_scales(model)
    for _, param in found:
        param.copy_(torch.empty(param.shape).uniform_(low, high, generator=gen).to(param))
    return [path for path, _ in found]


def last_weight_layer(model: nn.Module) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


@torch.no_grad()
def prepare(model: nn.Module, example: torch.Tensor, batches: int = 3, logit_scale: float = 3.0) -> nn.Module:
    """BatchNorm statistics from ``batches`` random batches, then the last weight layer scaled so
    the logits have a standard deviation of about ``logit_scale`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(2)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    for _ in range(batches):
        model(torch.randn(example.shape, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    out = model(example)
    out = out["out"] if isinstance(out, dict) else out
    layer = last_weight_layer(model)
    layer.weight.mul_(logit_scale / float(out.std().clamp_min(1e-6)))
    return model


def build(entry: ZooModel, seed: int = 0) -> tuple[nn.Module, Any]:
    """The model with seeded random weights and a trained net's residual-branch scales, in eval mode,
    and its example input."""
    torch.manual_seed(seed)
    model = entry.build()
    train_like_scales(model)
    x = entry.example()
    if entry.prepare:
        prepare(model, x)
    return model.eval(), x
