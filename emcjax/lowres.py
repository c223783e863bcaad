"""Low-resolution EMC: ``python -m emcjax.lowres --iters 100``.

Reconstructs the 3D Bragg intensities and the per-frame scale factors phi from sparse frames. Without
``--data`` it runs on the built-in deterministic demo data set (simulated on the first run, then cached).
``--config FILE.toml`` supplies defaults that flags override; the resolved config is saved as
``OUT/config.toml``. ``--resume`` continues ``OUT`` from its latest Orbax checkpoint; ``--init-from RUN``
starts from another run's final model and phi.

Outputs in ``--out``: config.toml, run.json, metrics.jsonl, iterations/NNN.h5, checkpoints/, intensities.h5,
figures/. The run directory's life cycle (lock, resume checks, provenance, clean-up of a failed start) is
``emcjax.rundir``'s, checkpoints are ``emcjax.checkpoint``'s, errors go through ``emcjax.cli`` (docs/RUNS.md).

The settings are ``emcjax.lowres_config``'s, the iterations (shared with emcjax.highres) ``emcjax.iteration_loop``'s;
this module sets the run up, resumes it and is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import time

import numpy as np

from emcjax import checkpoint, cli, rundir, runio, toml_config
from emcjax import emc as emc_lib
from emcjax import demo as demo_lib
from emcjax.demo import DemoConfig, cache_dir, demo_path, ensure_demo  # noqa: F401 (part of this module's API)
from emcjax.errors import ConfigError, DataError
from emcjax.iteration_loop import draw_run_figures, progress_line, run_iterations
from emcjax.lowres_config import DistributedConfig, LowresConfig
from emcjax.merge import halves

__all__ = ["CHECKPOINTS_DIR", "RESUMABLE_CHANGES", "DemoConfig", "DistributedConfig", "LowresConfig", "cache_dir",
           "demo_path", "ensure_demo", "main", "parse_args", "progress_line", "run", "run_iterations"]

CHECKPOINTS_DIR = checkpoint.CHECKPOINTS_DIR


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
            draw_run_figures(out, records, problem, state)
            log(f"done: {out} (iteration {int(state.iteration)})")
    return dict(records[-1]) if records else {"iteration": int(state.iteration)}


def _record_start(rd, config: LowresConfig, data_path: pathlib.Path, identity: dict, resumed_at: int | None) -> None:
    """config.toml (paths absolute, so the run resumes from any directory) and this start in run.json."""
    import jax

    saved = dataclasses.replace(config, config=None, resume=False, data=data_path if config.data is not None else None)
    rd.record_start(rundir.absolute(saved, "init_from", "frame_weights"), identity,
                    header="emcjax.lowres resolved config; reuse with --config", resumed_at=resumed_at,
                    devices=[str(d) for d in jax.devices()])


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
