"""Run-directory I/O: the resolved config (TOML), ``metrics.jsonl``, ``iterations/NNN.h5`` and ``intensities.h5``.

A run directory (docs/ARCHITECTURE.md, DESIGN.md "Files on disk") holds::

    config.toml          the resolved config of the run (load it back with `config_from_toml`)
    metrics.jsonl        one JSON object per iteration: iteration, log_likelihood, seconds, cc_true, ...
    iterations/NNN.h5    model, phi and the most likely rotation (and its probability) per frame after
                         iteration NNN
    intensities.h5       final model, hkl of the unique (asymmetric-unit) reflections, their integrated
                         intensity, and phi
    checkpoints/         Orbax checkpoints (written by the runner, not here)
    figures/             PNG figures (emcjax.figures)

Every file is written atomically: to a temporary name in the same directory, then renamed, so a killed
run never leaves a half-written file under the final name. Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple, Union

import h5py
import numpy as np

from emcjax.errors import ConfigError, DataError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None  # type: ignore[assignment]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
INTENSITIES_FILE = "intensities.h5"
ITERATIONS_DIR = "iterations"
RUN_FORMAT = "emcjax-run"
RUN_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# Atomic writes


_UMASK: int | None = None


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0o666 less the process umask (e.g. 0o644).

    The umask is read once, from /proc/self/status where the kernel shows it, else by setting and
    restoring it (before other threads exist, at the first call)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return 0o666 & ~_UMASK


def new_temporary(path: str | os.PathLike) -> pathlib.Path:
    """Creates an empty temporary file ``.NAME.XXXX.tmp`` next to ``path`` with the mode of a normal new file
    (``file_mode``: readable by group and others under the usual umask, not mkstemp's 0600)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return pathlib.Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` if the block succeeds.

    The parent directory is created. On an exception the temporary file is removed and ``path`` is left
    as it was.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = new_temporary(path)
    try:
        try:
            yield tmp_path
        except OSError as err:  # name the file being written, not its temporary name
            if err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, os.fspath(path)) from None
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def h5_atomic(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yields a new HDF5 file built in memory, written to ``path`` atomically when the block succeeds.

    For run outputs (model-sized): a full disk then fails as one plain OSError naming ``path``, where HDF5
    writing to disk would fail inside its C library, reporting on stderr while closing."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_bytes_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------
# Config <-> TOML


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
# metrics.jsonl


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def append_metrics(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one JSON object (one line) to ``run_dir/metrics.jsonl`` and flushes it to disk."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (empty list if the file does not exist); a truncated last
    line (a run killed while writing) is ignored."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def truncate_metrics(run_dir: str | os.PathLike, last_iteration: int) -> list[dict]:
    """Keeps the records with ``iteration <= last_iteration`` (rewrites the file atomically); returns them.
    Used on resume: iterations after the restored checkpoint are recomputed and appended again."""
    records = [r for r in read_metrics(run_dir) if int(r.get("iteration", 0)) <= last_iteration]
    path = pathlib.Path(run_dir) / METRICS_FILE
    if path.exists() or records:
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


# ----------------------------------------------------------------------------------------------------
# HDF5 outputs


REFINEMENT_DIR = "refinement"  # RUN/refinement/NNN.npz: the orientation refiner's state next to checkpoint NNN


def write_side_arrays(run_dir: str | os.PathLike, name: str, iteration: int, arrays: Mapping[str, np.ndarray],
                      keep: int) -> None:
    """Writes ``run_dir/name/NNN.npz`` (arrays a runner needs to resume at ``iteration`` besides its
    checkpoint) atomically and removes the files of iterations more than ``keep`` before it."""
    directory = pathlib.Path(run_dir) / name
    directory.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(directory / f"{iteration:03d}.npz", buffer.getvalue())
    for old in directory.glob("*.npz"):
        if old.stem.isdigit() and int(old.stem) <= iteration - keep:
            old.unlink(missing_ok=True)


def read_side_arrays(run_dir: str | os.PathLike, name: str, iteration: int) -> dict[str, np.ndarray] | None:
    """The arrays :func:`write_side_arrays` wrote for ``iteration``, or None if there is no such file."""
    path = pathlib.Path(run_dir) / name / f"{iteration:03d}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return {key: f[key] for key in f.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read ({err}); delete it to restart refinement from a grid E-step")


def iteration_path(run_dir: str | os.PathLike, iteration: int) -> pathlib.Path:
    """``run_dir/iterations/NNN.h5`` (three digits, more when needed)."""
    return pathlib.Path(run_dir) / ITERATIONS_DIR / f"{iteration:03d}.h5"


def _write_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        value = _json_value(value)
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        obj.attrs[key] = value


def write_iteration(
    run_dir: str | os.PathLike,
    iteration: int,
    intensity: Any,
    phi: Any,
    best_rotation: Any,
    best_probability: Any,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes ``run_dir/iterations/NNN.h5`` atomically.

    Datasets: ``intensity`` (n_asu, n_voxels) float32 (photons per voxel at phi = 1), ``phi`` (n_frames,)
    float32, ``best_rotation`` (n_frames,) int64 (index of the most likely rotation),
    ``best_probability`` (n_frames,) float32 (its probability), and one dataset per ``extra`` array (e.g.
    the kept pairs ``kept_frame``, ``kept_rotation``, ``kept_prob`` of the last E-step). Attributes:
    ``iteration`` and the iteration's metrics.
    """
    path = iteration_path(run_dir, iteration)
    with h5_atomic(path) as f:
        f.attrs["format"] = RUN_FORMAT
        f.attrs["format_version"] = RUN_FORMAT_VERSION
        f.attrs["iteration"] = int(iteration)
        _write_attrs(f, dict(metrics or {}))
        f.create_dataset("intensity", data=np.asarray(intensity, np.float32))
        f.create_dataset("phi", data=np.asarray(phi, np.float32))
        f.create_dataset("best_rotation", data=np.asarray(best_rotation, np.int64))
        f.create_dataset("best_probability", data=np.asarray(best_probability, np.float32))
        for name, values in (extra or {}).items():
            f.create_dataset(name, data=np.asarray(values))
    return path


def read_iteration(run_dir: str | os.PathLike, iteration: int) -> dict[str, Any]:
    """The arrays of ``iterations/NNN.h5`` as a dict (plus ``iteration``)."""
    path = iteration_path(run_dir, iteration)
    if not path.exists():
        raise DataError(f"{path} does not exist (no output for iteration {iteration})")
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in ("intensity", "phi", "best_rotation", "best_probability")}
        out["iteration"] = int(f.attrs["iteration"])
    return out


def write_intensities(
    run_dir: str | os.PathLike,
    intensity: Any,
    hkl: Any,
    integrated: Any,
    phi: Any,
    attrs: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes the final ``run_dir/intensities.h5`` atomically.

    Datasets: ``intensity`` (n_asu, n_voxels) float32 voxel model, ``hkl`` (n_asu, 3) int32 Miller indices
    of the unique reflections (rows of the model), ``integrated`` (n_asu,) float64 integrated intensity
    per unique hkl (sum over the peak's voxels), ``phi`` (n_frames,) float32. Attributes (``attrs``):
    iteration, cell, space group, ...
    """
    intensity = np.asarray(intensity, np.float32)
    hkl = np.asarray(hkl, np.int32)
    integrated = np.asarray(integrated, np.float64)
    if intensity.ndim != 2 or hkl.shape != (intensity.shape[0], 3) or integrated.shape != (intensity.shape[0],):
        raise ValueError(
            f"write_intensities: shapes disagree: intensity {intensity.shape}, hkl {hkl.shape}, "
            f"integrated {integrated.shape}; expected (n_asu, n_voxels), (n_asu, 3), (n_asu,)"
        )
    path = pathlib.Path(run_dir) / INTENSITIES_FILE
    with h5_atomic(path) as f:
        f.attrs["format"] = RUN_FORMAT
        f.attrs["format_version"] = RUN_FORMAT_VERSION
        _write_attrs(f, dict(attrs or {}))
        f.create_dataset("intensity", data=intensity)
        f.create_dataset("hkl", data=hkl)
        f.create_dataset("integrated", data=integrated)
        f.create_dataset("phi", data=np.asarray(phi, np.float32))
    return path


class RunResult(NamedTuple):
    """The final model of a run directory (``read_run``)."""

    intensity: np.ndarray
    """(n_asu, n_voxels) float32 voxel model."""
    phi: np.ndarray
    """(n_frames,) float32 per-frame scale."""
    hkl: np.ndarray
    """(n_asu, 3) int32 unique reflections (rows of ``intensity``)."""
    integrated: np.ndarray
    """(n_asu,) float64 integrated intensity per unique reflection."""
    attrs: dict
    """File attributes (iteration, ...)."""


def read_run(run_dir: str | os.PathLike) -> RunResult:
    """Reads the final model and phi of a run directory (``run_dir/intensities.h5``).

    Raises:
      DataError: the directory or its ``intensities.h5`` is missing (the run did not finish) or the
        file is not an emcjax run output.
    """
    run_dir = pathlib.Path(run_dir)
    path = run_dir / INTENSITIES_FILE
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise DataError(f"{path} does not exist: the run in {run_dir} has not finished (no final model)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != RUN_FORMAT:
                raise DataError(f"{path}: attribute format is {f.attrs.get('format')!r}, expected {RUN_FORMAT!r}")
            missing = [n for n in ("intensity", "phi", "hkl", "integrated") if n not in f]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {', '.join(missing)}")
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            return RunResult(
                intensity=f["intensity"][()],
                phi=f["phi"][()],
                hkl=f["hkl"][()],
                integrated=f["integrated"][()],
                attrs=attrs,
            )
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file: {err}") from None


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
