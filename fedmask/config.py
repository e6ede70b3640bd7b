"""Configuration precedence shared by every subcommand: flag > environment > config file > default.

Options are declared once, on the argparse parser, with ``default=None`` meaning "not given on the
command line". ``resolve`` then fills each unset option from ``FEDMASK_<OPTION>`` or from the config
file (YAML or JSON; a flat mapping, optionally with a section named after the subcommand), and
finally from the default recorded in ``UNSET_DEFAULTS``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

ENV_PREFIX = "FEDMASK_"


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors from either library
        raise ConfigError(f"config file {p}: cannot parse ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of option names to values")
    return data


def add_option(parser: argparse.ArgumentParser, *flags: str, default: Any = None, **kwargs: Any) -> None:
    """Add an option whose default applies only after env and config file were consulted."""
    action = parser.add_argument(*flags, default=None, **kwargs)
    parser.set_defaults(**{f"_default_{action.dest}": default})
    if default is not None and kwargs.get("help"):
        action.help = f"{kwargs['help']} (default: {default})"


def _convert(raw: Any, like: Any, name: str) -> Any:
    if like is None or not isinstance(raw, str):
        return raw
    try:
        if isinstance(like, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {type(like).__name__}") from exc
    return raw


def resolve(args: argparse.Namespace, command: str | None = None) -> argparse.Namespace:
    """Fill unset options from environment, config file and defaults, in that order."""
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        raw = load_config_file(config_path)
        section = raw.get(command) if command else None
        file_values = {k.replace("-", "_"): v for k, v in raw.items() if not isinstance(v, dict)}
        if isinstance(section, dict):
            file_values.update({k.replace("-", "_"): v for k, v in section.items()})
    for key in [k for k in vars(args) if k.startswith("_default_")]:
        dest = key[len("_default_") :]
        default = getattr(args, key)
        delattr(args, key)
        if getattr(args, dest, None) is not None:
            continue
        env = os.environ.get(ENV_PREFIX + dest.upper())
        if env is not None:
            value = _convert(env, default, ENV_PREFIX + dest.upper())
        elif dest in file_values:
            value = _convert(file_values[dest], default, f"{config_path}: {dest}")
        else:
            value = default
        setattr(args, dest, value)
    return args
