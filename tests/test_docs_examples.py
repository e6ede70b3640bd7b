"""The example config files in docs/examples load through the real parser, `resolve` and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmask.cli import build_parser
from fedmask.config import resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FEDMASK_"):
            monkeypatch.delenv(key)


def parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    return resolve(args, command=args.command)


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == ["fleet.yaml", "simulate.yaml", "task.yaml"]


def test_simulate_example() -> None:
    from fedmask.simulator.cli import simulation_config

    args = parse("simulate", "--config", str(EXAMPLES / "simulate.yaml"))
    config = simulation_config(args)
    assert args.log_level == "INFO"
    assert (config.dataset, config.partition, config.devices, config.devices_per_round) == (
        "fashion_mnist",
        "shards",
        100,
        20,
    )
    assert config.strategies == ["fedmask", "fedavg", "fedavg_ft", "local"]
    assert config.arch_kwargs == {"width": 0.25}
    assert config.dataset_kwargs == {"shard_size": 300, "shards_per_device": 2}
    assert config.mask_config["masked_layers"] == ["*"]
    assert config.hyper == {"fedmask": {"lr": 0.1, "finetune_epochs": 5}, "fedavg_ft": {"finetune_epochs": 5}}


def test_fleet_example_serves_the_aggregator_the_agent_and_the_store_commands() -> None:
    fleet = str(EXAMPLES / "fleet.yaml")
    aggregator = parse("aggregator", "run", "--config", fleet)
    assert aggregator.broker.endswith(":8884") and aggregator.fleet == "kitchens"
    assert aggregator.db.startswith("postgresql+psycopg://") and aggregator.task == "task.yaml"
    assert aggregator.log_level == "WARNING" and aggregator.mqtt_protocol == "5"
    agent = parse("agent", "run", "--config", fleet, "--device-id", "dev-1")
    assert agent.broker.endswith(":8883") and agent.state_dir == "/var/lib/fedmask-agent"
    assert agent.threads == 2 and agent.ca_file == "certs/ca.crt"
    for argv in (["devices"], ["rounds"], ["models", "list"]):
        assert parse(*argv, "--config", fleet).db.startswith("postgresql+psycopg://")


def test_task_example() -> None:
    from fedmask.aggregator.cli import check_task_file
    from fedmask.aggregator.tasks import load_task_file

    check_task_file(EXAMPLES / "task.yaml")
    task = load_task_file(EXAMPLES / "task.yaml", "kitchens")
    assert (task.task_id, task.strategy, task.arch, task.num_classes) == (
        "kitchens-2026-11",
        "fedmask",
        "har_cnn",
        14,
    )
    assert task.schedule.rounds == 10 and task.hyper["lr"] == 0.1
