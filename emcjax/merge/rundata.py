"""What the post-processing stages read from a finished ``lowres`` or ``highres`` run directory.

A run directory holds its resolved ``config.toml`` (data set path and EMC settings), ``intensities.h5`` (the
final model) and ``iterations/NNN.h5`` (per-frame phi, best rotation and probability and, from the pure core
on, the kept (frame, rotation, probability) pairs of the last E-step); optionally ``frame_weights.h5``.
A ``highres`` run directory (it holds ``source.json``) takes its data set and EMC settings from the
low-resolution run it names, with its own resolution and fine sampling (``emcjax.highres.emc_config``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import h5py
import numpy as np

from emcjax import atomic_files, runio, toml_config
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import DataError
from emcjax.model import ReciprocalGrid, make_grid

FRAME_WEIGHTS_FILE = "frame_weights.h5"


@dataclasses.dataclass(frozen=True, eq=False)
class RunData:
    """A finished run and the set-up it was made with.

    Attributes:
      path: the run directory.
      config: the run's resolved ``LowresConfig`` (of a highres run: its low-res run's, with the EMC
        settings and ``out`` of the highres run).
      data_path: its sparse data set.
      crystal: cell and space group of the data set.
      detector: valid pixels to the run's d_min.
      grid: the model grid (same reflections and voxels as the run's model).
      sampling_n: 600-cell parameter of the sampling rotation indices refer to.
      result: the final model (``intensities.h5``).
      iteration: the arrays of the last ``iterations/NNN.h5`` (phi, best_rotation, best_probability and,
        when written, kept_frame, kept_rotation, kept_prob and the refined best_quaternion).
      frame_weights: (n_frames,) weights the run used (None: all 1).
      truth: the data set's truth, or None.
    """

    path: pathlib.Path
    config: object
    data_path: pathlib.Path
    crystal: Crystal
    detector: Detector
    grid: ReciprocalGrid
    sampling_n: int
    result: runio.RunResult
    iteration: dict
    frame_weights: np.ndarray | None
    truth: dict | None

    @property
    def n_frames(self) -> int:
        return int(self.result.phi.shape[0])

    def weights(self) -> np.ndarray:
        """(n_frames,) float64 frame weights (ones when the run used none)."""
        return np.ones(self.n_frames) if self.frame_weights is None else self.frame_weights.astype(np.float64)

    def quaternions(self, rotation_index) -> np.ndarray:
        """(n, 4) quaternions of sampling rotation indices."""
        from emcjax.sampling_600cell import sample_600cell

        return sample_600cell(self.sampling_n).quaternions[np.asarray(rotation_index, np.int64)]

    @property
    def has_refined_orientations(self) -> bool:
        """Whether the last iteration file holds ``best_quaternion`` (continuous orientations refined off the
        grid, emcjax.refinement)."""
        return "best_quaternion" in self.iteration

    def best_quaternions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(stop - start, 4) float64 most likely orientation of frames ``start:stop``: the refined
        ``best_quaternion`` when the run saved it, else the sampling rotation ``best_rotation``."""
        stop = self.n_frames if stop is None else stop
        if self.has_refined_orientations:
            return np.asarray(self.iteration["best_quaternion"][start:stop], np.float64)
        return self.quaternions(self.iteration["best_rotation"][start:stop])


def last_iteration_file(run_dir: pathlib.Path) -> pathlib.Path:
    """The highest-numbered ``iterations/NNN.h5``; DataError when there is none."""
    files = [p for p in (run_dir / runio.ITERATIONS_DIR).glob("*.h5") if re.fullmatch(r"\d+\.h5", p.name)]
    if not files:
        raise DataError(f"{run_dir}: no {runio.ITERATIONS_DIR}/NNN.h5 (per-frame results); is it a finished run?")
    return max(files, key=lambda p: int(p.stem))


def read_iteration_file(path: pathlib.Path) -> dict:
    """Every dataset of an iteration file as an array, plus ``iteration``."""
    try:
        with h5py.File(path, "r") as f:
            out = {name: f[name][()] for name in f if isinstance(f[name], h5py.Dataset)}
            out["iteration"] = int(f.attrs.get("iteration", -1))
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file: {err}") from None
    missing = [n for n in ("phi", "best_rotation", "best_probability") if n not in out]
    if missing:
        raise DataError(f"{path}: missing dataset(s) {', '.join(missing)}")
    return out


def write_frame_weights(path: pathlib.Path, weights, attrs: dict | None = None) -> pathlib.Path:
    """Writes (n_frames,) float32 ``weights`` in [0, 1] (0 = frame not used) and attributes, atomically."""
    weights = np.asarray(weights, np.float32)
    with atomic_files.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("weights", data=weights)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
    return path


def read_frame_weights(path: pathlib.Path, n_frames: int | None = None) -> tuple[np.ndarray, dict]:
    """``(weights, attrs)`` of a frame-weights file (dataset ``weights`` (n_frames,) in [0, 1])."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"frame weights: {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "weights" not in f:
                raise DataError(f"frame weights: {path} has no dataset 'weights' (n_frames,) float in [0, 1]")
            weights = np.asarray(f["weights"][()], np.float64)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except OSError as err:
        raise DataError(f"frame weights: {path} is not a readable HDF5 file ({err})") from None
    if weights.ndim != 1 or not np.all((weights >= 0) & (weights <= 1)):
        raise DataError(f"frame weights: {path}: 'weights' must be a 1-D array of values in [0, 1]")
    if n_frames is not None and weights.shape[0] != n_frames:
        raise DataError(f"frame weights: {path} holds {weights.shape[0]} weights, the data set has {n_frames} frames")
    return weights, attrs


def data_path_of(config, run_dir: pathlib.Path | None = None) -> pathlib.Path:
    """The data set a run read: ``config.data`` or the cached demo data set. A relative path is taken from the
    current directory, else from the directories above ``run_dir`` (the run was started there)."""
    from emcjax import lowres

    if config.data is None:
        return lowres.demo_path(config.demo)
    path = pathlib.Path(config.data)
    if path.is_absolute() or path.exists() or run_dir is None:
        return path
    for parent in pathlib.Path(run_dir).resolve().parents:
        if (parent / path).exists():
            return parent / path
    return path


HIGHRES_SOURCE_FILE = "source.json"  # emcjax.highres.SOURCE_FILE


def is_highres(run_dir: pathlib.Path) -> bool:
    """Whether ``run_dir`` is a highres run directory (it holds ``source.json``)."""
    return (pathlib.Path(run_dir) / HIGHRES_SOURCE_FILE).is_file()


def run_config(run_dir: pathlib.Path):
    """The ``LowresConfig`` a run directory was made with; of a highres run, its low-res run's with the highres
    run's resolution (``emc.d_min``), fine sampling (``emc.rotation_n``) and ``out``."""
    import dataclasses as dc
    import json

    from emcjax import highres
    from emcjax.lowres import LowresConfig

    run_dir = pathlib.Path(run_dir)
    if not is_highres(run_dir):
        return toml_config.config_from_toml(LowresConfig, run_dir / runio.CONFIG_FILE)
    config = toml_config.config_from_toml(highres.HighresConfig, run_dir / runio.CONFIG_FILE)
    try:
        record = json.loads((run_dir / HIGHRES_SOURCE_FILE).read_text(encoding="utf-8"))
        fine_n, lowres_run = int(record["fine_n"]), pathlib.Path(record["lowres_run"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{run_dir / HIGHRES_SOURCE_FILE} is not a highres record ({err!r})") from None
    if not (lowres_run / runio.CONFIG_FILE).exists():
        raise DataError(f"{run_dir}: its low-resolution run {lowres_run} (source.json) has no {runio.CONFIG_FILE}")
    low = toml_config.config_from_toml(LowresConfig, lowres_run / runio.CONFIG_FILE)
    # the grid and detector depend on d_min (and the low-res run's vn, gw); rotation indices on the fine n
    return dc.replace(low, emc=dc.replace(low.emc, d_min=config.resolution, rotation_n=fine_n), out=run_dir)


def load_run(run_dir, *, need_iteration: bool = True) -> RunData:
    """Reads a finished run directory and rebuilds its detector and grid.

    Raises:
      DataError: no such directory, no results (``intensities.h5`` or an iteration file), or its data set
        is gone.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist")
    if not (run_dir / runio.CONFIG_FILE).exists():
        raise DataError(f"{run_dir}: no {runio.CONFIG_FILE}; is it an emcjax run directory?")
    config = run_config(run_dir)
    result = runio.read_run(run_dir)
    iteration = read_iteration_file(last_iteration_file(run_dir)) if need_iteration else {}
    data_path = data_path_of(config, run_dir)
    if not data_path.exists():
        raise DataError(f"{run_dir}: its data set {data_path} does not exist (config.toml 'data')")
    with SparseDataset(data_path) as ds:
        geometry = DetectorGeometry(**ds.geometry)
        crystal = Crystal(cell=tuple(ds.crystal["cell"]), space_group=str(ds.crystal["space_group"]))
        detector = make_detector(geometry, ds.mask)
        sampling_n = int(ds.candidate_sampling_n) if ds.has_candidates else int(config.emc.rotation_n)
        if is_highres(run_dir):  # rotation indices refer to the fine sampling
            sampling_n = int(config.emc.rotation_n)
        truth = ds.read_truth() if ds.has_truth else None
    # The same detector and grid as emcjax.emc.setup_problem builds.
    d_min = geometry.resolution_max_A if config.emc.d_min is None else config.emc.d_min
    detector = detector.truncate(d_min)
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = make_grid(crystal, d_min=d_min, d_max=1.0 / max(q_min, 1e-9), vn=config.emc.vn, gw=config.emc.gw)
    if tuple(result.intensity.shape) != grid.model_shape or not np.array_equal(result.hkl, grid.asu.hkl):
        raise DataError(
            f"{run_dir}: the model in intensities.h5 {tuple(result.intensity.shape)} does not match the grid its "
            f"config and data set give {grid.model_shape}"
        )
    weights_path = run_dir / FRAME_WEIGHTS_FILE
    weights = read_frame_weights(weights_path, result.phi.shape[0])[0] if weights_path.exists() else None
    return RunData(
        path=run_dir,
        config=config,
        data_path=data_path,
        crystal=crystal,
        detector=detector,
        grid=grid,
        sampling_n=sampling_n,
        result=result,
        iteration=iteration,
        frame_weights=weights,
        truth=truth,
    )
