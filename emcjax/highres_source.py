"""What the high-resolution local update (emcjax.highres) takes from the low-resolution run it starts from:
its config, data set, final model and phi, the kept orientations of its last E-step (:func:`read_lowres`) and
its frame weights, times those given to the local update (:func:`frame_weights`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import h5py
import numpy as np

from emcjax import lowres, runio, toml_config
from emcjax.errors import DataError
from emcjax.highres_config import HighresConfig
from emcjax.merge import rundata


@dataclasses.dataclass(frozen=True)
class LowresSource:
    """What the local update takes from a low-resolution run.

    Attributes:
      run_dir: the run directory.
      config: its resolved config.
      data_path: its data set.
      result: its final model, phi and hkl (intensities.h5).
      iteration: the iteration of the final model.
      coarse_n: 600-cell parameter of the sampling its rotation indices refer to.
      coarse_resolution: its d_min (Å).
      kept_frame, kept_rotation, kept_prob: the (frame, coarse rotation, probability) pairs of its last E-step
        (each frame's most likely rotation with probability 1 for runs that did not record them).
      best_rotation: (n_frames,) int64 most likely coarse rotation of each frame.
      kept_recorded: whether the run recorded its kept pairs (else the most likely rotations stand in).
      frame_weights: (n_frames,) float64 weights the run used (its frame_weights.h5), or None (all 1).
    """

    run_dir: pathlib.Path
    config: lowres.LowresConfig
    data_path: pathlib.Path
    result: runio.RunResult
    iteration: int
    coarse_n: int
    coarse_resolution: float
    kept_frame: np.ndarray
    kept_rotation: np.ndarray
    kept_prob: np.ndarray
    best_rotation: np.ndarray
    kept_recorded: bool
    frame_weights: np.ndarray | None = None


def read_lowres(run_dir: pathlib.Path) -> LowresSource:
    """Reads a finished low-resolution run directory.

    Raises:
      DataError: the directory, its config.toml, intensities.h5 or last iteration file is missing.
    """
    from emcjax.data import SparseDataset

    run_dir = pathlib.Path(run_dir)
    config_path = run_dir / runio.CONFIG_FILE
    if not config_path.exists():
        raise DataError(f"from: {run_dir} is not a low-resolution run directory ({config_path} does not exist)")
    config = toml_config.config_from_toml(lowres.LowresConfig, config_path)
    result = runio.read_run(run_dir)
    iteration = int(result.attrs.get("iteration", 0))
    data_path = pathlib.Path(config.data if config.data is not None else lowres.demo_path(config.demo))
    if not data_path.exists():
        raise DataError(f"from: the data set of {run_dir}, {data_path}, does not exist")
    with SparseDataset(data_path) as dataset:
        coarse_n = int(dataset.candidate_sampling_n) if dataset.has_candidates else config.emc.rotation_n
        d_det = float(dataset.geometry["resolution_max_A"])
    path = runio.iteration_path(run_dir, iteration)
    if not path.exists():
        raise DataError(f"from: {path} does not exist (the last iteration of {run_dir} is needed for its orientations)")
    with h5py.File(path, "r") as f:
        best = f["best_rotation"][()].astype(np.int64)
        recorded = all(k in f for k in ("kept_frame", "kept_rotation", "kept_prob"))
        if recorded:
            kept = tuple(f[k][()] for k in ("kept_frame", "kept_rotation", "kept_prob"))
        else:
            kept = (np.arange(best.shape[0]), best, np.ones(best.shape[0]))
    weights_path = run_dir / rundata.FRAME_WEIGHTS_FILE
    weights = rundata.read_frame_weights(weights_path, best.shape[0])[0] if weights_path.exists() else None
    return LowresSource(
        run_dir=run_dir, config=config, data_path=data_path, result=result, iteration=iteration,
        coarse_n=coarse_n, coarse_resolution=config.emc.d_min or d_det,
        kept_frame=np.asarray(kept[0], np.int64), kept_rotation=np.asarray(kept[1], np.int64),
        kept_prob=np.asarray(kept[2], np.float64), best_rotation=best, kept_recorded=recorded,
        frame_weights=weights,
    )


def frame_weights(config: HighresConfig, source: LowresSource, n_frames: int) -> tuple[np.ndarray | None, dict]:
    """``(weights, attrs)``: the low-res run's frame weights times ``config.frame_weights``'s; None when the
    run used none and none are given (every frame weighs 1). ``attrs`` records where they came from."""
    weights, attrs = source.frame_weights, {}
    if weights is not None:
        attrs["lowres_weights"] = os.fspath((source.run_dir / rundata.FRAME_WEIGHTS_FILE).absolute())
    if config.frame_weights is not None:
        extra, _ = rundata.read_frame_weights(config.frame_weights, n_frames)
        weights = extra if weights is None else weights * extra
        attrs["source"] = os.fspath(pathlib.Path(config.frame_weights).absolute())
    if weights is not None and weights.shape[0] != n_frames:
        raise DataError(f"from: {source.run_dir} has frame weights for {weights.shape[0]} frames, "
                        f"{source.data_path} holds {n_frames}")
    return weights, attrs
