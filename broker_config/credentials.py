"""Broker accounts: add a device (or the aggregator) to the mosquitto password file and hand the
agent its secret in a credentials file (`username:password`, mode 0600) for `--credentials-file FILE`.

The username of a device is its device id; the ACL pins each device to topics ending in its own
username, so ids must not contain MQTT wildcards or separators.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from fedmask.broker_config.binaries import BrokerUnavailableError, find_mosquitto_passwd
from fedmask.broker_config.passwords import (
    hash_password,
    read_password_file,
    write_password_file,
    write_private_file,
)
from fedmask.protocol.topics import ID_PATTERN, MAX_ID_LENGTH

logger = logging.getLogger(__name__)

AGGREGATOR_USER = "aggregator"
HEALTH_USER = "health"
# Accounts with their own ACL blocks; a device with one of these names would get their rights.
SERVICE_USERS = frozenset({AGGREGATOR_USER, HEALTH_USER})


class CredentialsError(ValueError):
    """A username, password or credentials file that cannot be used."""


class Credentials(NamedTuple):
    username: str
    password: str


def validate_username(username: str, *, what: str = "device id") -> str:
    """The wire protocol's id rule (fedmask.protocol.topics): letters, digits, '.', '_' and '-',
    starting with a letter or digit, at most 64 characters. So no '/', '+', '#' (they would widen
    the ACL's `%u` topics) and no ':' (the password-file separator)."""
    if not ID_PATTERN.fullmatch(username):
        raise CredentialsError(
            f"{what} {username!r}: expected 1-{MAX_ID_LENGTH} characters from [A-Za-z0-9._-], starting "
            "with a letter or digit (no '/', '+', '#', ':' or spaces)"
        )
    return username


def _validate_password(password: str) -> str:
    if not password or any(ch in password for ch in "\r\n\0"):
        raise CredentialsError("password must be non-empty and must not contain line breaks or NUL")
    return password


def generate_password() -> str:
    """A random secret (192 bits, URL-safe so it can sit in an mqtt:// URL unescaped)."""
    return secrets.token_urlsafe(24)


def default_credentials_path(passwd_file: str | os.PathLike[str], username: str) -> Path:
    """Where `add_device` writes a credentials file when not told: next to the password file."""
    return Path(passwd_file).parent / f"{username}.credentials"


def add_device(
    passwd_file: str | os.PathLike[str],
    device_id: str,
    password: str | None = None,
    *,
    credentials_file: str | os.PathLike[str] | None = None,
    use_tool: bool | None = None,
) -> str:
    """Add or update `device_id` in the password file and write its credentials file.

    `password` defaults to a fresh random secret. `use_tool`: None runs `mosquitto_passwd -b` when
    it is installed and otherwise writes the PBKDF2-SHA512 hash directly; True requires the tool;
    False always writes the hash directly. Returns the password. A running broker reads the
    password file again on SIGHUP.
    """
    validate_username(device_id)
    if device_id in SERVICE_USERS:
        raise CredentialsError(
            f"device id {device_id!r} is reserved for the {device_id} account; use add_service_user"
        )
    return _add_user(passwd_file, device_id, password, credentials_file, use_tool)


def add_service_user(
    passwd_file: str | os.PathLike[str],
    username: str = AGGREGATOR_USER,
    password: str | None = None,
    *,
    credentials_file: str | os.PathLike[str] | None = None,
    use_tool: bool | None = None,
) -> str:
    """Add or update the `aggregator` or `health` account; otherwise as `add_device`."""
    if username not in SERVICE_USERS:
        raise CredentialsError(f"service user must be one of {sorted(SERVICE_USERS)}, got {username!r}")
    return _add_user(passwd_file, username, password, credentials_file, use_tool)


def _add_user(
    passwd_file: str | os.PathLike[str],
    username: str,
    password: str | None,
    credentials_file: str | os.PathLike[str] | None,
    use_tool: bool | None,
) -> str:
    password = generate_password() if password is None else _validate_password(password)
    set_password(passwd_file, username, password, use_tool=use_tool)
    out = Path(credentials_file) if credentials_file else default_credentials_path(passwd_file, username)
    write_credentials(out, Credentials(username, password))
    logger.info("broker account %s: password file %s, credentials %s", username, passwd_file, out)
    return password


def set_password(
    passwd_file: str | os.PathLike[str], username: str, password: str, *, use_tool: bool | None = None
) -> None:
    """Add or update one entry of a mosquitto password file (created, mode 0600, if missing)."""
    validate_username(username, what="username")
    _validate_password(password)
    path = Path(passwd_file)
    tool = find_mosquitto_passwd() if use_tool is not False else None
    if use_tool and tool is None:
        raise BrokerUnavailableError("mosquitto_passwd is not installed (use_tool=True)")
    with _locked(path):
        if tool is not None:
            _set_with_tool(tool, path, username, password)
        else:
            entries = read_password_file(path)
            entries[username] = hash_password(password)
            write_password_file(path, entries)


def _set_with_tool(tool: Path, path: Path, username: str, password: str) -> None:
    if not path.exists():
        # mosquitto_passwd needs -c to create a file, and -c would also truncate an existing one;
        # an empty private file lets one command line serve both cases.
        write_private_file(path, "")
    # The password is on the tool's command line for the few milliseconds it runs; use_tool=False
    # avoids that on a shared host.
    result = subprocess.run(
        [str(tool), "-b", str(path), username, password],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise CredentialsError(f"{tool} could not update {path}: {detail or f'exit {result.returncode}'}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize concurrent updates of one password file (two `add-device` runs at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, as mosquitto_passwd itself
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_credentials(path: str | os.PathLike[str], credentials: Credentials) -> Path:
    """Write `username:password` readable by its owner only."""
    validate_username(credentials.username, what="username")
    _validate_password(credentials.password)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(out, f"{credentials.username}:{credentials.password}\n", mode=0o600)
    return out


def read_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file written by `add_device` (first non-empty line `username:password`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except OSError as exc:
        raise CredentialsError(f"credentials file {p}: cannot read ({exc.strerror or exc})") from exc
    if mode & 0o077:
        logger.warning(
            "credentials file %s is readable by other users (mode %o); chmod 600 it", p, mode & 0o777
        )
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    username, sep, password = line.partition(":")
    if not sep or not username or not password:
        raise CredentialsError(f"credentials file {p}: expected one line 'username:password'")
    validate_username(username, what=f"credentials file {p}: username")
    return Credentials(username, password)
