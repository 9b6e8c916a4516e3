"""Tests for pipeline_lib.core.config_loader: the shipped files load, overrides parse, errors name the key or file."""

from pathlib import Path

import pytest

from pipeline_lib.core.config import ConfigError
from pipeline_lib.core.config_loader import build_config, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_load():
    default = load_config(REPO / "configs" / "default.yaml")
    assert default.train.model == "resnet50" and default.train.head_only_epochs == 5
    assert default.sources.search[0].keywords_file == REPO / "configs" / "keywords.txt", "paths resolve from the file"
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.train.model == "resnet18" and demo.train.weights == "none"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.epchs: unknown key"):
        build_config({"train": {"epchs": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        build_config({"train": {"batch_size": "many"}})


def test_overrides_parse_yaml_values():
    config = build_config({}, ["train.epochs=3", "train.lr=0.5", "review.mode=off"])
    assert (config.train.epochs, config.train.lr, config.review.mode) == (3, 0.5, "off")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config({}, ["train.epochs"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
