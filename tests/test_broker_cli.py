"""`fedmask broker ...` through the real `fedmask` entry point (in-process for the account commands,
as a subprocess for `run`)."""

from __future__ import annotations

import io
import signal
import stat
import subprocess
import sys

import pytest
from fixtures.broker import Endpoint, wait_until

from fedmask.broker_config.binaries import find_mosquitto
from fedmask.broker_config.credentials import Credentials, read_credentials
from fedmask.broker_config.embedded import free_loopback_port, wait_until_listening
from fedmask.broker_config.passwords import read_password_file, verify_password
from fedmask.cli import main

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def test_add_device_writes_account_and_private_credentials(tmp_path, capsys):
    passwd, out = tmp_path / "fleet.passwd", tmp_path / "creds" / "dev-1.credentials"
    assert (
        main(["broker", "add-device", "--passwd", str(passwd), "--device", "dev-1", "--out", str(out)]) == 0
    )
    creds = read_credentials(out)
    assert creds.username == "dev-1"
    assert verify_password(creds.password, read_password_file(passwd)["dev-1"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert str(out) in capsys.readouterr().out


def test_add_device_takes_passwd_from_the_environment_and_password_from_stdin(tmp_path, monkeypatch):
    passwd = tmp_path / "env.passwd"
    monkeypatch.setenv("FEDMASK_PASSWD", str(passwd))
    monkeypatch.setattr(sys, "stdin", io.StringIO("chosen secret\n"))
    assert main(["broker", "add-device", "--device", "dev-2", "--password-stdin"]) == 0
    assert verify_password("chosen secret", read_password_file(passwd)["dev-2"])
    assert read_credentials(tmp_path / "dev-2.credentials") == Credentials("dev-2", "chosen secret")


def test_add_service_user_writes_the_aggregator_account(tmp_path):
    passwd = tmp_path / "fleet.passwd"
    assert main(["broker", "add-service-user", "--passwd", str(passwd)]) == 0
    creds = read_credentials(tmp_path / "aggregator.credentials")
    assert verify_password(creds.password, read_password_file(passwd)["aggregator"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["broker", "add-device", "--device", "dev-1"], "--passwd FILE is required"),
        (["broker", "add-device", "--passwd", "{tmp}/p", "--device", "aggregator"], "reserved"),
        (["broker", "add-device", "--passwd", "{tmp}/p", "--device", "a/b"], "expected 1-64 characters"),
        (["broker", "run", "--config", "test", "--dry-run"], "--config test needs --passwd FILE"),
        (["broker", "run", "--config", "no-such.conf", "--dry-run"], "not one of dev, production, test"),
        (["broker", "run", "--port", "0", "--dry-run"], "--port must be 1..65535"),
        (["broker", "run", "--port-map", "8883:1", "--dry-run"], "expected OLD=NEW"),
        (["broker", "run", "--config", "production", "--port-map", "9999=1", "--dry-run"], "no listener on"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("FEDMASK_PASSWD", raising=False)
    with pytest.raises(SystemExit) as info:
        main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_run_dry_run_moves_the_dev_listener(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["broker", "run", "--port", "18999", "--data-dir", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "listener 18999 127.0.0.1" in out.splitlines()
    assert "allow_anonymous true" in out.splitlines()
    assert out.startswith("# command: ") and str(data / "dev-port18999.conf") in out.splitlines()[0]


def test_run_dry_run_moves_every_production_listener_and_path(tmp_path, capsys):
    """A one-machine trial of production.conf: loopback, free ports, files under the trial's folders;
    everything else as shipped, and no deprecated option."""
    etc, data = tmp_path / "conf", tmp_path / "data"
    argv = ["broker", "run", "--config", "production", "--bind", "127.0.0.1", "--config-dir", str(etc)]
    argv += ["--port-map", "8883=18883", "--port-map", "8884=18884", "--port-map", "1883=11883"]
    argv += ["--data-dir", str(data), "--log-dest", "stderr", "--user", "nobody", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# command: {find_mosquitto() or 'mosquitto'} -c {data / 'production-local.conf'}"
    assert [line for line in lines if line.startswith("listener")] == [
        "listener 18883 127.0.0.1",
        "listener 18884 127.0.0.1",
        "listener 11883 127.0.0.1",
    ]
    assert f"cafile {etc}/certs/ca.crt" in lines and f"password_file {etc}/fedmask-aggregator.passwd" in lines
    assert f"persistence_location {data}/" in lines and f"pid_file {data}/mosquitto.pid" in lines
    assert "log_dest stderr" in lines and "user nobody" in lines
    options = [line for line in lines if line and not line.startswith("#")]
    assert not [line for line in options if "/etc/" in line or "/var/" in line or "/run/" in line]
    assert "use_username_as_clientid true" in lines and "max_packet_size 266240" in lines
    assert not [line for line in lines if line.startswith("message_size_limit")]


@needs_mosquitto
def test_run_test_config_serves_devices_reloads_on_sighup_and_stops_on_sigterm(tmp_path, mqtt_probe):
    passwd, data = tmp_path / "fleet.passwd", tmp_path / "data"
    assert main(["broker", "add-device", "--passwd", str(passwd), "--device", "dev-1"]) == 0
    port = free_loopback_port()
    command = [sys.executable, "-m", "fedmask", "broker", "run", "--config", "test"]
    command += ["--passwd", str(passwd), "--port", str(port), "--data-dir", str(data)]
    # The log is a file, not a pipe: mosquitto writes to the stderr it inherits.
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stderr=log)
        try:
            _exercise_running_broker(process, port, passwd, tmp_path, mqtt_probe)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not wait_until_listening("127.0.0.1", port, 0.5, lambda: True)  # mosquitto is gone too
    assert (data / "mosquitto.db").is_file()  # and saved its database on the way out


def _exercise_running_broker(process, port, passwd, tmp_path, mqtt_probe) -> None:
    assert wait_until_listening("127.0.0.1", port, 15.0, lambda: process.poll() is None), "broker not up"
    broker = Endpoint("127.0.0.1", port)
    device = mqtt_probe(broker, credentials=read_credentials(tmp_path / "dev-1.credentials"))
    assert not device.publish("fedmask/v1/fleet-a/up/dev-1", b"u").is_failure

    # An account added while the broker runs works once `fedmask` forwards SIGHUP to mosquitto.
    assert main(["broker", "add-device", "--passwd", str(passwd), "--device", "dev-2"]) == 0
    late = read_credentials(tmp_path / "dev-2.credentials")
    process.send_signal(signal.SIGHUP)

    def dev2_logs_in() -> bool:
        probe = mqtt_probe(broker, credentials=late, expect_refusal=True)
        probe.close()
        return not probe.connack.is_failure

    wait_until(dev2_logs_in, 5.0, "dev-2 login after SIGHUP")


def test_broker_help_lists_the_actions(capsys):
    assert main(["broker"]) == 2
    out = capsys.readouterr().out
    for action in ("add-device", "add-service-user", "run"):
        assert action in out


def test_module_is_importable_without_heavy_dependencies():
    code = (
        "import sys, fedmask.broker_config.cli\n"
        "heavy = {'torch', 'sqlalchemy', 'amqtt', 'paho'} & {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_credentials_file_default_sits_next_to_the_password_file(tmp_path):
    passwd = tmp_path / "nested" / "fleet.passwd"
    passwd.parent.mkdir()
    assert main(["broker", "add-device", "--passwd", str(passwd), "--device", "dev-7"]) == 0
    creds = read_credentials(passwd.parent / "dev-7.credentials")
    assert verify_password(creds.password, read_password_file(passwd)["dev-7"])
