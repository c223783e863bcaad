"""High-resolution local update: ``python -m emcjax.highres --from LOWRES_DIR --resolution 3.0 --iters N``.

Extends a converged low-resolution reconstruction to a higher resolution at a fraction of the cost of a full
search (the reference's second EMC stage, METHOD.md §2.11-2.12, §9.2-9.3): every frame evaluates only the
fine rotations (600-cell ``n_f = ceil(n_c res_coarse / res_fine)``) near the coarse rotations it kept with
P >= 0.01 in the last low-resolution E-step (emcjax.local_grid), in the EMC's candidate-list mode. The model
grows to the new cutoff: reflections the low-resolution model has keep its voxel values, new ones start
from the mean voxel profile of the outermost low-resolution reflections (docs/METHOD-NOTES.md); phi is the
low-resolution run's, fixed (the reference) or refined (``--refine-phi``).

Frames keep the low-resolution run's weights (its ``frame_weights.h5``: a half set, earlier rejections),
times those of ``--frame-weights`` (e.g. ``LOWRES_DIR/rejection.h5`` of ``python -m emcjax.reject``): a frame
left out at low resolution stays out. The weights used are written to ``--out/frame_weights.h5``.

Outputs in ``--out`` are those of ``emcjax.lowres`` (config.toml, metrics.jsonl, iterations/NNN.h5,
checkpoints/, intensities.h5, figures/, frame_weights.h5 when some frame weighs less than 1) plus
``source.json``, the record of the low-resolution run it came from and of the fine candidates. ``--resume``
continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Annotated

import h5py
import numpy as np

from emcjax import emc as emc_lib
from emcjax import atomic_files, checkpoint, cli, local_grid, lowres, rundir, runio, scoring, toml_config
from emcjax.errors import ConfigError, DataError
from emcjax.merge import rundata

SOURCE_FILE = "source.json"
OUTER_FRACTION = 0.2
"""New reflections start from the mean voxel profile of this outermost fraction (by |q|) of the low-res ones."""


def _from_arg():
    import tyro

    return tyro.conf.arg(name="from")


@dataclasses.dataclass(frozen=True)
class HighresConfig:
    """High-resolution local update of a low-resolution run."""

    from_run: Annotated[pathlib.Path | None, _from_arg()] = None
    """Low-resolution run directory (python -m emcjax.lowres --out DIR): its data set, final model and phi,
    and the kept orientations of its last E-step (required)."""
    resolution: float = 3.0
    """High-resolution limit d_min in Å (the data set must have pixels out to it)."""
    iters: int = 10
    """Total number of EMC iterations of the run (with --resume: the total including those already done)."""
    out: pathlib.Path = pathlib.Path("runs/highres")
    """Run directory for config.toml, source.json, metrics.jsonl, iterations/, checkpoints/, intensities.h5,
    figures/."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint; without --config, that run's config.toml
    supplies the defaults."""
    fine_n: int = 0
    """600-cell parameter of the fine sampling (0: ceil(n_c x res_coarse / res_fine), the reference's)."""
    min_probability: float = 0.01
    """Coarse rotations a frame kept with at least this probability contribute their fine neighbours."""
    refine_phi: bool = False
    """Refine phi by alternating E-steps (False: phi stays the low-resolution run's, as in the reference)."""
    max_kept: int = 32
    """At most this many fine rotations are kept per frame and E-step (top-k)."""
    frame_weights: pathlib.Path | None = None
    """HDF5 file with dataset 'weights' (n_frames,) in [0, 1] (e.g. LOWRES_DIR/rejection.h5 of python -m
    emcjax.reject), multiplied into the low-res run's own weights (its frame_weights.h5, e.g. a half set)."""
    refine_orientations: bool = False
    """Refine each frame's most probable fine rotations off the grid from iteration 2 on (emcjax.refinement;
    the other refine_* settings are the low-res run's)."""
    block_frames: int = 0
    """Frames per block of the E-step (0: all frames in one block)."""
    keep_checkpoints: int = 3
    """Number of most recent checkpoints kept (one is written every iteration)."""
    figures_every: int = 0
    """Also redraw the figures every this many iterations (0: only at the end of the run)."""
    iterations_every: int = 1
    """Write iterations/NNN.h5 every this many iterations (0: never; the last iteration is always written)."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override); not saved."""

    def __post_init__(self) -> None:
        for name, low in (("iters", 0), ("keep_checkpoints", 1), ("figures_every", 0), ("iterations_every", 0),
                          ("fine_n", 0), ("max_kept", 1), ("block_frames", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.resolution > 0:
            raise ConfigError(f"resolution must be > 0 Å, got {self.resolution!r}")
        if not 0 <= self.min_probability <= 1:
            raise ConfigError(f"min_probability must be in [0, 1], got {self.min_probability!r}")


# ----------------------------------------------------------------------------------------------------
# The low-resolution run


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


# ----------------------------------------------------------------------------------------------------
# The high-resolution problem and its start


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
    config: HighresConfig, source: LowresSource, n_frames: int, crystal, true_quaternions: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> LocalSetup:
    """Per-frame fine candidates from the low-res run's kept orientations, and the record of the set-up (with
    the low-res run's median orientation error, over the frames of weight > 0 in ``weights`` (None: all), when
    the true orientations are given)."""
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
        record["lowres_orientation_error_median_deg"] = float(
            np.degrees(np.median(errors[scoring.used_frames(weights, n_frames)])))
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
        weights, weight_attrs = frame_weights(config, source, frames.n_frames)
        local = local_candidates(config, source, frames.n_frames, crystal, truth.get("quaternion"), weights)
        frames = dataclasses.replace(frames, candidate_offsets=local.offsets, candidate_rotations=local.rotations)
        emc = emc_config(config, source, local.record["fine_n"])
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


# ----------------------------------------------------------------------------------------------------
# The run


def run(config: HighresConfig, log=print) -> dict:
    """Runs (or resumes) a high-resolution local update; returns the final iteration's metrics.

    Raises:
      ConfigError: no --from, ``out`` not empty without ``resume``, a resolution outside the data.
      DataError: unreadable low-res run, data set or checkpoint.
    """
    import jax
    from jax.experimental import multihost_utils

    if config.from_run is None:
        raise ConfigError("from: name the low-resolution run directory, e.g. --from runs/lowres")
    main_process = jax.process_index() == 0
    if not config.resume and rundir.status(config.out) != "new":
        raise ConfigError(f"out: {config.out} is not empty; add --resume to continue it, or choose another --out")
    multihost_utils.sync_global_devices("emcjax.highres: out checked")
    out = config.out
    source = read_lowres(config.from_run)
    start_setup = time.perf_counter()
    problem, emc, local = setup(config, source)
    weights, weight_attrs = local.weights, local.weight_attrs
    rec = local.record
    log(
        f"emcjax.highres: {source.run_dir} ({source.coarse_resolution} Å, n = {source.coarse_n}, iteration "
        f"{source.iteration}) -> {config.resolution} Å, n = {rec['fine_n']}; {rec['candidates_per_frame_mean']:.1f} "
        f"fine candidates per frame ({rec['fine_rotations_used']} of {rec['fine_rotations_total']} fine rotations "
        f"used), model {tuple(problem.grid.model_shape)}, set up in {time.perf_counter() - start_setup:.1f} s"
    )
    if not source.kept_recorded:
        log(f"warning: {source.run_dir} did not record its kept orientations; using each frame's most likely one")
    if weights is not None:
        log(f"frame weights: {rec['frames_used']} of {weights.shape[0]} frames used ({weight_attrs})")

    state = initial_state(problem, emc, source)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        toml_config.save_config(
            out / runio.CONFIG_FILE,
            dataclasses.replace(config, config=None, resume=False),
            header="emcjax.highres resolved config; reuse with --config",
        )
        atomic_files.write_text_atomic(out / SOURCE_FILE, json.dumps(rec, indent=2) + "\n")
        if weights is not None:
            rundata.write_frame_weights(out / rundata.FRAME_WEIGHTS_FILE, weights, weight_attrs)
    manager = checkpoint.open_manager(out, config.keep_checkpoints)
    try:
        records = []
        if config.resume:
            state, _ = checkpoint.restore_latest(manager, state, out, log=log)
            records = runio.truncate_metrics(out, int(state.iteration)) if main_process else []
            log(f"resumed {out} at iteration {int(state.iteration)}")
        meta = {"n_frames": int(problem.n_frames), "model_shape": [int(n) for n in problem.grid.model_shape]}
        state, records = lowres.run_iterations(config, emc, problem, state, manager, meta, records, main_process, log)
        checkpoint.finish(manager)
    finally:
        checkpoint.close(manager)

    final = dict(records[-1]) if records else {"iteration": int(state.iteration)}
    if not main_process:
        return final
    runio.write_intensities(
        out, np.asarray(state.intensity), problem.grid.asu.hkl, problem.integrated(state.intensity),
        np.asarray(state.phi),
        attrs={"iteration": int(state.iteration), "data": os.fspath(source.data_path),
               "lowres_run": os.fspath(source.run_dir.absolute()), "resolution_A": config.resolution},
    )
    lowres._draw(out, records, problem, state)
    log(f"done: {out} (iteration {int(state.iteration)})")
    return final


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> HighresConfig:
    """``--config FILE.toml`` (if given) supplies the defaults, flags override; with ``--resume`` and no
    ``--config`` the run's own config.toml does."""
    return toml_config.parse_stage_args(HighresConfig, argv, "python -m emcjax.highres", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.highres``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(lambda args: run(parse_args(args)), argv, "emcjax.highres")


if __name__ == "__main__":
    main()
