"""Config loading, overrides and validation: every error names the key, the value and the fix."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from regfw.config.schema import load_config, validate
from regfw.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_filled_and_overrides_win(tmp_path):
    path = write(tmp_path, "regularizers:\n  dropout: {}\ntrainer:\n  max_epochs: 5\n")
    cfg = load_config(path, ["trainer.max_epochs=3", "regularizers.dropout.hidden=0.3", "model.name=cnn"])
    assert cfg.trainer["max_epochs"] == 3
    assert cfg.model.name == "cnn"
    assert cfg.regularizers["dropout"]["hidden"] == 0.3
    assert cfg.regularizers["dropout"]["policy"] == "auto"  # default filled in
    resolved = OmegaConf.create(cfg.to_yaml())
    assert resolved.data.batch_size == 64 and resolved.uncertainty.samples == 30


def test_unknown_regularizer_key_names_full_path_and_closest(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "regularizers:\n  dropout:\n    hiden: 0.3\n"))
    text = str(err.value)
    assert text.startswith("regularizers.dropout.hiden: unknown key.")
    assert "Did you mean 'hidden'?" in text and "conv" in text


@pytest.mark.parametrize(
    "override, expected",
    [
        ("regularizers.dropout.hidden=1.5", "regularizers.dropout.hidden: got 1.5, expected a value in [0, 1)"),
        ("regularizers.dropout.hidden=-0.1", "regularizers.dropout.hidden: got -0.1, expected a value in [0, 1)"),
        ("regularizers.dropout.hidden=high", "regularizers.dropout.hidden: got 'high'"),
        ("regularizers.dropout.policy=smart",
         "regularizers.dropout.policy: got 'smart', expected one of 'auto', 'default'"),
        ("optimizer.lr=-1", "optimizer.lr: got -1.0, expected a value in > 0"),
        ("optimizer.weight_decay=-0.01", "optimizer.weight_decay: got -0.01, expected a value in >= 0"),
        ("data.batch_size=ten", "data.batch_size: got 'ten' (str), expected a whole number"),
        ("model.name=resnet", "model.name: got 'resnet', expected one of 'mlp', 'cnn', 'lstm'"),
        ("uncertainty.samples=1", "uncertainty.samples: got 1, expected at least 2"),
        ("regularizers.dropout.hidden=.nan", "regularizers.dropout.hidden: got nan, expected a finite number"),
        ("uncertainty.budget_mb=.inf", "uncertainty.budget_mb: got inf, expected a finite number"),
    ],
)
def test_bad_values_name_key_value_and_range(tmp_path, override, expected):
    path = write(tmp_path, "regularizers:\n  dropout: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert expected in str(err.value)


def test_unknown_regularizer_lists_known_and_closest(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "regularizers:\n  dropuot: {}\n"))
    text = str(err.value)
    assert "regularizers.dropuot: unknown regularizer 'dropuot'" in text
    assert "Known regularizers: " in text and "dropout" in text
    assert "Did you mean 'dropout'?" in text


def test_unknown_section_and_trainer_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainr: unknown top-level section.*Did you mean 'trainer'"):
        load_config(write(tmp_path, "trainr: {}\n"))
    with pytest.raises(ConfigError, match=r"trainer.max_epoch: unknown key.*Did you mean 'max_epochs'"):
        load_config(write(tmp_path, "trainer:\n  max_epoch: 3\n"))


def test_missing_file_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist. Create one with `regfw init"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"override 'trainer.max_epochs': expected KEY=VALUE"):
        load_config(write(tmp_path, "{}\n"), ["trainer.max_epochs"])


def test_switching_a_regularizer_off_with_false():
    cfg = validate({"regularizers": {"dropout": False}})
    assert cfg.regularizers == {}
