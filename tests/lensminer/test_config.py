"""Tests of the typed configuration."""

from __future__ import annotations

import pytest

from lensminer.config import LensMinerConfig, load_config
from lensminer.exceptions import ConfigError


def test_defaults_follow_method():
    config = LensMinerConfig()
    assert config.survey.size == 152
    assert config.survey.pixscale == pytest.approx(0.262)
    assert config.augment.crop_size == 96
    assert config.pretrain.temperature == pytest.approx(0.2)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: s3://bucket/run/\npretrain:\n  epochs: 7\n  batch_size: 32\n")
    config = load_config(path, {"pretrain.epochs": 9, "survey.layer": None})
    assert config.pretrain.epochs == 9
    assert config.pretrain.batch_size == 32
    assert config.survey.layer == "ls-dr9"
    assert config.cutouts_url == "s3://bucket/run/cutouts.zarr"


def test_unknown_key_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pretrain:\n  epoch: 7\n")
    with pytest.raises(ConfigError, match="epoch"):
        load_config(path)


def test_invalid_value_names_field():
    with pytest.raises(ConfigError, match="size"):
        load_config(None, {"survey.size": 0})


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/run.yaml")


def test_non_mapping_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_override_below_value_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/a\n")
    with pytest.raises(ConfigError, match="is a value"):
        load_config(path, {"run_dir.sub": 1})


def test_invalid_value_message_names_value():
    with pytest.raises(ConfigError, match=r"pretrain.epochs = 'abc'"):
        load_config(None, {"pretrain.epochs": "abc"})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"pretrain.epoch is not a configuration key.*epochs"):
        load_config(None, {"pretrain.epoch": 3})
