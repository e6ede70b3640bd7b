"""Where the broker is and how to log in: ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``.

``mqtts`` means TLS (default port 8883, certificate checked against the system store or ``ca_file``);
``mqtt`` is plain TCP (default port 1883). Credentials come from the first of: the URL's userinfo, a
credentials file (``username:password`` on one line, or JSON ``{"username": ..., "password": ...}``),
the environment (``FEDMASK_MQTT_USERNAME`` / ``FEDMASK_MQTT_PASSWORD``). The password never appears in
``repr``, ``str`` or an error message.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
ENV_USERNAME = "FEDMASK_MQTT_USERNAME"
ENV_PASSWORD = "FEDMASK_MQTT_PASSWORD"


class BrokerUrlError(ValueError):
    """A broker URL or credentials source that cannot be used."""


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker address with its TLS settings and credentials."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # PEM bundle to verify the broker; None: the system's trust store
    certfile: str | None = None  # client certificate, for brokers that authenticate devices by TLS
    keyfile: str | None = None

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def _redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _existing_file(path: str | os.PathLike[str], what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise BrokerUrlError(f"{what} {p} does not exist or is not a file")
    return str(p)


def load_credentials(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Read ``(username, password)`` from a file: ``username:password`` or a JSON object."""
    p = Path(_existing_file(path, "credentials file"))
    mode = p.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("credentials file %s is readable by other users; chmod 600 it", p)
    text = p.read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BrokerUrlError(
                f"credentials file {p}: invalid JSON ({exc.msg} at line {exc.lineno})"
            ) from exc
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise BrokerUrlError(f'credentials file {p}: expected {{"username": "...", "password": "..."}}')
        return username, password
    lines = text.splitlines()
    if len(lines) != 1 or ":" not in lines[0] or lines[0].startswith(":"):
        raise BrokerUrlError(f"credentials file {p}: expected one line 'username:password' or a JSON object")
    username, password = lines[0].split(":", 1)
    return username, password


def parse_broker_url(
    url: str,
    *,
    ca_file: str | os.PathLike[str] | None = None,
    credentials_file: str | os.PathLike[str] | None = None,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> BrokerUrl:
    """Parse ``url`` and resolve credentials (URL > ``credentials_file`` > environment)."""
    shown = _redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # bad port, unbalanced IPv6 brackets
        raise BrokerUrlError(f"broker URL {shown!r}: {exc}") from exc
    if parts.scheme not in DEFAULT_PORTS:
        raise BrokerUrlError(
            f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://, got {parts.scheme!r}://"
        )
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {shown!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerUrlError(f"broker URL {shown!r}: expected no path, query or fragment")
    if port == 0:
        raise BrokerUrlError(f"broker URL {shown!r}: port must be 1-65535")
    tls = parts.scheme == "mqtts"
    if not tls and (ca_file or certfile or keyfile):
        raise BrokerUrlError(f"broker URL {shown!r}: CA or client certificate given, but mqtt:// has no TLS")
    broker = BrokerUrl(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=tls,
        ca_file=_existing_file(ca_file, "CA file") if ca_file else None,
        certfile=_existing_file(certfile, "client certificate") if certfile else None,
        keyfile=_existing_file(keyfile, "client key") if keyfile else None,
    )
    if parts.username is not None:
        username, password = unquote(parts.username), unquote(parts.password or "") or None
    elif credentials_file is not None:
        username, password = load_credentials(credentials_file)
    else:
        env = os.environ if env is None else env
        username, password = env.get(ENV_USERNAME) or None, env.get(ENV_PASSWORD)
        if password is not None and username is None:
            raise BrokerUrlError(f"{ENV_PASSWORD} is set but {ENV_USERNAME} is not")
    if not username and password:
        raise BrokerUrlError(f"broker URL {shown!r}: a password needs a username")
    return replace(broker, username=username or None, password=password)
