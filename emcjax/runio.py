"""Run-directory I/O: ``metrics.jsonl``, ``iterations/NNN.h5`` and ``intensities.h5``.

A run directory (docs/ARCHITECTURE.md, DESIGN.md "Files on disk") holds::

    config.toml          the resolved config of the run (emcjax.toml_config: `config_from_toml`)
    metrics.jsonl        one JSON object per iteration: iteration, log_likelihood, seconds, cc_true, ...
    iterations/NNN.h5    model, phi and the most likely rotation (and its probability) per frame after
                         iteration NNN
    intensities.h5       final model, hkl of the unique (asymmetric-unit) reflections, their integrated
                         intensity, and phi
    checkpoints/         Orbax checkpoints (written by the runner, not here)
    figures/             PNG figures (emcjax.figures)

Every file is written atomically (emcjax.atomic_files): to a temporary name in the same directory, then
renamed, so a killed run never leaves a half-written file under the final name. Nothing here imports JAX.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import h5py
import numpy as np

from emcjax.atomic_files import h5_atomic, write_bytes_atomic, write_text_atomic
from emcjax.errors import DataError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
INTENSITIES_FILE = "intensities.h5"
ITERATIONS_DIR = "iterations"
RUN_FORMAT = "emcjax-run"
RUN_FORMAT_VERSION = 1


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

