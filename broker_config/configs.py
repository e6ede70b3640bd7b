"""The packaged mosquitto configuration files, and the few line-level edits the tools make to them.

Mosquitto's format is one `option value` per line, with `listener` starting a section that later
listener options belong to. The helpers here only replace whole option lines, so comments and the
order of sections are kept and a derived file still reads like the packaged one.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ACL_FILE = PACKAGE_DIR / "fedmask.acl"
TEST_TEMPLATE = PACKAGE_DIR / "test.conf.template"
NAMED_CONFIGS = {"dev": PACKAGE_DIR / "dev.conf", "production": PACKAGE_DIR / "production.conf"}
TEMPLATE_FIELDS = frozenset({"port", "password_file", "acl_file", "persistence_dir", "run_as_user"})

_LISTENER = re.compile(r"^(\s*)listener\s+(\d+)(?:\s+(\S+))?\s*$")


class ConfigFileError(ValueError):
    """A mosquitto configuration that cannot be used as asked."""


def named_config(name_or_path: str | os.PathLike[str]) -> Path:
    """`dev` or `production` give the packaged file; anything else is a path that must exist."""
    key = os.fspath(name_or_path)
    if key in NAMED_CONFIGS:
        return NAMED_CONFIGS[key]
    path = Path(key)
    if not path.is_file():
        names = ", ".join([*NAMED_CONFIGS, "test"])
        raise ConfigFileError(f"mosquitto config {key!r}: not one of {names} and no such file")
    return path


def current_user() -> str:
    """Name of the effective user, for mosquitto's `user` option."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        import getpass

        return getpass.getuser()


def render_template(template: str, values: Mapping[str, object], *, source: str = "template") -> str:
    """Fill `{name}` placeholders; every placeholder must be given and no value may span lines."""
    wanted = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    missing = sorted(wanted - values.keys())
    if missing:
        raise ConfigFileError(f"{source}: no value for placeholder(s) {', '.join(missing)}")
    text_values = {key: str(value) for key, value in values.items()}
    for key, value in text_values.items():
        if "\n" in value or "\r" in value:
            raise ConfigFileError(f"{source}: value for {{{key}}} must be a single line, got {value!r}")
    return template.format_map(text_values)


def render_test_config(
    *,
    port: int,
    persistence_dir: str | os.PathLike[str],
    password_file: str | os.PathLike[str] | None = None,
    acl_file: str | os.PathLike[str] = ACL_FILE,
    anonymous: bool = False,
    run_as_user: str | None = None,
) -> str:
    """The test template for one private broker: authenticated with the ACL, or anonymous."""
    if not 0 < port < 65536:
        raise ConfigFileError(f"{TEST_TEMPLATE.name}: port must be 1..65535, got {port}")
    if not anonymous and password_file is None:
        raise ConfigFileError(f"{TEST_TEMPLATE.name}: an authenticated broker needs a password_file")
    text = render_template(
        TEST_TEMPLATE.read_text(),
        {
            "port": port,
            "password_file": password_file or "",
            "acl_file": acl_file,
            "persistence_dir": Path(persistence_dir),
            "run_as_user": run_as_user or current_user(),
        },
        source=TEST_TEMPLATE.name,
    )
    if anonymous:
        text = set_options(text, {"allow_anonymous": "true", "password_file": None, "acl_file": None})
    return text


def _option_name(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split(None, 1)[0]


def set_options(text: str, changes: Mapping[str, str | None]) -> str:
    """Set options by name: every line of that option gets the new value (listener options repeat
    per listener), None deletes the option, and an option not present is appended at the end (so
    only use that for global options)."""
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        name = _option_name(line)
        if name in changes:
            seen.add(name)
            value = changes[name]
            if value is not None:
                out.append(f"{name} {value}")
            continue
        out.append(line)
    out.extend(f"{name} {value}" for name, value in changes.items() if name not in seen and value is not None)
    return "\n".join(out) + "\n"


def option_values(text: str, name: str) -> list[str]:
    """The values of every line setting `name`, in file order."""
    values = []
    for line in text.splitlines():
        if _option_name(line) == name:
            parts = line.strip().split(None, 1)
            values.append(parts[1] if len(parts) > 1 else "")
    return values


def listener_ports(text: str) -> list[int]:
    """Ports of the `listener` sections, in file order."""
    return [int(m.group(2)) for line in text.splitlines() if (m := _LISTENER.match(line))]


def remap_listeners(text: str, ports: Mapping[int, int], host: str | None = None) -> str:
    """Move listeners to other ports (and, given `host`, bind them to that address)."""
    unknown = set(ports) - set(listener_ports(text))
    if unknown:
        raise ConfigFileError(f"no listener on port(s) {sorted(unknown)} to remap")
    out = []
    for line in text.splitlines():
        m = _LISTENER.match(line)
        if m and int(m.group(2)) in ports:
            address = host or m.group(3)
            line = f"{m.group(1)}listener {ports[int(m.group(2))]}" + (f" {address}" if address else "")
        out.append(line)
    return "\n".join(out) + "\n"


# Options whose value is a file or directory path.
PATH_OPTIONS = (
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "password_file",
    "acl_file",
    "persistence_location",
    "pid_file",
)


def relocate(text: str, old_root: str, new_root: str | os.PathLike[str]) -> str:
    """Every path option under `old_root` moved to the same place under `new_root` (e.g. the
    `/etc/mosquitto` of production.conf to a trial's own directory)."""
    old = old_root.rstrip("/")
    out = []
    for line in text.splitlines():
        name = _option_name(line)
        if name in PATH_OPTIONS:
            value = line.strip().split(None, 1)[1] if len(line.split()) > 1 else ""
            if value == old or value.startswith(old + "/"):
                line = f"{name} {Path(new_root)}{value[len(old) :]}"
        out.append(line)
    return "\n".join(out) + "\n"
