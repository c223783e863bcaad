"""Config dataclasses <-> TOML: ``config_to_dict`` / ``dataclass_from_dict`` (light type coercion, unknown keys
refused), ``to_toml`` / ``parse_toml``, ``save_config`` / ``config_from_toml``, ``config_differences``; and a
stage's command line with ``--config FILE.toml`` as its defaults (``parse_stage_args``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import numpy as np

from emcjax.atomic_files import write_text_atomic
from emcjax.errors import ConfigError
from emcjax.runio import CONFIG_FILE

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None  # type: ignore[assignment]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def config_to_dict(config: Any) -> dict:
    """A (nested) config dataclass as a plain dict: nested dataclasses become dicts, paths strings,
    tuples lists; fields whose value is ``None`` are left out (TOML has no null; a missing key means the
    default, and every optional field of the emcjax configs defaults to ``None``)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = _plain(getattr(config, field.name))
        if value is not None:
            out[field.name] = value
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Converts a TOML value to the field type ``tp`` (light coercion: int -> float, list -> tuple,
    str -> Path, table -> dataclass); raises ConfigError naming ``where`` on a mismatch."""
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad(f"a table of {tp.__name__} settings")
        return dataclass_from_dict(tp, value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(tp, type) and issubclass(tp, os.PathLike) or tp is pathlib.Path:
        if not isinstance(value, str):
            raise bad("a path string")
        return pathlib.Path(value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise bad("an array")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise bad(f"an array of {len(args)} values")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise bad(str(tp))
    return value  # unknown annotation: pass through, the dataclass's __post_init__ validates


def dataclass_from_dict(cls: type, values: Mapping[str, Any], *, where: str = "", base: Any = None) -> Any:
    """Builds ``cls`` from a (nested) dict, e.g. a parsed TOML file.

    Missing keys take their value from ``base`` (an instance of ``cls``) or the field default; nested
    tables fill nested dataclasses field by field. An unknown key raises ConfigError naming it.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; {cls.__name__} has: {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
            sub_base = getattr(base, key) if base is not None else _field_default(fields[key])
            kwargs[key] = dataclass_from_dict(inner, value, where=f"{prefix}{key}", base=sub_base)
        else:
            kwargs[key] = _convert(value, tp, f"{prefix}{key}")
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise ConfigError(f"{where}: cannot write {value!r} ({type(value).__name__}) to TOML")


def to_toml(values: Mapping[str, Any], _table: str = "") -> str:
    """A (nested) dict of scalars, lists and dicts as TOML text: scalars first, then one ``[table]``
    per nested dict (dotted names for deeper levels)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {_toml_value(value, _table + key)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{_table}{_toml_key(key)}"
        sub = to_toml(value, _table=name + ".")
        scalar_part = any(not isinstance(v, Mapping) and v is not None for v in value.values())
        if scalar_part or not value:
            text += f"\n[{name}]\n" + sub
        else:
            text += sub
    return text


def parse_toml(path: str | os.PathLike) -> dict:
    """Reads a TOML file; a missing or malformed file raises ConfigError naming it."""
    path = pathlib.Path(path)
    if tomllib is None:  # pragma: no cover
        raise ConfigError(f"reading {path} needs Python >= 3.11 (tomllib)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a TOML text file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def config_from_toml(cls: type, path: str | os.PathLike, *, base: Any = None) -> Any:
    """Loads a config dataclass from a TOML file (nested tables for nested dataclasses); keys that are
    missing keep the value of ``base`` (default: the dataclass defaults). Unknown keys -> ConfigError."""
    values = parse_toml(path)
    try:
        return dataclass_from_dict(cls, values, base=base)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(path: str | os.PathLike, config: Any, header: str = "") -> None:
    """Writes a config dataclass as TOML, atomically."""
    text = to_toml(config_to_dict(config))
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + "\n" + text
    write_text_atomic(path, text)


def config_differences(config: Any, reference: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted.field: (value, reference value)}`` for every field that differs (nested dataclasses
    compared field by field)."""
    out: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(config):
        a, b = getattr(config, field.name), getattr(reference, field.name)
        name = prefix + field.name
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
            out.update(config_differences(a, b, name + "."))
        elif a != b:
            out[name] = (a, b)
    return out


# ----------------------------------------------------------------------------------------------------
# A stage's command line


def config_argument(argv: list[str]) -> pathlib.Path | None:
    """The value of ``--config FILE`` / ``--config=FILE`` in ``argv`` (the last one wins)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a TOML file, e.g. --config run.toml")
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return pathlib.Path(path) if path is not None else None


def parse_stage_args(cls: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """A stage's command line (a dataclass ``cls`` with ``out``, ``resume`` and ``config`` fields):
    ``--config FILE.toml`` supplies the defaults, flags override; with ``--resume`` and no ``--config`` the
    run's own ``OUT/config.toml`` does."""
    import sys

    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = cls()
    config_file = config_argument(argv)
    if config_file is not None:
        default = config_from_toml(cls, config_file)
        if default.config is not None:
            raise ConfigError(f"{config_file}: key 'config' cannot be set inside a config file")
    config = tyro.cli(cls, prog=prog, args=argv, default=default, description=description)
    saved = config.out / CONFIG_FILE
    if config.resume and config_file is None and saved.exists():
        default = dataclasses.replace(config_from_toml(cls, saved), resume=False)
        config = tyro.cli(cls, prog=prog, args=argv, default=default, description=description)
    return config
