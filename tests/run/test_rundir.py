"""A run directory is never overwritten silently: new runs get new directories, an explicit one
must be new or empty, ``--force`` replaces only an earlier regfw run, and every process of a
multi-process job writes to the same directory."""
from __future__ import annotations

import os

import pytest

from regfw.cli.main import main
from regfw.config.schema import load_config
from regfw.errors import RunError
from regfw.run import distributed as D
from regfw.run.job import fit, new_run_dir


def test_new_runs_get_new_directories_even_within_one_second(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'runs'}", "run.name=exp"])
    made = [new_run_dir(cfg) for _ in range(3)]
    assert len({p.name for p in made}) == 3
    assert all(p.is_dir() and sorted(c.name for c in p.iterdir()) == [".regfw-lock", ".regfw-run"]
               and p.name.startswith("exp-") for p in made)
    # within one second the timestamp repeats and -2, -3 are appended
    first = made[0].name
    assert all(p.name in (first + "-2", first + "-3") or p.name[:19] != first[:19] for p in made[1:])


def test_an_explicit_directory_must_be_new_or_empty(tmp_path):
    cfg = load_config(None)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_run_dir(cfg, str(empty)) == empty
    assert new_run_dir(cfg, str(tmp_path / "a" / "b")).is_dir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(RunError) as err:
        new_run_dir(cfg, str(busy))
    assert str(err.value) == (f"run directory '{busy}' exists and is not empty; choose a new one, continue it with "
                              f"`regfw fit CONFIG --run-dir {busy} --resume`, or replace it with --force")
    with pytest.raises(RunError, match="holds no regfw run; --force replaces only a run directory regfw made"):
        new_run_dir(cfg, str(busy), force=True)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # refused, and untouched
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunError, match="is a file; choose a directory"):
        new_run_dir(cfg, str(a_file))


def test_force_replaces_an_earlier_run_only_after_the_new_one_was_checked(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {train_fraction: 0.1}\nmodel: {init_args: {hidden: [8]}}\nuncertainty: {enabled: false}\n"
                   "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}\n")
    run = tmp_path / "run"
    assert main(["fit", str(cfg), "--run-dir", str(run)]) == 0
    first = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "epoch=007.ckpt").write_text("from before")  # a file of regfw's kind

    assert main(["fit", str(cfg), "--run-dir", str(run)]) == 2  # no flag: refused
    assert "exists and is not empty" in capsys.readouterr().err
    # a config that fails is reported before anything is deleted
    assert main(["fit", str(cfg), "model.init_args.in_features=3", "--run-dir", str(run), "--force"]) == 2
    assert "model: building 'mlp'" in capsys.readouterr().err
    assert (run / "checkpoints" / "epoch=007.ckpt").exists()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == first

    assert main(["fit", str(cfg), "seed=1", "--run-dir", str(run), "--force"]) == 0
    assert not (run / "checkpoints" / "epoch=007.ckpt").exists()
    assert "seed: 1" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() != first


def test_every_process_of_an_external_launch_needs_one_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(D.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RunError) as err:
        fit(load_config(None))
    assert str(err.value) == ("this process (rank 1) is one of several started by a launcher (torchrun, srun); all "
                              "of them must write to one run directory: pass --run-dir DIR (or set "
                              "REGFW_RUN_DIR=DIR)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, rank", [
    ({}, 0),
    ({"RANK": "3"}, 3),
    ({"SLURM_PROCID": "5"}, 5),
    ({"LOCAL_RANK": "1"}, 1),  # a process started by Lightning's own launcher
    ({"LOCAL_RANK": "1", "NODE_RANK": "2", "LOCAL_WORLD_SIZE": "4"}, 9),
])
def test_rank_before_torch_distributed_is_up(monkeypatch, env, rank):
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert D.env_rank() == rank


def test_the_run_directory_is_announced_to_child_processes_only_while_they_start(monkeypatch):
    monkeypatch.delenv(D.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv(D.RESUME_ENV, "stale.ckpt")
    with D.announce_to_child_processes("runs/x", None):
        assert os.environ[D.RUN_DIR_ENV] == "runs/x" and D.RESUME_ENV not in os.environ
    assert D.RUN_DIR_ENV not in os.environ and os.environ[D.RESUME_ENV] == "stale.ckpt"
    with D.announce_to_child_processes("runs/y", "runs/y/checkpoints/last.ckpt"):
        assert D.shared_run_dir() == "runs/y" and os.environ[D.RESUME_ENV] == "runs/y/checkpoints/last.ckpt"
