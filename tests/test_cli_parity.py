"""Every configuration the accuracy benchmark runs is expressible as `fedmask simulate` flags and as a
config file: both, parsed by the real parser and `resolve`, give the benchmark's own SimulationConfig.

Generic over `benchmarks/accuracy.py` WORKLOADS (every workload, default and --quick size), so new
workloads, values and per-method hyperparameters are covered as they are added.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmask.cli import build_parser
from fedmask.config import resolve
from fedmask.simulator.cli import simulation_config
from fedmask.simulator.config import SimulationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy

# SimulationConfig field -> (flag, config-file key). A field missing here fails the coverage test.
FLAGS = {
    "dataset": ("--dataset", "dataset"),
    "partition": ("--partition", "partition"),
    "devices": ("--devices", "devices"),
    "devices_per_round": ("--devices-per-round", "devices_per_round"),
    "rounds": ("--rounds", "rounds"),
    "local_epochs": ("--local-epochs", "local_epochs"),
    "strategies": ("--strategy", "strategy"),
    "seed": ("--seed", "seed"),
    "output_dir": ("--output-dir", "output_dir"),
    "data_root": ("--data-root", "data_root"),
    "arch": ("--arch", "arch"),
    "arch_kwargs": ("--arch-option", "arch_kwargs"),
    "hyper": ("--hyper", "hyper"),
    "mask_config": ("--mask-option", "mask_config"),
    "dataset_kwargs": ("--data-option", "dataset_kwargs"),
    "eval_every": ("--eval-every", "eval_every"),
    "max_payload": ("--max-payload", "max_payload"),
    "transport": ("--transport", "transport"),
    "agent_processes": ("--agent-processes", "agent_processes"),
    "fleet": ("--fleet", "fleet"),
    "device_classes": ("--device-classes", "device_classes"),
    "tflite_devices": ("--tflite-devices", "tflite_devices"),
    "mask_codings": ("--mask-codings", "mask_codings"),
}
MAPPINGS = ("arch_kwargs", "mask_config", "dataset_kwargs")

CASES = [(name, quick) for name in accuracy.WORKLOADS for quick in (False, True)]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FEDMASK_"):
            monkeypatch.delenv(key)


def _json(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def as_flags(config: SimulationConfig) -> list[str]:
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = FLAGS[f.name][0]
        if value is None:
            continue  # "not given": the CLI's None is the dataclass's None
        if f.name in ("strategies", "device_classes", "mask_codings"):
            if not value:
                continue
            argv += [flag, ",".join(value)]
        elif f.name in MAPPINGS:
            for key, item in value.items():
                argv += [flag, f"{key}={_json(item)}"]
        elif f.name == "hyper":
            for strategy, values in value.items():
                for key, item in values.items():
                    argv += [flag, f"{strategy}.{key}={_json(item)}"]
        else:
            argv += [flag, str(value)]
    return argv


def as_file_mapping(config: SimulationConfig) -> dict[str, Any]:
    data = {FLAGS[k][1]: v for k, v in config.to_dict().items() if v is not None}
    return json.loads(json.dumps(data))  # tuples -> lists, as a YAML/JSON file holds them


def parsed(argv: list[str]) -> SimulationConfig:
    args = build_parser().parse_args(argv)
    resolve(args, command=args.command)
    return simulation_config(args)


def normalized(config: SimulationConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))


def benchmark(name: str, quick: bool, tmp_path: Path) -> SimulationConfig:
    return accuracy.benchmark_config(
        name,
        quick=quick,
        seed=3,
        strategies=list(accuracy.STRATEGIES),
        output_dir=tmp_path / "out" / name,
        data_root=tmp_path / "data",
    )


def test_every_simulation_config_field_has_a_flag_and_a_file_key() -> None:
    assert {f.name for f in dataclasses.fields(SimulationConfig)} == set(FLAGS)
    parser_options = build_parser()._subparsers._group_actions[0].choices["simulate"]._option_string_actions
    for flag, _ in FLAGS.values():
        assert flag in parser_options


@pytest.mark.parametrize(
    ("name", "quick"), CASES, ids=[f"{n}-{'quick' if q else 'default'}" for n, q in CASES]
)
def test_benchmark_config_round_trips_through_flags(name: str, quick: bool, tmp_path: Path) -> None:
    expected = benchmark(name, quick, tmp_path)
    got = parsed(["simulate", *as_flags(expected)])
    assert normalized(got) == normalized(expected)
    assert got.hyper == expected.hyper and got.arch_kwargs == expected.arch_kwargs


@pytest.mark.parametrize("layout", ["top-level.yaml", "section.yaml", "top-level.json"])
@pytest.mark.parametrize(
    ("name", "quick"), CASES, ids=[f"{n}-{'quick' if q else 'default'}" for n, q in CASES]
)
def test_benchmark_config_round_trips_through_a_config_file(
    name: str, quick: bool, layout: str, tmp_path: Path
) -> None:
    expected = benchmark(name, quick, tmp_path)
    data = as_file_mapping(expected)
    if layout.startswith("section"):
        # Split between the top level and the section, as a shared file would be.
        data = {"seed": data.pop("seed"), "hyper": data.pop("hyper"), "simulate": data}
    path = tmp_path / layout
    path.write_text(json.dumps(data) if layout.endswith(".json") else yaml.safe_dump(data))
    got = parsed(["simulate", "--config", str(path)])
    assert normalized(got) == normalized(expected)


def test_flags_refine_the_files_mappings_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "hyper: {fedmask: {lr: 0.5, finetune_epochs: 3}}\n"
        "simulate:\n"
        "  dataset: fashion_mnist\n"
        "  arch_kwargs: {width: 0.25}\n"
        "  dataset_kwargs: {shard_size: 300, shards_per_device: 2}\n"
        "  mask_config: {granularity: unit, masked_layers: ['fc*']}\n"
        "  hyper: {fedavg: {lr: 0.05}}\n"
    )
    got = parsed(
        [
            "simulate",
            "--config",
            str(path),
            "--hyper",
            "fedmask.lr=0.1",
            "--data-option",
            "shard_size=200",
            "--mask-option",
            'masked_layers=["conv*", "fc2"]',
        ]
    )
    assert got.hyper == {"fedmask": {"lr": 0.1, "finetune_epochs": 3}, "fedavg": {"lr": 0.05}}
    assert got.dataset_kwargs == {"shard_size": 200, "shards_per_device": 2}
    assert got.mask_config == {"granularity": "unit", "masked_layers": ["conv*", "fc2"]}
    assert got.arch_kwargs == {"width": 0.25}


def test_environment_mappings_are_json_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMASK_ARCH_KWARGS", '{"width": 0.5}')
    monkeypatch.setenv("FEDMASK_HYPER", '{"fedmask": {"lr": 0.3}}')
    monkeypatch.setenv("FEDMASK_DEVICES", "12")
    got = parsed(["simulate", "--dataset", "fashion_mnist"])
    assert (got.arch_kwargs, got.hyper, got.devices) == ({"width": 0.5}, {"fedmask": {"lr": 0.3}}, 12)


def test_a_top_level_hyper_mapping_is_used(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("hyper:\n  fedmask: {lr: 0.25}\n  fedavg_ft: {finetune_epochs: 2}\n")
    got = parsed(["simulate", "--config", str(path)])
    assert got.hyper == {"fedmask": {"lr": 0.25}, "fedavg_ft": {"finetune_epochs": 2}}


def test_options_reach_the_model_and_the_loader(tmp_path: Path) -> None:
    """The parsed mappings are what the run hands on: the task spec builds a model of that width."""
    from fedmask.models import WeightMode
    from fedmask.simulator.run import task_spec
    from fedmask.strategies.model_factory import build_for

    config = parsed(
        [
            "simulate",
            "--dataset",
            "hmp",
            "--arch-option",
            "width=0.5",
            "--mask-option",
            'masked_layers=["fc*"]',
            "--hyper",
            "fedmask.lr=0.2",
        ]
    )
    spec = task_spec(config, "fedmask", "har_cnn", 14)
    assert spec.hyper["lr"] == 0.2
    model = build_for(spec, WeightMode.MASK)
    assert model.conv1.out_channels == 16  # 32 channels at width 0.5
    assert model.mask_config.masked_layers == ("fc*",)


def test_a_simulate_run_carries_the_options_into_its_results(hmp_root: Path, tmp_path: Path) -> None:
    """End to end: flags and a config file's mappings arrive in the run (results.json records them)."""
    import subprocess

    config = tmp_path / "run.yaml"
    config.write_text(
        "hyper: {fedmask: {finetune_epochs: 1}}\n"
        "simulate: {mask_config: {masked_layers: ['fc*']}, dataset_kwargs: {test_fraction: 0.3}}\n"
    )
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "fedmask", "simulate", "--config", str(config), "--transport", "inproc",
        "--strategy", "fedmask", "--rounds", "1", "--devices", "2", "--arch-option", "width=0.5",
        "--data-root", str(hmp_root.parents[1]), "--output-dir", str(out), "--log-level", "WARNING",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMASK_")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((out / "results.json").read_text())["config"]
    assert recorded["arch_kwargs"] == {"width": 0.5}
    assert recorded["mask_config"] == {"masked_layers": ["fc*"]}
    assert recorded["dataset_kwargs"] == {"test_fraction": 0.3}
    assert recorded["hyper"] == {"fedmask": {"finetune_epochs": 1}}
