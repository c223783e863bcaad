"""The high-resolution problem and its start (emcjax.highres): the fine candidates of every frame around the
coarse rotations the low-resolution run kept (:func:`local_candidates`), the EMC settings (:func:`emc_config`),
the problem in candidate-list mode (:func:`setup`) and the low-resolution model extended to the new
reflections (:func:`extend_model`, :func:`initial_state`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from emcjax import emc as emc_lib
from emcjax import local_grid, scoring
from emcjax.errors import ConfigError, DataError
from emcjax.highres_config import HighresConfig
from emcjax.highres_source import LowresSource, frame_weights

OUTER_FRACTION = 0.2
"""New reflections start from the mean voxel profile of this outermost fraction (by |q|) of the low-res ones."""


class _WithSampling:
    """A data set seen with another candidate sampling (``setup_problem`` reads its n from the data set)."""

    def __init__(self, dataset, candidate_sampling_n: int):
        self._dataset = dataset
        self.candidate_sampling_n = candidate_sampling_n

    def __getattr__(self, name):
        return getattr(self._dataset, name)


def emc_config(config: HighresConfig, source: LowresSource, fine_n: int) -> emc_lib.EMCConfig:
    """The EMC settings of the local update: the low-res run's, to the new cutoff on the fine sampling."""
    return dataclasses.replace(
        source.config.emc, d_min=config.resolution, rotation_n=fine_n, update_phi=config.refine_phi,
        max_kept=config.max_kept, block_frames=config.block_frames, stream=False,
        refine_orientations=config.refine_orientations, refine_start=1,
    )


def extend_model(grid, low_hkl: np.ndarray, low_intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The starting high-resolution model: low-res voxel values where it has them, new reflections initialised.

    A new reflection starts from the mean voxel profile of the outermost ``OUTER_FRACTION`` of the low-res
    reflections (by |q|): the expected level and shape at the edge of the old data, the same for all, so
    the first E-step is not biased towards any one of them; the result is projected onto symmetric models.

    Args:
      grid: the high-resolution model grid (same vn, gw and crystal as the low-res one).
      low_hkl: (n_low, 3) unique reflections of the low-res model.
      low_intensity: (n_low, n_voxels) low-res model.

    Returns:
      ``(intensity, is_new)``: (n_asu, n_voxels) float32 model and (n_asu,) bool new reflections.
    """
    import jax.numpy as jnp

    from emcjax import model as model_lib

    low_intensity = np.asarray(low_intensity, np.float64)
    if low_intensity.shape[1] != grid.n_voxels:
        raise ConfigError(
            f"from: the low-res model has {low_intensity.shape[1]} voxels per reflection, the high-res grid "
            f"{grid.n_voxels}: vn and gw must be the low-res run's"
        )
    row = {tuple(h): i for i, h in enumerate(np.asarray(low_hkl).tolist())}
    source = np.array([row.get(tuple(h), -1) for h in grid.asu.hkl.tolist()], np.int64)
    is_new = source < 0
    q_low = np.linalg.norm(np.asarray(low_hkl, np.float64) @ grid.crystal.reciprocal_basis.T, axis=1)
    outer = q_low >= np.quantile(q_low, 1.0 - OUTER_FRACTION)
    profile = low_intensity[outer].mean(axis=0)
    intensity = np.where(is_new[:, None], profile[None, :], low_intensity[np.maximum(source, 0)])
    intensity = model_lib.symmetrize(jnp.asarray(intensity, jnp.float32), grid.tables)
    return np.asarray(intensity, np.float32), is_new


@dataclasses.dataclass(frozen=True)
class LocalSetup:
    """The fine candidates of every frame, the record of how they were made (``source.json``) and the frame
    weights of the run (None: all 1) with where they came from."""

    offsets: np.ndarray
    rotations: np.ndarray
    record: dict
    weights: np.ndarray | None = None
    weight_attrs: dict = dataclasses.field(default_factory=dict)


def local_candidates(
    config: HighresConfig, source: LowresSource, n_frames: int, crystal, true_quaternions: np.ndarray | None = None
) -> LocalSetup:
    """Per-frame fine candidates from the low-res run's kept orientations, and the record of the set-up (with
    the low-res run's median orientation error when the true orientations are given)."""
    from emcjax.sampling_600cell import sample_600cell

    fine_n = config.fine_n or local_grid.fine_sampling_n(source.coarse_n, source.coarse_resolution, config.resolution)
    radius = local_grid.neighbour_radius(source.coarse_n, fine_n)
    coarse, fine = sample_600cell(source.coarse_n), sample_600cell(fine_n)
    offsets, rotations, n_coarse = local_grid.frame_candidates(
        source.kept_frame, source.kept_rotation, source.kept_prob, n_frames, coarse, fine, radius,
        config.min_probability,
    )
    per_frame = np.diff(offsets)
    record = {
        "lowres_run": os.fspath(source.run_dir.absolute()),
        "lowres_iteration": source.iteration,
        "lowres_resolution_A": source.coarse_resolution,
        "data": os.fspath(source.data_path),
        "coarse_n": source.coarse_n,
        "fine_n": fine_n,
        "neighbour_radius_rad": radius,
        "min_probability": config.min_probability,
        "kept_pairs_recorded": source.kept_recorded,
        "coarse_per_frame_mean": float(n_coarse.mean()),
        "candidates_total": int(rotations.shape[0]),
        "candidates_per_frame_mean": float(per_frame.mean()),
        "candidates_per_frame_max": int(per_frame.max(initial=0)),
        "frames_without_candidates": int(np.sum(per_frame == 0)),
        "fine_rotations_used": int(np.unique(rotations).shape[0]),
        "fine_rotations_total": int(fine.n_rot),
    }
    if true_quaternions is not None:
        errors = scoring.orientation_errors(
            coarse.quaternions[source.best_rotation], true_quaternions, crystal.rotation_ops_cartesian
        )
        record["lowres_orientation_error_median_deg"] = float(np.degrees(np.median(errors)))
    return LocalSetup(offsets, rotations, record)


def setup(config: HighresConfig, source: LowresSource, mesh=None):
    """The high-resolution problem (candidate-list mode on the fine sampling, the frames weighted by
    :func:`frame_weights`), its EMC settings and set-up (fine candidates, record, frame weights).

    The frames are read into memory to carry their fine candidate lists (``setup_problem`` takes candidate
    lists only from the frames or the data set), so the local update does not stream.
    """
    from emcjax.crystal import Crystal
    from emcjax.data import SparseDataset

    with SparseDataset(source.data_path) as dataset:
        crystal = Crystal(cell=tuple(dataset.crystal["cell"]), space_group=str(dataset.crystal["space_group"]))
        if config.resolution < float(dataset.geometry["resolution_max_A"]):
            raise ConfigError(
                f"resolution: {config.resolution} Å is beyond the pixels of {source.data_path} "
                f"(resolution_max_A = {dataset.geometry['resolution_max_A']} Å)"
            )
        if config.resolution > source.coarse_resolution:
            raise ConfigError(
                f"resolution: {config.resolution} Å is lower than the low-res run's {source.coarse_resolution} Å"
            )
        frames = dataset.read_all()
        if source.result.phi.shape != (frames.n_frames,):
            raise DataError(
                f"from: {source.run_dir} has phi for {source.result.phi.shape[0]} frames, "
                f"{source.data_path} holds {frames.n_frames}"
            )
        truth = dataset.read_truth() if dataset.has_truth else {}
        local = local_candidates(config, source, frames.n_frames, crystal, truth.get("quaternion"))
        frames = dataclasses.replace(frames, candidate_offsets=local.offsets, candidate_rotations=local.rotations)
        emc = emc_config(config, source, local.record["fine_n"])
        weights, weight_attrs = frame_weights(config, source, frames.n_frames)
        problem = emc_lib.setup_problem(_WithSampling(dataset, local.record["fine_n"]), emc, frames, mesh=mesh,
                                        frame_weights=weights)
    if weights is not None:
        local.record["frames_used"] = int(np.sum(weights > 0))
    return problem, emc, dataclasses.replace(local, weights=weights, weight_attrs=weight_attrs)


def initial_state(problem, emc: emc_lib.EMCConfig, source: LowresSource) -> emc_lib.EMCState:
    """The low-res model extended to the new reflections, and the low-res phi."""
    from emcjax import parallel

    intensity, _ = extend_model(problem.grid, source.result.hkl, source.result.intensity)
    state = emc_lib.initial_state(problem, emc, 0)  # the other fields of the state (random model replaced)
    return state._replace(
        intensity=parallel.replicate(problem.mesh, intensity),
        phi=parallel.replicate(problem.mesh, np.asarray(source.result.phi, np.float32)),
    )
