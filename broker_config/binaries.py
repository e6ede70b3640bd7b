"""Where the mosquitto executables are: an explicit environment override, then PATH, then the Debian
location (`/usr/sbin` is not on a normal user's PATH)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MOSQUITTO_ENV = "FEDMASK_MOSQUITTO"
MOSQUITTO_PASSWD_ENV = "FEDMASK_MOSQUITTO_PASSWD"


class BrokerUnavailableError(RuntimeError):
    """A broker executable the caller asked for is not installed."""


def _find(name: str, env: str, fallbacks: tuple[str, ...]) -> Path | None:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerUnavailableError(f"{env}={override} is not an executable file")
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in fallbacks:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def find_mosquitto() -> Path | None:
    """The mosquitto broker executable, or None when it is not installed."""
    return _find("mosquitto", MOSQUITTO_ENV, ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"))


def find_mosquitto_passwd() -> Path | None:
    """The mosquitto_passwd tool, or None when it is not installed."""
    return _find(
        "mosquitto_passwd",
        MOSQUITTO_PASSWD_ENV,
        ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd"),
    )


def require_mosquitto() -> Path:
    """The mosquitto executable; a clear error when it is missing."""
    path = find_mosquitto()
    if path is None:
        raise BrokerUnavailableError(
            "mosquitto is not installed (looked on PATH and in /usr/sbin); install the `mosquitto` "
            f"package or point {MOSQUITTO_ENV} at the executable"
        )
    return path
