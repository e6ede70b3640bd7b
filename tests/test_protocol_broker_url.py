"""protocol.broker_url: mqtt:// and mqtts:// URLs, credentials from URL, file or environment."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedmask.protocol.broker_url import (
    ENV_PASSWORD,
    ENV_USERNAME,
    BrokerUrl,
    BrokerUrlError,
    load_credentials,
    parse_broker_url,
)

NO_ENV: dict[str, str] = {}


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerUrl("broker.local", 1883)),
        ("mqtt://10.0.0.5:11883/", BrokerUrl("10.0.0.5", 11883)),
        ("mqtts://broker.local", BrokerUrl("broker.local", 8883, tls=True)),
        ("mqtt://[::1]:1884", BrokerUrl("::1", 1884)),
        ("mqtt://dev-1@h", BrokerUrl("h", 1883, username="dev-1")),
        (
            "mqtts://dev-1:p%40ss:w@h:9000",
            BrokerUrl("h", 9000, tls=True, username="dev-1", password="p@ss:w"),
        ),
    ],
)
def test_parse(url: str, expected: BrokerUrl) -> None:
    assert parse_broker_url(url, env=NO_ENV) == expected


def test_password_never_shows() -> None:
    broker = parse_broker_url("mqtts://dev-1:hunter2@h", env=NO_ENV)
    assert broker.password == "hunter2"
    assert "hunter2" not in repr(broker) and "hunter2" not in str(broker)
    assert str(broker) == "mqtts://dev-1@h:8883"
    with pytest.raises(BrokerUrlError) as err:
        parse_broker_url("http://dev-1:hunter2@h", env=NO_ENV)
    assert "hunter2" not in str(err.value) and "mqtt://" in str(err.value)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("tcp://h", "scheme must be"),
        ("mqtt://", "no host"),
        ("mqtt://h:70000", "out of range"),
        ("mqtt://h:abc", "Port could not be cast"),
        ("mqtt://h:0", "1-65535"),
        ("mqtt://h/topic", "no path"),
        ("mqtt://h?ca=x", "no path, query"),
        ("mqtt://:pw@h", "needs a username"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(BrokerUrlError, match=complaint):
        parse_broker_url(url, env=NO_ENV)


def test_ca_file_must_exist_and_needs_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with pytest.raises(BrokerUrlError, match=r"CA file .*ca\.pem does not exist"):
        parse_broker_url("mqtts://h", ca_file=ca, env=NO_ENV)
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert parse_broker_url("mqtts://h", ca_file=ca, env=NO_ENV).ca_file == str(ca)
    with pytest.raises(BrokerUrlError, match="no TLS"):
        parse_broker_url("mqtt://h", ca_file=ca, env=NO_ENV)


def test_credentials_file_line_and_json(tmp_path: Path) -> None:
    line = secret_file(tmp_path / "line", "dev-3:pa:ss\n")
    assert load_credentials(line) == ("dev-3", "pa:ss")
    js = secret_file(tmp_path / "creds.json", json.dumps({"username": "dev-4", "password": "x"}))
    broker = parse_broker_url("mqtt://h", credentials_file=js, env=NO_ENV)
    assert (broker.username, broker.password) == ("dev-4", "x")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("justuser", "one line 'username:password'"),
        ("a:b\nc:d", "one line"),
        (":nouser", "one line"),
        ("{not json", "invalid JSON"),
        ('{"username": "a"}', '"password"'),
    ],
)
def test_bad_credentials_files_name_the_file(tmp_path: Path, text: str, complaint: str) -> None:
    path = secret_file(tmp_path / "creds", text)
    with pytest.raises(BrokerUrlError, match=complaint) as err:
        load_credentials(path)
    assert str(path) in str(err.value)


def test_missing_credentials_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BrokerUrlError, match=r"credentials file .*nope does not exist"):
        parse_broker_url("mqtt://h", credentials_file=tmp_path / "nope", env=NO_ENV)


def test_world_readable_credentials_file_is_warned_about(tmp_path: Path, caplog) -> None:
    path = tmp_path / "creds"
    path.write_text("a:b")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedmask.protocol.broker_url"):
        load_credentials(path)
    assert "readable by other users" in caplog.text


def test_precedence_url_then_file_then_environment(tmp_path: Path) -> None:
    env = {ENV_USERNAME: "env-user", ENV_PASSWORD: "env-pw"}
    creds = secret_file(tmp_path / "creds", "file-user:file-pw")
    assert parse_broker_url("mqtt://h", env=env).username == "env-user"
    assert parse_broker_url("mqtt://h", credentials_file=creds, env=env).username == "file-user"
    assert parse_broker_url("mqtt://url-user:pw@h", credentials_file=creds, env=env).username == "url-user"
    assert parse_broker_url("mqtt://h", env=NO_ENV).username is None


def test_environment_password_without_username_is_an_error() -> None:
    with pytest.raises(BrokerUrlError, match=ENV_USERNAME):
        parse_broker_url("mqtt://h", env={ENV_PASSWORD: "pw"})


def test_shared_cli_options_resolve_from_flags_env_and_defaults(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from fedmask.config import resolve
    from fedmask.protocol.cli_options import DEFAULT_BROKER, add_broker_options, broker_from_args

    parser = argparse.ArgumentParser()
    add_broker_options(parser)
    monkeypatch.delenv("FEDMASK_BROKER", raising=False)
    monkeypatch.delenv(ENV_USERNAME, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    args = resolve(parser.parse_args([]))
    assert (args.broker, args.mqtt_protocol, args.max_payload) == (DEFAULT_BROKER, "5", 128 * 1024)
    assert broker_from_args(args) == BrokerUrl("127.0.0.1", 1883)

    creds = secret_file(tmp_path / "creds", "dev-5:pw")
    monkeypatch.setenv("FEDMASK_BROKER", "mqtts://broker.local")
    monkeypatch.setenv("FEDMASK_MAX_PAYLOAD", "65536")
    args = resolve(parser.parse_args(["--credentials-file", str(creds), "--mqtt-protocol", "3.1.1"]))
    assert (args.mqtt_protocol, args.max_payload) == ("3.1.1", 65536)
    assert broker_from_args(args) == BrokerUrl(
        "broker.local", 8883, tls=True, username="dev-5", password="pw"
    )
