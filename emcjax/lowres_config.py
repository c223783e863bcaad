"""Settings of a low-resolution EMC run (``python -m emcjax.lowres``): :class:`LowresConfig` and its
multi-process part :class:`DistributedConfig`."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from emcjax import emc as emc_lib
from emcjax.demo import DemoConfig
from emcjax.errors import ConfigError


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
