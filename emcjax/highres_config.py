"""Settings of the high-resolution local update (``python -m emcjax.highres``): :class:`HighresConfig`."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated

from emcjax.errors import ConfigError


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
