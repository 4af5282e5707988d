"""The sweep's models, read from ``selection.json`` (:mod:`.families`): how to build each with random
weights, feed it a small input, read its logits and compute its own training loss."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import model_checks as checks
import torch
from torch import Tensor, nn
from zoo.models import pixel_logits, prepare, train_like_scales

from .families import BATCH, SELECTION, VIDEO_FRAMES


@dataclass(frozen=True)
class SweepModel:
    """One model the sweep runs."""

    key: str  #: ``timm/<family>`` or ``torchvision/<group>/<builder>``
    source: str  #: ``timm`` or ``torchvision``
    name: str
    kwargs: dict
    size: int
    input: str  #: ``image``, ``video`` or ``images`` (a list, detection)
    group: str  #: ``classification``, ``segmentation``, ``detection``, ``video``

    @property
    def detection(self) -> bool:
        return self.input == "images"

    @property
    def output_key(self) -> str | None:
        return "out" if self.group == "segmentation" else None

    @property
    def transform(self) -> Callable[[Tensor], Tensor] | None:
        return pixel_logits if self.group == "segmentation" else None

    def example(self) -> Any:
        gen = torch.Generator().manual_seed(1)
        if self.input == "images":
            return [torch.rand(3, self.size, self.size, generator=gen) for _ in range(BATCH)]
        if self.input == "video":
            return torch.randn(BATCH, 3, VIDEO_FRAMES, self.size, self.size, generator=gen)
        return torch.randn(BATCH, 3, self.size, self.size, generator=gen)

    def construct(self) -> nn.Module:
        if self.source == "timm":
            import timm

            return timm.create_model(self.name, pretrained=False, **self.kwargs)
        import torchvision

        return torchvision.models.get_model(self.name, weights=None, **self.kwargs)

    def targets(self) -> list[dict[str, Tensor]]:
        """One box per image, for a detection model's own training loss."""
        s = self.size
        return [{"boxes": torch.tensor([[s * 0.1, s * 0.1, s * 0.6, s * 0.7]]), "labels": torch.tensor([1]),
                 "masks": torch.zeros(1, s, s, dtype=torch.uint8).index_fill_(1, torch.arange(8, 40), 1),
                 "keypoints": torch.tensor([[[s * 0.2, s * 0.2, 1.0]] * 17])} for _ in range(BATCH)]


def load() -> tuple[list[SweepModel], dict[str, str]]:
    """Every selected model, and every excluded family or builder with the reason."""
    data = json.loads(SELECTION.read_text())
    models, excluded = [], {}
    for source in ("timm", "torchvision"):
        part = data.get(source, {"chosen": {}, "excluded": {}})
        for key, entry in sorted(part["chosen"].items()):
            group = entry.get("group", "classification")
            models.append(SweepModel(f"{source}/{key}", source, entry["model"], entry["kwargs"], entry["size"],
                                     entry.get("input", "image"), group))
        excluded.update({f"{source}/{key}": why for key, why in part["excluded"].items()})
    return models, excluded


@dataclass
class Prototype:
    """A built model (eval mode) with its example input and what every case of it compares against, computed
    once per model: each case's surgery starts from a copy (:func:`build`), so these are the same for all."""

    model: nn.Module
    x: Any
    reference: Any  #: the eval output before any surgery
    own_doing: dict[str, set]  #: what a plain forward pass changes in the model (:func:`model_checks.volatile`)


_PROTOTYPE: dict[str, Prototype] = {}


@torch.no_grad()
def train_like_weights(model: nn.Module, seed: int = 4) -> list[str]:
    """Every weight matrix or kernel that starts all zero (timm zero-initialises the classifier of
    MLP-Mixer and gMLP) drawn from N(0, 1 / fan_in), as a trained net's are nonzero: a zero head makes
    every output its bias, so MC dropout would be tested on constant outputs. Returns their paths."""
    gen = torch.Generator().manual_seed(seed)
    found = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and not weight.any():
            fan_in = weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=gen) / fan_in ** 0.5)
            found.append(path)
    return found


def prototype(entry: SweepModel) -> Prototype:
    """The model of ``entry`` built once per worker (cases of one model run together: ``xdist_group``)."""
    if entry.key in _PROTOTYPE:
        return _PROTOTYPE[entry.key]
    _PROTOTYPE.clear()  # cases of one model run together (xdist_group): keep one prototype
    torch.manual_seed(0)
    model = entry.construct()
    train_like_scales(model)
    train_like_weights(model)
    x = entry.example()
    if not entry.detection:
        prepare(model, x)
    model.eval()
    with torch.no_grad():
        reference = copy.deepcopy(model(x))
    _PROTOTYPE[entry.key] = Prototype(model, x, reference, checks.volatile(model, lambda m: m(x)))
    return _PROTOTYPE[entry.key]


def statistics_with_dropout(model: nn.Module, x: Tensor) -> None:
    """The BatchNorm statistics (and logit scale) estimated again with the inserted layers active, as a
    training run with them leaves a model: :func:`build` estimated them before the surgery, without the
    dropout. Monte Carlo dropout on such statistics meets the variance shift of dropout before a
    BatchNorm in every block, compounded over the depth: on eca_resnext26ts, spatial dropout moves the
    logits by about 30 around an eval-mode spread of 3, every sample's softmax is one-hot on the same
    class, and the probabilities' MC spread (4e-12) lies under the floating-point floor, leaving nothing
    to compare. After the surgery's own checks (the eval output, which these statistics change)."""
    prepare(model, x)
    model.eval()


def build(entry: SweepModel) -> tuple[nn.Module, Any]:
    """A fresh copy of the model (random weights, trained-like scales and BatchNorm statistics, eval
    mode) and its example input; built once per worker and copied per case."""
    proto = prototype(entry)
    return copy.deepcopy(proto.model), proto.x
