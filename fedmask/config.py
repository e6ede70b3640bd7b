"""Configuration precedence shared by every subcommand: flag > environment > config file > default.

Options are declared once, on the argparse parser, with ``default=None`` meaning "not given on the
command line". ``resolve`` then fills each unset option from ``FEDMASK_<OPTION>`` or from the config
file (YAML or JSON; a mapping of option names, optionally with a section named after the subcommand),
and finally from the default recorded by ``add_option``.

Every key of a config file must mean something: a top-level key is an option of some subcommand or the
name of a subcommand's section; a key in a section is an option of that subcommand. Anything else is a
``ConfigError`` naming the key (and the closest valid one). Options declared with ``merge=`` take a
mapping (``hyper:``, ``arch_kwargs:`` ...): the file's, the environment's (a JSON object) and the
flags' mappings are merged key by key, the flag winning.

Errors: ``ConfigError`` is a usage or configuration mistake (exit code 2), ``RunError`` a failure while
running (exit code 1); both carry one line saying what went wrong and what to do about it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ENV_PREFIX = "FEDMASK_"
# Keys a config file may hold besides the subcommands' options and sections.
GLOBAL_KEYS = ("log_level",)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A configuration file, flag or value that cannot be used (exit code 2)."""


class RunError(RuntimeError):
    """A failure while running that the user can act on (exit code 1): ``cause; what to do``."""


def suggest(key: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid key, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, sorted(set(valid)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key_error(where: str, key: str, valid: Iterable[str], what: str = "key") -> ConfigError:
    """The error for ``key`` not among ``valid``: names it, the nearest valid key, and the choices."""
    valid = sorted(set(valid))
    hint = suggest(key, valid)
    if not hint:
        listed = ", ".join(valid) if len(valid) <= 30 else ", ".join(valid[:30]) + ", ..."
        hint = f"; valid {what}s: {listed}" if valid else f"; no {what}s are accepted here"
    return ConfigError(f"{where}: unknown {what} {key!r}{hint}")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the --config path (or FEDMASK_CONFIG)")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors from either library
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {p}: cannot parse ({detail}); fix the YAML/JSON syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of option names to values")
    return data


def add_option(
    parser: argparse.ArgumentParser,
    *flags: str,
    default: Any = None,
    merge: Callable[[Any, str], dict[str, Any]] | None = None,
    file_key: str | None = None,
    **kwargs: Any,
) -> None:
    """Add an option whose default applies only after env and config file were consulted.

    ``merge``: the option holds a mapping; ``merge(raw, where)`` turns any of its forms (the flags'
    list of strings, the file's mapping, the environment's JSON text) into a dict, and the three are
    merged key by key (flag over environment over file). ``file_key``: the name in a config file and
    the environment when it differs from the option's dest (``--arch-option`` -> ``arch_kwargs``).
    """
    action = parser.add_argument(*flags, default=None, **kwargs)
    parser.set_defaults(**{f"_default_{action.dest}": {} if merge else default})
    if merge is not None:
        parser.set_defaults(**{f"_merge_{action.dest}": merge})
    if file_key is not None:
        parser.set_defaults(**{f"_filekey_{action.dest}": file_key})
    if merge is None and (action.type is not None or action.choices is not None):
        spec = {"type": action.type, "choices": tuple(action.choices) if action.choices else None}
        parser.set_defaults(**{f"_check_{action.dest}": spec})
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


def _check(value: Any, spec: dict[str, Any] | None, name: str) -> Any:
    """A value from the environment or a config file, converted and checked as its flag would be."""
    if value is None or not spec:
        return value
    typ, choices = spec.get("type"), spec.get("choices")
    if isinstance(value, str) and callable(typ):
        try:
            value = typ(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            kind = getattr(typ, "__name__", "value")
            raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from exc
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
    if choices:
        if all(isinstance(c, str) for c in choices) and isinstance(value, (int, float)):
            value = str(value)  # YAML reads `mqtt_protocol: 5` as a number
        if value not in choices:
            listed = ", ".join(map(str, choices))
            raise ConfigError(
                f"{name}: {value!r} is not one of {listed}{suggest(str(value), map(str, choices))}"
            )
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; nested mappings merge, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- which keys a config file may hold ------------------------------------------------------------------


def _parser_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Config-file keys of ``parser`` and every subcommand under it (options declared by add_option)."""
    defaults = parser._defaults
    keys = set()
    for name in defaults:
        if name.startswith("_default_"):
            dest = name[len("_default_") :]
            keys.add(defaults.get(f"_filekey_{dest}", dest))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                keys |= _parser_keys(sub)
    return keys


def config_schema(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Section name (top-level subcommand) -> the keys valid in it."""
    schema: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                schema[name] = _parser_keys(sub)
    return schema


def check_file_keys(raw: dict[str, Any], schema: dict[str, set[str]], path: Any) -> None:
    """Raise ``ConfigError`` for the first key of the file that no subcommand would use."""
    any_option = set().union(*schema.values()) if schema else set()
    top_valid = any_option | set(schema) | set(GLOBAL_KEYS)
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        # `rounds` and `data` are both a subcommand and an option: a mapping is the section.
        if name in schema and isinstance(value, dict):
            valid = schema[name] | set(GLOBAL_KEYS)
            for inner in value:
                if str(inner).replace("-", "_") not in valid:
                    raise unknown_key_error(f"config file {path}: section {key!r}", str(inner), valid)
        elif name in schema and name not in any_option:
            if value is not None:
                raise ConfigError(
                    f"config file {path}: section {key!r} must be a mapping of {key}'s options to values"
                )
        elif name not in top_valid:
            raise unknown_key_error(f"config file {path}", str(key), top_valid)


def resolve(args: argparse.Namespace, command: str | None = None) -> argparse.Namespace:
    """Fill unset options from environment, config file and defaults, in that order."""
    schema = vars(args).pop("_config_schema", None)
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        raw = load_config_file(config_path)
        if schema is not None:
            check_file_keys(raw, schema, config_path)
        sections = set(schema) if schema is not None else {command}
        section = raw.get(command) if command else None
        file_values = {
            str(k).replace("-", "_"): v
            for k, v in raw.items()
            if not (str(k).replace("-", "_") in sections and (isinstance(v, dict) or v is None))
        }
        if isinstance(section, dict):
            for k, v in section.items():
                name = str(k).replace("-", "_")
                if isinstance(v, dict) and isinstance(file_values.get(name), dict):
                    v = deep_merge(file_values[name], v)  # a section's mapping refines the top level's
                file_values[name] = v
    namespace = vars(args)
    merges = {
        k[len("_merge_") :]: namespace.pop(k) for k in [k for k in namespace if k.startswith("_merge_")]
    }
    checks = {
        k[len("_check_") :]: namespace.pop(k) for k in [k for k in namespace if k.startswith("_check_")]
    }
    file_keys = {
        k[len("_filekey_") :]: namespace.pop(k) for k in [k for k in namespace if k.startswith("_filekey_")]
    }
    for key in [k for k in namespace if k.startswith("_default_")]:
        dest = key[len("_default_") :]
        default = namespace.pop(key)
        name = file_keys.get(dest, dest)
        env_name = ENV_PREFIX + name.upper()
        env = os.environ.get(env_name)
        if dest in merges:
            value: Any = dict(default)
            if name in file_values and file_values[name] is not None:
                value = deep_merge(value, merges[dest](file_values[name], f"{config_path}: {name}"))
            if env is not None:
                value = deep_merge(value, merges[dest](env, env_name))
            if getattr(args, dest, None) is not None:
                value = deep_merge(value, merges[dest](getattr(args, dest), "command line"))
            setattr(args, dest, value)
            continue
        if getattr(args, dest, None) is not None:
            continue
        if env is not None:
            value = _check(_convert(env, default, env_name), checks.get(dest), env_name)
        elif name in file_values:
            where = f"config file {config_path}: {name}"
            value = _check(_convert(file_values[name], default, where), checks.get(dest), where)
        else:
            value = default
        setattr(args, dest, value)
    return args


def parse_json_or_text(raw: str) -> Any:
    """A flag's VALUE: JSON when it parses (numbers, booleans, lists, null), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def key_value_mapping(raw: Any, where: str, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings (flags), a mapping (file) or a JSON object (environment) as a dict."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k).replace("-", "_"): v for k, v in raw.items()}
    if isinstance(raw, str):
        value = parse_json_or_text(raw)
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): v for k, v in value.items()}
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a mapping of KEY: VALUE, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for item in raw:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} width=0.5")
        out[key.strip().replace("-", "_")] = parse_json_or_text(text)
    return out


# -- model options, shared by `fedmask simulate` and task files (read from the code, not listed) --------

_COMMON_ARCH_ARGS = ("seed", "num_classes", "mask_config")


def arch_options(arch: str, where: str = "--arch") -> list[str]:
    """The keywords architecture ``arch`` accepts besides seed, num_classes and mask_config."""
    from fedmask.models.zoo import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise unknown_key_error(where, arch, ARCHITECTURES, what="architecture")
    params = inspect.signature(ARCHITECTURES[arch].build).parameters.values()
    return [p.name for p in params if p.name not in _COMMON_ARCH_ARGS and p.kind != p.VAR_KEYWORD]


def check_arch_kwargs(
    arch: str, kwargs: dict[str, Any], where: str = "arch option", arch_where: str = "--arch"
) -> None:
    valid = arch_options(arch, arch_where)
    for key in kwargs:
        if key not in valid:
            raise unknown_key_error(f"{where} for {arch}", key, valid, what="option")


def check_mask_config(options: dict[str, Any], where: str = "mask option") -> None:
    """Keys against ``MaskConfig``'s fields, then the values by building one."""
    from fedmask.models.layers import MaskConfig

    valid = [f.name for f in dataclasses.fields(MaskConfig) if f.init]
    for key in options:
        if key not in valid:
            raise unknown_key_error(where, key, valid, what="option")
    try:
        MaskConfig(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
