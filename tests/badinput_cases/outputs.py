"""Bad input where regfw writes or reads what a user names: ``predict --out``, ``init``, run
directories, checkpoints given to ``predict``/``rank``, MC sample counts, and data that a model
cannot predict (non-finite rows, the wrong width, a split the data does not have).

Every target that must not be replaced (a FIFO, a symbolic link, a dangling one, a directory, an
existing file, the command's own config or checkpoint) is made here, in the test's directory.
"""
from __future__ import annotations

import os
from pathlib import Path

NAN_DATA = '''
from regfw.build.datasets import BUILTIN_DATA

class NanDigits(BUILTIN_DATA["digits"]):
    """Digits with a NaN in validation row 3 and an infinity in row 17."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.x_val[3, 5] = float("nan")
        self.x_val[17, 0] = float("inf")
'''


def cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    cfg, ckpt = str(tmp / "c.yaml"), str(root / "run" / "checkpoints" / "last.ckpt")
    out = tmp / "outputs"
    out.mkdir()
    (out / "keep.csv").write_text("index,prediction\n0,1\n")
    (out / "not-a-dir").write_text("x")
    (out / "adir").mkdir()
    os.mkfifo(out / "fifo")
    os.symlink(out / "keep.csv", out / "link.csv")
    os.symlink(out / "missing.csv", out / "dangling.csv")
    os.symlink(out / "missing-dir", out / "dangling-run")
    os.symlink(out / "keep.csv", out / "init-link.yaml")
    (tmp / "outdata.py").write_text(NAN_DATA)
    nan = ["data.name=null", "data.class_path=outdata.NanDigits"]
    predict = ["predict", cfg, ckpt]
    long_name = "r" * 300
    return [
        # predict --out: never over a file without --force, never over anything but a regular file
        ([*predict, "--out", cfg], "c.yaml"),
        ([*predict, "--out", cfg, "--force"], "own input"),
        ([*predict, "--out", ckpt, "--force"], "last.ckpt"),
        ([*predict, "--out", str(out / "keep.csv")], "pass --force"),
        ([*predict, "--out", str(out / "fifo"), "--force"], "FIFO"),
        ([*predict, "--out", str(out / "link.csv"), "--force"], "symbolic link"),
        ([*predict, "--out", str(out / "dangling.csv")], "does not exist"),
        ([*predict, "--out", str(out / "adir"), "--force"], "is a directory"),
        ([*predict, "--out", str(out / "not-a-dir" / "p.csv")], "not-a-dir"),
        ([*predict, "--out", str(out / (long_name + ".csv"))], "file name too long"),
        ([*predict, "--out", " "], "--out"),
        # init: the same rule at its path
        (["init", str(out / "fifo"), "--force"], "FIFO"),
        (["init", str(out / "init-link.yaml"), "--force"], "symbolic link"),
        (["init", str(out / "dangling.csv"), "--force"], "dangling.csv"),
        (["init", str(out / "not-a-dir" / "x.yaml"), "--force"], "not-a-dir"),
        # new-plugin: --dir must be a directory (or a new one)
        (["new-plugin", "outcase", "--dir", str(out / "not-a-dir")], "is a regular file, not a directory"),
        (["new-plugin", "outcase", "--dir", str(out / "not-a-dir" / "sub")], "not-a-dir"),
        (["new-plugin", "outcase", "--dir", str(out / "fifo")], "FIFO"),
        # MC samples and --k are bounded before any work
        ([*predict, "--out", str(out / "p.csv"), "--samples", "0"], "--samples: got 0"),
        ([*predict, "--out", str(out / "p.csv"), "--samples", "1"], "--samples: got 1"),
        ([*predict, "--out", str(out / "p.csv"), "--samples", "20000"], "at most 10000"),
        (["rank", cfg, ckpt, "--samples", "1000000000"], "--samples: got 1000000000"),
        (["rank", cfg, ckpt, "--samples", "-3"], "--samples"),
        (["rank", cfg, ckpt, "--k", "0"], "--k: got 0"),
        (["rank", cfg, ckpt, "--k", "-5"], "--k"),
        # checkpoints that are not files
        (["rank", cfg, str(root / "run")], "is a directory"),
        (["predict", cfg, str(root / "run" / "checkpoints"), "--out", str(out / "p.csv")], "is a directory"),
        (["rank", cfg, str(out / "fifo")], "not a regular file"),
        # data the model cannot predict
        ([*predict, "--out", str(out / "p.csv"), "--split", "predict"], "no predict_dataloader"),
        ([*predict, "--out", str(out / "p.csv"), "data.name=diabetes"], "diabetes"),
        ([*predict, "--out", str(out / "p.csv"), *nan], "rows 3, 17"),
        (["rank", cfg, ckpt, *nan], "rows 3, 17"),
        # run directories
        (["fit", cfg, "--run-dir", str(out / "dangling-run")], "does not exist"),
        (["fit", cfg, "--run-dir", str(out / "fifo")], "FIFO"),
        (["fit", cfg, f"run.name={long_name}", f"run.dir={out / 'runs'}"], "run.name"),
        (["fit", cfg, "--run-dir", str(out / "not-a-dir" / "run")], "not-a-dir"),
    ]
