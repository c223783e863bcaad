"""The built-in demo data set of ``python -m emcjax.lowres`` (used without ``--data``): a deterministic
simulation, made on the first run and cached in ``$EMCJAX_CACHE``, ``$XDG_CACHE_HOME/emcjax`` or
``~/.cache/emcjax``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time

from emcjax import atomic_files, toml_config
from emcjax.errors import ConfigError

DEMO_FORMAT = 2  # bump to invalidate cached demo data sets when the simulator's output changes


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The built-in demo data set (used when --data is not given): a simulation with the simulator's
    defaults (P 43 21 2 lysozyme-like cell, 1 Å, 4 Å) except for these fields, and how the demo run treats
    it. Like real crystals, the frames take continuous (off-grid) orientations; each frame carries the
    candidate list a spot-based orientation step would give (its grid rotations nearest the truth), and the
    demo run refines orientations off the grid and stops once the model has converged."""

    n_frames: int = 400
    """Number of frames."""
    bragg_photons: float = 150.0
    """Mean number of Bragg photons per frame at phi = 1 (photons)."""
    background_photons: float = 30.0
    """Mean number of background photons per frame (photons)."""
    rotation_n: int = 0
    """Frame orientations are drawn from the 600-cell sampling with this n (0: continuous, off-grid)."""
    candidates: int = 8
    """Per-frame candidate lists: the K rotations of the --demo.candidate-n sampling nearest the true
    orientation (what spot-based preselection gives; 0: none, the EMC then searches --emc.rotation-n)."""
    candidate_n: int = 20
    """600-cell refinement parameter of the candidate rotations (20: 2.7° grid; 0: --demo.rotation-n)."""
    refine: bool = True
    """Turn on --emc.refine-orientations for the demo run (continuous orientations need it; refine-start
    and the other refinement settings come from --emc.*)."""
    stop_model_change: float = 0.05
    """The demo run stops before --iters once an iteration after the first refined one changes the model by
    less than this (relative L2; 0: run all --iters iterations)."""
    seed: int = 0
    """Seed of the simulation (the data set is a deterministic function of these settings)."""

    def __post_init__(self) -> None:
        if self.n_frames < 1:
            raise ConfigError(f"demo.n_frames must be >= 1, got {self.n_frames}")
        if not self.stop_model_change >= 0:
            raise ConfigError(f"demo.stop_model_change must be >= 0, got {self.stop_model_change}")

    def simulation(self, out: pathlib.Path | None = None):
        """The ``emcjax.simulate.SimulationConfig`` of the demo data set."""
        from emcjax import simulate

        return simulate.SimulationConfig(
            out=out,
            n_frames=self.n_frames,
            bragg_photons=self.bragg_photons,
            background_photons=self.background_photons,
            rotation_n=self.rotation_n,
            candidates=self.candidates,
            candidate_n=self.candidate_n,
            seed=self.seed,
        )


def run_settings(demo: DemoConfig, emc):
    """The EMC settings and the convergence tolerance of a run on the demo data set: ``emc`` with
    refinement turned on (``demo.refine``), and ``demo.stop_model_change``."""
    if demo.refine and not emc.refine_orientations:
        emc = dataclasses.replace(emc, refine_orientations=True)
    return emc, demo.stop_model_change


def describe(demo: DemoConfig, emc) -> str:
    """One line saying what the demo run does (emc: the settings from ``run_settings``)."""
    orientations = (f"orientations drawn from the 600-cell n={demo.rotation_n} grid" if demo.rotation_n
                    else "continuous (off-grid) orientations")
    if demo.candidates:
        n = demo.candidate_n or demo.rotation_n
        search = (f"per-frame candidate lists of the {demo.candidates} nearest rotations of the 600-cell n={n} "
                  f"grid ({math.degrees(0.944 / n):.1f}°, what a spot-based orientation step gives)")
    else:
        search = f"full search of the 600-cell n={emc.rotation_n} grid"
    refine = (f"orientation refinement from iteration {emc.refine_start + 1}" if emc.refine_orientations
              else "no orientation refinement")
    stop = (f"stop once the relative model change < {demo.stop_model_change:g}" if demo.stop_model_change
            else "no convergence stop")
    return f"demo: {demo.n_frames} frames, {orientations}, {search}, {refine}, {stop}"


def cache_dir() -> pathlib.Path:
    """Where the demo data set is cached: ``$EMCJAX_CACHE``, else ``$XDG_CACHE_HOME/emcjax``, else
    ``~/.cache/emcjax``."""
    if os.environ.get("EMCJAX_CACHE"):
        return pathlib.Path(os.environ["EMCJAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "emcjax"


def demo_path(demo: DemoConfig) -> pathlib.Path:
    """Cache path of the demo data set: ``demo-<hash>.h5``, the hash over the full simulation config."""
    sim = toml_config.config_to_dict(demo.simulation())
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
    with atomic_files.atomic_path(path) as tmp:
        simulate.write(dataclasses.replace(demo.simulation(out=tmp), overwrite=True))
    log(f"demo data set: written in {time.perf_counter() - start:.1f} s")
    return path
