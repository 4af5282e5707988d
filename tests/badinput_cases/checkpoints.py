"""Checkpoints that are not what they claim: no digest, edited content, another regfw version, files
that are not torch checkpoints, and resumes with another model or optimizer (``fit --resume``,
``predict``, ``rank``). Each is refused in one line naming the file (or the key) and, where the
file could be trusted knowingly, the flag that accepts it."""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from regfw.run.checkpoints import INTEGRITY_KEY, safe_load, seal

Case = tuple[list[str], str]


def _variant(last: Path, out: Path, change: Callable[[dict[str, Any]], None], *, reseal: bool = False) -> str:
    """Write ``last`` changed by ``change`` to ``out``: with a fresh digest (``reseal``) or the old one."""
    ckpt = safe_load(last)
    change(ckpt)
    if reseal:
        seal(ckpt)
    torch.save(ckpt, out)
    return str(out)


def cases(root: Path, tmp: Path) -> list[Case]:
    last = root / "run" / "checkpoints" / "last.ckpt"
    cfg = str(root / "c.yaml")
    d = tmp / "ck"
    d.mkdir()

    def first_weight(c: dict) -> None:
        key = next(iter(c["state_dict"]))
        c["state_dict"][key] = c["state_dict"][key] + 1.0

    def no_digest_edited(c: dict) -> None:
        c.pop(INTEGRITY_KEY)
        first_weight(c)

    def rate(c: dict) -> None:
        c["hyper_parameters"]["regularizers"]["dropout"]["hidden"] = 0.9

    def version(c: dict) -> None:
        c["regfw"]["version"] = "0.0.1"

    def old_scheme(c: dict) -> None:
        c[INTEGRITY_KEY] = {"sha256": c[INTEGRITY_KEY]["sha256"], "tensors": c[INTEGRITY_KEY]["tensors"]}

    def uncovered(c: dict) -> None:
        c[INTEGRITY_KEY]["covers"] = [k for k in c[INTEGRITY_KEY]["covers"] if k != "state_dict"]
        first_weight(c)

    def optimizer_lr(c: dict) -> None:
        c["optimizer_states"][0]["param_groups"][0]["lr"] = 10.0

    def loop_progress(c: dict) -> None:
        c["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] = 7

    def zeroed_digest(c: dict) -> None:
        c[INTEGRITY_KEY]["sha256"] = "0" * 64

    def unmarked(c: dict) -> None:
        c.pop(INTEGRITY_KEY)
        c.pop("regfw")

    made = {
        "nodigest-edited.ckpt": _variant(last, d / "nodigest-edited.ckpt", no_digest_edited),
        "rate09.ckpt": _variant(last, d / "rate09.ckpt", rate),
        "oldversion.ckpt": _variant(last, d / "oldversion.ckpt", version, reseal=True),
        "oldscheme.ckpt": _variant(last, d / "oldscheme.ckpt", old_scheme),
        "uncovered.ckpt": _variant(last, d / "uncovered.ckpt", uncovered),
        "epoch5.ckpt": _variant(last, d / "epoch5.ckpt", lambda c: c.update(epoch=5)),
        "optlr.ckpt": _variant(last, d / "optlr.ckpt", optimizer_lr),
        "progress.ckpt": _variant(last, d / "progress.ckpt", loop_progress),
        "zerodigest.ckpt": _variant(last, d / "zerodigest.ckpt", zeroed_digest),
        "unmarked.ckpt": _variant(last, d / "unmarked.ckpt", unmarked),
        "more-epochs.ckpt": _variant(last, d / "more-epochs.ckpt", lambda c: None, reseal=True),
    }
    (d / "random.ckpt").write_bytes(bytes((i * 97 + 13) % 251 for i in range(4096)))
    (d / "head.ckpt").write_bytes(last.read_bytes()[:100])
    with zipfile.ZipFile(d / "notes.zip.ckpt", "w") as z:
        z.writestr("notes.txt", "a zip archive, not a torch checkpoint")
    torch.save([1, 2, 3], d / "list.ckpt")
    path = {name: str(d / name) for name in ("random.ckpt", "head.ckpt", "notes.zip.ckpt", "list.ckpt")} | made
    out = str(tmp / "pred.csv")

    def resume(name: str, *extra: str) -> list[str]:
        return ["fit", cfg, "--resume", path[name], "trainer.max_epochs=3", "--run-dir", str(tmp / "r"), *extra]

    return [
        # the cases: a removed digest with an edited tensor, an edited rate, another version, random bytes
        (resume("nodigest-edited.ckpt"), "nodigest-edited.ckpt' has no integrity digest"),
        (["rank", cfg, path["rate09.ckpt"]], "rate09.ckpt' no longer matches the SHA-256 digest"),
        (resume("oldversion.ckpt"), "oldversion.ckpt' was written by regfw 0.0.1"),
        (["rank", cfg, path["random.ckpt"]], "random.ckpt' is not a torch checkpoint"),
        # the flag that accepts each is named; the other flag does not accept it
        (["predict", cfg, path["rate09.ckpt"], "--out", out], "pass --accept-unverified"),
        (["predict", cfg, path["oldversion.ckpt"], "--out", out], "pass --accept-version"),
        (["predict", cfg, path["oldversion.ckpt"], "--out", out, "--accept-unverified"], "pass --accept-version"),
        (["rank", cfg, path["rate09.ckpt"], "--accept-version"], "pass --accept-unverified"),
        # digests that do not vouch for the content
        (resume("oldscheme.ckpt"), "oldscheme.ckpt' has a digest of an older format that covers only its tensors"),
        (resume("uncovered.ckpt"), "uncovered.ckpt' holds state_dict that its digest does not cover"),
        (resume("zerodigest.ckpt"), "zerodigest.ckpt' no longer matches the SHA-256 digest"),
        # edited loop state, optimizer state and epoch (the digest kept)
        (resume("epoch5.ckpt"), "epoch5.ckpt' no longer matches"),
        (resume("optlr.ckpt"), "optlr.ckpt' no longer matches"),
        (resume("progress.ckpt"), "progress.ckpt' no longer matches"),
        # files that are not regfw checkpoints
        (resume("unmarked.ckpt"), "unmarked.ckpt' was not written by regfw"),
        (resume("head.ckpt"), "head.ckpt' is corrupt or truncated"),
        (resume("notes.zip.ckpt"), "notes.zip.ckpt' is corrupt or truncated"),
        (resume("list.ckpt"), "list.ckpt' is not a Lightning checkpoint (it holds list)"),
        (["predict", cfg, path["random.ckpt"], "--out", out], "random.ckpt' is not a torch checkpoint"),
        # a whole, verified checkpoint resumed with another model or another optimizer
        (resume("more-epochs.ckpt", "model.init_args.hidden=[16]"), "model.init_args.hidden is [8] in the checkpoint"),
        (resume("more-epochs.ckpt", "optimizer.name=sgd"), "optimizer.name is 'adam' in the checkpoint"),
    ]
