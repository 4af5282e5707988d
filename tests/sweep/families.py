"""Which models the registry sweep runs: one model per timm family (up to :data:`MAX_PARAMS` parameters),
every torchvision builder up to :data:`TV_MAX_PARAMS`.

A timm *family* is a model name up to its first size or variant suffix (:func:`family`): the name is
split at ``_``; the first token is cut at its first digit (a version ``v2`` stays: ``mobilenetv3``,
``resnetv2``), and later tokens are kept while they are plain words that are not a size
(``coat_lite_mini`` -> ``coat_lite``, ``vit_tiny_patch16_224`` -> ``vit``, ``resnet18d`` -> ``resnet``).

From each family the sweep takes the smallest model that builds on the CPU with random weights and
runs one forward at a small input (:data:`SIZES`) within :data:`BUILD_SECONDS`. Smallest means fewest
parameters, counted on the ``meta`` device (nothing allocated); a name whose count is unknown (it cannot
be built on ``meta``) is ranked by its name (:func:`size_rank`: the size word, then the numbers in the
name) after the counted ones. Models over :data:`MAX_PARAMS` are not run; of the rest the next smallest is
tried when one does not build or run (:data:`CANDIDATES` tries in all). A torchvision builder is run at the
first of :data:`SIZES` at which it builds and runs, a detector with fewer proposals and detections than
torchvision's defaults (:data:`DETECTION_LIGHT`), and not over :data:`TV_MAX_PARAMS`.
``python -m tests.sweep.families`` (zoo environment) writes the choice to ``selection.json`` beside this
file, with the reason for every family or builder that has no such model; the sweep reads it and prints it
in its table.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

SELECTION = Path(os.environ.get("REGFW_SWEEP_SELECTION") or Path(__file__).with_name("selection.json"))
#: Square image sizes tried, smallest first (``img_size`` is passed where the constructor takes it).
SIZES = (64, 96, 128)
#: How long building one model and one forward of batch 2 may take on the CPU.
BUILD_SECONDS = 5.0
#: Models built per family, smallest first (names over :data:`MAX_PARAMS` are not counted: never built).
CANDIDATES = 3
#: A timm model with more parameters is not run (a family's smallest is tried first), counted on the ``meta``
#: device (nothing allocated) or, where that cannot build it, after building it: each of the sweep's cases copies
#: the model and runs it dozens of times (MC samples of two strategies, the noise floor, BatchNorm statistics).
MAX_PARAMS = 40_000_000
#: The same for a torchvision builder (each builder is run, not one per family): the sweep's 20 minutes on 2
#: cores hold those up to this size. Summed over their cases (CPU seconds, all four regularizers, detectors with
#: :data:`DETECTION_LIGHT`), the 10 builders of 40-50 M took 146 s; 34 of the 35 over 50 M took 1020 s, half the
#: whole sweep's 1950 (Keypoint R-CNN 39 s, ViT-L/16 73 s, RegNetY-128GF 200 s and 19 GB of memory; ViT-H/14
#: was not run: none of :data:`SIZES` is a multiple of its 14-pixel patch).
TV_MAX_PARAMS = 50_000_000
NUM_CLASSES = 10
BATCH = 2
#: Words that name a size, never a family.
SIZE_WORDS = frozenset(
    "tiny small base large huge giant gigantic atto femto pico nano micro mini medium little xxs xs xl xxl "
    "xlarge xxlarge xtiny xxtiny xx zepto ti wee pwee dwee dpwee dlittle betwixt mediumd giantopt pruned "
    "distilled".split())


def family(name: str) -> str:
    """The family of a timm model name (see the module docstring)."""
    tokens = name.split("_")
    first = re.match(r"([a-z]*?)(v\d+)?(\d|$)", tokens[0])
    head = (first.group(1) + (first.group(2) or "")) if first and first.group(1) else tokens[0]
    kept = [head]
    if head != tokens[0]:
        return head
    for token in tokens[1:]:
        if not token.isalpha() or len(token) == 1 or token in SIZE_WORDS:
            break
        kept.append(token)
    return "_".join(kept)


#: Size words, smallest first.
SIZE_ORDER = ("zepto", "atto", "femto", "pico", "nano", "micro", "xxtiny", "xtiny", "tiny", "xxs", "ti", "mini", "xs",
              "small", "little", "wee", "pwee", "dwee", "dpwee", "xsmall", "s", "lite", "medium", "mediumd", "m",
              "betwixt", "base", "b", "large", "l", "xl", "xlarge", "huge", "h", "xxlarge", "giant", "g", "gigantic")


def size_rank(name: str) -> tuple:
    """A sort key putting the smaller models of a family first, read off the name: the smallest size
    word in it (unknown: in the middle), then its numbers (depth, width, resolution) in order."""
    tokens = re.split(r"[_.]", name)
    ranks = [SIZE_ORDER.index(t) for t in tokens if t in SIZE_ORDER]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else SIZE_ORDER.index("base") - 0.5, numbers, len(name), name)


def meta_model(build: Any) -> torch.nn.Module | None:
    """``build()`` constructed on the meta device (nothing allocated); None when it cannot be."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - a model that needs real tensors at init
        return None


def params(model: torch.nn.Module | None) -> int | None:
    """The parameter count of ``model``; None for no model."""
    return None if model is None else sum(p.numel() for p in model.parameters())


def meta_params(build: Any) -> int | None:
    """The parameter count of ``build()`` constructed on the meta device; None when it cannot be."""
    return params(meta_model(build))


def train_forward(model: torch.nn.Module, x: Any) -> None:
    """One training-mode forward (the sweep's training step runs one): an auxiliary head that runs in training
    only may need a larger input than the eval pass (torchvision's Inception v3 below about 299 pixels).
    A failure is raised again naming the mode; the model is left in eval mode."""
    try:
        model.train()(x)
    except Exception as exc:
        raise RuntimeError(f"in training mode: {type(exc).__name__}: {exc}") from exc
    finally:
        model.eval()


def too_big(model: torch.nn.Module, cap: int = MAX_PARAMS) -> str:
    """Why a built model is not run (over ``cap`` parameters), or ``""``: for the models whose parameters
    cannot be counted on the ``meta`` device before they are built."""
    return over_cap(params(model), cap)


def over_cap(n: int | None, cap: int = MAX_PARAMS) -> str:
    """Why a model of ``n`` parameters is not run, or ``""`` (at most ``cap``, or not counted)."""
    return f"too slow ({n / 1e6:.0f} M parameters)" if n is not None and n > cap else ""


def timm_params(name: str) -> int | None:
    import timm

    return meta_params(lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES))


def try_timm(name: str) -> tuple[dict[str, Any] | None, str]:
    """The build arguments and input size at which ``name`` builds and runs, or None and why not."""
    import timm

    last = ""
    for size in SIZES:
        for with_size in (True, False):
            kw: dict[str, Any] = {"num_classes": NUM_CLASSES}
            if with_size:
                kw["img_size"] = size
            start = time.process_time()
            try:
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, **kw).eval()
                with torch.no_grad():
                    out = model(torch.randn(BATCH, 3, size, size))
                    train_forward(model, torch.randn(BATCH, 3, size, size))
            except Exception as exc:  # noqa: BLE001 - recorded as the reason
                last = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                if "pretrained" in str(exc).lower():
                    return None, f"needs pretrained weights ({last})"
                continue
            took = time.process_time() - start
            if too_big(model):
                return None, too_big(model)
            if not isinstance(out, torch.Tensor) or out.shape != (BATCH, NUM_CLASSES):
                last = f"output {type(out).__name__} {getattr(out, 'shape', '')}, not logits [B, C]"
                continue
            if took > BUILD_SECONDS:
                return None, f"too slow (build and one forward {took:.1f} s CPU at {size}x{size})"
            return {"kwargs": kw, "size": size}, ""
    return None, f"does not build at a small input on CPU ({last})"


def select_timm() -> dict[str, Any]:
    """One model per family (see the module docstring)."""
    import timm

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(family(name), []).append(name)
    chosen, excluded = {}, {}
    for fam, names in sorted(families.items()):
        reasons = []
        params = {name: timm_params(name) for name in names}
        ranked = sorted(names, key=lambda n: (params[n] is None, params[n] or 0, size_rank(n)))
        big = [n for n in ranked if (params[n] or 0) > MAX_PARAMS]
        small = [n for n in ranked if n not in big]
        for name in small[:CANDIDATES]:
            found, why = try_timm(name)
            if found is not None:
                chosen[fam] = {"model": name, **found}
                break
            reasons.append(f"{name}: {why}")
        else:
            if big:
                reasons.append(f"{len(big)} models too slow (over {MAX_PARAMS // 10**6} M parameters, smallest "
                               f"{big[0]}: {params[big[0]] / 1e6:.0f} M)")
            excluded[fam] = "; ".join(reasons)
        print(fam, chosen.get(fam) or excluded.get(fam), file=sys.stderr, flush=True)
    return {"chosen": chosen, "excluded": excluded}


#: torchvision builder groups: (module of ``torchvision.models``, build keyword arguments, input kind).
TV_GROUPS: dict[str, tuple[str, dict[str, Any], str]] = {
    "classification": ("", {"num_classes": NUM_CLASSES}, "image"),
    "segmentation": ("segmentation", {"num_classes": 3, "weights_backbone": None}, "image"),
    "detection": ("detection", {"num_classes": 5, "weights_backbone": None, "min_size": 64, "max_size": 64},
                  "images"),
    "video": ("video", {"num_classes": NUM_CLASSES}, "video"),
}
VIDEO_FRAMES = 4
#: A detector's proposal and detection counts, cut from torchvision's defaults (1000-2000 proposals, 100-300
#: detections an image) as its small input allows: with the defaults, random weights fill every slot and one
#: forward of Mask R-CNN at 64x64 takes 6 CPU s, almost all in the heads run on each of 100 detections; with
#: these, 0.4 s. A detector gets those of these arguments its model's constructor names.
DETECTION_LIGHT = {"rpn_pre_nms_top_n_train": 200, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_train": 50,
                   "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 64, "box_detections_per_img": 10,
                   "topk_candidates": 100, "detections_per_img": 10}


def detection_light(model: torch.nn.Module | None) -> dict[str, Any]:
    """The :data:`DETECTION_LIGHT` arguments that the constructor of ``model`` (built on ``meta``) names."""
    import inspect

    if model is None:
        return {}
    named = inspect.signature(type(model).__init__).parameters
    return {k: v for k, v in DETECTION_LIGHT.items() if k in named}


def tv_input(kind: str, size: int) -> Any:
    gen = torch.Generator().manual_seed(1)
    if kind == "images":
        return [torch.rand(3, size, size, generator=gen) for _ in range(BATCH)]
    if kind == "video":
        return torch.randn(BATCH, 3, VIDEO_FRAMES, size, size, generator=gen)
    return torch.randn(BATCH, 3, size, size, generator=gen)


def try_torchvision(name: str, base: dict[str, Any], kind: str) -> tuple[dict[str, Any] | None, str]:
    import torchvision

    meta = meta_model(lambda: torchvision.models.get_model(name, weights=None, **base))
    big = over_cap(params(meta), TV_MAX_PARAMS)
    if big:
        return None, big
    if kind == "images":
        base = {**base, **detection_light(meta)}
    last = ""
    for size in SIZES:
        for extra in ({"image_size": size}, {}):
            kw = {**base, **extra}
            start = time.process_time()
            try:
                torch.manual_seed(0)
                model = torchvision.models.get_model(name, weights=None, **kw).eval()
                with torch.no_grad():
                    model(tv_input(kind, size))
                    if kind != "images":  # a detection model's training pass needs targets: the sweep gives them
                        train_forward(model, tv_input(kind, size))
            except Exception as exc:  # noqa: BLE001 - recorded as the reason
                last = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                continue
            took = time.process_time() - start
            if too_big(model, TV_MAX_PARAMS):
                return None, too_big(model, TV_MAX_PARAMS)
            if took > BUILD_SECONDS:
                return None, f"too slow (build and one forward {took:.1f} s CPU at {size}x{size})"
            return {"kwargs": kw, "size": size, "input": kind}, ""
    return None, f"does not build at a small input on CPU ({last})"


def select_torchvision(done: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every builder (those in ``done``, a previous result, are kept as they are)."""
    import torchvision

    chosen, excluded = dict((done or {}).get("chosen", {})), dict((done or {}).get("excluded", {}))
    for group, (sub, base, kind) in TV_GROUPS.items():
        module = getattr(torchvision.models, sub) if sub else torchvision.models
        names = torchvision.models.list_models(module=module)
        if not sub:  # the top-level listing holds every builder; classification is what no submodule has
            others = {n for g, (s, _, _) in TV_GROUPS.items() if s
                      for n in torchvision.models.list_models(module=getattr(torchvision.models, s))}
            others |= set(torchvision.models.list_models(module=torchvision.models.optical_flow))
            others |= set(torchvision.models.list_models(module=torchvision.models.quantization))
            names = [n for n in names if n not in others]
        for name in sorted(names):
            key = f"{group}/{name}"
            if key in chosen or key in excluded:
                continue
            found, why = try_torchvision(name, base, kind)
            if found is not None:
                chosen[key] = {"model": name, "group": group, **found}
            else:
                excluded[key] = why
            print(key, chosen.get(key) or excluded.get(key), file=sys.stderr, flush=True)
    return {"chosen": chosen, "excluded": excluded}


def main() -> None:
    """``python -m tests.sweep.families [timm|torchvision]``: select both (default) or one, keeping the other."""
    parts = sys.argv[1:] or ["torchvision", "timm"]
    data = json.loads(SELECTION.read_text()) if SELECTION.exists() else {}
    for part in parts:
        data[part] = select_torchvision(data.get(part)) if part == "torchvision" else select_timm()
        SELECTION.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    SELECTION.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
