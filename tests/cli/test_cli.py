"""The ``regfw`` command line, end to end in subprocesses."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def test_fit_two_epochs_writes_a_complete_run_directory_and_rank_reads_it(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((ROOT / "templates" / "demo.yaml").read_text())
    result = run_cli("fit", str(cfg), "trainer.max_epochs=2", "data.train_fraction=0.3",
                     "regularizers.dropout.hidden=0.3", "uncertainty.enabled=false")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert run.name.startswith("cfg-")
    resolved = OmegaConf.load(run / "config.yaml")
    assert resolved.trainer.max_epochs == 2
    assert resolved.regularizers.dropout.hidden == 0.3
    assert resolved.regularizers.dropout.policy == "auto"  # every default filled in
    assert "explicit" in (run / "plan.txt").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["regfw"]["regularizers"] == ["dropout"]
    assert "val_acc" in (run / "metrics.csv").read_text()
    assert f"run directory: runs/{run.name}" in result.stdout
    assert re.search(r"^  val_acc +0\.\d{4}$", result.stdout, flags=re.M)  # in the one summary

    # active learning from that checkpoint
    result = run_cli("rank", str(cfg), f"runs/{run.name}/checkpoints/last.ckpt", "--k", "7", "--samples", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    assert len(rows) == 7
    indices, scores = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert len(set(indices)) == 7 and all(0 <= i < 450 for i in indices)  # 25% of 1,797 digits
    assert scores == sorted(scores, reverse=True)
    missing = run_cli("rank", str(cfg), "nope.ckpt")
    assert missing.returncode == 2 and "checkpoint 'nope.ckpt' does not exist" in missing.stderr


def test_cli_errors_are_one_line_without_traceback(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("regularizers:\n  dropout:\n    hidden: 2\n")
    result = run_cli("plan", str(cfg))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "regfw plan: error: regularizers.dropout.hidden: got 2.0, expected a value in [0, 1). "
        "Change it or remove it to use the default."
    )
    result = run_cli("--debug", "plan", str(cfg))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_init_writes_starter_config_and_never_overwrites(tmp_path, run_cli):
    result = run_cli("init", "my.yaml")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "my.yaml").read_text()
    assert "regularizers:" in text and "dropout:" in text
    OmegaConf.load(tmp_path / "my.yaml")  # valid YAML
    again = run_cli("init", "my.yaml")
    assert again.returncode == 2 and "exists; choose another path or pass --force" in again.stderr
    assert (tmp_path / "my.yaml").read_text() == text


def test_demo_compares_with_and_without_regularizers(tmp_path, run_cli):
    result = run_cli("demo", str(ROOT / "templates" / "demo.yaml"), "trainer.max_epochs=2",
                     "data.train_fraction=0.3", "uncertainty.samples=5", "uncertainty.every_n_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lines = {line.split("  ")[0]: line for line in out.splitlines() if line.startswith(("with (dropout)", "without"))}
    assert set(lines) == {"with (dropout)", "without"}
    assert lines["with (dropout)"].split()[2:] != lines["without"].split()[1:]  # different runs, different numbers
    assert "gap (train-val acc)" in out and "mc/auroc_error" in out
    plots = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("plot ")]
    assert len(plots) == 5 and all((tmp_path / p).is_file() for p in plots)  # + risk-coverage, OOD histograms
    assert "Temperature scaling" in out and "mutual_information   AUROC" in out and "mc/aurc" in out
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2  # the baseline got its own directory
