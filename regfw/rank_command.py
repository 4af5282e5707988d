"""The `regfw rank` command: active learning from a trained checkpoint and its config's data.

Command glue only (load the config, the data and the checkpoint, call the library; `regfw.cli`
prints); the acquisition functions and the ranking are in :mod:`regfw.uncertainty.acquisition`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regfw.errors import RunError


def load_module(checkpoint: str) -> Any:
    """A :class:`~regfw.module.RegularizedModule` from a ``regfw fit`` checkpoint, in eval mode."""
    from regfw.module import RegularizedModule

    path = Path(checkpoint)
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} does not exist; pass a file from <run dir>/checkpoints/")
    from regfw.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)  # a truncated, corrupt or foreign file is reported by name
    try:
        if (ckpt.get("regfw") or {}).get("callback"):  # a module of one's own, trained with regfw.Regularize
            from regfw.callback import load_regularized

            return load_regularized(None, path)
        module = RegularizedModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise RunError(f"checkpoint {str(path)!r} could not be loaded: {type(exc).__name__}: {exc}") from None
    return module.eval()


def rank_checkpoint(config: str, checkpoint: str, overrides: Sequence[str] = (), *, k: int = 50,
                    acquisition: str = "bald", split: str = "val", samples: int = 30) -> Any:
    """The ``k`` samples of the config's ``split`` most worth labelling, by ``acquisition``."""
    from regfw.checkpoints import read_checkpoint
    from regfw.config import load_config
    from regfw.factory import build_datamodule
    from regfw.uncertainty import rank
    from regfw.uncertainty.heldout import prepare_heldout

    cfg = load_config(config, overrides)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)  # the same splits as the fit
    module = load_module(checkpoint)
    temperature = (read_checkpoint(Path(checkpoint)).get("regfw_calibration") or {}).get("temperature")
    if split == "train":
        loader = getattr(datamodule, "train_eval_dataloader", None)
        if loader is None:
            raise RunError("--split train needs a data module with train_eval_dataloader(); use --split val")
        loader = loader()
    else:
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
    try:
        return rank(module, loader, acquisition=acquisition, k=k, samples=samples, seed=cfg.uncertainty.seed,
                    temperature=temperature)
    except ValueError as exc:
        raise RunError(str(exc)) from None
