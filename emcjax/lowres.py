"""Low-resolution EMC: ``python -m emcjax.lowres --iters 100``.

Reconstructs the 3D Bragg intensities and the per-frame scale factors phi from sparse frames. Without
``--data`` it runs on the built-in deterministic demo data set (simulated on the first run, then cached).
``--config FILE.toml`` supplies defaults that flags override; the resolved config is saved as
``OUT/config.toml``. ``--resume`` continues ``OUT`` from its latest Orbax checkpoint; ``--init-from RUN``
starts from another run's final model and phi.

Outputs in ``--out``: config.toml, metrics.jsonl, iterations/NNN.h5, checkpoints/, intensities.h5, figures/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Literal

import numpy as np

from emcjax import emc as emc_lib
from emcjax import figures as figures_lib
from emcjax import runio, scoring
from emcjax.errors import ConfigError, DataError, EmcjaxError
from emcjax.merge import halves

CHECKPOINTS_DIR = "checkpoints"
DEMO_FORMAT = 1  # bump to invalidate cached demo data sets when the simulator's output changes


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The built-in demo data set (used when --data is not given): a simulation with the simulator's
    defaults (P 43 21 2 lysozyme-like cell, 1 Å, 4 Å) except for these fields."""

    n_frames: int = 1000
    """Number of frames."""
    bragg_photons: float = 150.0
    """Mean number of Bragg photons per frame at phi = 1 (photons)."""
    background_photons: float = 30.0
    """Mean number of background photons per frame (photons)."""
    rotation_n: int = 4
    """Frame orientations are drawn from the 600-cell sampling with this n (0: continuous, off-grid)."""
    seed: int = 0
    """Seed of the simulation (the data set is a deterministic function of these settings)."""

    def __post_init__(self) -> None:
        if self.n_frames < 1:
            raise ConfigError(f"demo.n_frames must be >= 1, got {self.n_frames}")

    def simulation(self, out: pathlib.Path | None = None):
        """The ``emcjax.simulate.SimulationConfig`` of the demo data set."""
        from emcjax import simulate

        return simulate.SimulationConfig(
            out=out,
            n_frames=self.n_frames,
            bragg_photons=self.bragg_photons,
            background_photons=self.background_photons,
            rotation_n=self.rotation_n,
            seed=self.seed,
        )


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
        if self.resume and self.init_from is not None:
            raise ConfigError(
                f"resume and init_from exclude each other (got --resume and --init-from {self.init_from}): "
                "--resume continues --out from its checkpoint, --init-from starts a new run"
            )


# ----------------------------------------------------------------------------------------------------
# Data


def cache_dir() -> pathlib.Path:
    """Where the demo data set is cached: ``$EMCJAX_CACHE``, else ``$XDG_CACHE_HOME/emcjax``, else
    ``~/.cache/emcjax``."""
    if os.environ.get("EMCJAX_CACHE"):
        return pathlib.Path(os.environ["EMCJAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "emcjax"


def demo_path(demo: DemoConfig) -> pathlib.Path:
    """Cache path of the demo data set: ``demo-<hash>.h5``, the hash over the full simulation config."""
    sim = runio.config_to_dict(demo.simulation())
    sim.pop("overwrite", None)
    sim["_format"] = DEMO_FORMAT
    digest = hashlib.sha256(json.dumps(sim, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"demo-{digest}.h5"


def ensure_demo(demo: DemoConfig, log=print) -> pathlib.Path:
    """Returns the cached demo data set, simulating it first if it is not cached yet (atomically, so
    concurrent runs never see a partial file)."""
    from emcjax import simulate

    path = demo_path(demo)
    if path.exists():
        log(f"demo data set: {path} (cached)")
        return path
    log(f"demo data set: simulating {demo.n_frames} frames -> {path}")
    start = time.perf_counter()
    with runio.atomic_path(path) as tmp:
        simulate.write(dataclasses.replace(demo.simulation(out=tmp), overwrite=True))
    log(f"demo data set: written in {time.perf_counter() - start:.1f} s")
    return path


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_manager(run_dir: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager((run_dir / CHECKPOINTS_DIR).absolute(), options=options)


def _state_dict(state) -> dict:
    return dict(state._asdict())


def _save_checkpoint(manager, state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    step = int(state.iteration)
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def _restore_checkpoint(manager, template, run_dir: pathlib.Path):
    """Restores the latest checkpoint into the shapes, dtypes and shardings of ``template`` (an EMCState)."""
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        raise ConfigError(
            f"resume: no checkpoint in {run_dir / CHECKPOINTS_DIR}; start a new run without --resume "
            "(after removing the directory) or choose another --out"
        )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        _state_dict(template),
    )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError) as err:
        raise DataError(f"resume: cannot restore checkpoint {step} of {run_dir / CHECKPOINTS_DIR}: {err}") from None
    state = type(template)(**restored["state"])
    meta = dict(restored["meta"] or {})
    for name, field in _state_dict(state).items():  # fields may be pytrees (the likelihood): check every leaf
        for value, expected in zip(jax.tree.leaves(field), jax.tree.leaves(_state_dict(template)[name])):
            if value.shape != expected.shape:
                raise DataError(
                    f"resume: checkpoint {step} in {run_dir / CHECKPOINTS_DIR} has {name} of shape {value.shape}, "
                    f"this problem needs {expected.shape}; was the run made with other --data or --emc settings?"
                )
    return state, meta


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


def progress_line(record: dict, total: int, eta_s: float) -> str:
    """One progress line: iteration/total, log-likelihood, model change, phi mean±std, certainty, seconds,
    ETA, and cc_true and the median orientation error (degrees) when present."""
    width = len(str(total))
    parts = [
        f"iter {record['iteration']:>{width}d}/{total}",
        f"logL {record.get('log_likelihood', float('nan')):.6e}",
        f"dmodel {record.get('model_change', float('nan')):.3e}",
        f"phi {record.get('phi_mean', float('nan')):.3f}±{record.get('phi_std', float('nan')):.3f}",
        f"certainty {record.get('certainty', float('nan')):.3f}",
        f"{record.get('seconds', float('nan')):.2f}s",
        f"ETA {_fmt_seconds(eta_s)}",
    ]
    if record.get("cc_true") is not None:
        parts.append(f"cc_true {record['cc_true']:.4f}")
    if record.get("orientation_error_median_deg") is not None:
        parts.append(f"orient {record['orientation_error_median_deg']:.2f}°")
    return "  ".join(parts)


def _is_nonempty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_out_dir(config: LowresConfig) -> None:
    out = config.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} exists and is not a directory; choose another --out")
    if config.resume:
        if not (out / CHECKPOINTS_DIR).is_dir():
            raise ConfigError(
                f"resume: {out} holds no run to resume ({out / CHECKPOINTS_DIR} does not exist); "
                "drop --resume to start a new run or name the run directory with --out"
            )
    elif _is_nonempty_dir(out):
        raise ConfigError(
            f"out: run directory {out} is not empty; add --resume to continue that run, "
            "or choose another --out (nothing was overwritten)"
        )


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


def run(config: LowresConfig, log=print) -> dict:
    """Runs (or resumes) a low-resolution EMC reconstruction; returns the final iteration's metrics.

    Writes ``config.out``: config.toml, metrics.jsonl, iterations/NNN.h5, checkpoints/ (Orbax),
    intensities.h5 and figures/.

    Args:
      config: the resolved run config.
      log: where progress lines go (``print`` by default).

    Raises:
      ConfigError: ``out`` is a non-empty directory without ``resume``, nothing to resume, or
        ``init_from`` does not fit the data set.
      DataError: unreadable data set, checkpoint or init run.
    """
    import jax
    from jax.experimental import multihost_utils

    from emcjax import parallel
    from emcjax.data import SparseDataset

    main_process = jax.process_index() == 0
    _check_out_dir(config)
    multihost_utils.sync_global_devices("emcjax.lowres: out checked")
    out = config.out
    diffs = runio.config_differences(config, LowresConfig())
    diffs.pop("config", None)
    log("emcjax.lowres: " + (", ".join(f"{k}={v[0]!r}" for k, v in diffs.items()) or "all defaults"))

    if config.resume and (out / runio.CONFIG_FILE).exists():
        try:
            saved = runio.config_from_toml(LowresConfig, out / runio.CONFIG_FILE)
        except ConfigError as err:
            log(f"warning: cannot read the saved config: {err}")
        else:
            changed = {
                k: v
                for k, v in runio.config_differences(config, saved).items()
                if k.split(".")[0] in ("data", "emc", "demo", "seed")
            }
            if changed:
                log(
                    "warning: resuming with settings that differ from the saved config: "
                    + ", ".join(f"{k}={v[0]!r} (was {v[1]!r})" for k, v in changed.items())
                )

    init = runio.read_run(config.init_from) if config.init_from is not None else None
    if config.data is None and main_process:
        ensure_demo(config.demo, log=log)
    multihost_utils.sync_global_devices("emcjax.lowres: data ready")
    data_path = config.data if config.data is not None else demo_path(config.demo)
    if not pathlib.Path(data_path).exists():
        raise DataError(f"data: data set {data_path} does not exist")

    start_setup = time.perf_counter()
    with SparseDataset(data_path) as dataset:
        weights, weight_attrs = halves.run_frame_weights(
            dataset.n_frames, weights_file=config.frame_weights, half=config.half, split=config.split,
            split_seed=config.split_seed,
        )
        problem = emc_lib.setup_problem(dataset, config.emc, frame_weights=weights)
    log(
        f"problem: {problem.n_frames} frames, model {tuple(problem.grid.model_shape)} (unique reflections x voxels), "
        f"set up in {time.perf_counter() - start_setup:.1f} s"
    )

    seed = config.seed if config.half is None else halves.half_seed(config.seed, config.half)
    state = emc_lib.initial_state(problem, config.emc, seed)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            halves.record(out, weights, {**weight_attrs, "init_seed": seed})
            log(f"frame weights: {int(np.sum(weights > 0))} of {weights.shape[0]} frames used ({weight_attrs})")
        runio.save_config(
            out / runio.CONFIG_FILE,
            dataclasses.replace(config, config=None, resume=False),
            header="emcjax.lowres resolved config; reuse with --config",
        )
    manager = _checkpoint_manager(out, config.keep_checkpoints)
    try:
        if config.resume:
            state, meta = _restore_checkpoint(manager, state, out)
            if meta.get("n_frames") not in (None, problem.n_frames):
                raise DataError(
                    f"resume: the checkpoint in {out} was made with {meta['n_frames']} frames, "
                    f"the data set {data_path} has {problem.n_frames}"
                )
            records = runio.truncate_metrics(out, int(state.iteration)) if main_process else []
            log(f"resumed {out} at iteration {int(state.iteration)}")
        else:
            records = []
            if init is not None:
                _check_init(init, problem, config.init_from)
                state = state._replace(
                    intensity=parallel.replicate(problem.mesh, np.asarray(init.intensity, state.intensity.dtype)),
                    phi=parallel.replicate(problem.mesh, np.asarray(init.phi, state.phi.dtype)),
                )
                log(f"initial model and phi from {config.init_from}")

        meta = {
            "n_frames": int(problem.n_frames),
            "model_shape": [int(n) for n in problem.grid.model_shape],
            "data": os.fspath(data_path),
        }
        start = int(state.iteration)
        per_frame = None
        times: list[float] = []
        for _ in range(start, config.iters):
            state, metrics, per_frame = emc_lib.iterate(problem, state, config.emc)
            iteration = int(state.iteration)
            record = {"iteration": iteration, **metrics, **scoring.orientation_metrics(problem, per_frame["best_rotation"])}
            records.append(record)
            if main_process:
                runio.append_metrics(out, record)
            if main_process and (
                iteration == config.iters or (config.iterations_every and iteration % config.iterations_every == 0)
            ):
                runio.write_iteration(
                    out, iteration, state.intensity, state.phi,
                    per_frame["best_rotation"], per_frame["best_probability"], metrics,
                    extra={k: v for k, v in per_frame.items() if k.startswith("kept_")},
                )
            _save_checkpoint(manager, state, {**meta, "iteration": iteration})
            times.append(float(metrics.get("seconds", 0.0)))
            recent = times[-5:]
            eta = (config.iters - iteration) * (sum(recent) / len(recent))
            if main_process:
                log(progress_line(record, config.iters, eta))
            if main_process and config.figures_every and iteration % config.figures_every == 0 and iteration < config.iters:
                _draw(out, records, problem, state)
        manager.wait_until_finished()
    finally:
        manager.close()

    final = dict(records[-1]) if records else {"iteration": int(state.iteration)}
    if not main_process:
        return final
    runio.write_intensities(
        out,
        np.asarray(state.intensity),
        problem.grid.asu.hkl,
        problem.integrated(state.intensity),
        np.asarray(state.phi),
        attrs={"iteration": int(state.iteration), "data": os.fspath(data_path)},
    )
    _draw(out, records, problem, state)
    log(f"done: {out} (iteration {int(state.iteration)})")
    return final


def _draw(out: pathlib.Path, records: list[dict], problem, state) -> None:
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


def _config_argument(argv: list[str]) -> pathlib.Path | None:
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


def parse_args(argv: list[str] | None = None) -> LowresConfig:
    """Parses the command line: ``--config FILE.toml`` (if given) supplies the defaults, flags override.

    With ``--resume`` and no ``--config``, the resumed run's ``OUT/config.toml`` supplies the defaults, so
    ``--out DIR --resume --iters 200`` continues a run with its own settings.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = LowresConfig()
    config_file = _config_argument(argv)
    if config_file is not None:
        default = runio.config_from_toml(LowresConfig, config_file)
        if default.config is not None:
            raise ConfigError(f"{config_file}: key 'config' cannot be set inside a config file")
    description = __doc__.split("\n\n")[0]
    prog = "python -m emcjax.lowres"
    config = tyro.cli(LowresConfig, prog=prog, args=argv, default=default, description=description)
    saved = config.out / runio.CONFIG_FILE
    if config.resume and config_file is None and saved.exists():
        # --resume without --config: the run's own saved config supplies the defaults, flags still override
        default = dataclasses.replace(runio.config_from_toml(LowresConfig, saved), resume=False)
        config = tyro.cli(LowresConfig, prog=prog, args=argv, default=default, description=description)
    return config


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
        from emcjax import parallel

        d = config.distributed
        parallel.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
        run(config)
    except EmcjaxError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
