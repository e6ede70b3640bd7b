"""Pure checks of the broker_config helpers: config rendering and editing, password hashes,
account names and credentials files. No broker is started here."""

from __future__ import annotations

import stat
import string
from pathlib import Path

import pytest

from fedmask.broker_config import configs
from fedmask.broker_config.configs import (
    ConfigFileError,
    listener_ports,
    named_config,
    option_values,
    remap_listeners,
    render_template,
    render_test_config,
    set_options,
)
from fedmask.broker_config.credentials import (
    Credentials,
    CredentialsError,
    add_device,
    add_service_user,
    read_credentials,
    validate_username,
    write_credentials,
)
from fedmask.broker_config.passwords import (
    PasswordFileError,
    hash_password,
    read_password_file,
    verify_password,
)

# --- packaged files ------------------------------------------------------------------------------


def test_packaged_files_exist_and_named_configs_resolve():
    for path in (configs.ACL_FILE, configs.TEST_TEMPLATE, *configs.NAMED_CONFIGS.values()):
        assert path.is_file(), path
    assert named_config("dev") == configs.PACKAGE_DIR / "dev.conf"
    assert named_config("production") == configs.PACKAGE_DIR / "production.conf"


def test_named_config_accepts_a_file_and_names_the_choices_otherwise(tmp_path):
    own = tmp_path / "mine.conf"
    own.write_text("listener 1999 127.0.0.1\n")
    assert named_config(str(own)) == own
    with pytest.raises(ConfigFileError, match=r"'nope'.*dev, production, test"):
        named_config("nope")


def test_template_uses_exactly_the_documented_placeholders():
    fields = {f for _, f, _, _ in string.Formatter().parse(configs.TEST_TEMPLATE.read_text()) if f}
    assert fields == configs.TEMPLATE_FIELDS


def test_dev_config_is_loopback_only_and_production_refuses_anonymous():
    dev = named_config("dev").read_text()
    assert all(line.split()[2] == "127.0.0.1" for line in dev.splitlines() if line.startswith("listener "))
    prod = named_config("production").read_text()
    assert option_values(prod, "allow_anonymous") == ["false", "false", "false"]
    # Each listener its own accounts: the devices', the aggregator's, the health probe's.
    assert option_values(prod, "per_listener_settings") == ["true"]
    assert [Path(p).name for p in option_values(prod, "password_file")] == [
        "fedmask.passwd",
        "fedmask-aggregator.passwd",
        "fedmask-health.passwd",
    ]
    # Every listener but the loopback health listener is TLS (has a certfile in its section).
    sections = prod.split("\nlistener ")[1:]
    plain = [s.split("\n", 1)[0] for s in sections if "\ncertfile " not in s]
    assert plain == ["1883 127.0.0.1"]
    assert option_values(prod, "tls_version") == ["tlsv1.2", "tlsv1.2"]


# --- rendering and editing -----------------------------------------------------------------------


def test_render_template_names_a_missing_placeholder():
    with pytest.raises(ConfigFileError, match=r"my.template: no value for placeholder\(s\) acl_file"):
        render_template("port {port}\nacl_file {acl_file}\n", {"port": 1}, source="my.template")


def test_render_template_refuses_values_that_would_inject_lines():
    with pytest.raises(ConfigFileError, match=r"\{password_file\} must be a single line"):
        render_template("password_file {password_file}\n", {"password_file": "x\nallow_anonymous true"})


def test_authenticated_test_config_points_at_password_file_and_acl(tmp_path):
    text = render_test_config(port=4321, persistence_dir=tmp_path / "data", password_file=tmp_path / "pw")
    assert listener_ports(text) == [4321]
    assert option_values(text, "allow_anonymous") == ["false"]
    assert option_values(text, "password_file") == [str(tmp_path / "pw")]
    assert option_values(text, "acl_file") == [str(configs.ACL_FILE)]
    assert option_values(text, "persistence_location") == [f"{tmp_path / 'data'}/"]


def test_anonymous_test_config_drops_password_file_and_acl(tmp_path):
    text = render_test_config(port=4321, persistence_dir=tmp_path, anonymous=True)
    assert option_values(text, "allow_anonymous") == ["true"]
    assert option_values(text, "password_file") == []
    assert option_values(text, "acl_file") == []


def test_authenticated_test_config_requires_a_password_file(tmp_path):
    with pytest.raises(ConfigFileError, match="needs a password_file"):
        render_test_config(port=4321, persistence_dir=tmp_path)
    with pytest.raises(ConfigFileError, match=r"port must be 1\.\.65535"):
        render_test_config(port=70000, persistence_dir=tmp_path, anonymous=True)


def test_set_options_replaces_every_occurrence_deletes_and_appends():
    text = "# comment\nlistener 1 a\ncafile /x\nlistener 2 b\ncafile /x\npid_file /run/p\n"
    out = set_options(text, {"cafile": "/y", "pid_file": None, "user": "me"})
    assert option_values(out, "cafile") == ["/y", "/y"]
    assert option_values(out, "pid_file") == []
    assert out.splitlines()[-1] == "user me"
    assert "# comment" in out


def test_remap_listeners_moves_ports_and_binds_to_the_given_host():
    prod = named_config("production").read_text()
    assert listener_ports(prod) == [8883, 8884, 1883]
    out = remap_listeners(prod, {8883: 20001, 1883: 20003}, host="127.0.0.1")
    assert listener_ports(out) == [20001, 8884, 20003]
    assert "listener 20001 127.0.0.1" in out.splitlines()
    with pytest.raises(ConfigFileError, match=r"no listener on port\(s\) \[9999\]"):
        remap_listeners(prod, {9999: 1})


# --- password hashes -----------------------------------------------------------------------------


def test_hash_has_mosquitto_layout_and_verifies():
    hashed = hash_password("s3cret")
    _, tag, iterations, salt, digest = hashed.split("$")
    assert (tag, iterations) == ("7", "101")
    assert len(salt) == 16 and len(digest) == 88  # base64 of 12 and 64 bytes
    assert verify_password("s3cret", hashed)
    assert not verify_password("s3cret ", hashed)
    assert hash_password("s3cret") != hashed  # fresh salt each time


def test_verify_refuses_other_hash_formats():
    with pytest.raises(PasswordFileError, match=r"not a mosquitto PBKDF2-SHA512 \(\$7\$\) hash"):
        verify_password("x", "$6$abc$def")


def test_password_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("dev-1:$7$101$a$b\nnot-a-line\n")
    with pytest.raises(PasswordFileError, match=rf"{path}:2: expected 'username:hash'"):
        read_password_file(path)


# --- account names and credentials files ---------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/b", "dev+1", "dev#", "a:b", " dev", "-dev", "dév", "$SYS", "x" * 65])
def test_device_ids_that_would_break_the_acl_or_the_file_are_refused(bad):
    with pytest.raises(CredentialsError, match="expected 1-64 characters"):
        validate_username(bad)


@pytest.mark.parametrize("good", ["dev-1", "Pi4.kitchen_02", "x" * 64, "7"])
def test_plain_device_ids_are_accepted(good):
    assert validate_username(good) == good


@pytest.mark.parametrize("reserved", ["aggregator", "health"])
def test_device_cannot_take_a_service_account_name(tmp_path, reserved):
    with pytest.raises(CredentialsError, match="reserved"):
        add_device(tmp_path / "passwd", reserved, use_tool=False)
    assert not (tmp_path / "passwd").exists()


def test_service_user_must_be_a_known_role(tmp_path):
    with pytest.raises(CredentialsError, match="service user must be one of"):
        add_service_user(tmp_path / "passwd", "root", use_tool=False)


def test_native_add_device_writes_hash_and_private_credentials(tmp_path):
    passwd = tmp_path / "passwd"
    password = add_device(passwd, "dev-1", use_tool=False)
    again = add_device(passwd, "dev-2", "chosen-pw", use_tool=False)
    assert again == "chosen-pw"
    entries = read_password_file(passwd)
    assert list(entries) == ["dev-1", "dev-2"]
    assert verify_password(password, entries["dev-1"]) and verify_password("chosen-pw", entries["dev-2"])
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    creds_file = tmp_path / "dev-1.credentials"
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    assert read_credentials(creds_file) == Credentials("dev-1", password)
    assert len(password) >= 32


def test_updating_a_device_replaces_its_hash_only(tmp_path):
    passwd = tmp_path / "passwd"
    add_device(passwd, "dev-1", "one", use_tool=False)
    add_device(passwd, "dev-2", "two", use_tool=False)
    add_device(passwd, "dev-1", "uno", use_tool=False)
    entries = read_password_file(passwd)
    assert list(entries) == ["dev-1", "dev-2"]
    assert verify_password("uno", entries["dev-1"]) and not verify_password("one", entries["dev-1"])
    assert verify_password("two", entries["dev-2"])


def test_credentials_file_keeps_colons_and_spaces_in_passwords(tmp_path):
    path = write_credentials(tmp_path / "c", Credentials("dev-1", " a:b c "))
    assert path.read_text() == "dev-1: a:b c \n"
    assert read_credentials(path) == Credentials("dev-1", " a:b c ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "expected one line 'username:password'"),
        ("dev-1\n", "expected one line"),
        ("a/b:pw\n", "username"),
    ],
)
def test_bad_credentials_files_are_refused_with_the_file_name(tmp_path, content, message):
    path = tmp_path / "device.credentials"
    path.write_text(content)
    with pytest.raises(CredentialsError, match=message) as info:
        read_credentials(path)
    assert str(path) in str(info.value)


def test_missing_credentials_file_is_a_clear_error(tmp_path):
    with pytest.raises(CredentialsError, match=r"credentials file .*nothing: cannot read"):
        read_credentials(tmp_path / "nothing")


def test_password_with_line_break_is_refused(tmp_path):
    with pytest.raises(CredentialsError, match="line breaks"):
        add_device(tmp_path / "passwd", "dev-1", "a\nb", use_tool=False)


def test_packaged_cluster_example_is_present():
    cluster = Path(configs.PACKAGE_DIR) / "cluster"
    assert (cluster / "README.md").is_file()
    assert (cluster / "emqx.conf").is_file()
    assert (cluster / "acl.conf").is_file()
