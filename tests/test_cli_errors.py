"""Errors a person can act on: every failure of `fedmask aggregator run`, `agent run`, `simulate` and the
store commands ends in one line, ``fedmask: error: <cause>; <fix>``, with exit code 2 for usage and
configuration mistakes and 1 for failures while running, and no traceback unless --log-level DEBUG.

Real processes against real things: a loopback port nothing listens on, a PostgreSQL URL with no server,
a TLS Mosquitto whose CA the client does not know, an ACL Mosquitto that refuses a publish.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.broker import BrokerHandle

from fedmask.broker_config.embedded import free_loopback_port
from fedmask.cli import main

TASK = "strategy: fedmask\narch: har_cnn\nnum_classes: 14\nschedule: {rounds: 1, quorum: 1}\n"
BAD_POSTGRES = "postgresql://nouser@127.0.0.1:1/x"


def fedmask(*argv: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDMASK_")}
    return subprocess.run(
        [sys.executable, "-m", "fedmask", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def error_line(stderr: str) -> str:
    """The last stderr line, checked to be the one-line error (and no traceback before it)."""
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("fedmask: error: "), stderr
    assert "; " in line, f"no fix hint in {line!r}"
    return line


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(TASK)
    return path


@pytest.fixture
def device_file(tmp_path: Path) -> Path:
    from fedmask.datasets.federated import DeviceData, save_device

    rng = np.random.default_rng(0)
    data = DeviceData(
        "dev-1",
        rng.normal(size=(8, 3, 128)).astype(np.float32),
        np.arange(8) % 14,
        rng.normal(size=(4, 3, 128)).astype(np.float32),
        np.arange(4) % 14,
        num_classes=14,
    )
    return save_device(data, tmp_path / "dev-1.npz")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FEDMASK_"):
            monkeypatch.delenv(key)


# -- configuration and usage mistakes: exit code 2 ----------------------------------------------------------


def test_unknown_strategy_in_the_task_file(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(TASK.replace("fedmask", "fedmsk"))
    result = fedmask("aggregator", "run", "--task", str(task), "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert result.returncode == 2
    assert "strategy: unknown strategy 'fedmsk'; did you mean 'fedmask'?" in error_line(result.stderr)
    assert not (tmp_path / "a.db").exists()  # nothing was started


def test_task_file_missing_a_key(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text("strategy: fedmask\narch: har_cnn\n")
    result = fedmask("aggregator", "run", "--task", str(task))
    assert result.returncode == 2
    assert f"task file {task}: missing num_classes; a task file names" in error_line(result.stderr)


def test_task_file_keys_and_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "task.yaml"
    cases = {
        TASK + "schedul: {rounds: 2}\n": "unknown key 'schedul'; did you mean 'schedule'?",
        TASK.replace("quorum", "quorm"): "schedule: unknown key 'quorm'; did you mean 'quorum'?",
        TASK + "arch_kwargs: {widht: 0.5}\n": "arch_kwargs for har_cnn: unknown option 'widht'",
        TASK + "mask_config: {granularty: unit}\n": "mask_config: unknown option 'granularty'",
        TASK.replace("har_cnn", "har_cn"): "arch: unknown architecture 'har_cn'",
    }
    for text, message in cases.items():
        task.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["aggregator", "run", "--task", str(task)])
        assert exit_.value.code == 2, text
        assert message in error_line(capsys.readouterr().err)
    # One through a real process, for the message as printed.
    task.write_text(TASK + "schedul: {rounds: 2}\n")
    result = fedmask("aggregator", "run", "--task", str(task))
    assert result.returncode == 2 and "did you mean 'schedule'?" in error_line(result.stderr)


def test_task_and_agent_options_are_required(tmp_path: Path) -> None:
    result = fedmask("aggregator", "run")
    assert result.returncode == 2
    assert "no task; pass --task FILE" in error_line(result.stderr)
    result = fedmask("agent", "run", "--data", "x.npz")
    assert result.returncode == 2
    assert "agent run: --device-id is required; pass --device-id" in error_line(result.stderr)


def test_missing_config_file_and_unknown_config_key(tmp_path: Path, task_file: Path) -> None:
    result = fedmask("agent", "run", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml does not exist; check the --config path" in error_line(result.stderr)
    config = tmp_path / "fleet.yaml"
    config.write_text("brokr: mqtt://127.0.0.1:1883\n")
    result = fedmask("aggregator", "run", "--task", str(task_file), "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'brokr'; did you mean 'broker'?" in error_line(result.stderr)


def test_bad_flags_are_one_line_usage_errors() -> None:
    result = fedmask("simulate", "--rounds", "many")
    assert result.returncode == 2
    assert "argument --rounds: invalid int value: 'many'; see `fedmask simulate --help`" in error_line(
        result.stderr
    )
    result = fedmask("agent", "run", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in error_line(result.stderr)


def test_simulate_unknown_names_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("--dataset", "fashion_mnst"): "unknown workload 'fashion_mnst'; did you mean 'fashion_mnist'?",
        ("--strategy", "fedmask,fedavgft"): "unknown strategy 'fedavgft'; did you mean 'fedavg_ft'?",
        ("--arch", "conv5"): "unknown architecture 'conv5'; did you mean",
        ("--hyper", "fedmask"): "expected STRATEGY.KEY=VALUE",
        ("--arch-option", "width"): "expected KEY=VALUE",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["simulate", "--output-dir", str(tmp_path / "out"), *argv])
        assert exit_.value.code == 2
        assert message in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_bad_database_url_is_a_usage_error(tmp_path: Path, task_file: Path) -> None:
    result = fedmask("aggregator", "run", "--task", str(task_file), "--db", "mysql://u@h/db")
    assert result.returncode == 2
    assert "unsupported backend 'mysql'" in error_line(result.stderr)
    result = fedmask("devices", "--db", "not a url")
    assert result.returncode == 2 and "not a valid SQLAlchemy URL" in error_line(result.stderr)


# -- failures while running: exit code 1 --------------------------------------------------------------------


def test_database_unreachable(task_file: Path) -> None:
    result = fedmask("aggregator", "run", "--task", str(task_file), "--db", BAD_POSTGRES)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "database postgresql+psycopg://nouser@127.0.0.1:1/x: connection failed" in line
    assert "check --db (or FEDMASK_DB) and that the database server is running" in line
    for argv in (["devices"], ["rounds"], ["models", "list"], ["db", "upgrade"]):
        result = fedmask(*argv, "--db", BAD_POSTGRES)
        assert result.returncode == 1, argv
        assert "connection failed" in error_line(result.stderr)


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = fedmask("agent", "run", "--device-id", "dev-1", "--data", str(tmp_path / "gone.npz"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "gone.npz: device data file does not exist" in line and "fedmask data partition" in line
    # The simulator's data root without the data set.
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        ["simulate", "--transport", "inproc", "--data-root", str(empty), "--output-dir", str(tmp_path)]
    )
    assert code == 1
    assert "no hmp data found" in error_line(capsys.readouterr().err)


def test_debug_log_level_after_the_subcommand_adds_the_traceback(tmp_path: Path) -> None:
    result = fedmask(
        "agent", "run", "--device-id", "d", "--data", str(tmp_path / "x.npz"), "--log-level", "DEBUG"
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fedmask: error: ")


def fedmask_together(*commands: list[str]) -> list[tuple[int, str]]:
    """Run several `fedmask` processes at once (each waits out its connect timeout); (code, stderr) each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMASK_")}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fedmask", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    results = []
    for process in processes:
        _, stderr = process.communicate(timeout=90)
        results.append((process.returncode, stderr))
    return results


def aggregator_and_agent(tmp_path: Path, task_file: Path, device_file: Path, broker: str) -> list[list[str]]:
    return [
        ["aggregator", "run", "--task", str(task_file), "--broker", broker, "--db", f"sqlite:///{tmp_path}/a.db"],
        ["--log-level", "ERROR", "agent", "run", "--device-id", "dev-1", "--data", str(device_file),
         "--broker", broker, "--state-dir", str(tmp_path / "state")],
    ]  # fmt: skip


@pytest.mark.slow
def test_broker_unreachable(tmp_path: Path, task_file: Path, device_file: Path) -> None:
    broker = f"mqtt://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    for code, stderr in fedmask_together(*aggregator_and_agent(tmp_path, task_file, device_file, broker)):
        assert code == 1
        line = error_line(stderr)
        assert f"cannot connect to {broker}" in line and "Connection refused" in line
        assert "is the broker running and reachable there?" in line


def test_malformed_broker_options_are_usage_errors(tmp_path: Path, device_file: Path) -> None:
    result = fedmask(
        "agent", "run", "--device-id", "dev-1", "--data", str(device_file), "--broker", "ftp://x"
    )
    assert result.returncode == 2
    assert "scheme must be mqtt:// or mqtts://" in error_line(result.stderr)
    result = fedmask(
        "agent", "run", "--device-id", "dev-1", "--data", str(device_file), "--broker", "mqtts://h",
        "--ca-file", str(tmp_path / "none.pem"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "none.pem does not exist" in error_line(result.stderr)


@pytest.mark.broker
@pytest.mark.slow
def test_tls_verify_failure(tmp_path: Path, task_file: Path, device_file: Path, tls_mosquitto) -> None:
    port, _ca = tls_mosquitto
    # The system trust store does not know the test CA.
    commands = aggregator_and_agent(tmp_path, task_file, device_file, f"mqtts://127.0.0.1:{port}")
    results = fedmask_together(*commands)
    for code, stderr in results:
        assert code == 1
        line = error_line(stderr)
        assert "certificate verify failed" in line
        assert "pass the CA that signed it with --ca-file" in line


def test_agent_credentials_of_another_device_are_refused_before_connecting(
    tmp_path: Path, device_file: Path
) -> None:
    """The ACL would refuse every publish of an agent whose username is not its device id."""
    credentials = tmp_path / "dev-2.credentials"
    credentials.write_text("dev-2:secret\n")
    credentials.chmod(0o600)
    result = fedmask(
        "agent", "run", "--device-id", "dev-1", "--data", str(device_file), "--credentials-file",
        str(credentials), "--broker", f"mqtt://127.0.0.1:{free_loopback_port()}",
    )  # fmt: skip
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "credentials are for user 'dev-2' but --device-id is 'dev-1'" in line
    assert "--device-id dev-2" in line


@pytest.mark.broker
def test_refused_publish_and_refused_login(mosquitto: BrokerHandle, tmp_path: Path, task_file: Path) -> None:
    db = f"sqlite:///{tmp_path / 'a.db'}"
    # A device account may not publish the fleet's task: the broker's ACL refuses it.
    device = mosquitto.credentials_file("dev-1")
    result = fedmask(
        "aggregator", "run", "--task", str(task_file), "--broker", mosquitto.url(),
        "--credentials-file", str(device), "--db", db, "--log-level", "ERROR",
    )  # fmt: skip
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "broker refused publish to 'fedmask/v1/default/task': Not authorized" in line
    assert "ACL" in line
    # No credentials at all: the broker refuses the connection.
    result = fedmask(
        "aggregator", "run", "--task", str(task_file), "--broker", mosquitto.url(), "--db", db,
        "--log-level", "ERROR",
    )  # fmt: skip
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "refused fedmask-aggregator-default: Not authorized" in line and "--credentials-file" in line
