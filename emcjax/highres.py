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

The settings are ``emcjax.highres_config``'s, the reading of the low-resolution run ``emcjax.highres_source``'s,
the problem and its start ``emcjax.highres_setup``'s; this module runs the update and is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from emcjax import atomic_files, checkpoint, cli, lowres, rundir, runio, toml_config
from emcjax.errors import ConfigError
from emcjax.highres_config import HighresConfig
from emcjax.highres_setup import LocalSetup, emc_config, extend_model, initial_state, local_candidates, setup
from emcjax.highres_source import LowresSource, frame_weights, read_lowres
from emcjax.merge import rundata

__all__ = ["SOURCE_FILE", "HighresConfig", "LocalSetup", "LowresSource", "emc_config", "extend_model", "frame_weights",
           "initial_state", "local_candidates", "main", "parse_args", "read_lowres", "run", "setup"]

SOURCE_FILE = "source.json"


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
    lowres.draw_run_figures(out, records, problem, state)
    log(f"done: {out} (iteration {int(state.iteration)})")
    return final


def parse_args(argv: list[str] | None = None) -> HighresConfig:
    """``--config FILE.toml`` (if given) supplies the defaults, flags override; with ``--resume`` and no
    ``--config`` the run's own config.toml does."""
    return toml_config.parse_stage_args(HighresConfig, argv, "python -m emcjax.highres", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.highres``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(lambda args: run(parse_args(args)), argv, "emcjax.highres")


if __name__ == "__main__":
    main()
