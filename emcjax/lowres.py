"""Low-resolution EMC: ``python -m emcjax.lowres --iters 100``.

Reconstructs the 3D Bragg intensities and the per-frame scale factors phi from sparse frames. Without
``--data`` it runs on the built-in deterministic demo data set (simulated on the first run, then cached).
``--config FILE.toml`` supplies defaults that flags override; the resolved config is saved as
``OUT/config.toml``. ``--resume`` continues ``OUT`` from its latest Orbax checkpoint; ``--init-from RUN``
starts from another run's final model and phi.

Outputs in ``--out``: config.toml, run.json, metrics.jsonl, iterations/NNN.h5, checkpoints/, intensities.h5,
figures/. The run directory's life cycle (lock, resume checks, provenance, clean-up of a failed start) is
``emcjax.rundir``'s, checkpoints are ``emcjax.checkpoint``'s, errors go through ``emcjax.cli`` (docs/RUNS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import time
from typing import Literal

import numpy as np

from emcjax import checkpoint, cli, rundir, runio, scoring, toml_config
from emcjax import emc as emc_lib
from emcjax import demo as demo_lib
from emcjax.demo import DemoConfig, cache_dir, demo_path, ensure_demo  # noqa: F401 (part of this module's API)
from emcjax.errors import ConfigError, DataError
from emcjax.merge import halves

CHECKPOINTS_DIR = checkpoint.CHECKPOINTS_DIR


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (jax.distributed): one process per host (or per GPU); unset fields come from the
    EMCJAX_COORDINATOR / EMCJAX_NUM_PROCESSES / EMCJAX_PROCESS_ID environment variables, then from JAX's own
    cluster detection (SLURM, Open MPI, cloud TPU)."""

    coordinator_address: str | None = None
    """host:port of process 0's coordinator service."""
    num_processes: int | None = None
    """Number of processes of the run."""
    process_id: int | None = None
    """This process's index, 0 .. num_processes-1 (process 0 writes the run directory)."""


@dataclasses.dataclass(frozen=True)
class LowresConfig:
    """Low-resolution EMC run."""

    iters: int = 100
    """Total number of EMC iterations of the run (with --resume: the total including those already done)."""
    data: pathlib.Path | None = None
    """Sparse data set (HDF5, docs/FORMATS.md); None: the built-in demo data set (see --demo.*)."""
    out: pathlib.Path = pathlib.Path("runs/lowres")
    """Run directory for config.toml, metrics.jsonl, iterations/, checkpoints/, intensities.h5, figures/."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (up to --iters iterations in total); without
    --config, that run's config.toml supplies the defaults."""
    init_from: pathlib.Path | None = None
    """Run directory whose final model and phi (intensities.h5) start this run; same frames and model shape."""
    seed: int = 0
    """Seed of the random initial model (with --half, each half draws its own seed from it)."""
    frame_weights: pathlib.Path | None = None
    """HDF5 file with dataset 'weights' (n_frames,) in [0, 1] (0 = frame left out), e.g. RUN/rejection.h5
    of python -m emcjax.reject."""
    half: Literal["a", "b"] | None = None
    """Reconstruct only this half of the frames (split by --split), from its own random start."""
    split: Literal["parity", "random"] = "parity"
    """How --half splits the frames: by frame index parity, or a random permutation seeded by --split-seed."""
    split_seed: int = 0
    """Seed of --split random."""
    keep_checkpoints: int = 3
    """Number of most recent checkpoints kept (one is written every iteration)."""
    figures_every: int = 0
    """Also redraw the figures every this many iterations (0: only at the end of the run)."""
    iterations_every: int = 1
    """Write iterations/NNN.h5 every this many iterations (0: never; the last iteration is always written)."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override); not saved."""
    emc: emc_lib.EMCConfig = dataclasses.field(default_factory=emc_lib.EMCConfig)
    """EMC algorithm settings."""
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    """Demo data set settings (used only without --data)."""
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    """Multi-process settings (single process when unset)."""

    def __post_init__(self) -> None:
        for name, low in (("iters", 0), ("keep_checkpoints", 1), ("figures_every", 0), ("iterations_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# The run


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(record: dict, total: int, eta_s: float, at_most: bool = False) -> str:
    """One progress line: iteration/total, log-likelihood, model change, phi mean±std, certainty, seconds,
    ETA (``at_most``: a bound, the run may stop earlier on convergence) and cc_true when present."""
    width = len(str(total))
    parts = [
        f"iter {record['iteration']:>{width}d}/{total}",
        f"logL {record.get('log_likelihood', float('nan')):.6e}",
        f"dmodel {record.get('model_change', float('nan')):.3e}",
        f"phi {record.get('phi_mean', float('nan')):.3f}±{record.get('phi_std', float('nan')):.3f}",
        f"certainty {record.get('certainty', float('nan')):.3f}",
        f"{record.get('seconds', float('nan')):.2f}s",
        f"ETA {'<= ' if at_most else ''}{_fmt_seconds(eta_s)}",
    ]
    if record.get("cc_true") is not None:
        parts.append(f"cc_true {record['cc_true']:.4f}")
    if record.get("orientation_error_median_deg") is not None:
        parts.append(f"orient {record['orientation_error_median_deg']:.2f}°")
    return "  ".join(parts)


def _check_init(init, problem, source: pathlib.Path) -> None:
    model_shape = tuple(problem.grid.model_shape)
    if tuple(init.intensity.shape) != model_shape:
        raise ConfigError(
            f"init_from: model in {source} has shape {tuple(init.intensity.shape)}, this run needs {model_shape} "
            "(same crystal, resolution, --emc.vn and --emc.gw)"
        )
    if tuple(init.phi.shape) != (problem.n_frames,):
        raise ConfigError(
            f"init_from: phi in {source} has {init.phi.shape[0]} frames, this data set has {problem.n_frames}"
        )
    if init.hkl.shape == tuple(problem.grid.asu.hkl.shape) and not np.array_equal(init.hkl, problem.grid.asu.hkl):
        raise ConfigError(f"init_from: the unique reflections (hkl) in {source} differ from this run's")


RESUMABLE_CHANGES = {
    "iters", "resume", "out", "config", "keep_checkpoints", "figures_every", "iterations_every", "distributed",
    "data", "init_from", "emc.block_frames", "emc.stream",
}
"""Settings a resumed run may change (``data`` only to another path of the same data set, checked by its
identity; ``init_from`` is not used once a run has a checkpoint)."""


def _check_settings(config: LowresConfig) -> None:
    """Checks of settings that need no data."""
    if config.emc.d_min is not None and not config.emc.d_min > 0:
        raise ConfigError(f"emc.d_min must be a resolution > 0 Å, got {config.emc.d_min}")


def _recorded_data(run_dir: pathlib.Path) -> dict | None:
    """The identity of the data set a run directory was made with: from its run.json, else (e.g. the
    ``-init`` directory of ``emcjax.legacy import``) of the data set its config.toml names, if it exists."""
    recorded = rundir.RunDirectory(run_dir, write=False).provenance().get("data")
    if recorded:
        return recorded
    config_path = run_dir / runio.CONFIG_FILE
    if config_path.exists():
        data = toml_config.parse_toml(config_path).get("data")
        if isinstance(data, str) and pathlib.Path(data).is_file():
            return rundir.data_identity(data)
    return None


def _usable_truth(problem, log):
    """``problem`` without its truth when /truth is not usable (wrong shapes): truth is optional, a warning."""
    truth = problem.truth
    if truth is None:
        return problem
    hkl, intensity = truth.get("hkl"), truth.get("intensity")
    if hkl is None and intensity is None:
        return problem
    hkl = None if hkl is None else np.asarray(hkl)
    intensity = None if intensity is None else np.asarray(intensity)
    if (hkl is None or intensity is None or hkl.ndim != 2 or hkl.shape[1] != 3 or intensity.ndim != 2
            or intensity.shape[0] != hkl.shape[0] or not np.issubdtype(hkl.dtype, np.integer)):
        log(f"warning: the data set's /truth is not usable (hkl {None if hkl is None else hkl.shape}, intensity "
            f"{None if intensity is None else intensity.shape}; expected (n, 3) integers and (n, n_voxels)); "
            "running without truth (no cc_true)")
        return dataclasses.replace(problem, truth=None)
    return problem


def run(config: LowresConfig, log=print) -> dict:
    """Runs (or resumes) a low-resolution EMC reconstruction; returns the final iteration's metrics.

    Writes ``config.out``: config.toml, run.json, metrics.jsonl, iterations/NNN.h5, checkpoints/ (Orbax),
    intensities.h5 and figures/. The run directory's life cycle (lock, resume checks, clean-up of a failed
    start) is ``emcjax.rundir``'s; nothing is written before every check has passed.

    Args:
      config: the resolved run config.
      log: where progress lines go (``print`` by default).

    Raises:
      ConfigError: ``out`` in use, holding another run or other files; nothing to resume; resume settings
        that differ from the run's; ``init_from`` that does not fit the data set.
      DataError: unreadable or other data set, checkpoint or init run.
    """
    import jax
    from jax.experimental import multihost_utils

    from emcjax import parallel
    from emcjax.data import SparseDataset

    main_process = jax.process_index() == 0
    _check_settings(config)
    out = config.out
    with rundir.RunDirectory(out, log=log, write=main_process) as rd, contextlib.ExitStack() as stack:
        resuming = config.resume and rd.status == "started"
        if config.resume:
            saved = rd.saved_config(LowresConfig)
            if not resuming:
                log(f"resume: {out} has no checkpoint yet (its start stopped before the first one); starting it over")
            rundir.check_resume_config(  # frame_weights is recorded absolute
                rundir.absolute(saved, "frame_weights"), rundir.absolute(config, "frame_weights"), RESUMABLE_CHANGES, out
            )
            if (saved.data is None) != (config.data is None):
                raise ConfigError(f"resume: data = {config.data!r} (the run has {saved.data!r}) (nothing was changed)")
        else:
            rd.check_new_start()
        multihost_utils.sync_global_devices("emcjax.lowres: out checked")
        if config.data is None and main_process:
            ensure_demo(config.demo, log=log)
        multihost_utils.sync_global_devices("emcjax.lowres: data ready")
        data_path = (config.data if config.data is not None else demo_path(config.demo)).absolute()
        emc_config, stop_model_change = config.emc, 0.0
        if config.data is None:
            emc_config, stop_model_change = demo_lib.run_settings(config.demo, config.emc)
            log(demo_lib.describe(config.demo, emc_config))
        if not data_path.exists():
            raise DataError(f"data: data set {data_path} does not exist")
        identity = rundir.data_identity(data_path)
        if identity["n_frames"] and identity["photons"] == 0:
            raise DataError(f"data: {data_path} holds no photon in any frame; nothing to reconstruct")
        if resuming:
            rundir.check_same_data(rd.provenance().get("data"), identity, f"resume: run {out}", log)
        init = None
        if config.init_from is not None and not resuming:
            init = runio.read_run(config.init_from)
            rundir.check_same_data(_recorded_data(config.init_from), identity,
                                   f"init_from: run {config.init_from}", log)
        if main_process and not resuming:  # the checks of a new start that need no set-up passed:
            rd.clear_failed_start()  # from here on the directory changes (and a --resume can start it over)
            _record_start(rd, config, data_path, identity, None)
        diffs = toml_config.config_differences(config, LowresConfig())
        diffs.pop("config", None)
        log("emcjax.lowres: " + (", ".join(f"{k}={v[0]!r}" for k, v in diffs.items()) or "all defaults"))

        start_setup = time.perf_counter()
        dataset = stack.enter_context(SparseDataset(data_path))  # streaming re-reads it at every E-step
        weights, weight_attrs = halves.run_frame_weights(
            dataset.n_frames, weights_file=config.frame_weights, half=config.half, split=config.split,
            split_seed=config.split_seed,
        )
        problem = _usable_truth(emc_lib.setup_problem(dataset, emc_config, frame_weights=weights), log)
        if not emc_config.stream:
            dataset.close()
        log(f"problem: {problem.n_frames} frames, model {tuple(problem.grid.model_shape)} (unique reflections x "
            f"voxels), set up in {time.perf_counter() - start_setup:.1f} s")

        seed = config.seed if config.half is None else halves.half_seed(config.seed, config.half)
        state = emc_lib.initial_state(problem, emc_config, seed)
        if main_process and weights is not None:
            halves.record(out, weights, {**weight_attrs, "init_seed": seed})
            log(f"frame weights: {int(np.sum(weights > 0))} of {weights.shape[0]} frames used ({weight_attrs})")
        if init is not None:
            _check_init(init, problem, config.init_from)
            state = state._replace(
                intensity=parallel.replicate(problem.mesh, np.asarray(init.intensity, state.intensity.dtype)),
                phi=parallel.replicate(problem.mesh, np.asarray(init.phi, state.phi.dtype)),
            )
        manager = checkpoint.open_manager(out, config.keep_checkpoints)
        stack.callback(checkpoint.close, manager)
        if resuming:
            state, meta = checkpoint.restore_latest(manager, state, out, log=log)
            if meta.get("n_frames") not in (None, problem.n_frames):
                raise DataError(f"resume: the checkpoint in {out} was made with {meta['n_frames']} frames, "
                                f"the data set {data_path} has {problem.n_frames}")
            if main_process:  # every check of the resume passed: from here on the directory changes
                _record_start(rd, config, data_path, identity, int(state.iteration))
        meta = {"n_frames": int(problem.n_frames), "model_shape": [int(n) for n in problem.grid.model_shape],
                "data": os.fspath(data_path)}
        if resuming:
            records = runio.truncate_metrics(out, int(state.iteration)) if main_process else []
            log(f"resumed {out} at iteration {int(state.iteration)}")
        else:
            records = []
            if init is not None:
                log(f"initial model and phi from {config.init_from}")
            checkpoint.save(manager, state, {**meta, "iteration": 0})  # from here on the run is resumable
        state, records = run_iterations(config, emc_config, problem, state, manager, meta, records, main_process, log,
                                        stop_model_change=stop_model_change)
        checkpoint.finish(manager)
        if main_process:  # still under the lock
            runio.write_intensities(
                out, np.asarray(state.intensity), problem.grid.asu.hkl, problem.integrated(state.intensity),
                np.asarray(state.phi), attrs={"iteration": int(state.iteration), "data": os.fspath(data_path)},
            )
            _draw(out, records, problem, state)
            log(f"done: {out} (iteration {int(state.iteration)})")
    return dict(records[-1]) if records else {"iteration": int(state.iteration)}


def _record_start(rd, config: LowresConfig, data_path: pathlib.Path, identity: dict, resumed_at: int | None) -> None:
    """config.toml (paths absolute, so the run resumes from any directory) and this start in run.json."""
    import jax

    saved = dataclasses.replace(config, config=None, resume=False, data=data_path if config.data is not None else None)
    rd.record_start(rundir.absolute(saved, "init_from", "frame_weights"), identity,
                    header="emcjax.lowres resolved config; reuse with --config", resumed_at=resumed_at,
                    devices=[str(d) for d in jax.devices()])


def run_iterations(config, emc_config, problem, state, manager, meta, records, main_process, log,
                   stop_model_change: float = 0.0):
    """The iterations from ``state.iteration`` to ``config.iters`` (a stage config with ``out``, ``iters``,
    ``iterations_every``, ``figures_every``): metrics, iterations/NNN.h5, a checkpoint each, progress lines
    and figures; returns the final state and all metrics records. Shared by lowres and highres.

    ``stop_model_change`` > 0 stops the run early, after the first iteration whose relative model change
    (``model_change``) is below it (a convergence stop; --iters is then a maximum), with orientation
    refinement not before the first refined iteration."""
    out = config.out
    times: list[float] = []
    iterate = functools.partial(emc_lib.iterate, problem, config=emc_config)
    refiner = None
    if emc_config.refine_orientations:
        from emcjax.refinement import Refiner

        refiner = Refiner(problem, emc_config)
        iterate = refiner.iterate
        log(f"orientation refinement: from iteration {emc_config.refine_start + 1}, the {emc_config.refine_top_k} "
            f"most probable rotations of each frame, {emc_config.refine_steps} steps, up to "
            f"{emc_config.refine_max_angle_deg}°")
        if int(state.iteration) > 0:
            _restore_refinement(refiner, out, int(state.iteration), log)
    refined_from = emc_config.refine_start + 1 if emc_config.refine_orientations else 0
    for _ in range(int(state.iteration), config.iters):
        state, metrics, per_frame = iterate(state)
        iteration = int(state.iteration)
        converged = (bool(stop_model_change) and float(metrics.get("model_change", np.inf)) < stop_model_change
                     and iteration > refined_from)  # a grid-only plateau is not convergence of a refined run
        record = {"iteration": iteration, **metrics,
                  **scoring.orientation_metrics(problem, per_frame["best_rotation"], per_frame.get("best_quaternion"))}
        records.append(record)
        if main_process:
            runio.append_metrics(out, record)
        if main_process and (
            iteration == config.iters or converged or (config.iterations_every and iteration % config.iterations_every == 0)
        ):
            runio.write_iteration(out, iteration, state.intensity, state.phi,
                                  per_frame["best_rotation"], per_frame["best_probability"], metrics,
                                  extra={k: v for k, v in per_frame.items() if k.startswith("kept_") or k == "best_quaternion"})
        if refiner is not None and main_process:
            runio.write_side_arrays(out, runio.REFINEMENT_DIR, iteration, refiner.snapshot(),
                                    keep=config.keep_checkpoints)
        checkpoint.save(manager, state, {**meta, "iteration": iteration})
        times.append(float(metrics.get("seconds", 0.0)))
        recent = times[-5:]
        eta = (config.iters - iteration) * (sum(recent) / len(recent))
        if main_process:
            log(progress_line(record, config.iters, eta, at_most=bool(stop_model_change)))
        if main_process and config.figures_every and iteration % config.figures_every == 0 and iteration < config.iters:
            _draw(out, records, problem, state)
        if converged:
            log(f"converged: relative model change {metrics['model_change']:.2e} < {stop_model_change:g} at "
                f"iteration {iteration} (of at most {config.iters}); stopping")
            break
    return state, records


def _restore_refinement(refiner, out: pathlib.Path, iteration: int, log) -> None:
    """Resumes the refiner where checkpoint ``iteration`` left it (its kept rotations and refined candidates);
    without the file (a run from before it was written) refinement restarts from a grid E-step."""
    arrays = runio.read_side_arrays(out, runio.REFINEMENT_DIR, iteration)
    if arrays is None:
        log(f"warning: {out / runio.REFINEMENT_DIR} has no state for iteration {iteration}; orientation refinement "
            "restarts from a grid E-step")
    elif arrays:
        refiner.restore(arrays)


def _draw(out: pathlib.Path, records: list[dict], problem, state) -> None:
    from emcjax import figures as figures_lib  # matplotlib: imported when the first figure is drawn

    truth = getattr(problem, "truth", None)
    true_integrated = None
    if truth is not None and truth.get("intensity") is not None and truth.get("hkl") is not None:
        # the truth's reflections need not be the model's (e.g. a run to a lower resolution than the data)
        true_integrated = scoring.values_by_hkl(
            problem.grid.asu.hkl, truth["hkl"], np.asarray(problem.integrated(truth["intensity"]))
        )
    crystal = getattr(problem.grid, "crystal", None)
    figures_lib.draw_all(
        out,
        records,
        problem.grid.asu.hkl,
        np.asarray(problem.integrated(state.intensity)),
        true_integrated,
        laue_ops=getattr(crystal, "laue_ops", None),
    )


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> LowresConfig:
    """Parses the command line: ``--config FILE.toml`` (if given) supplies the defaults, flags override.

    With ``--resume`` and no ``--config``, the resumed run's ``OUT/config.toml`` supplies the defaults, so
    ``--out DIR --resume --iters 200`` continues a run with its own settings.
    """
    return toml_config.parse_stage_args(LowresConfig, argv, "python -m emcjax.lowres", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.lowres``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(_main, argv, "emcjax.lowres")


def _main(argv: list[str]) -> None:
    config = parse_args(argv)
    from emcjax import parallel

    d = config.distributed
    parallel.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    run(config)


if __name__ == "__main__":
    main()
