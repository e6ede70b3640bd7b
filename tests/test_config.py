"""Configuration precedence: flag > FEDMASK_* environment > config file > default."""

from __future__ import annotations

import pytest

from fedmask.cli import build_parser
from fedmask.config import ConfigError, resolve


def _parse(argv, monkeypatch=None):
    args = build_parser().parse_args(argv)
    return resolve(args, command=args.command)


def test_defaults_apply_when_nothing_else_is_given():
    args = _parse(["simulate"])
    assert args.rounds == 10 and args.dataset == "hmp" and args.transport == "mqtt"


def test_config_file_section_then_environment_then_flag(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("rounds: 3\nsimulate:\n  dataset: fashion_mnist\n  hyper: {fedmask: {lr: 0.5}}\n")
    args = _parse(["simulate", "--config", str(config)])
    assert (args.rounds, args.dataset, args.hyper) == (3, "fashion_mnist", {"fedmask": {"lr": 0.5}})

    monkeypatch.setenv("FEDMASK_ROUNDS", "7")
    assert _parse(["simulate", "--config", str(config)]).rounds == 7
    assert _parse(["simulate", "--config", str(config), "--rounds", "2"]).rounds == 2


def test_global_config_option_works_before_the_subcommand(tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"rounds": 4}')
    assert _parse(["--config", str(config), "simulate"]).rounds == 4


def test_bad_values_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMASK_ROUNDS", "many")
    with pytest.raises(ConfigError, match="FEDMASK_ROUNDS"):
        _parse(["simulate"])
    with pytest.raises(ConfigError, match="does not exist"):
        _parse(["simulate", "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        _parse(["simulate", "--config", str(bad)])
