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


def test_aggregator_run_defaults_are_the_services():
    # The command line repeats the service's defaults (it imports the service only to run it).
    import inspect

    from fedmask.aggregator.service import AggregatorService

    args = _parse(["aggregator", "run", "--fleet", "f", "--task", "t.yaml"])
    service = inspect.signature(AggregatorService).parameters
    assert args.batch_max == service["batch_max"].default
    assert args.batch_wait_ms / 1e3 == service["batch_wait_s"].default
    assert args.store_writer == service["store_writer"].default


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


# -- unknown keys, value checks, --log-level -------------------------------------------------------------


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=False)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("FEDMASK_"):
            monkeypatch.delenv(key)


def test_a_misspelt_top_level_key_is_named_with_the_nearest_valid_key(tmp_path, clean_env):
    config = _write(tmp_path, "brokr: mqtt://broker.example:1883\n")
    with pytest.raises(ConfigError, match=r"unknown key 'brokr'; did you mean 'broker'\?"):
        _parse(["aggregator", "run", "--config", config])
    with pytest.raises(ConfigError, match="'brokr'"):
        _parse(["agent", "run", "--config", config])
    with pytest.raises(ConfigError, match="'brokr'"):
        _parse(["simulate", "--config", config])
    # Nothing close: the error lists what is valid instead.
    far = _write(tmp_path, "zzzzzz: 1\n", "far.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'zzzzzz'; valid keys: "):
        _parse(["devices", "--config", far])


def test_a_misspelt_key_in_the_subcommands_section_is_an_error(tmp_path, clean_env):
    config = _write(tmp_path, "simulate:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"section 'simulate': unknown key 'roundz'; did you mean 'rounds'"):
        _parse(["simulate", "--config", config])
    # ... also when another subcommand runs: the file is checked whole.
    with pytest.raises(ConfigError, match="roundz"):
        _parse(["devices", "--config", config])
    # A section holds only its own command's options.
    wrong = _write(tmp_path, "aggregator:\n  rounds: 3\n", "wrong.yaml")
    with pytest.raises(ConfigError, match=r"section 'aggregator': unknown key 'rounds'"):
        _parse(["aggregator", "run", "--config", wrong])
    scalar = _write(tmp_path, "simulate: 3\n", "scalar.yaml")
    with pytest.raises(ConfigError, match="section 'simulate' must be a mapping"):
        _parse(["simulate", "--config", scalar])


def test_every_section_rejects_unknown_keys():
    from fedmask.config import check_file_keys, config_schema

    schema = config_schema(build_parser())
    assert {"simulate", "aggregator", "agent", "devices", "rounds", "round", "models", "db", "data"} <= set(
        schema
    )
    for section in schema:
        with pytest.raises(ConfigError, match=f"section '{section}': unknown key 'not_an_option'"):
            check_file_keys({section: {"not_an_option": 1}}, schema, "f.yaml")
        check_file_keys({section: {"log_level": "DEBUG"}}, schema, "f.yaml")


def test_sections_for_other_subcommands_and_their_top_level_options_are_allowed(tmp_path, clean_env):
    config = _write(
        tmp_path,
        "broker: mqtt://127.0.0.1:1883\n"
        "fleet: orchard\n"
        "db: sqlite:///x.db\n"
        "device_id: dev-1\n"
        "aggregator: {shared_group: workers}\n"
        "agent: {state_dir: /tmp/agent}\n"
        "simulate: {rounds: 2}\n",
    )
    args = _parse(["aggregator", "run", "--config", config])
    assert (args.broker, args.fleet, args.db, args.shared_group) == (
        "mqtt://127.0.0.1:1883",
        "orchard",
        "sqlite:///x.db",
        "workers",
    )
    assert not hasattr(args, "rounds")
    assert _parse(["simulate", "--config", config]).rounds == 2


def test_nested_mappings_are_checked_against_the_code(tmp_path, clean_env):
    from fedmask.simulator.cli import simulation_config

    cases = {
        "mask_config: {granularty: unit}\n": r"mask option: unknown option 'granularty'; did you mean",
        "mask_config: {granularity: units}\n": r"mask option: MaskConfig.granularity",
        "arch_kwargs: {widht: 0.5}\n": r"arch option for har_cnn: unknown option 'widht'; did you mean",
        "dataset: fashion_mnist\ndataset_kwargs: {alpah: 0.3}\n": r"unknown option 'alpah'; did you mean",
        "dataset: shakespeare\ndataset_kwargs: {max_train_per_speakr: 9}\n": r"'max_train_per_speaker'",
        "hyper: {fedmsk: {lr: 0.1}}\n": r"hyper: unknown strategy 'fedmsk'; did you mean 'fedmask'",
        "hyper: {fedmask: 0.1}\n": r"'fedmask' must map hyperparameter names to values",
        "strategy: [fedmask, fedavgg]\n": r"unknown strategy 'fedavgg'; did you mean 'fedavg'",
        "dataset: hmpp\n": r"unknown workload 'hmpp'; did you mean 'hmp'",
        "arch: har_cn\n": r"unknown architecture 'har_cn'; did you mean 'har_cnn'",
        "dataset: hmp\npartition: shards\n": r"workload hmp supports natural",
    }
    for text, message in cases.items():
        config = _write(tmp_path, text)
        with pytest.raises(ConfigError, match=message):
            simulation_config(_parse(["simulate", "--config", config]))


def test_mask_options_follow_the_fields_maskconfig_declares(monkeypatch, clean_env):
    """Validation reads MaskConfig's fields: a field added there is accepted with no other change."""
    import dataclasses

    from fedmask.models import layers
    from fedmask.simulator.cli import simulation_config

    @dataclasses.dataclass(frozen=True)
    class Extended(layers.MaskConfig):
        density_budget: float = 1.0

    monkeypatch.setattr(layers, "MaskConfig", Extended)
    config = simulation_config(_parse(["simulate", "--mask-option", "density_budget=0.3"]))
    assert config.mask_config == {"density_budget": 0.3}


def test_file_and_environment_values_are_checked_like_flags(tmp_path, monkeypatch, clean_env):
    with pytest.raises(ConfigError, match=r"rounds: cannot read 'many' as int"):
        _parse(["simulate", "--config", _write(tmp_path, "rounds: many\n")])
    with pytest.raises(ConfigError, match=r"devices: expected an integer, got \[3\]"):
        _parse(["simulate", "--config", _write(tmp_path, "devices: [3]\n")])
    with pytest.raises(ConfigError, match=r"'mqt' is not one of inproc, mqtt; did you mean 'mqtt'"):
        _parse(["simulate", "--config", _write(tmp_path, "transport: mqt\n")])
    assert _parse(["agent", "run", "--config", _write(tmp_path, "mqtt_protocol: 5\n")]).mqtt_protocol == "5"
    monkeypatch.setenv("FEDMASK_DEVICES", "12")
    assert _parse(["simulate"]).devices == 12


def test_log_level_is_accepted_before_or_after_the_subcommand(tmp_path, monkeypatch, clean_env):
    assert _parse(["simulate"]).log_level == "INFO"
    assert _parse(["--log-level", "WARNING", "simulate"]).log_level == "WARNING"
    assert _parse(["simulate", "--log-level", "debug"]).log_level == "DEBUG"
    assert _parse(["aggregator", "run", "--log-level", "ERROR"]).log_level == "ERROR"
    assert _parse(["models", "list", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert _parse(["simulate", "--config", _write(tmp_path, "log_level: warning\n")]).log_level == "WARNING"
    monkeypatch.setenv("FEDMASK_LOG_LEVEL", "ERROR")
    assert _parse(["simulate"]).log_level == "ERROR"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--log-level", "LOUD"])
